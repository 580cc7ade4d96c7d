"""Helpers the bench scripts share: synthetic Parquet data, a random teacher, ``still`` in a
subprocess with its peak memory, failures recorded, and the result saved as JSON with one
JSON line last on stdout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout ends with the result line."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def save_result(result: dict[str, Any], path: Path | None, shown: dict[str, Any] | None = None) -> None:
    """Writes ``result`` to ``path`` (unless None) and prints ``shown`` (default: ``result``) as one JSON line.

    Args:
        result: Everything measured.
        path: Where it goes (``bench/results/<name>.json``); None: not saved (quick runs).
        shown: What the last stdout line holds, when not all of ``result``.
    """
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result if shown is None else shown), flush=True)


def make_data(directory: Path, rows: int, classes: int = 10, files: int = 4, seed: int = 0,
              features: int = 784) -> Path:
    """Writes ``rows`` rows of (id, features uint8[``features``], label) as ``files`` Parquet files.

    Random features in 0..255 (a uint8 fixed-size list: still reads it as inputs of shape
    ``(features,)`` scaled by 1/255) and random labels in 0..classes-1; row groups of 10,000.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = -(-rows // files)
    for index, start in enumerate(range(0, rows, per_file)):
        stop = min(start + per_file, rows)
        table_rows = []
        for chunk in range(start, stop, 50_000):
            n = min(50_000, stop - chunk)
            x = rng.integers(0, 256, (n, features), dtype=np.uint8)
            table_rows.append(pa.table({
                "id": np.arange(chunk, chunk + n, dtype=np.int64),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), features),
                "label": rng.integers(0, classes, n).astype(np.int64),
            }))
        pq.write_table(pa.concat_tables(table_rows), directory / f"part-{index:03d}.parquet",
                       row_group_size=10_000, compression="zstd", compression_level=1)
    return directory


def make_teacher(path: Path, classes: int, width: int = 1200, features: int = 784, depth: int = 2) -> str:
    """Saves a randomly initialised (seed 0) MLP ``features``-width×depth-``classes`` as a still checkpoint."""
    import torch

    from still.checkpoints import save_checkpoint
    from still.models import build_model

    torch.manual_seed(0)
    args = {"input_shape": [features], "num_classes": classes, "width": width, "depth": depth}
    return save_checkpoint(str(path), build_model("mlp", **args), "mlp", args)


class PeakRss:
    """Samples the RSS (Linux ``VmRSS``) of one process and of every process below it; keeps the peaks.

    A ``still`` command with an embedded Ray starts the GCS and the raylet as its
    children, and the raylet starts the Ray workers, so the tree holds all of that
    command's Ray processes and none of another job's on the same machine.

    Attributes:
        driver: Peak bytes of the process itself.
        worker: Peak bytes of the largest Ray worker (``ray::…`` process title), its own
            child processes (a training worker's reader process) included.
        by_title: Peak bytes per Ray worker kind, keyed by the title up to the first
            ``.``, ``(`` or space (``ray::RayTrainWorker``, ``ray::ReadParquet``, …).
        anon_driver / anon_worker: The same peaks of ``RssAnon`` (private memory: not
            the object store's shared pages a worker has mapped).
        anon_by_title: Peak ``RssAnon`` per Ray worker kind.
    """

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.driver = self.worker = self.anon_driver = self.anon_worker = 0
        self.by_title: dict[str, int] = {}
        self.anon_by_title: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _memory(pid: int) -> tuple[int, int]:
        """(VmRSS, RssAnon) in bytes; zeros once the process is gone."""
        rss = anon = 0
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
        except OSError:
            pass
        return rss, anon

    def _children(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    # the parent pid is the 2nd field after the "(comm)" (which may hold spaces)
                    ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(proc.name))
        return children

    @staticmethod
    def _title(pid: int) -> str | None:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return command.split(b"\0", 1)[0].decode(errors="replace") if command.startswith(b"ray::") else None

    def sample(self) -> None:
        """Takes one sample of the whole tree.

        A Ray worker's own child processes (a training worker's forked reader process,
        which carries its title) count with it: their RSS is added to the worker's, an
        upper bound, since pages the two still share are counted twice.
        """
        rss, anon = self._memory(self.pid)
        self.driver, self.anon_driver = max(self.driver, rss), max(self.anon_driver, anon)
        children = self._children()
        todo = list(children.get(self.pid, []))
        while todo:
            pid = todo.pop()
            title = self._title(pid)
            if title is None:
                todo.extend(children.get(pid, []))
                continue
            rss, anon = self._memory(pid)
            below = list(children.get(pid, []))
            while below:
                child = below.pop()
                child_rss, child_anon = self._memory(child)
                rss, anon = rss + child_rss, anon + child_anon
                below.extend(children.get(child, []))
            self.worker, self.anon_worker = max(self.worker, rss), max(self.anon_worker, anon)
            for sep in ".( ":
                title = title.split(sep, 1)[0]
            self.by_title[title] = max(self.by_title.get(title, 0), rss)
            self.anon_by_title[title] = max(self.anon_by_title.get(title, 0), anon)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def mib(value: int | float) -> float:
    return round(value / 2**20, 1)


def run_still(args: list[str], timeout: float | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Runs ``python -m still_cli ARGS --json`` as a new process (its own embedded Ray), with its peak memory.

    Returns:
        ``summary`` (the command's last stdout line, parsed), ``seconds`` (wall time of
        the process), ``driver_mib`` / ``worker_mib`` (peak RSS of the process and of
        its largest Ray worker), ``anon_driver_mib`` / ``anon_worker_mib`` (the same of
        private memory), ``ray_mib`` and ``ray_anon_mib`` (peak RSS and private memory per Ray worker kind).

    Raises:
        RuntimeError: The command failed or timed out; the message ends with the last
            line of its stderr.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # this checkout's still, also where none is installed (a bare GPU node)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "still_cli", *args, "--json"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    with PeakRss(proc.pid) as rss:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            os.killpg(proc.pid, 9)  # the command and its embedded Ray (its own session)
            proc.communicate()
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise RuntimeError(f"still {args[0]} timed out after {timeout:.0f} s") from None
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"still {args[0]} failed: {error_line(stderr) or f'exit status {proc.returncode}'}")
    return {"summary": json.loads(stdout.strip().splitlines()[-1]), "seconds": seconds,
            "driver_mib": mib(rss.driver), "worker_mib": mib(rss.worker), "anon_driver_mib": mib(rss.anon_driver),
            "anon_worker_mib": mib(rss.anon_worker), "ray_mib": {k: mib(v) for k, v in sorted(rss.by_title.items())},
            "ray_anon_mib": {k: mib(v) for k, v in sorted(rss.anon_by_title.items())}}


def error_line(stderr: str) -> str:
    """The line of a failed command's stderr that says why: still's own ``still: error:`` line, else the
    last ``…Error: …`` / ``…Exception: …`` line (Ray's worker prefix and colours removed), else the last line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in stderr.splitlines()]
    lines = [re.sub(r"^\((?:[^()]|\([^()]*\))*\)\s*", "", line) for line in lines if line]
    for pattern in (r"^still: error: ", r"^[\w.]*(Error|Exception|Interrupt)\b.*?: "):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1]
    return lines[-1] if lines else ""


def attempt(name: str, errors: dict[str, str], measure: Callable[[], Any]) -> Any:
    """Runs one measurement; on failure records ``errors[name]`` = the error's last line and returns None."""
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - a bench records every failure and carries on
        lines = [line for line in str(exc).splitlines() if line.strip()]
        errors[name] = f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"
        log(f"{name} failed: {errors[name]}")
        return None
