"""The deterministic shard plan, and what a killed run left behind.

The input rows (files in sorted order) are cut into fixed ranges of ``shard_rows``;
shard i is always the same rows and is named ``part-{i:05d}.parquet``. The plan is
saved as ``_plan.json`` in the store directory by the first run and reused by reruns,
and copied into the manifest (each shard's ``source_rows``), which is what joins a
labels-only store back to its source. Shards are written under a temporary name and
renamed into place complete, so after ``kill -9`` only whole ``part-*`` files exist; a
rerun keeps those and writes the rest, and every (id, view) is in the store once.
"""

from __future__ import annotations

import json
import math
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from still.storage import Location
from teacher_infer import store as st

SHARD_INPUT_BYTES = 32 << 20
"""Decoded input bytes per shard when ``infer.shard_rows=0``."""


def file_rows(spec: Any, files: int | None = None) -> list[int]:
    """Rows of each of the dataset's files, or of its first ``files`` (footers only)."""
    fs, paths = spec.arrow_files()
    rows = []
    for path in paths[:files]:
        with fs.open_input_file(path) as handle:
            rows.append(pq.ParquetFile(handle).metadata.num_rows)
    return rows


def input_itemsize(spec: Any) -> int:
    """Bytes of one decoded input value (1 for images and uint8 features)."""
    if spec.image:
        return 1
    fs, paths = spec.arrow_files()
    with fs.open_input_file(paths[0]) as handle:
        kind = pq.ParquetFile(handle).schema_arrow.field(spec.feature_column).type
    if isinstance(kind, pa.BaseExtensionType):
        kind = kind.storage_type
    while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    return max(1, kind.bit_width // 8) if pa.types.is_primitive(kind) else 4


def make_plan(spec: Any, shard_rows: int, itemsize: int, num_cpus: int) -> dict[str, Any]:
    """Cuts the dataset (files in order) into shards of consecutive rows.

    Args:
        spec: The ``DatasetSpec``.
        shard_rows: Rows per shard; 0: at most :data:`SHARD_INPUT_BYTES` of decoded input
            each, at least two shards per CPU, and a multiple of ``num_cpus`` shards.
        itemsize: Bytes per decoded input value.
        num_cpus: CPUs of the cluster.

    Returns:
        ``{"shard_rows", "num_rows", "files": [...], "shards": [{"index", "rows",
        "pieces": [[file_index, start, stop], ...]}]}``.
    """
    counts = file_rows(spec)
    total = sum(counts)
    if shard_rows <= 0:
        # at most SHARD_INPUT_BYTES each, at least two per CPU, and a whole number of rounds
        # of the CPUs (5 shards on 2 CPUs leave one CPU idle for the last fifth of the run)
        per_row = max(1, math.prod(spec.input_shape) * itemsize)
        cpus = max(1, num_cpus)
        count = max(math.ceil(total / max(256, SHARD_INPUT_BYTES // per_row)), 2 * cpus)
        count = math.ceil(count / cpus) * cpus
        shard_rows = max(1, math.ceil(total / count))
    shards, start = [], 0
    while start < total:
        stop = min(start + shard_rows, total)
        pieces, offset = [], 0
        for file_index, n in enumerate(counts):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                pieces.append([file_index, lo - offset, hi - offset])
            offset += n
        shards.append({"index": len(shards), "rows": stop - start, "pieces": pieces})
        start = stop
    return {"shard_rows": shard_rows, "num_rows": total, "files": list(spec.files), "shards": shards}


def load_or_make_plan(spec: Any, store_dir: Location, key: str, shard_rows: int, itemsize: int,
                      num_cpus: Any) -> dict[str, Any]:
    """The plan a killed run saved for this key, else a new one (saved before any shard is written).

    Args:
        num_cpus: A callable giving the cluster's CPUs (only called for a new plan).
    """
    plan_loc = store_dir.join(st.PLAN_NAME)
    if plan_loc.exists():
        try:
            plan = plan_loc.read_json()
            if plan.get("key") == key and plan.get("num_rows") == spec.num_rows:
                return plan
        except (ValueError, OSError):
            pass
    plan = make_plan(spec, shard_rows, itemsize, num_cpus())
    plan["key"] = key
    plan_loc.write_atomic(json.dumps(plan).encode())
    return plan


def complete_shards(store_dir: Location, plan: dict[str, Any], views: int = 1) -> dict[int, dict[str, Any]]:
    """Shards already in place (from a killed run): readable, right row count, stats in the footer.

    A shard of a multi-view store holds ``views`` rows per planned (source) row.

    Anything else named ``part-*`` is deleted: it cannot be trusted and will be written again.
    """
    done: dict[int, dict[str, Any]] = {}
    if not store_dir.exists():
        return done
    expected = {st.shard_name(s["index"]): s for s in plan["shards"]}
    for path in store_dir.fs.glob(posixpath.join(store_dir.path, "part-*.parquet")):
        name = posixpath.basename(path)
        shard = expected.get(name)
        loc = store_dir.join(name)
        try:
            stats, rows = st.read_shard_stats(loc)
            ok = shard is not None and rows == shard["rows"] * views
        except Exception:  # an unreadable file cannot be trusted: write it again
            ok = False
        if ok:
            done[shard["index"]] = {"stats": stats}
        else:
            store_dir.fs.rm(loc.path)
    return done
