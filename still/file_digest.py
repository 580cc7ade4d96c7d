"""sha256 of local files, computed once per version of a file in a process.

Language-model fingerprints hash whole weight files (a 98 MB GGUF takes ~0.1 s to
hash here, a multi-GB checkpoint seconds). A file is identified by its resolved path,
size and modification time (ns): while none of them changes, its digest is reused; a
rewritten file gets a new mtime and is hashed again.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The sha256 hex digest of a local file's bytes, cached per (path, size, mtime).

    Args:
        path: A local file.

    Raises:
        FileNotFoundError: The file does not exist (callers check files first).
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _digest(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime_ns are the cache key: a changed file is a new entry
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
