"""Student training throughput: a top-k store vs online KD vs CE only vs a plain PyTorch loop.

    python bench/train.py            # full run (~1-2 min); JSON last line, saved to bench/results/train.json
    python bench/train.py --quick    # smoke run
    python bench/train.py --with-ray-train   # also (a) through a 1-worker TorchTrainer

All of (a)-(c) go through ``student_train.driver.train_job`` (``still train``'s code
path) in process (``scaling.num_workers=0``: same loop, no TorchTrainer start-up);
(d) is a hand-written loop over the same in-memory data. samples/s counts training
steps only (the loop's own per-epoch timing), one torch thread everywhere:

    (a) topk     the student distilled from a top-k store (teacher never run)
    (b) online   the same, with the teacher forwarded every step (kd.online_teacher)
    (c) ce       the same student and data path, kd.weight=0
    (d) plain    single-process PyTorch, CE, data held as tensors
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import save_result  # bench/common.py: these scripts run as python bench/<name>.py

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def _train(overrides: list[str], out: Path, name: str) -> dict:
    from still.config import load_config
    from student_train.config import TrainConfig
    from student_train.driver import train_job

    cfg = load_config(TrainConfig, None, [*overrides, "tracking.enabled=false", "scaling.cpus_per_worker=1",
                                          f"train.output_dir={out / name}"])
    started = time.perf_counter()
    summary = train_job(cfg, run_name=name, quiet=True)
    wall = time.perf_counter() - started
    history = summary["history"]
    samples = sum(h["samples_per_s"] * h["epoch_s"] for h in history)
    seconds = sum(h["epoch_s"] for h in history)
    return {"samples_per_s": samples / seconds, "wall_s": wall, "test_accuracy": summary["student_test_accuracy"]}


def _plain(epochs: int, batch_size: int, width: int, seed: int) -> dict:
    from still.config import DataConfig
    from still.datasets import load_arrays, resolve_dataset
    from still.models import build_model

    spec = resolve_dataset(DataConfig(source="builtin:digits"))
    _, x, y = load_arrays(spec, splits=("train",))
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=spec.input_shape, num_classes=spec.num_classes, width=width, depth=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    samples, seconds = 0, 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), batch_size):
            idx = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - started
        samples += len(xs)
    return {"samples_per_s": samples / seconds, "wall_s": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few epochs: a smoke run")
    parser.add_argument("--with-ray-train", action="store_true", help="also time (a) with a 1-worker TorchTrainer")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs = 3 if args.quick else 20
    batch, width, seed = 128, 256, 0
    work = Path(tempfile.mkdtemp(prefix="still-bench-train-"))

    import ray

    from still.config import load_config
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    _train(["data.source=builtin:digits", "student.width=512", "student.depth=2", "kd.weight=0",
            f"train.epochs={3 if args.quick else 15}", "scaling.num_workers=0"], work, "teacher")
    teacher_ckpt = str(work / "teacher" / "student.pt")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    store = run_infer(load_config(InferConfig, None, [
        "data.source=builtin:digits", f"teacher.uri={teacher_ckpt}", f"store.root={work / 'stores'}",
        "store.mode=topk", "store.k=5", "tracking.enabled=false"]))["store"]
    student = [f"student.width={width}", "student.depth=2", f"train.epochs={epochs}", f"train.batch_size={batch}",
               f"train.seed={seed}", "train.lr=0.001", "scaling.num_workers=0"]
    results = {
        "topk": _train([f"store.uri={store}", "kd.temperature=4", "kd.weight=0.7", *student], work, "topk"),
        "online": _train(["data.source=builtin:digits", f"kd.online_teacher={teacher_ckpt}", "kd.temperature=4",
                          "kd.weight=0.7", *student], work, "online"),
        "ce": _train([f"store.uri={store}", "kd.weight=0", *student], work, "ce"),
        "plain": _plain(epochs, batch, width, seed),
    }
    if args.with_ray_train:
        ray_student = [s if s != "scaling.num_workers=0" else "scaling.num_workers=1" for s in student]
        results["topk_torchtrainer_1w"] = _train([f"store.uri={store}", "kd.temperature=4", "kd.weight=0.7",
                                                  *ray_student], work, "topk-ray")
    ray.shutdown()
    a = results["topk"]["samples_per_s"]
    figures = {
        "bench": "train", "quick": args.quick, "dataset": "builtin:digits (1449 train rows)",
        "student": f"mlp {width}x2", "teacher": "mlp 512x2", "epochs": epochs, "batch_size": batch,
        "samples_per_s": {k: round(v["samples_per_s"], 1) for k, v in results.items()},
        "wall_s": {k: round(v["wall_s"], 2) for k, v in results.items()},
        "ratio_vs_ce": round(a / results["ce"]["samples_per_s"], 3),
        "ratio_vs_online": round(a / results["online"]["samples_per_s"], 3),
        "ratio_vs_plain": round(a / results["plain"]["samples_per_s"], 3),
        "torch_threads": 1,
    }
    save_result(figures, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
