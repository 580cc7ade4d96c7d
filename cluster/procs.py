"""Finding and stopping exactly the processes a local cluster started (Linux ``/proc``).

``ray stop`` stops every Ray process of the user, including a test's embedded cluster or
another engineer's; here a node is the ``ray start --block`` process we spawned in a new
session, and everything in that session or descended from it. Ray's job supervisor starts
each job driver in a session of its own, so descendants are followed by parent pid too.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    name: str
    state: str
    start_ticks: int


def read_proc(pid: int) -> Proc | None:
    """Returns the process ``pid``, or None when it is gone (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    name = stat[stat.find("(") + 1 : stat.rfind(")")]
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return Proc(pid, int(fields[1]), int(fields[3]), name, fields[0], int(fields[19]))


def process_table() -> dict[int, Proc]:
    """Every live process on the machine, by pid."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = read_proc(int(entry))
            if proc is not None:
                table[proc.pid] = proc
    return table


def start_ticks(pid: int) -> int:
    """The start time of ``pid`` in clock ticks since boot (0 when gone): with the pid, an
    identity that survives pid reuse."""
    proc = read_proc(pid)
    return proc.start_ticks if proc else 0


def is_same_process(pid: int, ticks: int) -> bool:
    """True when ``pid`` is alive and is the process that was recorded with ``ticks``."""
    return pid > 0 and start_ticks(pid) == ticks


def tree(roots: dict[int, int], table: dict[int, Proc] | None = None) -> set[int]:
    """The processes started by ``roots`` (pid -> start ticks): each root still alive, every
    process in a root's session, and all their descendants.

    A root whose pid now belongs to another process is ignored, and so is its session
    unless some member of it is a descendant of a verified root.
    """
    table = table if table is not None else process_table()
    sessions = set(roots)
    found = {pid for pid, ticks in roots.items() if pid in table and table[pid].start_ticks == ticks}
    for pid in roots:
        if pid in table and pid not in found and table[pid].sid == pid:
            sessions.discard(pid)  # the pid was reused by a new session leader
    found |= {p.pid for p in table.values() if p.sid in sessions}
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return found


def terminate(pids: set[int], grace_s: float = 3.0) -> set[int]:
    """SIGTERM ``pids``, SIGKILL whatever is left after ``grace_s``; returns the pids
    signalled. Waits until all of them are gone (or 10 s more)."""
    signalled = set()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            signalled.add(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(read_proc(p) for p in signalled):
        time.sleep(0.1)
    for pid in signalled:
        if read_proc(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(read_proc(p) for p in signalled):
        time.sleep(0.1)
    return signalled
