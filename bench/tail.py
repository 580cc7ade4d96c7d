"""Which ``kd.tail`` should be the default? Students distilled from dense, top-k and sampled
stores of one teacher, on a 100-class task, at T = 1 and T = 4.

    python bench/tail.py              # ~35 min on 2 CPUs; JSON saved to bench/results/tail.json
    python bench/tail.py --quick      # a smoke run on a slice of the data (numbers mean nothing)

The task: ``builtin:mnist-pairs`` — two real MNIST digits side by side, labelled with the
two-digit number (100 classes; still.datasets.composed). No dataset with 100+ classes
ships on these machines and none may be downloaded, so this one is composed from real
data: a teacher's mistakes spread over related classes (37 vs 87, 37 vs 31), the dark
knowledge a top-k store with k = 10 of 100 classes must keep.

Everything goes through still's own entry points (``run_infer``, ``train_job`` in
process): one teacher (MLP 1568-1200-1200-100, dropout), its stores (dense fp16,
top-10 fp16, sampled 64 draws fp16 at T_s = 1 and at T_s = 4), and per temperature and seed one student
(MLP 1568-300-300-100) for each of: CE only, dense, top-10 with ``kd.tail=uniform``,
top-10 with ``kd.tail=bucket``, and the sampled stores drawn at T_s = 1 and T_s = 4.
The figure is test errors out of 10,000, mean and standard error over seeds.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import save_result  # bench/common.py: these scripts run as python bench/<name>.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "tail.json"
DATA = "data.source=builtin:mnist-pairs"


def train(out: Path, name: str, overrides: list[str]) -> dict:
    from still.config import load_config
    from student_train.config import TrainConfig
    from student_train.driver import JobOptions, train_job

    cfg = load_config(TrainConfig, None, [*overrides, "scaling.num_workers=0", "tracking.enabled=false",
                                          f"train.output_dir={out / name}"])
    started = time.perf_counter()
    summary = train_job(cfg, run_name=name, options=JobOptions(quiet=True, log_model=False))
    return {"test_errors": summary["test_errors"], "test_count": summary["test_count"],
            "test_accuracy": summary["student_test_accuracy"], "test_agreement": summary.get("test_agreement"),
            "seconds": round(time.perf_counter() - started, 1)}


def infer(out: Path, teacher: str, overrides: list[str]) -> dict:
    from still.config import load_config
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    return run_infer(load_config(InferConfig, None, [DATA, f"teacher.uri={teacher}", f"store.root={out / 'stores'}",
                                                     "tracking.enabled=false", *overrides]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--student-epochs", type=int, default=12)
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else args.seeds
    teacher_epochs, student_epochs = (1, 1) if args.quick else (args.teacher_epochs, args.student_epochs)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="still-bench-tail-") as tmp:
        out = Path(tmp)
        teacher = train(out, "teacher", [DATA, "student.width=1200", "student.depth=2", "student.dropout=0.3",
                                         "kd.weight=0", f"train.epochs={teacher_epochs}", "train.batch_size=128",
                                         "train.lr=0.001", "train.seed=0"])
        teacher_ckpt = str(out / "teacher" / "student.pt")
        print(f"teacher: {teacher['test_errors']} test errors of {teacher['test_count']} ({teacher['seconds']} s)",
              flush=True)
        stores = {
            "dense": infer(out, teacher_ckpt, ["store.mode=dense", "store.dtype=float16"]),
            "topk": infer(out, teacher_ckpt, ["store.mode=topk", "store.k=10", "store.dtype=float16"]),
            "sampled-T1": infer(out, teacher_ckpt, ["store.mode=sampled", "store.samples=64", "store.dtype=float16"]),
            "sampled-T4": infer(out, teacher_ckpt, ["store.mode=sampled", "store.samples=64", "store.dtype=float16",
                                                    "store.sample_temperature=4"]),
        }
        student = ["student.width=300", "student.depth=2", f"train.epochs={student_epochs}", "train.batch_size=128",
                   "train.lr=0.001", "kd.weight=0.9"]
        variants = {"ce": (None, ["kd.weight=0"]), "dense": ("dense", []), "topk-uniform": ("topk", ["kd.tail=uniform"]),
                    "topk-bucket": ("topk", ["kd.tail=bucket"]), "sampled-T1": ("sampled-T1", []),
                    "sampled-T4": ("sampled-T4", [])}
        runs = []
        for temperature in (1.0, 4.0):
            for name, (store, extra) in variants.items():
                if name == "ce" and temperature != 1.0:
                    continue  # CE ignores T
                for seed in range(seeds):
                    source = [f"store.uri={stores[store]['store']}"] if store else [DATA]
                    result = train(out, f"{name}-T{temperature:g}-s{seed}",
                                   [*source, *student, *extra, f"kd.temperature={temperature}", f"train.seed={seed}"])
                    runs.append({"variant": name, "temperature": temperature, "seed": seed, **result})
                    print(f"T={temperature:g} {name:<13} seed {seed}: {result['test_errors']} errors "
                          f"({result['seconds']} s)", flush=True)
    table = {}
    for run in runs:
        key = f"{run['variant']} T={run['temperature']:g}"
        table.setdefault(key, []).append(run["test_errors"])
    mean_errors = {key: sum(v) / len(v) for key, v in table.items()}
    standard_errors = {key: (statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else None) for key, v in table.items()}
    summary = {
        "bench": "tail", "task": "builtin:mnist-pairs (100 classes)", "seeds": seeds,
        "teacher_test_errors": teacher["test_errors"], "test_count": teacher["test_count"],
        "stores": {name: {"bytes_per_row": s["bytes_per_row"], "fidelity_T4": s["fidelity"].get("4")}
                   for name, s in stores.items()},
        "mean_test_errors": mean_errors, "standard_error": standard_errors, "runs": runs, "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()} {platform.python_version()}",
    }
    for key, value in mean_errors.items():
        spread = f" ± {standard_errors[key]:.1f}" if standard_errors[key] is not None else ""
        print(f"{key:<20} {value:8.1f}{spread} test errors")
    save_result(summary, None if args.quick else RESULTS, {k: v for k, v in summary.items() if k != "runs"})
    return summary


if __name__ == "__main__":
    main()
