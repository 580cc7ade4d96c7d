"""Benchmark: a sweep over one soft-label store vs the same sweep with online KD.

    python bench/sweep.py                 # 16 trials, MNIST-style teacher 1200-1200 on digits; ~15 min on 2 CPUs
    python bench/sweep.py --data builtin:mnist --epochs 1 --teacher-epochs 2 --batch-size 128 --mode-trials 1
    python bench/sweep.py --quick         # smoke run: 4 trials, 1 epoch

One run measures, on ``--data`` (default ``builtin:digits``, 1,797 images 8x8, 10 classes;
on digits the teacher costs almost nothing to run, so MNIST is the telling case):

1. a teacher (MLP ``--teacher-width``-``--teacher-width``, the paper's 1200 by default)
   trained once with ``still train``'s code path (not timed);
2. ``store``: ``still infer`` writes one top-k store (timed: ``infer_s``), then
   ``still tune`` runs the grid of ``--trials`` students (T × width, λ = 0.7) over it
   (timed: ``store_sweep_s``);
3. ``online``: the same grid through the same ``still tune`` machinery, every trial
   with ``kd.online_teacher=<checkpoint>``: the teacher is loaded by every trial and
   forwarded on every batch (timed: ``online_sweep_s``);
4. ``bare``: the same students trained by the bare loop (arrays in memory, the
   per-worker loop, no Tune, no MLflow, no export) in this process: ``bare_per_trial_s``;
5. trial modes: ``--mode-trials`` trials with ``tune.trial_mode=in_process`` and
   with ``trainer`` (a TorchTrainer per trial), for the per-trial cost of each.

Both sweeps run one trial at a time, no early stopping, so they do identical
student work. ``ratio`` = (infer_s + store_sweep_s) / online_sweep_s (the teacher
pass charged to the store side); ``ratio_sweep_only`` leaves it out. The per-trial
overhead of Tune + MLflow + export over the bare loop is
``store_sweep_s / trials − bare_per_trial_s``. Progress goes to stderr; the last
stdout line is one JSON object, also saved to ``bench/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import save_result  # bench/common.py: these scripts run as python bench/<name>.py

HERE = Path(__file__).resolve().parent


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


DATA = {"source": "builtin:digits", "batch_size": 64}
"""The dataset and batch size every stage of the bench uses (set from the command line)."""


def train_teacher(out: Path, width: int, epochs: int) -> str:
    from still.config import load_config
    from student_train.config import TrainConfig
    from student_train.driver import JobOptions, train_job

    cfg = load_config(TrainConfig, None, [
        f"data.source={DATA['source']}", f"student.width={width}", "student.depth=2", "student.dropout=0.2",
        "kd.weight=0", f"train.epochs={epochs}", f"train.batch_size={DATA['batch_size']}", "train.lr=0.002",
        "scaling.num_workers=0", "tracking.enabled=false", f"train.output_dir={out}",
    ])
    return train_job(cfg, run_name="bench-teacher", options=JobOptions(quiet=True, log_model=False))["checkpoint"]


def write_store(root: Path, teacher: str) -> tuple[str, float]:
    from still.config import load_config
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    cfg = load_config(InferConfig, None, [
        f"data.source={DATA['source']}", f"teacher.uri={teacher}", f"store.root={root}", "store.mode=topk",
        "store.k=5", "tracking.enabled=false",
    ])
    started = time.perf_counter()
    summary = run_infer(cfg)
    return summary["store"], time.perf_counter() - started


def sweep(name: str, out: Path, tracking: str, teacher_or_store: list[str], grid: dict, epochs: int,
          extra: list[str] = ()) -> tuple[dict, float]:
    from still.config import load_config
    from tuning.config import TuneConfig
    from tuning.driver import run_tune

    overrides = [
        *teacher_or_store, f"tune.name={name}", f"tune.output_dir={out / name}", f"tracking.uri={tracking}",
        "tracking.experiment=bench-sweep", "tune.searcher=grid", "tune.num_samples=1", "tune.scheduler=none",
        "tune.max_concurrent_trials=1", f"train.epochs={epochs}", f"train.batch_size={DATA['batch_size']}",
        "train.lr=0.003", "student.depth=2", f"data.source={DATA['source']}",
        f"space.temperature={grid['temperature']}", f"space.width={grid['width']}", "space.weight=[0.7]",
        *extra,
    ]
    started = time.perf_counter()
    summary = run_tune(load_config(TuneConfig, None, overrides))
    return summary, time.perf_counter() - started


def bare_loop(store: str, grid: dict, epochs: int) -> float:
    """Mean seconds per student of the bare loop: arrays in memory, run_loop, nothing else."""
    import torch

    from still.config import load_config
    from student_train.config import TrainConfig
    from student_train.data import resolve_source
    from student_train.driver import student_model_args
    from student_train.feed import load_split_arrays
    from student_train.loop import LocalSession, LoopSpec, run_loop

    times = []
    for temperature in grid["temperature"]:
        for width in grid["width"]:
            started = time.perf_counter()
            cfg = load_config(TrainConfig, None, [
                f"store.uri={store}", f"kd.temperature={temperature}", "kd.weight=0.7", f"student.width={width}",
                "student.depth=2", f"train.epochs={epochs}", f"train.batch_size={DATA['batch_size']}",
                "train.lr=0.003", "scaling.num_workers=0", "tracking.enabled=false",
            ])
            source = resolve_source(cfg.store.uri, cfg.data, verify=False)
            arrays = load_split_arrays(source)
            with tempfile.TemporaryDirectory() as tmp:
                spec = LoopSpec(cfg=cfg, source=source, model_args=student_model_args(cfg, source), quiet=True)
                run_loop(spec, LocalSession(tmp, torch.device("cpu"), arrays=arrays))
            times.append(time.perf_counter() - started)
    return sum(times) / len(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 trials, 1 epoch, 1 trial per mode")
    parser.add_argument("--epochs", type=int, default=0, help="epochs per student (default 3; quick 1)")
    parser.add_argument("--teacher-width", type=int, default=0, help="teacher hidden units (default 1200; quick 256)")
    parser.add_argument("--mode-trials", type=int, default=0, help="trials per trial mode (default 3; quick 1)")
    parser.add_argument("--workdir", default="", help="where stores, runs and MLflow go (default: a temp dir)")
    parser.add_argument("--data", default="builtin:digits", help="data.source of every stage")
    parser.add_argument("--batch-size", type=int, default=64, help="train.batch_size of every student")
    parser.add_argument("--teacher-epochs", type=int, default=0, help="teacher epochs (default 30; quick 10)")
    args = parser.parse_args(argv)
    DATA.update(source=args.data, batch_size=args.batch_size)
    quick = args.quick
    epochs = args.epochs or (1 if quick else 3)
    teacher_width = args.teacher_width or (256 if quick else 1200)
    mode_trials = args.mode_trials or (1 if quick else 3)
    grid = ({"temperature": [2, 8], "width": [32, 64]} if quick
            else {"temperature": [2, 4, 8, 16], "width": [32, 64, 128, 256]})
    trials = len(grid["temperature"]) * len(grid["width"])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="still-bench-sweep-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking

    from still.ray_setup import init_ray

    init_ray()
    log(f"teacher MLP {teacher_width}x2 on {args.data} ...")
    teacher = train_teacher(work / "teacher", teacher_width, epochs=args.teacher_epochs or (10 if quick else 30))
    log("one teacher pass into a top-k store ...")
    store, infer_s = write_store(work / "stores", teacher)
    log(f"store sweep: {trials} trials ...")
    store_summary, store_s = sweep("store", work, tracking, [f"store.uri={store}"], grid, epochs)
    log(f"online-KD sweep: {trials} trials ...")
    online_summary, online_s = sweep("online", work, tracking, [f"kd.online_teacher={teacher}"], grid, epochs)
    log("bare loop ...")
    bare_s = bare_loop(store, grid, epochs)
    mode_grid = {"temperature": [4], "width": [32 * (2 ** i) for i in range(mode_trials)]}
    log(f"trial modes: {mode_trials} trial(s) in_process vs trainer ...")
    _, in_process_s = sweep("mode-in-process", work, tracking, [f"store.uri={store}"], mode_grid, epochs,
                            ["tune.trial_mode=in_process"])
    _, trainer_s = sweep("mode-trainer", work, tracking, [f"store.uri={store}"], mode_grid, epochs,
                         ["tune.trial_mode=trainer", "scaling.num_workers=1"])

    def acc(summary: dict) -> float | None:
        return summary.get("best", {}).get("metrics", {}).get("val_accuracy")

    result = {
        "bench": "sweep",
        "quick": quick,
        "data": args.data,
        "trials": trials,
        "epochs": epochs,
        "batch_size": DATA["batch_size"],
        "teacher_width": teacher_width,
        "infer_s": round(infer_s, 2),
        "store_sweep_s": round(store_s, 2),
        "online_sweep_s": round(online_s, 2),
        "ratio": round((infer_s + store_s) / online_s, 3),
        "ratio_sweep_only": round(store_s / online_s, 3),
        "bare_per_trial_s": round(bare_s, 3),
        "store_per_trial_s": round(store_s / trials, 3),
        "online_per_trial_s": round(online_s / trials, 3),
        "overhead_per_trial_s": round(store_s / trials - bare_s, 3),
        "mode_trials": mode_trials,
        "in_process_per_trial_s": round(in_process_s / mode_trials, 2),
        "trainer_per_trial_s": round(trainer_s / mode_trials, 2),
        "store_best_val_accuracy": acc(store_summary),
        "online_best_val_accuracy": acc(online_summary),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    import ray

    ray.shutdown()  # stop Ray's log forwarding so the JSON stays the last stdout line
    name = "sweep-quick.json" if quick else "sweep.json"
    if args.data != "builtin:digits":
        name = name.replace(".json", f"-{args.data.split(':')[-1]}.json")
    save_result(result, HERE / "results" / name)
    return result


if __name__ == "__main__":
    main()
