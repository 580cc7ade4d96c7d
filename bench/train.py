"""Student training: throughput against plain PyTorch, streaming from large labels-only stores, sweep overhead.

    python bench/train.py            # full run, ~11 min on 2 CPUs (3 of them writing data and stores, cached after)
    python bench/train.py --quick    # smoke run, 200k/20k rows: ~3.5 min; saved to bench/results/train-quick.json
    python bench/train.py --with-ray-train   # also (a) through a 1-worker TorchTrainer
    python bench/train.py --cache DIR --keep # where the synthetic data, teacher and stores live; keep the run folders

The scripts import ``still`` from the checkout: run them from the repository root with
the package installed (``setup.sh``) or ``PYTHONPATH=.``.

**1. In-memory throughput on digits** (1,449 training rows; MLP 256×2 student, batch
128, one torch thread everywhere). (a)-(c) are ``still train --json`` processes that
train in process (``scaling.num_workers=0``: the same loop, no Ray, no TorchTrainer
start-up; the teacher and its store come from ``still train`` and ``still infer`` too);
(d) is a hand-written loop in this process over the same data as tensors. samples/s
counts training steps only (the loop's own per-epoch ``epoch_s``); ``wall_s`` is the
whole process:

    (a) topk     the student distilled from a top-k store (teacher never run)
    (b) online   the same, with the teacher forwarded every step (kd.online_teacher)
    (c) ce       the same student and data path, kd.weight=0
    (d) plain    single-process PyTorch, CE, data held as tensors

``ratio_vs_ce`` = a/c, ``ratio_vs_online`` = a/b, ``ratio_vs_plain`` = a/d.

**2. Streaming from a large labels-only store** (``ratio_stream_vs_plain``). Synthetic
data: ``--rows`` rows (10M; quick 200k) of 32 uint8 features (still scales them by 1/255)
and 10 random classes, written once as Parquet under ``--cache``; a random-init teacher
MLP 32-256-256-10 (a still checkpoint); a labels-only top-5 store written by ``still
infer store.include_inputs=false store.mode=topk store.k=5`` (a cache hit on later
runs: the store root is in ``--cache`` too). The student (MLP 32-64-10, width 64, depth
1) trains 1 epoch at batch 1024, λ = 0.7, T = 4, lr 1e-3 through ``still train --json``
in a new process (embedded Ray, ``train.ingest=stream``, ``scaling.num_workers=1``,
``scaling.cpus_per_worker=1``, ``train.max_failures=0``, ``tracking.enabled=false``):
its rows are joined back to the source Parquet by Ray Data every epoch. samples/s is
the summary's ``history[i]["samples_per_s"]`` (training steps only: batches waited
for count, evaluation does not); the process's wall time is recorded beside it. The
epoch's clock includes the start of the Ray Data pipeline (seconds, whatever the
rows), so ``stream_steady_samples_per_s`` = (samples at ``--rows`` − samples at
``--small-rows``) ÷ (their epochs' seconds difference) takes it out, and
``ratio_stream_steady_vs_plain`` compares that with the plain loop.

The baseline is a plain PyTorch loop in this process over the same training rows
(the store's ``split == 0`` rows, inputs read from the source Parquet, scaled to
float32 and held as tensors before the clock starts): the same student, batch size,
optimiser and learning rate, one epoch, CE only. Thread counts: both sides train with
one torch intra-op thread (the still worker reserves 1 CPU and sets torch's threads
from it). still additionally runs Ray Data's read/join/convert tasks in other
processes on the machine's other CPU(s): that is what streaming costs and buys, and
what the plain loop does before its clock starts. The plain loop also skips the KD
loss that still computes (λ = 0.7); part 1's a/c shows what that costs.

**3. Memory** (``rss_ratio_10x``): the peak RSS of the Ray Train worker
(``ray::RayTrainWorker``) and of the ``still train`` process (the driver), sampled
every 0.5 s over the command's process tree (``bench/common.PeakRss``: /proc, no
psutil), for the same streaming run from the ``--small-rows`` (1M; quick 20k) store
and from the ``--rows`` store. ``rss_ratio_10x`` = worker peak at ``--rows`` ÷ at
``--small-rows``, ``rss_ratio_10x_driver`` the same for the driver. Private memory
(``RssAnon``: without the object store's shared pages) is reported beside it. The
stores' shard size is ``still infer``'s choice (``--shard-rows`` 0: auto, 250k-row
shards at 1M rows, 1M-row shards at 10M); ``--shard-rows N`` fixes it (those stores go
under ``stores-shardN/``: the shard size is not part of a store's key). A read task
holds one shard while it converts it, so with auto shards its memory grows with the
shard (4× from 1M to 10M rows); the worker holds 8 MiB blocks, its shuffle buffer and
what Ray Data prefetches (2026-12-01, after streaming was bounded: worker 706 → 1,001
MiB, ×1.42; before: 712 → 2,115 MiB).

**4. Sweep overhead** (``trial_overhead_s``): ``still tune --json`` in a new process,
4 in-process trials (``tune.trial_mode=in_process``, grid T ∈ {2, 4} × width ∈ {32,
64}, λ = 0.7) of 2 epochs each on the digits store of part 1, batch 128, one trial at a
time, no early stopping, tracking off. ``trial_overhead_s`` = the mean over trials of
the trial's wall time (Tune's ``time_total_s``, from ``trials/trial-NNNN/result.json``)
− its training steps (the per-epoch ``epoch_s`` of ``models/trial-NNNN/summary.json``):
what a trial costs besides the bare loop (opening its data, evaluation, export, MLflow,
the trial actor's first imports for the first trial). ``sweep_overhead_per_trial_s`` =
(the sweep's ``wall_s`` − every trial's ``epoch_s``) ÷ trials also spreads the sweep's
own costs (Ray start, planning, the table and plot) over the trials; ``process_s`` adds
the process's Python imports.

Every measurement that fails is recorded (null, and the error's last line under
``errors``) and the script carries on. Progress goes to stderr; the last stdout line
is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

# bench/common.py: these scripts run as python bench/<name>.py
from common import attempt, log, make_data, make_teacher, run_still, save_result

HERE = Path(__file__).resolve().parent
FEATURES, CLASSES = 32, 10
STREAM_STUDENT = {"width": 64, "depth": 1, "batch_size": 1024, "lr": 0.001, "epochs": 1}


# --------------------------------------------------------------------------- 1. in memory, digits


def _train(overrides: list[str], out: Path, name: str) -> dict:
    """``still train --json`` in a new process, without tracking; its training throughput and wall time."""
    run = run_still(["train", *overrides, "tracking.enabled=false", "scaling.cpus_per_worker=1",
                     f"train.output_dir={out / name}", f"train.name={name}"], timeout=900)
    summary = run["summary"]
    return {**_throughput(summary["history"]), "wall_s": run["seconds"], "job_s": summary.get("seconds"),
            "test_accuracy": summary.get("student_test_accuracy"), "checkpoint": summary.get("checkpoint")}


def _throughput(history: list[dict]) -> dict:
    """samples/s over all epochs (each epoch's samples/s weighted by its seconds) and the epochs' seconds."""
    samples = sum(h["samples_per_s"] * h["epoch_s"] for h in history)
    seconds = sum(h["epoch_s"] for h in history)
    return {"samples_per_s": samples / seconds, "epoch_s": seconds, "samples": round(samples)}


def _plain(epochs: int, batch_size: int, width: int, seed: int) -> dict:
    from still.config import DataConfig
    from still.datasets import load_arrays, resolve_dataset

    spec = resolve_dataset(DataConfig(source="builtin:digits"))
    _, x, y = load_arrays(spec, splits=("train",))
    return plain_loop(torch.from_numpy(x), torch.from_numpy(y), spec.input_shape, spec.num_classes, epochs,
                      batch_size, width, 2, 1e-3, seed)


def plain_loop(xs: torch.Tensor, ys: torch.Tensor, input_shape: Any, classes: int, epochs: int, batch_size: int,
               width: int, depth: int, lr: float, seed: int) -> dict:
    """CE training of still's MLP over tensors in memory; the clock covers the epochs only."""
    from still.models import build_model

    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=list(input_shape), num_classes=classes, width=width, depth=depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    samples, seconds = 0, 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), batch_size):
            idx = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(xs.index_select(0, idx)), ys.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - started
        samples += len(xs)
    return {"samples_per_s": samples / seconds, "wall_s": seconds, "samples": samples}


def digits_store(work: Path, quick: bool) -> dict:
    """A digits teacher (MLP 512×2, ``still train`` with kd.weight=0) and its top-5 store (``still infer``)."""
    teacher = _train(["data.source=builtin:digits", "student.width=512", "student.depth=2", "kd.weight=0",
                      f"train.epochs={3 if quick else 15}", "scaling.num_workers=0"], work, "teacher")["checkpoint"]
    run = run_still(["infer", "data.source=builtin:digits", f"teacher.uri={teacher}", f"store.root={work / 'stores'}",
                     "store.mode=topk", "store.k=5", "tracking.enabled=false"], timeout=600)
    return {"teacher": teacher, "store": run["summary"]["store"]}


def in_memory(args: argparse.Namespace, work: Path, digits: dict | None, errors: dict[str, str]) -> dict:
    """Part 1: (a)-(d) and, with --with-ray-train, (a) on a 1-worker TorchTrainer."""
    epochs = 3 if args.quick else 20
    batch, width, seed = 128, 256, 0
    student = [f"student.width={width}", "student.depth=2", f"train.epochs={epochs}", f"train.batch_size={batch}",
               f"train.seed={seed}", "train.lr=0.001", "scaling.num_workers=0"]
    runs: dict[str, list[str]] = {
        "topk": ["store.uri={store}", "kd.temperature=4", "kd.weight=0.7", *student],
        "online": ["data.source=builtin:digits", "kd.online_teacher={teacher}", "kd.temperature=4", "kd.weight=0.7",
                   *student],
        "ce": ["store.uri={store}", "kd.weight=0", *student],
    }
    if args.with_ray_train:
        runs["topk_torchtrainer_1w"] = [s if s != "scaling.num_workers=0" else "scaling.num_workers=1"
                                        for s in runs["topk"]]
    results: dict[str, dict | None] = {}
    for name, overrides in runs.items():
        def run(name: str = name, overrides: list[str] = overrides) -> dict:
            if digits is None:
                raise RuntimeError("no digits teacher/store (see errors.digits_store)")
            return _train([o.format(**digits) for o in overrides], work, name)

        results[name] = attempt(name, errors, run)
        log(f"{name}: {results[name]}")
    results["plain"] = attempt("plain", errors, lambda: _plain(epochs, batch, width, seed))
    rate = {k: (v["samples_per_s"] if v else None) for k, v in results.items()}
    return {
        "dataset": "builtin:digits (1449 train rows)", "student": f"mlp {width}x2", "teacher": "mlp 512x2",
        "epochs": epochs, "batch_size": batch,
        "samples_per_s": {k: _round(v, 1) for k, v in rate.items()},
        "wall_s": {k: (round(v["wall_s"], 2) if v else None) for k, v in results.items()},
        "ratio_vs_ce": _ratio(rate["topk"], rate["ce"]),
        "ratio_vs_online": _ratio(rate["topk"], rate["online"]),
        "ratio_vs_plain": _ratio(rate["topk"], rate["plain"]),
    }


# --------------------------------------------------------------------------- 2-3. streaming, memory


def synthetic_store(cache: Path, rows: int, teacher: str, shard_rows: int, timeout: float) -> dict:
    """The ``rows``-row dataset (written once under ``cache``) and its labels-only top-5 store (``still infer``)."""
    data = cache / f"data-{rows}x{FEATURES}u8"
    if not (data / ".complete").exists():
        shutil.rmtree(data, ignore_errors=True)
        log(f"writing {rows:,} rows x {FEATURES} uint8 to {data}")
        started = time.perf_counter()
        make_data(data, rows, classes=CLASSES, files=max(4, rows // 250_000), features=FEATURES)
        (data / ".complete").write_text(f"{time.perf_counter() - started:.1f} s\n")
    log(f"still infer of {rows:,} rows, labels only")
    root = cache / ("stores" if not shard_rows else f"stores-shard{shard_rows}")  # shard size is not in the key
    run = run_still(["infer", f"data.source={data}", f"teacher.uri={teacher}", f"store.root={root}",
                     "store.mode=topk", "store.k=5", "store.include_inputs=false", f"infer.shard_rows={shard_rows}",
                     "tracking.enabled=false"], timeout=timeout)
    summary = run["summary"]
    return {"data": str(data), "store": summary["store"], "rows": summary["rows"],
            "shards": len(list(Path(summary["store"]).glob("part-*.parquet"))),
            "cache_hit": summary.get("cache_hit"), "bytes_per_row": summary.get("bytes_per_row"),
            "infer_s": round(run["seconds"], 2), "infer_rows_per_s": summary.get("rows_per_s")}


def stream_train(store: str, out: Path, timeout: float) -> dict:
    """1 epoch of ``still train`` streaming the store on one Ray Train worker, in a new process."""
    s = STREAM_STUDENT
    run = run_still([
        "train", f"store.uri={store}", "train.ingest=stream", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        f"student.width={s['width']}", f"student.depth={s['depth']}", f"train.epochs={s['epochs']}",
        f"train.batch_size={s['batch_size']}", f"train.lr={s['lr']}", "train.seed=0", "kd.weight=0.7",
        "kd.temperature=4", "train.max_failures=0", "tracking.enabled=false", f"train.output_dir={out}",
    ], timeout=timeout)
    summary = run["summary"]
    history = summary["history"]
    return {
        **{k: _round(v, 2) for k, v in _throughput(history).items()},
        "wall_s": round(run["seconds"], 2), "job_s": summary.get("seconds"),
        "test_accuracy": summary.get("student_test_accuracy"),
        "world_size": history[-1].get("world_size"), "resumed_from": history[-1].get("resumed_from"),
        "driver_mib": run["driver_mib"],
        "worker_mib": max((v for k, v in run["ray_mib"].items() if "TrainWorker" in k), default=None),
        "largest_ray_worker_mib": run["worker_mib"], "anon_driver_mib": run["anon_driver_mib"],
        "anon_largest_ray_worker_mib": run["anon_worker_mib"], "ray_mib": run["ray_mib"],
    }


def plain_stream_baseline(data: str, store: str) -> dict:
    """The plain loop over the store's training rows, inputs from the source Parquet held as float32 tensors."""
    ids, splits = [], []
    for path in sorted(Path(store).glob("part-*.parquet")):
        table = pq.read_table(path, columns=["id", "split"])
        ids.append(table["id"].to_numpy())
        splits.append(table["split"].to_numpy())
    train_ids = np.concatenate(ids)[np.concatenate(splits) == 0]
    features, labels, source_ids = [], [], []
    for path in sorted(Path(data).glob("*.parquet")):
        table = pq.read_table(path)
        features.append(table["features"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, FEATURES))
        labels.append(table["label"].to_numpy())
        source_ids.append(table["id"].to_numpy())
    source_ids = np.concatenate(source_ids)
    if not np.array_equal(source_ids, np.arange(len(source_ids))):
        raise RuntimeError(f"{data}: ids are not 0..n-1 in file order")
    train_ids.sort()
    xs = torch.from_numpy(np.concatenate(features)[train_ids]).float().mul_(1 / 255)
    ys = torch.from_numpy(np.concatenate(labels)[train_ids])
    s = STREAM_STUDENT
    result = plain_loop(xs, ys, (FEATURES,), CLASSES, s["epochs"], s["batch_size"], s["width"], s["depth"], s["lr"], 0)
    return {k: _round(v, 2) for k, v in result.items()}


# --------------------------------------------------------------------------- 4. sweep overhead


def sweep_overhead(store: str, out: Path, grid: dict[str, str], timeout: float) -> dict:
    """One ``still tune`` of in-process trials; its wall time against the trials' own training seconds."""
    run = run_still([
        "tune", f"store.uri={store}", "tune.trial_mode=in_process", "tune.searcher=grid", "tune.num_samples=1",
        "tune.scheduler=none", "tune.max_concurrent_trials=1", f"tune.output_dir={out}", f"tune.name={out.name}",
        "train.epochs=2", "train.batch_size=128", "train.lr=0.003", "student.depth=2", "space.weight=[0.7]",
        f"space.temperature={grid['temperature']}", f"space.width={grid['width']}", "tracking.enabled=false",
    ], timeout=timeout)
    summary = run["summary"]
    rows = summary["trials"]
    epoch_s, missing, per_trial = 0.0, [], []
    folder = Path(summary.get("output_dir") or out)
    for row in rows:
        try:
            trial_epochs = sum(h["epoch_s"] for h in json.loads(
                (folder / "models" / row["trial"] / "summary.json").read_text())["history"])
            results = (folder / "trials" / row["trial"] / "result.json").read_text().strip().splitlines()
            per_trial.append(float(json.loads(results[-1])["time_total_s"]) - trial_epochs)
            epoch_s += trial_epochs
        except (OSError, ValueError, KeyError, IndexError) as exc:
            missing.append(f"{row['trial']}: {type(exc).__name__}")
    if missing:
        raise RuntimeError(f"no per-epoch epoch_s for {len(missing)} trial(s): {missing[0]}")
    wall = float(summary["wall_s"])
    return {"trials": len(rows), "statuses": sorted({r["status"] for r in rows}), "sweep_wall_s": wall,
            "process_s": round(run["seconds"], 2), "epoch_s_sum": round(epoch_s, 3),
            "trial_overhead_each_s": [round(x, 3) for x in per_trial],
            "trial_overhead_s": round(sum(per_trial) / len(per_trial), 3),
            "sweep_overhead_per_trial_s": round((wall - epoch_s) / len(rows), 3)}


# --------------------------------------------------------------------------- main


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _round(value: float | None, digits: int) -> float | None:
    return round(value, digits) if isinstance(value, (int, float)) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer epochs, 200k/20k rows")
    parser.add_argument("--with-ray-train", action="store_true", help="also time (a) with a 1-worker TorchTrainer")
    parser.add_argument("--rows", type=int, default=0, help="rows of the large store (default 10M; quick 200k)")
    parser.add_argument("--small-rows", type=int, default=0, help="rows of the small store (default 1M; quick 20k)")
    parser.add_argument("--cache", default=str(Path("~/.cache/still-bench/train").expanduser()),
                        help="synthetic data, teacher and stores: written once, reused by later runs")
    parser.add_argument("--shard-rows", type=int, default=0, help="still infer's infer.shard_rows (0: auto)")
    parser.add_argument("--keep", action="store_true", help="keep this run's folder (runs, sweep) afterwards")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    big = args.rows or (200_000 if args.quick else 10_000_000)
    small = args.small_rows or (20_000 if args.quick else 1_000_000)
    cache = Path(args.cache).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="still-bench-train-"))
    log(f"work folder {work}, cache {cache}")
    errors: dict[str, str] = {}
    phases: dict[str, float] = {}

    def timed(name: str, measure: Any) -> Any:
        started = time.perf_counter()
        value = attempt(name, errors, measure)
        phases[name] = round(time.perf_counter() - started, 1)
        return value

    # 1. In memory, digits.
    digits = timed("digits_store", lambda: digits_store(work, args.quick))
    memory = timed("in_memory", lambda: in_memory(args, work, digits, errors)) or {
        "ratio_vs_ce": None, "ratio_vs_online": None, "ratio_vs_plain": None}

    # 2-3. Streaming from labels-only stores, peak memory.
    def teacher() -> str:
        path = cache / f"teacher-mlp{FEATURES}-256x2-{CLASSES}.pt"
        return str(path) if path.exists() else make_teacher(path, CLASSES, width=256, features=FEATURES)

    teacher_uri = attempt("stream_teacher", errors, teacher)
    stores: dict[int, dict | None] = {}
    streams: dict[int, dict | None] = {}
    for rows in (small, big):
        def write(rows: int = rows) -> dict:
            if teacher_uri is None:
                raise RuntimeError("no teacher (see errors.stream_teacher)")
            return synthetic_store(cache, rows, teacher_uri, args.shard_rows, timeout=1800)

        stores[rows] = timed(f"store_{rows}", write)
        log(f"store {rows:,}: {stores[rows]}")
    for rows in (small, big):
        def stream(rows: int = rows) -> dict:
            if stores[rows] is None:
                raise RuntimeError(f"no {rows}-row store (see errors.store_{rows})")
            timeout = 1800 if rows > 2_000_000 else 600
            return stream_train(stores[rows]["store"], work / f"stream-{rows}", timeout=timeout)

        log(f"still train, streaming {rows:,} rows")
        streams[rows] = timed(f"stream_{rows}", stream)
        log(f"stream {rows:,}: {streams[rows]}")

    def plain_big() -> dict:
        if stores[big] is None:
            raise RuntimeError(f"no {big}-row store (see errors.store_{big})")
        return plain_stream_baseline(stores[big]["data"], stores[big]["store"])

    log(f"plain loop over the {big:,}-row store's training rows")
    plain = timed("plain_stream", plain_big)
    log(f"plain: {plain}")

    # 4. Sweep overhead on the digits store.
    def sweep() -> dict:
        if digits is None:
            raise RuntimeError("no digits store (see errors.digits_store)")
        return sweep_overhead(digits["store"], work / "tune", {"temperature": "[2,4]", "width": "[32,64]"},
                              timeout=900)

    log("still tune: 4 in-process trials")
    tune = timed("sweep", sweep)
    log(f"sweep: {tune}")

    steady = None  # samples/s with the pipeline's start-up (paid by both runs) taken out
    if streams[big] and streams[small] and streams[big]["epoch_s"] > streams[small]["epoch_s"]:
        steady = round((streams[big]["samples"] - streams[small]["samples"])
                       / (streams[big]["epoch_s"] - streams[small]["epoch_s"]), 1)

    def worker_ratio(key: str) -> float | None:
        a, b = streams.get(big), streams.get(small)
        return _ratio(a.get(key) if a else None, b.get(key) if b else None)

    result = {
        "bench": "train", "quick": args.quick, **memory,
        "ratio_stream_vs_plain": _ratio(streams[big] and streams[big]["samples_per_s"],
                                        plain and plain["samples_per_s"]),
        "ratio_stream_steady_vs_plain": _ratio(steady, plain and plain["samples_per_s"]),
        "stream_steady_samples_per_s": steady,
        "rss_ratio_10x": worker_ratio("worker_mib"),
        "rss_ratio_10x_driver": worker_ratio("driver_mib"),
        "trial_overhead_s": tune["trial_overhead_s"] if tune else None,
        "stream_setup": {"features": f"{FEATURES} x uint8 (scale 1/255)", "classes": CLASSES,
                         "teacher": f"mlp {FEATURES}-256-256-{CLASSES} (random init)",
                         "store": "labels-only topk k=5 float16",
                         "student": f"mlp {FEATURES}-{STREAM_STUDENT['width']}-{CLASSES}", **STREAM_STUDENT,
                         "kd": "weight 0.7, T 4", "rows": big, "small_rows": small},
        "stores": {str(k): v for k, v in stores.items()},
        "stream": {str(k): v for k, v in streams.items()},
        "plain_stream": plain,
        "sweep": {"grid": "T [2,4] x width [32,64], weight 0.7, 2 epochs, batch 128, digits store, one at a time",
                  **(tune or {})},
        "torch_threads": 1,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "phases_s": phases,
        "total_wall_s": round(time.perf_counter() - began, 1),
        "errors": errors,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    save_result(result, HERE / "results" / ("train-quick.json" if args.quick else "train.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
