"""Slimming a wheel: drop the files a run does not need and rewrite RECORD so pip installs it.

Ray's wheel is 79 MB, more than half of it files that still never uses on a GPU node:
its Java jars, the dashboard's web client and RLlib. :data:`RAY_DROP` names them.
"""

from __future__ import annotations

import base64
import csv
import fnmatch
import hashlib
import io
import zipfile
from pathlib import Path

# The dashboard *process* still starts (still's embedded cluster asks for it), and its
# HTTP server refuses to start without client/build/ and client/build/static/ on disk
# (ray/dashboard/http_server_head.py, setup_static_dir); so the page shell and its one
# stylesheet stay, and the scripts, source maps, fonts, images and profiler UI go.
RAY_DROP = (
    "ray/jars/*",                                   # Java workers (ray_dist.jar, 31 MB zipped)
    "ray/rllib/*",                                  # reinforcement learning
    "ray/dashboard/client/build/speedscope-*",      # the profiler's web UI
    "ray/dashboard/client/build/static/js/*",       # fnmatch's * also matches "/"
    "ray/dashboard/client/build/static/media/*",
    "ray/dashboard/client/build/static/css/*.map",
)


def record_hash(data: bytes) -> str:
    """The ``sha256=…`` field of a RECORD line (urlsafe base64, no padding, as PEP 376 wants)."""
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def slim_wheel(source: Path, dest: Path, drop: tuple[str, ...]) -> dict[str, int]:
    """Copies wheel ``source`` to ``dest`` without the members matching ``drop``; RECORD rewritten.

    Every kept member keeps its ``ZipInfo`` (so executables such as Ray's ``raylet``
    keep their mode bits) and its bytes; RECORD lists exactly the kept files.

    Args:
        source: The wheel as downloaded.
        dest: Where the slim wheel goes (same file name, so pip still reads its tags).
        drop: ``fnmatch`` patterns of member names to leave out.

    Returns:
        ``{"files_kept", "files_dropped", "bytes_before", "bytes_after"}`` (file sizes).

    Raises:
        ValueError: ``source`` has no ``*.dist-info/RECORD``, or a pattern matched nothing
            (the wheel's layout changed: the list needs a look).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    matched = dict.fromkeys(drop, 0)
    kept: list[tuple[str, str, int]] = []
    with zipfile.ZipFile(source) as zin:
        # the wheel's own RECORD (vendored packages inside it carry theirs, further down)
        records = [name for name in zin.namelist() if name.count("/") == 1 and name.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise ValueError(f"{source.name}: expected one *.dist-info/RECORD, found {len(records)}")
        record_name = records[0]
        dropped = 0
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                hits = [pattern for pattern in drop if fnmatch.fnmatchcase(info.filename, pattern)]
                for pattern in hits:
                    matched[pattern] += 1
                if hits:
                    dropped += 1
                    continue
                if info.filename == record_name or info.is_dir():
                    continue
                data = zin.read(info)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
                kept.append((info.filename, record_hash(data), len(data)))
            unmatched = [pattern for pattern, count in matched.items() if not count]
            if unmatched:
                raise ValueError(f"{source.name}: no member matches {unmatched}; update the drop list")
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerows(kept)
            writer.writerow((record_name, "", ""))
            zout.writestr(zin.getinfo(record_name), buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(dest)
    return {"files_kept": len(kept), "files_dropped": dropped, "bytes_before": source.stat().st_size,
            "bytes_after": dest.stat().st_size}
