"""Offline against online distillation with augmentation (Beyer et al. 2022), measured on MNIST.

    python bench/views.py --teacher runs/mnist-teacher/student.pt   # the main job's teacher: ~15 min on 2 CPUs
    python bench/views.py                                            # trains the teacher first (+5 min)
    python bench/views.py --quick                                    # smoke run: 1 epoch each, not saved

One teacher (``--teacher``, a still checkpoint; else the main job's teacher recipe:
MLP 784-1200-1200-10, ±2 px jitter, 20 epochs, cosine) and one student (MLP
784-800-800-10, T = 4, λ = 0.7, ``--epochs`` epochs at batch 128, lr 1e-3 cosine,
seed 0, one view or one jittered image per sample per epoch), trained in process
(``scaling.num_workers=0``, so no arm pays Ray Train's start-up) by ``still`` CLI
processes:

    (a) online       ``kd.online_teacher``: the teacher forwarded on every jittered batch
    (b) single_view  distilled from a single-view store (targets of the un-jittered images;
                     the student sees those images: jittering them would mismatch the targets)
    (c) views_K      distilled from a K-view store (``store.views=K``, the views replayed),
                     for each K of ``--views`` (default 2,8)
    (d) baseline_K   labels only on the same K views (the main job's baseline)

Each arm reports test errors (of 10,000), its training process's wall time, and for
(b)/(c) the ``still infer`` time that made its store (once per store: every later
student reuses it). ``cost_vs_online`` = (infer + train) ÷ online's train time.
Results: ``bench/results/views.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import attempt, log, run_still, save_result  # noqa: E402

STUDENT = ["data.source=builtin:mnist", "student.family=mlp", "student.width=800", "student.depth=2",
           "kd.temperature=4", "kd.weight=0.7", "train.batch_size=128", "train.lr=0.001",
           "train.lr_schedule=cosine", "train.seed=0", "scaling.num_workers=0", "tracking.enabled=false"]


def train_teacher(work: Path, epochs: int) -> str:
    """The main job's teacher recipe; returns its checkpoint."""
    out = run_still(["train", "data.source=builtin:mnist", "student.width=1200", "student.depth=2",
                     f"train.epochs={epochs}", "train.lr=0.001", "train.lr_schedule=cosine", "train.augment.jitter=2",
                     "train.batch_size=128", "scaling.num_workers=0", "tracking.enabled=false",
                     f"train.output_dir={work / 'teacher'}"], cwd=work)
    return out["summary"]["checkpoint"]


def make_store(work: Path, teacher: str, views: int) -> dict[str, Any]:
    extra = [f"store.views={views}", "store.augment.jitter=2"] if views > 1 else []
    out = run_still(["infer", "data.source=builtin:mnist", f"teacher.uri={teacher}", f"store.root={work / 'stores'}",
                     "store.mode=topk", "store.k=10", "store.include_inputs=false", "tracking.enabled=false", *extra],
                    cwd=work)
    return {"store": out["summary"]["store"], "infer_s": round(out["seconds"], 1),
            "rows": out["summary"]["rows"]}


def train_student(work: Path, name: str, epochs: int, extra: list[str]) -> dict[str, Any]:
    out = run_still(["train", *STUDENT, f"train.epochs={epochs}", f"train.output_dir={work / name}", *extra],
                    cwd=work)
    return {"test_errors": out["summary"]["test_errors"], "train_s": round(out["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="", help="a still checkpoint (default: train the main job's teacher)")
    parser.add_argument("--epochs", type=int, default=12, help="student epochs")
    parser.add_argument("--views", default="2,8", help="K of the multi-view stores, comma-separated")
    parser.add_argument("--quick", action="store_true", help="1 epoch each (teacher 1 epoch), not saved")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "views.json"))
    args = parser.parse_args()
    epochs = 1 if args.quick else args.epochs
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="still-bench-views-") as tmp:
        work = Path(tmp)
        teacher = args.teacher and str(Path(args.teacher).resolve())
        if not teacher:
            log("training the teacher")
            teacher = train_teacher(work, 1 if args.quick else 20)
        arms: dict[str, Any] = {}
        log("(a) online KD")
        arms["online"] = attempt("online", errors, lambda: train_student(
            work, "online", epochs, [f"kd.online_teacher={teacher}", "train.augment.jitter=2"]))
        for views in [1] + [int(k) for k in args.views.split(",")]:
            name = "single_view" if views == 1 else f"views_{views}"
            log(f"({'b' if views == 1 else 'c'}) {name}")
            store = attempt(f"{name}_store", errors, lambda: make_store(work, teacher, views))
            if store is None:
                continue
            student = attempt(name, errors, lambda: train_student(work, name, epochs, [f"store.uri={store['store']}"]))
            arms[name] = {**store, **(student or {})}
            if views > 1:
                log(f"(d) baseline on {views} views")
                baseline = attempt(f"baseline_{views}", errors, lambda: train_student(
                    work, f"baseline_{views}", epochs, [f"store.uri={store['store']}", "kd.weight=0"]))
                arms[f"baseline_{views}"] = baseline
    online_s = (arms.get("online") or {}).get("train_s")
    for arm in arms.values():
        if arm and online_s and "infer_s" in arm and "train_s" in arm:
            arm["cost_vs_online"] = round((arm["infer_s"] + arm["train_s"]) / online_s, 3)
    result = {"epochs": epochs, "views": [int(k) for k in args.views.split(",")], "teacher": teacher, "arms": arms,
              "errors": errors}
    save_result(result, None if args.quick else Path(args.out))


if __name__ == "__main__":
    main()
