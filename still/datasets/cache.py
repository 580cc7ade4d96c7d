"""The local dataset cache: Parquet parts plus a fingerprint.json, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CACHE_ENV = "STILL_CACHE_DIR"
INFO_FILE = "fingerprint.json"
ROWS_PER_FILE = 10_000
"""Rows per cached Parquet file: several files give Ray Data read parallelism."""


def cache_root() -> Path:
    """Returns ``$STILL_CACHE_DIR``, else ``~/.cache/still``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/still").expanduser()


def read_info(directory: Path) -> dict[str, Any] | None:
    """Returns a complete cache's fingerprint.json contents, or None when there is none."""
    info = directory / INFO_FILE
    return json.loads(info.read_text()) if info.is_file() else None


def part_files(directory: Path) -> tuple[str, ...]:
    """Returns the cache's Parquet files as sorted absolute paths."""
    return tuple(str(p) for p in sorted(directory.glob("part-*.parquet")))


def write_cache(parts: Iterable[pa.Table], directory: Path, info: dict[str, Any]) -> None:
    """Writes one Parquet file per table and ``info`` as fingerprint.json, atomically.

    Everything goes to a temporary sibling directory that is renamed into place when
    complete, so a killed build leaves no partial cache. When another process has
    finished the same cache first, its copy is kept.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        for index, table in enumerate(parts):
            pq.write_table(table, tmp / f"part-{index:05d}.parquet")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        tmp.chmod(0o755)
        try:
            os.rename(tmp, directory)
        except OSError:
            if read_info(directory) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def chunks(table: pa.Table, rows: int = ROWS_PER_FILE) -> Iterable[pa.Table]:
    """Yields consecutive slices of ``table`` of at most ``rows`` rows."""
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


def table_fingerprint(table: pa.Table) -> str:
    """Returns sha256 over a table's column names, types and values.

    Hashes the logical values rather than the Parquet bytes, so the same data gives
    the same fingerprint whatever pyarrow version or compression wrote the cache.
    """
    digest = hashlib.sha256()
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        digest.update(f"{name}:{column.type}\n".encode())
        while pa.types.is_fixed_size_list(column.type):
            column = column.flatten()
        values = column.to_numpy(zero_copy_only=False)
        if values.dtype != object:
            digest.update(values.tobytes())
        elif len(values) and isinstance(values[0], bytes):  # encoded images: length-prefixed
            for blob in values:
                digest.update(len(blob).to_bytes(8, "little") + blob)
        else:
            digest.update("\0".join(values).encode())
    return digest.hexdigest()
