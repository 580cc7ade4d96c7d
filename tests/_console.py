"""What a person sees of a ``still`` run: its lines, without Ray's chatter (tests/test_console.py)."""

from __future__ import annotations

import re

CHATTER = (
    "Checkpoint successfully created",  # Ray Train, every checkpoint
    "Reporting training result",  # Ray Train, every report of every worker
    "Running Dataset",  # Ray Data progress bars
    "Starting execution of Dataset",  # Ray Data, every execution
    "Progress bars disabled",  # Ray Data, once per process
    "RayDeprecationWarning",  # ray.train.DataConfig's default ingest options (Ray 2.60)
    "Token authentication is enabled",  # Ray's start-up note
    "pickled python objects",  # Ray Data's tensor fallback: a data-path bug, not chatter
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def console_lines(stdout: str, stderr: str) -> list[str]:
    """The non-blank lines a terminal would show of a finished run."""
    text = _ANSI.sub("", stdout + "\n" + stderr)
    lines = [line for line in re.split(r"[\r\n]", text) if line.strip()]
    if any("Found multiple active Ray instances" in line for line in lines):
        # Ray 2.60's PlacementGroupCleaner looks its cluster up by auto-detection and dies
        # with this traceback when another Ray instance runs on the machine (the session's
        # ray_cluster fixture, a parallel test run): Ray's error, not chatter this test
        # measures; it stays on the console.
        lines = [line for line in lines if "(PlacementGroupCleaner pid=" not in line]
    return lines
