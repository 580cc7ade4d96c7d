"""GPU benchmark: ``still train`` on one GPU from a top-k store vs a plain CUDA loop, and a resume.

    python bench/gpu_train.py                 # 1M rows x 32 features; not yet run on a GPU (a few minutes expected)
    python bench/gpu_train.py --device cpu    # smoke run: the same steps on the CPU, small sizes, not saved

Same data: ``--rows`` synthetic rows of 32 float32 features and 10 classes in Parquet
(id, features, label; splits by id hash, so 80% train), labels drawn from
softmax(x·W). The teacher is that generating model (a TorchScript ``nn.Linear``; its
softmax is the labels' distribution), so no teacher needs training. ``still infer``
writes a self-contained top-5 store of it on the CPUs (``--infer-gpus 1``: on the GPU).
Same student everywhere: ``still.models`` mlp, width 256, depth 2, batch 4096, Adam.

    (1) ray_1w      still train scaling.num_workers=1 scaling.use_gpu=true (a TorchTrainer;
                    train.ingest=auto holds this store's rows in memory, on the device)
    (2) stream      (1) with train.ingest=stream: Ray Data streams the store's shards to
                    the worker through the shuffle buffer on the GPU
    (3) in_process  still train scaling.num_workers=0 scaling.use_gpu=true (no TorchTrainer)
    (4) plain       one process: the store's train rows as CUDA tensors, CE, one epoch
                    timed after a warm-up, torch.cuda.synchronize() around it
    (5) resume      still train (as 1) for 2 epochs, then the same command with
                    train.epochs=3 train.resume=true: the summary must say resumed_from 2,
                    epochs 3, and the run must have used the GPU

(1), (2), (3) and (5) run the ``still`` CLI in a subprocess (``--json``; the public path,
so internal changes do not break this script), each under a timeout. Their samples/s is
the loop's own (``history[i]["samples_per_s"]``, training steps only); one epoch of (1)
to (3) includes CUDA warm-up, so ``samples_per_s_warm`` also gives epoch 2 of (5)'s
first run. ``ratio`` is still samples/s ÷ plain samples/s. Whether a run used the GPU
comes from the summary's ``device`` key when it has one, else from ``nvidia-smi``
sampled every 0.5 s during the run (GPU memory in use rising ≥ 256 MiB, or a compute
process appearing). A failed step is recorded (``error``: the last stderr line) and
the others still run; the exit status is 1 if any failed. Without CUDA it prints
``{"skipped": ...}`` and exits 0. The last stdout line is one JSON object, saved to
``bench/results/gpu_train.json`` (the ``--device cpu`` smoke run saves nothing unless
``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import save_result  # bench/common.py: these scripts run as python bench/<name>.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "gpu_train.json"
TOPK = 5
MEM_RISE_MIB = 256  # GPU memory a CUDA context plus a small student surely takes


def log(message: str) -> None:
    print(f"[gpu-train-bench] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data and teacher


def make_data(directory: Path, rows: int, features: int, classes: int, files: int = 8) -> np.ndarray:
    """Writes ``rows`` float32 rows as Parquet (id, features, label); returns the teacher's logit weights.

    x ~ N(0, 1); labels ~ softmax(x·W) with W ~ N(0, 3/√features) (Gumbel-max), so the
    best possible classifier is the linear teacher W itself (Bayes accuracy about 0.66).
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((features, classes)) * 3 / np.sqrt(features)).astype(np.float32)
    per_file = -(-rows // files)
    for index, start in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - start)
        x = rng.standard_normal((n, features), dtype=np.float32)
        labels = np.argmax(x @ weights + rng.gumbel(size=(n, classes)), axis=1).astype(np.int64)
        table = pa.table({"id": np.arange(start, start + n, dtype=np.int64),
                          "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), features),
                          "label": labels})
        pq.write_table(table, directory / f"part-{index:03d}.parquet", row_group_size=65_536)
    return weights


def make_teacher(path: Path, weights: np.ndarray) -> str:
    """The generating model as a TorchScript ``nn.Linear`` (a user's own teacher file)."""
    import torch

    features, classes = weights.shape
    linear = torch.nn.Linear(features, classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weights.T.copy()))
        linear.bias.zero_()
    torch.jit.script(linear.eval()).save(str(path))
    return str(path)


# --------------------------------------------------------------------------- GPU evidence


class GpuWatch:
    """Samples ``nvidia-smi`` every 0.5 s while in the block: utilisation, memory in use, compute processes.

    ``used`` is True when memory in use rose by ≥ MEM_RISE_MIB over the value before the
    block or a compute process appeared; None when nothing could be sampled.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.util: list[float] = []
        self.memory: list[float] = []
        self.apps: list[int] = []
        self.baseline: tuple[float, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "GpuWatch":
        if self.enabled:
            self.baseline = self._sample()
            self._thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    @staticmethod
    def _query(args: list[str]) -> list[str] | None:
        try:
            done = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return [line for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else None

    def _sample(self) -> tuple[float, int] | None:
        gpu = self._query(["--query-gpu=utilization.gpu,memory.used", "--id=0"])
        apps = self._query(["--query-compute-apps=pid"])
        try:
            util, memory = (float(v) for v in gpu[0].split(",")) if gpu else (None, None)
        except ValueError:  # "[N/A]" on some boards
            return None
        if memory is None:
            return None
        self.util.append(util)
        return memory, len(apps or [])

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            sample = self._sample()
            if sample is not None:
                self.memory.append(sample[0])
                self.apps.append(sample[1])

    def report(self) -> dict[str, Any]:
        if not self.enabled or self.baseline is None:
            return {"used": None, "why": "nvidia-smi not available"}
        base_memory, base_apps = self.baseline
        rise = max(self.memory, default=base_memory) - base_memory
        apps = max(self.apps, default=base_apps) - base_apps
        return {"used": bool(rise >= MEM_RISE_MIB or apps > 0), "mem_rise_mib": round(rise),
                "new_compute_apps": apps, "util_mean": round(sum(self.util) / len(self.util), 1) if self.util else None,
                "util_max": max(self.util, default=None), "samples": len(self.memory)}


# --------------------------------------------------------------------------- the still CLI


class Budget:
    """A wall-clock deadline shared by all steps; each subprocess gets min(step timeout, time left)."""

    def __init__(self, seconds: float, step_timeout: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.step_timeout = step_timeout

    def timeout(self) -> float:
        return min(self.step_timeout, self.deadline - time.monotonic())


def still_cli(verb: str, overrides: list[str], work: Path, name: str, budget: Budget,
              watch_gpu: bool) -> dict[str, Any]:
    """Runs ``python -m still_cli VERB OVERRIDES --json`` in ``work`` under a timeout.

    Returns:
        ``{"ok", "wall_s", "summary" (the last stdout line parsed, or None), "gpu",
        "error" and "stderr_tail" (when not ok)}``; stdout/stderr kept in ``work/logs``.
    """
    timeout = budget.timeout()
    if timeout < 15:
        return {"ok": False, "wall_s": 0.0, "summary": None, "error": "skipped: the time budget is spent"}
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "STILL_CACHE_DIR": str(work / "cache"), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "still_cli", verb, *overrides, "--json"]
    log(f"{name}: still {verb} {' '.join(overrides)} (timeout {timeout:.0f}s)")
    started = time.perf_counter()
    timed_out = False
    with open(logs / f"{name}.stdout", "w") as out, open(logs / f"{name}.stderr", "w") as err, \
            GpuWatch(watch_gpu) as watch:
        # Its own session, so a timeout kills the embedded Ray cluster it started too.
        proc = subprocess.Popen(command, cwd=work, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    wall = round(time.perf_counter() - started, 2)
    stdout = (logs / f"{name}.stdout").read_text(errors="replace").strip().splitlines()
    stderr = [line for line in (logs / f"{name}.stderr").read_text(errors="replace").splitlines() if line.strip()]
    summary = None
    if stdout:
        try:
            summary = json.loads(stdout[-1])
        except json.JSONDecodeError:
            summary = None
    result: dict[str, Any] = {"ok": not timed_out and proc.returncode == 0 and isinstance(summary, dict),
                              "rc": proc.returncode, "wall_s": wall, "summary": summary}
    if watch_gpu:
        result["gpu"] = watch.report()
    if not result["ok"]:
        last = stderr[-1] if stderr else (stdout[-1] if stdout else "")
        result["error"] = f"timed out after {timeout:.0f}s" if timed_out else (last[:500] or f"exit {proc.returncode}")
        result["stderr_tail"] = [line[:300] for line in stderr[-3:]]
    log(f"{name}: {'ok' if result['ok'] else 'FAILED: ' + result['error']} in {wall}s")
    return result


def throughput(history: list[dict[str, Any]]) -> float | None:
    """Samples/s over the given epochs (training steps only, the loop's own timing)."""
    seconds = sum(float(h.get("epoch_s") or 0) for h in history)
    samples = sum(float(h.get("samples_per_s") or 0) * float(h.get("epoch_s") or 0) for h in history)
    return round(samples / seconds, 1) if seconds > 0 else None


def ran_on_gpu(run: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether a run used the GPU, and how that was decided."""
    summary = run.get("summary") or {}
    history = summary.get("history") or [{}]
    for where, holder in (("summary", summary), ("history", history[-1])):
        device = holder.get("device")
        if isinstance(device, str) and device:
            return device.startswith("cuda"), f"{where}.device={device}"
    gpu = run.get("gpu") or {}
    if gpu.get("used") is None:
        return None, "no device key in the summary and no nvidia-smi"
    return gpu["used"], (f"nvidia-smi: memory +{gpu['mem_rise_mib']} MiB, "
                         f"{gpu['new_compute_apps']} new compute process(es)")


def train_step(label: str, overrides: list[str], work: Path, budget: Budget, cuda: bool) -> dict[str, Any]:
    """One ``still train`` run (logs under ``label``), summarised: samples/s, epochs, resume point, device."""
    run = still_cli("train", overrides, work, label, budget, watch_gpu=cuda)
    summary = run.pop("summary") or {}
    history = summary.get("history") or []
    step: dict[str, Any] = {"ok": run["ok"], "wall_s": run["wall_s"]}
    if run["ok"]:
        gpu_used, how = ran_on_gpu({**run, "summary": summary})
        step.update({
            "seconds": summary.get("seconds"), "samples_per_s": throughput(history),
            "samples_per_s_by_epoch": [round(float(h.get("samples_per_s") or 0), 1) for h in history],
            "epoch_s": [round(float(h.get("epoch_s") or 0), 3) for h in history],
            "epochs": summary.get("epochs"), "resumed_from": summary.get("resumed_from"), "ingest": summary.get("ingest"),
            "test_accuracy": summary.get("student_test_accuracy"), "world_size": (history[-1:] or [{}])[0].get(
                "world_size"), "ran_on_gpu": gpu_used if cuda else False, "device_evidence": how if cuda else "cpu run",
        })
        if cuda and gpu_used is False:
            step["ok"] = False
            step["error"] = f"scaling.use_gpu=true but the run did not use the GPU ({how})"
    else:
        step.update({k: run[k] for k in ("rc", "error", "stderr_tail") if k in run})
    if "gpu" in run:
        step["gpu"] = run["gpu"]
    return step


# --------------------------------------------------------------------------- the plain loop


def plain_loop(store: str, family: str, width: int, depth: int, batch_size: int, device: str,
               lr: float, warmup_steps: int = 20) -> dict[str, Any]:
    """One epoch of CE over the store's train rows, held as tensors on ``device``.

    Reads the store's shards with pyarrow (``input``, ``label``, ``split``; the teacher
    columns are not needed for CE), scales the inputs as the manifest says, trains the
    same ``still.models`` student with Adam. ``warmup_steps`` steps first (CUDA/cuBLAS
    initialisation, allocator), then one timed epoch with a synchronize on each side.
    """
    import torch

    from still.models import build_model

    manifest = json.loads((Path(store) / "manifest.json").read_text())
    shape = list(manifest["preprocessing"]["input_shape"])
    scale = float(manifest["preprocessing"].get("input_scale") or 1.0)
    table = pq.read_table(sorted(str(p) for p in Path(store).glob("part-*.parquet")),
                          columns=["input", "label", "split"])
    train = table.filter(pc.equal(table["split"], 0))
    flat = train["input"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    x = torch.from_numpy(flat.astype(np.float32).reshape(train.num_rows, *shape)).to(device) * scale
    y = torch.from_numpy(train["label"].to_numpy()).to(device)
    torch.manual_seed(0)
    model = build_model(family, input_shape=shape, num_classes=int(manifest["num_classes"]), width=width,
                        depth=depth).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # as the still runs of the smoke mode (scaling.cpus_per_worker=1)

    def step(index: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(warmup_steps):
        step(torch.randint(0, len(y), (batch_size,), device=device, generator=generator))
    sync()
    started = time.perf_counter()
    order = torch.randperm(len(y), device=device, generator=generator)
    for start in range(0, len(y), batch_size):
        loss = step(order[start : start + batch_size])
    sync()
    seconds = time.perf_counter() - started
    return {"ok": True, "rows": len(y), "epoch_s": round(seconds, 3), "samples_per_s": round(len(y) / seconds, 1),
            "final_loss": round(loss.item(), 4), "warmup_steps": warmup_steps}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: a smoke run of the same steps on the CPU (small defaults, nothing saved)")
    parser.add_argument("--rows", type=int, default=0, help="default 1,000,000 (cuda), 20,000 (cpu)")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=0, help="default 4096 (cuda), 1024 (cpu)")
    parser.add_argument("--infer-gpus", type=float, default=0.0, help="infer.num_gpus of the store's still infer")
    parser.add_argument("--step-timeout", type=float, default=180.0, help="seconds per still subprocess")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything (steps then skipped)")
    parser.add_argument("--work", default="", help="keep data, store, runs and logs here (default: a temp dir)")
    parser.add_argument("--out", default="", help=f"result JSON (default {RESULTS.relative_to(ROOT)}; cpu: none)")
    args = parser.parse_args(argv)
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu_train", "skipped": "no CUDA device"}))
        return 0
    rows = args.rows or (1_000_000 if cuda else 20_000)
    batch = args.batch_size or (4096 if cuda else 1024)
    out = Path(args.out) if args.out else (RESULTS if cuda else None)
    lr = 1e-3
    started = time.perf_counter()
    budget = Budget(args.budget, args.step_timeout)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="still-gpu-train-"))
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict[str, Any]] = {}
    try:
        log(f"{rows} rows x {args.features} float32 features, {args.classes} classes into {work}")
        data_started = time.perf_counter()
        weights = make_data(work / "data", rows, args.features, args.classes)
        teacher = make_teacher(work / "teacher.pt", weights)
        steps["data"] = {"ok": True, "wall_s": round(time.perf_counter() - data_started, 2)}

        infer = still_cli("infer", [
            f"data.source={work / 'data'}", f"teacher.uri={teacher}", f"store.root={work / 'stores'}",
            "store.mode=topk", f"store.k={TOPK}", "store.include_inputs=true", f"infer.num_gpus={args.infer_gpus:g}",
            "tracking.enabled=false"], work, "infer", budget, watch_gpu=False)
        isum = infer.pop("summary") or {}
        steps["infer"] = {k: v for k, v in infer.items() if k != "gpu"}
        store = isum.get("store", "")
        if infer["ok"]:
            steps["infer"].update({key: isum.get(key) for key in ("rows", "seconds", "teacher_accuracy",
                                                                  "bytes_per_row")})
            log(f"store {store}")

        student = ["student.family=mlp", f"student.width={args.width}", f"student.depth={args.depth}",
                   f"train.batch_size={batch}", f"train.lr={lr:g}", "train.seed=0", "kd.temperature=4",
                   "kd.weight=0.5", f"scaling.use_gpu={'true' if cuda else 'false'}", "tracking.enabled=false"]
        if not cuda:  # one torch thread on the CPU everywhere (a small box's cores are often contended)
            student.append("scaling.cpus_per_worker=1")

        def train(name: str, extra: list[str], label: str = "") -> dict[str, Any]:
            if not store:
                return {"ok": False, "error": "skipped: no store (still infer failed)"}
            overrides = [f"store.uri={store}", *student, f"train.output_dir={work / 'runs' / name}",
                         f"train.name={name}", *extra]
            return train_step(label or name, overrides, work, budget, cuda)

        steps["ray_1w"] = train("ray_1w", ["scaling.num_workers=1", "train.epochs=1"])
        steps["stream"] = stream = train("stream", ["scaling.num_workers=1", "train.epochs=1", "train.ingest=stream"])
        if stream["ok"] and stream.get("ingest") not in (None, "stream"):
            stream.update(ok=False, error=f"train.ingest=stream, but the summary says ingest={stream['ingest']}")
        steps["in_process"] = train("in_process", ["scaling.num_workers=0", "train.epochs=1"])
        in_proc = steps["in_process"]
        if not in_proc["ok"] and in_proc.get("rc") == 2 and "still: error" in in_proc.get("error", ""):
            # The config refused num_workers=0 with use_gpu=true: a finding, not a failure.
            in_proc.update(ok=True, refused=in_proc.pop("error"))
        log(f"plain {'CUDA' if cuda else 'CPU'} loop")
        try:
            if not store:
                raise RuntimeError("skipped: no store (still infer failed)")
            steps["plain"] = plain_loop(store, "mlp", args.width, args.depth, batch, "cuda" if cuda else "cpu", lr)
            log(f"plain: {steps['plain']}")
        except Exception as exc:  # noqa: BLE001 - recorded in the result, the script goes on
            steps["plain"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
            log(f"plain: FAILED: {steps['plain']['error']}")

        first = train("resume", ["scaling.num_workers=1", "train.epochs=2"], "resume-1")
        second = train("resume", ["scaling.num_workers=1", "train.epochs=3", "train.resume=true"], "resume-2") \
            if first["ok"] else {"ok": False, "error": "skipped: the first run failed"}
        resumed_ok = bool(second["ok"] and second.get("resumed_from") == 2 and second.get("epochs") == 3
                          and (not cuda or second.get("ran_on_gpu") is not False))
        steps["resume"] = {"ok": resumed_ok, "resumed_ok": resumed_ok, "first": first, "second": second}
        if not resumed_ok and "error" not in second and second["ok"]:
            steps["resume"]["error"] = (f"resumed_from={second.get('resumed_from')} epochs={second.get('epochs')}, "
                                        "expected 2 and 3")
    except Exception as exc:  # noqa: BLE001 - data or teacher generation: nothing else can run
        steps["data"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
        log(f"FAILED: {steps['data']['error']}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    plain_sps = steps.get("plain", {}).get("samples_per_s")
    sps = {name: steps[name].get("samples_per_s") for name in ("ray_1w", "stream", "in_process", "plain")
           if name in steps}
    resume_first = steps.get("resume", {}).get("first", {}).get("samples_per_s_by_epoch") or []
    warm = {"ray_1w_epoch2": resume_first[1] if len(resume_first) > 1 else None}
    failed = [name for name, step in steps.items() if not step.get("ok")]
    ratio = {name: round(sps[name] / plain_sps, 3) if sps.get(name) and plain_sps else None
             for name in ("ray_1w", "stream", "in_process")}
    ratio["ray_1w_warm"] = round(warm["ray_1w_epoch2"] / plain_sps, 3) if warm["ray_1w_epoch2"] and plain_sps else None
    result = {
        "bench": "gpu_train", "mode": args.device, "smoke": not cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "cpus": os.cpu_count(),
        "rows": rows, "train_rows": steps.get("plain", {}).get("rows"), "features": args.features,
        "classes": args.classes, "store": f"topk k={TOPK}, self-contained", "student": f"mlp {args.width}x{args.depth}",
        "batch_size": batch, "lr": lr, "torch_threads": None if cuda else 1,
        "samples_per_s": sps, "samples_per_s_warm": warm, "ratio": ratio,
        "resumed_ok": steps.get("resume", {}).get("resumed_ok", False),
        "in_process_gpu": None if not cuda else ("refused by the config: " + steps["in_process"]["refused"]
                                                 if "refused" in steps.get("in_process", {})
                                                 else steps.get("in_process", {}).get("ran_on_gpu")),
        "ok": not failed, "failed": failed, "seconds": round(time.perf_counter() - started, 1), "steps": steps,
    }
    save_result(result, out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
