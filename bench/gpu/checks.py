"""Runs still's GPU checks one after another, each time-boxed, and writes what each found into one folder.

    python bench/gpu/checks.py --out "$OUT"                      # on a GPU node (run.sh calls it)
    python bench/gpu/checks.py --cpu --out /tmp/gpu-cpu --wheels .whl-cpu [--py312 PYTHON]

Steps, in order; a failed or timed-out step is recorded and the next one still runs:

- ``install``: the carried wheels into a fresh folder (``pip install --no-index --no-deps
  --target``), put first on ``PYTHONPATH`` for every later step; the node's torch stays;
- ``env``: ``env_check.py``: versions, requirements, CUDA, Ray started as still starts it;
- ``infer``: ``bench/gpu_infer.py``: ``still infer`` (streaming plan, teacher actor on the
  GPU) against a plain CUDA loop;
- ``train``: ``bench/gpu_train.py``: ``still train`` on the GPU from a top-k store (memory
  ingest, **streamed ingest**, in process, resume) against a plain CUDA loop;
- with ``--py312`` (``--cpu`` here): ``install_cp312`` and ``env_cp312``: the cp312 wheels
  of ``.whl/``, the very files that travel, installed by that Python 3.12 and Ray started.

Each step gets ``min(its own limit, what is left of --budget)``; one whose limit would be
under 10 s is skipped. ``--cpu`` runs the same steps at small sizes on the CPU.

Written into ``--out``: ``gpu_checks.json`` (every step: ok, exit status, seconds, its
JSON result), ``gpu_infer.json`` and ``gpu_train.json`` (the benches' own), and
``logs.tar.gz`` (each step's stdout and stderr, and each ``still`` run's of gpu_train).
Progress goes to stderr; the last stdout line is the summary. Exit status 1 if any
step failed, 2 (nothing run) when ``--wheels`` holds no wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MIN_STEP_S = 10.0


@dataclass(frozen=True)
class Step:
    """One check: its command (run from the repository root), its own time limit, and the folder of
    installed wheels its ``PYTHONPATH`` starts with."""

    name: str
    command: list[str]
    limit_s: float
    site: Path


def log(message: str) -> None:
    print(f"[gpu-checks] {message}", file=sys.stderr, flush=True)


def install_command(python: str, wheels: Path, site: Path) -> list[str]:
    """The install of the device README: every wheel of ``wheels`` into ``site``, no index, no dependencies."""
    return [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
            "--upgrade", "--target", str(site), *sorted(str(p) for p in wheels.glob("*.whl"))]


def plan(args: argparse.Namespace, work: Path, out: Path) -> list[Step]:
    """The steps of this mode, in order."""
    python, wheels, site = sys.executable, Path(args.wheels).resolve(), work / "site"
    requirements = str(wheels / "node-requirements.json")
    if args.cpu:
        infer = ["--device", "cpu", "--step-timeout", "180"]
        train = ["--device", "cpu", "--rows", "20000", "--budget", "400", "--step-timeout", "120"]
        limits = {"infer": 240, "train": 420}
    else:
        infer = ["--rows", "16384", "--step-timeout", "150"]
        train = ["--rows", "1000000", "--budget", "245", "--step-timeout", "80"]
        limits = {"infer": 210, "train": 260}
    bench = ROOT / "bench"
    steps = [
        Step("install", install_command(python, wheels, site), 120, site),
        Step("env", [python, str(HERE / "env_check.py"), "--site", str(site), "--requirements", requirements],
             120, site),
        Step("infer", [python, str(bench / "gpu_infer.py"), *infer, "--out", str(out / "gpu_infer.json")],
             limits["infer"], site),
        Step("train", [python, str(bench / "gpu_train.py"), *train, "--work", str(work / "train"),
                       "--out", str(out / "gpu_train.json")], limits["train"], site),
    ]
    if args.py312:
        wheels312, site312 = (ROOT / ".whl").resolve(), work / "site312"
        steps += [
            Step("install_cp312", install_command(args.py312, wheels312, site312), 120, site312),
            Step("env_cp312", [args.py312, str(HERE / "env_check.py"), "--site", str(site312), "--requirements",
                               str(wheels312 / "node-requirements.json")], 120, site312),
        ]
    return steps


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (from ``/proc``), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:  # the parent pid is the 2nd field after "(comm)", which may hold spaces
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def kill_tree(pid: int) -> None:
    """Kills the process groups of ``pid`` and of everything below it: the benches start each ``still``
    command in a session of its own (so they can kill its Ray), which killing ours alone would miss."""
    groups = set()
    for member in process_tree(pid):
        try:
            groups.add(os.getpgid(member))
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_step(step: Step, timeout: float, env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Runs ``step`` in its own session (a timeout kills Ray's processes with it); its last stdout line as JSON."""
    stdout, stderr = logs / f"{step.name}.stdout", logs / f"{step.name}.stderr"
    log(f"{step.name}: starting (limit {timeout:.0f} s)")
    started = time.perf_counter()
    timed_out = False
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_tree(proc.pid)  # also what it left running (Ray's GCS, raylet, workers)
            proc.wait()
    record: dict[str, Any] = {"ok": not timed_out and proc.returncode == 0, "rc": proc.returncode,
                              "wall_s": round(time.perf_counter() - started, 1), "limit_s": round(timeout),
                              "timed_out": timed_out, "result": None}
    lines = stdout.read_text(errors="replace").strip().splitlines()
    if lines:
        try:
            record["result"] = json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if not record["ok"]:
        tail = [line[:300] for line in stderr.read_text(errors="replace").splitlines() if line.strip()][-5:]
        record["error"] = (f"timed out after {timeout:.0f} s" if timed_out else
                           reason(record["result"] or {}) or (tail[-1] if tail else f"exit {proc.returncode}"))
        record["stderr_tail"] = tail
    log(f"{step.name}: {'ok' if record['ok'] else 'FAILED: ' + record['error']} in {record['wall_s']} s")
    return record


def reason(result: dict[str, Any]) -> str:
    """Why a check's own JSON says it failed: env's ``problems``, gpu_infer's ``errors``, gpu_train's ``failed``."""
    if result.get("errors"):
        return "; ".join(f"{name}: {error}" for name, error in result["errors"].items())
    if result.get("problems"):
        return "; ".join(result["problems"])
    steps = result.get("steps") or {}
    return "; ".join(f"{name}: {steps.get(name, {}).get('error')}" for name in result.get("failed") or [])


def failures(records: dict[str, dict[str, Any]]) -> list[str]:
    """The failed steps, and within a bench that failed, its failed parts (``train.stream``)."""
    failed = []
    for name, record in records.items():
        if not record["ok"]:
            parts = (record.get("result") or {}).get("failed") or list((record.get("result") or {}).get("errors") or [])
            failed += [f"{name}.{part}" for part in parts] or [name]
    return failed


def save_logs(work: Path, out: Path) -> None:
    """Every step's stdout/stderr and gpu_train's per-run logs, as one archive (the device tool brings back 8 files)."""
    with tarfile.open(out / "logs.tar.gz", "w:gz") as archive:
        for folder, name in ((work / "logs", "steps"), (work / "train" / "logs", "train")):
            if folder.is_dir():
                archive.add(folder, arcname=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the folder for the JSON and logs ($OUT on a device machine)")
    parser.add_argument("--cpu", action="store_true", help="the same steps on the CPU, small sizes")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"), help="the wheels to install (default .whl/)")
    parser.add_argument("--py312", default="", help="also install .whl/ with this Python 3.12 and start Ray there")
    parser.add_argument("--budget", type=float, default=0, help="seconds for all steps (default 510; cpu 1500)")
    args = parser.parse_args(argv)
    budget = args.budget or (1500.0 if args.cpu else 510.0)
    if not any(Path(args.wheels).glob("*.whl")):
        print(f"checks: no wheels in {args.wheels}: run python bench/gpu/prepare.py where pip reaches an index, "
              "and carry .whl", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="still-gpu-checks-"))
    logs = work / "logs"
    logs.mkdir()
    started = time.monotonic()
    records: dict[str, dict[str, Any]] = {}
    for step in plan(args, work, out):
        left = budget - (time.monotonic() - started)
        timeout = min(step.limit_s, left)
        if timeout < MIN_STEP_S:
            records[step.name] = {"ok": False, "skipped": True, "error": "skipped: the time budget is spent"}
            log(f"{step.name}: skipped, {left:.0f} s left")
            continue
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
        env.update(PYTHONPATH=os.pathsep.join([str(step.site), str(ROOT)]), PYTHONUNBUFFERED="1")
        records[step.name] = run_step(step, timeout, env, logs)
    save_logs(work, out)
    shutil.rmtree(work, ignore_errors=True)
    failed = failures(records)
    summary = {"checks": "gpu", "mode": "cpu" if args.cpu else "gpu", "ok": not failed, "failed": failed,
               "wall_s": round(time.monotonic() - started, 1), "budget_s": budget, "steps": records}
    (out / "gpu_checks.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({key: summary[key] for key in ("checks", "mode", "ok", "failed", "wall_s")}), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
