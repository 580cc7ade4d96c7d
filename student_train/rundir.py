"""One run at a time in a run's folder: a second run of the same name is refused, not interleaved.

Two ``still train`` runs of one config share a name, hence an output folder
(``runs/<name>``) and a checkpoint folder; before this, the second one deleted the
first one's checkpoints as it started. :func:`claim_run_directory` takes an exclusive
``flock`` on ``<output_dir>/.still-run.lock`` for the run's whole length: a second run
of that name on this machine fails at once, naming the folder, the key to change and
the process that holds it, and touches nothing. The lock is released by the kernel when
the holder exits, however it exits (``kill -9`` included), so a stale lock never
blocks a later run; only then are an earlier run's checkpoints dropped (a fresh run
of the same name) or continued (``train.resume=true``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Iterator

from still.errors import StillError

LOCK_NAME = ".still-run.lock"


@contextlib.contextmanager
def claim_run_directory(output_dir: Path, checkpoints: Path, *, resume: bool, name: str) -> Iterator[None]:
    """Holds ``output_dir`` for one run; drops an earlier run's ``checkpoints`` unless resuming.

    Args:
        output_dir: The run's folder (created if needed).
        checkpoints: The run's checkpoint folder inside it.
        resume: Keep the checkpoints (``train.resume=true``).
        name: The run name, for the message.

    Raises:
        StillError: Another process holds the folder: a run of the same name is under way.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StillError(
                f"run {name!r} is already running in {output_dir} ({holder}); this run was refused and touched "
                "nothing of it. Wait for it to end, or give this run its own train.name (or train.output_dir)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        if not resume and checkpoints.exists():
            shutil.rmtree(checkpoints)  # a fresh run of the same name: drop the old run's checkpoints
        yield
    finally:
        handle.close()  # releases the lock
