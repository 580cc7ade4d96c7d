"""Finding Ray Train's worker processes from outside, as an operator would: by process title."""

from __future__ import annotations

import os

TRAIN_WORKER_TITLE = b"ray::RayTrainWorker"


def train_worker_pids() -> set[int]:
    """Pids of the live Ray Train worker processes on this machine (Ray titles them ``ray::RayTrainWorker…``)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if handle.read().startswith(TRAIN_WORKER_TITLE):
                    pids.add(int(entry))
        except OSError:
            continue
    return pids
