"""Student training: still against plain PyTorch loops with the same KD loss, in memory and streamed.

    python bench/train.py            # full run, ~16 min on 2 CPUs (plus ~5 min writing data and stores once)
    python bench/train.py --quick    # smoke run: 200k/20k-row stores, 1 epoch; saved to bench/results/train-quick.json
    python bench/train.py --cache DIR --keep # where the synthetic data, teachers and stores live; keep run folders

Run from the repository root (``bench/common.py`` puts the checkout on the path of the
``still`` processes it starts). Every ``still`` run is ``still train --json`` in a new
process (its own embedded Ray), tracking off, one torch thread; the plain loops run
in this process with one torch thread. samples/s counts training steps only (the
epoch's ``epoch_s``; evaluation is not in it).

**The plain loops** (the baselines): the same student, optimizer (Adam, fused, as
still's), learning rate, batch size and rows, held as tensors in memory before the
clock starts (inputs as float32 model inputs, the teacher's top-k target already at
T), over a fresh permutation per epoch: ``plain_kd`` with still's loss function
(``student_train.losses.kd_loss``, λ = 0.7, T = 4, the top-k target with its tail
bucket), ``plain_ce`` with cross-entropy only. The loss is the same code on both sides,
so a ratio measures what still's data path and loop cost, not the loss.

**1. Memory ingest, MNIST-sized** (``ratio_memory_vs_plain_kd``, goal ≥ 0.9): 60,000
rows of 784 uint8 features and 10 classes (synthetic, so nothing is downloaded), a
random-init teacher MLP 784-512-512-10 and its labels-only top-10 fp16 store (``still
infer``); the student MLP 784-256-256-10, batch 128, ``--epochs`` (5; quick 1), in
process (``scaling.num_workers=0``, ``train.ingest=memory``); still and the plain loops
run ``--repeats`` (3) times, each still run between two plain runs of its loss, and the ratio is
the median of the bracketed ratios (as in part 2). Also ``ratio_kd_vs_ce``:
the same still run at λ = 0.7 ÷ at λ = 0 (what the KD loss costs per step in still).

**2. Streamed from a labels-only store** (``ratio_stream_vs_plain_kd``, goal ≥ 0.8;
``ratio_stream_vs_plain`` against the CE loop, reported): ``--rows`` rows (10M; quick
200k) of 32 uint8 features, 10 classes, a random-init teacher MLP 32-256-256-10, its
labels-only top-5 store; the student MLP 32-64-10, batch 1024, 1 epoch, λ = 0.7, T = 4,
one Ray Train worker (``scaling.num_workers=1 scaling.cpus_per_worker=1``,
``train.ingest=stream``): its rows are read, joined back to the source Parquet by id,
mixed and batched in the worker's reader process (``student_train.prefetch``). ``stream_fixed_s`` (goal ≤ 2 s) is the
fixed cost of a streamed epoch: the time its first batch took to arrive plus its
validation pass (``first_batch_s`` + ``val_s`` of the epoch). The plain loops run over
the same training rows. This machine's speed drifts by ±20% from one minute to the
next, so the large store's still run is repeated ``--stream-repeats`` (5) times, each
between two runs of the plain KD loop (plain, still, plain, …, still, plain): a still
run's ratio is its throughput ÷ the mean of the two plain runs around it
(``bracketed_ratios``), which cancels a drift over those minutes, and
``ratio_stream_vs_plain_kd`` is the median of these ratios. The figures reported under
``still`` and ``plain_kd`` are each side's run of median throughput.

**3. Memory** (``rss_private_ratio_10x``, goal ≤ 1.2): the peak private memory
(``RssAnon``) of the Ray Train worker streaming the ``--rows`` store ÷ streaming the
``--small-rows`` (1M; quick 20k) store, sampled every 0.5 s over the command's process
tree (``bench/common.PeakRss``); ``rss_ratio_10x`` is the same of total RSS.

**4. Sweep overhead** (``trial_overhead_s``, goal ≤ 2 s): ``still tune --json``, 4
in-process trials (grid T ∈ {2, 4} × width ∈ {32, 64}, λ = 0.7, 2 epochs, batch 128)
one at a time on a digits store: a trial's wall time in Tune minus its training steps,
averaged.

Every measurement that fails is recorded (null, and the error's last line under
``errors``) and the script carries on. Progress goes to stderr; the last stdout line
is one JSON object. The machine is described under ``machine``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# bench/common.py: these scripts run as python bench/<name>.py
from common import attempt, log, make_data, make_teacher, run_still, save_result

HERE = Path(__file__).resolve().parent
KD = {"temperature": 4.0, "weight": 0.7}
MEMORY = {"rows": 60_000, "features": 784, "classes": 10, "teacher_width": 512, "k": 10,
          "width": 256, "depth": 2, "batch_size": 128, "lr": 0.001}
STREAM = {"features": 32, "classes": 10, "teacher_width": 256, "k": 5,
          "width": 64, "depth": 1, "batch_size": 1024, "lr": 0.001, "epochs": 1}


# --------------------------------------------------------------------------- data and stores


def labels_only_store(cache: Path, rows: int, setup: dict, timeout: float) -> dict:
    """``rows`` synthetic rows (written once under ``cache``), a random teacher and its labels-only top-k store."""
    features, classes = setup["features"], setup["classes"]
    data = cache / f"data-{rows}x{features}u8-c{classes}"
    if not (data / ".complete").exists():
        shutil.rmtree(data, ignore_errors=True)
        log(f"writing {rows:,} rows x {features} uint8 to {data}")
        make_data(data, rows, classes=classes, files=max(4, rows // 250_000), features=features)
        (data / ".complete").write_text("ok\n")
    teacher = cache / f"teacher-mlp{features}-{setup['teacher_width']}x2-{classes}.pt"
    if not teacher.exists():
        make_teacher(teacher, classes, width=setup["teacher_width"], features=features)
    log(f"still infer of {rows:,} rows, labels only")
    run = run_still(["infer", f"data.source={data}", f"teacher.uri={teacher}", f"store.root={cache / 'stores'}",
                     "store.mode=topk", f"store.k={setup['k']}", "store.include_inputs=false",
                     "tracking.enabled=false"], timeout=timeout)
    summary = run["summary"]
    return {"data": str(data), "store": summary["store"], "rows": summary["rows"],
            "cache_hit": summary.get("cache_hit"), "bytes_per_row": summary.get("bytes_per_row"),
            "infer_s": round(run["seconds"], 2)}


def train_rows(store: str, temperature: float) -> dict[str, torch.Tensor]:
    """A store's training rows as the plain loops hold them: float32 inputs, the top-k target bound at T."""
    from still.config import DataConfig
    from student_train.data import bind_temperature, resolve_source, teacher_prefix
    from student_train.feed import load_split_arrays

    source = resolve_source([store], DataConfig())
    arrays = bind_temperature(load_split_arrays(source)["train"], source, temperature)
    bound = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    p = teacher_prefix(0)
    return {"x": source.normalisation.apply(bound["x"]).reshape(len(bound["x"]), -1).contiguous(),
            "y": bound["y"], "idx": bound[p + "topk_idx"].long(), "log_p": bound[p + "topk_logp_at"],
            "log_tail": bound[p + "topk_logtail_at"], "classes": source.num_classes}


# --------------------------------------------------------------------------- the plain loops


def plain_loop(rows: dict[str, Any], setup: dict, epochs: int, kd: bool, seed: int = 0) -> dict:
    """The student trained over ``rows`` in memory: still's model and loss, nothing else; the clock covers the epochs."""
    from still.models import build_model
    from student_train.losses import kd_loss
    from teacher_infer.targets import TopKAtT

    torch.manual_seed(seed)
    x, y = rows["x"], rows["y"]
    model = build_model("mlp", input_shape=[x.shape[1]], num_classes=rows["classes"], width=setup["width"],
                        depth=setup["depth"])
    opt = torch.optim.Adam(model.parameters(), lr=setup["lr"], fused=True)
    gen = torch.Generator().manual_seed(seed)
    batch, T, lam = setup["batch_size"], KD["temperature"], KD["weight"]
    samples, seconds = 0, 0.0
    for _ in range(epochs):
        started = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            b = order[i:i + batch]
            logits = model(x.index_select(0, b))
            labels = y.index_select(0, b)
            if kd:
                target = TopKAtT(rows["idx"].index_select(0, b), rows["log_p"].index_select(0, b),
                                 rows["log_tail"].index_select(0, b), T, rows["classes"])
                loss = kd_loss(logits, target, labels, T, lam)["loss"]
            else:
                loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - started
        samples += len(x)
    return {"samples_per_s": round(samples / seconds, 1), "epoch_s": round(seconds, 3), "samples": samples}


# --------------------------------------------------------------------------- still runs


def still_train(store: str, setup: dict, out: Path, name: str, *overrides: str, timeout: float = 3600) -> dict:
    """``still train --json`` in a new process; its training throughput, memory and epoch timings."""
    run = run_still([
        "train", f"store.uri={store}", f"student.width={setup['width']}", f"student.depth={setup['depth']}",
        f"train.batch_size={setup['batch_size']}", f"train.lr={setup['lr']}", "train.seed=0",
        f"kd.temperature={KD['temperature']}", "train.max_failures=0", "tracking.enabled=false",
        "scaling.cpus_per_worker=1", f"train.output_dir={out / name}", f"train.name={name}", *overrides,
    ], timeout=timeout)
    summary = run["summary"]
    history = summary["history"]
    samples = sum(h["samples_per_s"] * h["epoch_s"] for h in history)
    seconds = sum(h["epoch_s"] for h in history)
    worker = "ray::RayTrainWorker"
    return {
        "samples_per_s": round(samples / seconds, 1), "epoch_s": round(seconds, 3), "samples": round(samples),
        "first_batch_s": [round(h.get("first_batch_s", 0.0), 3) for h in history],
        "val_s": [round(h.get("val_s", 0.0), 3) for h in history],
        "wall_s": round(run["seconds"], 2), "job_s": summary.get("seconds"), "ingest": summary.get("ingest"),
        "test_accuracy": summary.get("student_test_accuracy"), "test_nll": summary.get("test_nll"),
        "driver_mib": run["driver_mib"], "anon_driver_mib": run["anon_driver_mib"],
        "worker_mib": run["ray_mib"].get(worker), "anon_worker_mib": run["ray_anon_mib"].get(worker),
    }


def sweep_overhead(store: str, out: Path, timeout: float) -> dict:
    """One ``still tune`` of 4 in-process trials; a trial's wall time against its own training seconds."""
    run = run_still([
        "tune", f"store.uri={store}", "tune.trial_mode=in_process", "tune.searcher=grid", "tune.num_samples=1",
        "tune.scheduler=none", "tune.max_concurrent_trials=1", f"tune.output_dir={out}", f"tune.name={out.name}",
        "train.epochs=2", "train.batch_size=128", "train.lr=0.003", "student.depth=2", "space.weight=[0.7]",
        "space.temperature=[2,4]", "space.width=[32,64]", "tracking.enabled=false",
    ], timeout=timeout)
    summary = run["summary"]
    folder = Path(summary.get("output_dir") or out)
    per_trial, epoch_s = [], 0.0
    for row in summary["trials"]:
        trial_epochs = sum(h["epoch_s"] for h in json.loads(
            (folder / "models" / row["trial"] / "summary.json").read_text())["history"])
        results = (folder / "trials" / row["trial"] / "result.json").read_text().strip().splitlines()
        per_trial.append(float(json.loads(results[-1])["time_total_s"]) - trial_epochs)
        epoch_s += trial_epochs
    wall = float(summary["wall_s"])
    return {"trials": len(per_trial), "sweep_wall_s": wall, "process_s": round(run["seconds"], 2),
            "trial_overhead_each_s": [round(x, 3) for x in per_trial],
            "trial_overhead_s": round(sum(per_trial) / len(per_trial), 3),
            "sweep_overhead_per_trial_s": round((wall - epoch_s) / len(per_trial), 3)}


def digits_store(work: Path) -> str:
    """A digits teacher (``still train``, kd.weight=0) and its top-5 store (``still infer``), for the sweep."""
    teacher = run_still(["train", "data.source=builtin:digits", "student.width=256", "kd.weight=0", "train.epochs=5",
                         "scaling.num_workers=0", "tracking.enabled=false", f"train.output_dir={work / 'teacher'}"],
                        timeout=600)["summary"]["checkpoint"]
    return run_still(["infer", "data.source=builtin:digits", f"teacher.uri={teacher}", f"store.root={work / 'stores'}",
                      "store.mode=topk", "store.k=5", "tracking.enabled=false"], timeout=600)["summary"]["store"]


# --------------------------------------------------------------------------- main


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _median_run(results: list[dict | None]) -> dict | None:
    """The run of median throughput among the repeats that succeeded."""
    done = sorted((r for r in results if r), key=lambda r: r["samples_per_s"])
    return done[len(done) // 2] if done else None


def bracketed_ratios(still: list[dict | None], plain: list[dict | None]) -> list[float | None]:
    """Each still run's throughput ÷ the mean of the plain runs just before and after it (``plain[i]``,
    ``plain[i + 1]``); None where a run failed."""
    ratios = []
    for i, run in enumerate(still):
        around = [_get(p, "samples_per_s") for p in plain[i:i + 2]]
        ratios.append(_ratio(_get(run, "samples_per_s"), sum(around) / 2)
                      if len(around) == 2 and None not in around else None)
    return ratios


def _median(values: list[float | None]) -> float | None:
    done = sorted(v for v in values if v is not None)
    return done[len(done) // 2] if done else None


def _get(result: dict | None, key: str) -> Any:
    return result.get(key) if result else None


def machine() -> dict:
    """What the figures were measured on."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": 1, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 200k/20k-row stores, 1 epoch")
    parser.add_argument("--rows", type=int, default=0, help="rows of the large store (default 10M; quick 200k)")
    parser.add_argument("--small-rows", type=int, default=0, help="rows of the small store (default 1M; quick 20k)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs of part 1 (default 5; quick 1)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of part 1 (median taken)")
    parser.add_argument("--stream-repeats", type=int, default=5,
                        help="still runs of part 2's large store, each between two plain KD loops (median ratio)")
    parser.add_argument("--cache", default=str(Path("~/.cache/still-bench/train").expanduser()),
                        help="synthetic data, teachers and stores: written once, reused by later runs")
    parser.add_argument("--keep", action="store_true", help="keep this run's folder (runs, sweep) afterwards")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    big = args.rows or (200_000 if args.quick else 10_000_000)
    small = args.small_rows or (20_000 if args.quick else 1_000_000)
    epochs = args.epochs or (1 if args.quick else 5)
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
        shown = f"{len(value['x']):,} rows" if isinstance(value, dict) and "x" in value else value
        log(f"{name}: {shown}")
        return value

    # 1. Memory ingest, MNIST-sized.
    mem_store = timed("memory_store", lambda: labels_only_store(cache, MEMORY["rows"], MEMORY, timeout=1800))
    memory: dict[str, Any] = {}
    if mem_store:
        common = [f"train.epochs={epochs}", "scaling.num_workers=0", "train.ingest=memory"]
        rows = timed("memory_rows", lambda: train_rows(mem_store["store"], KD["temperature"]))
        runs: dict[str, list] = {"still_kd": [], "still_ce": [], "plain_kd": [], "plain_ce": []}

        def plain_runs(repeat: int) -> None:
            runs["plain_kd"].append(timed(f"memory_plain_kd_{repeat}", lambda: plain_loop(rows, MEMORY, epochs, True)))
            runs["plain_ce"].append(timed(f"memory_plain_ce_{repeat}", lambda: plain_loop(rows, MEMORY, epochs, False)))

        for repeat in range(args.repeats):  # each still run between two plain runs of its loss (part 2 says why)
            plain_runs(repeat)
            runs["still_kd"].append(timed(f"memory_still_kd_{repeat}", lambda: still_train(
                mem_store["store"], MEMORY, work, "memory-kd", *common, f"kd.weight={KD['weight']}")))
            runs["still_ce"].append(timed(f"memory_still_ce_{repeat}", lambda: still_train(
                mem_store["store"], MEMORY, work, "memory-ce", *common, "kd.weight=0")))
        plain_runs(args.repeats)
        memory = {name: _median_run(results) for name, results in runs.items()}
        memory["bracketed_ratios_kd"] = bracketed_ratios(runs["still_kd"], runs["plain_kd"])
        memory["bracketed_ratios_ce"] = bracketed_ratios(runs["still_ce"], runs["plain_ce"])
        memory["repeats"] = args.repeats
        del rows

    # 2-3. Streamed from labels-only stores; peak memory at two sizes.
    stores = {n: timed(f"store_{n}", lambda n=n: labels_only_store(cache, n, STREAM, timeout=3600))
              for n in (small, big)}

    def stream(n: int, name: str) -> dict | None:
        return timed(name, lambda: still_train(
            stores[n]["store"], STREAM, work, f"stream-{n}", "scaling.num_workers=1", "train.ingest=stream",
            f"train.epochs={STREAM['epochs']}", f"kd.weight={KD['weight']}"))

    streams = {small: stream(small, f"stream_{small}")} if stores[small] else {}
    plain_stream: dict[str, Any] = {}
    if stores[big]:
        rows = timed("stream_rows", lambda: train_rows(stores[big]["store"], KD["temperature"]))
        big_runs: dict[str, list] = {"still": [], "plain_kd": []}

        def plain_kd(repeat: int) -> None:
            if rows is not None:
                big_runs["plain_kd"].append(timed(f"stream_plain_kd_{repeat}",
                                                  lambda: plain_loop(rows, STREAM, 1, kd=True)))

        # plain, still, plain, ..., still, plain: every still run is bracketed by the plain runs just
        # before and after it, so that the machine's drift over those minutes cancels out of its ratio
        for repeat in range(args.stream_repeats):
            plain_kd(repeat)
            big_runs["still"].append(stream(big, f"stream_{big}_{repeat}"))
        plain_kd(args.stream_repeats)
        streams[big] = _median_run(big_runs["still"])
        plain_stream["plain_kd"] = _median_run(big_runs["plain_kd"])
        plain_stream["bracketed_ratios"] = bracketed_ratios(big_runs["still"], big_runs["plain_kd"])
        if rows is not None:
            plain_stream["plain_ce"] = timed("stream_plain_ce", lambda: plain_loop(rows, STREAM, 1, kd=False))
            del rows

    # 4. Sweep overhead.
    digits = timed("digits_store", lambda: digits_store(work))
    tune = timed("sweep", lambda: sweep_overhead(digits, work / "tune", timeout=900)) if digits else None

    stream_big, stream_small = streams.get(big), streams.get(small)
    fixed = None
    if stream_big and stream_big["first_batch_s"]:
        fixed = round(stream_big["first_batch_s"][0] + stream_big["val_s"][0], 3)
    rate = lambda r: _get(r, "samples_per_s")  # noqa: E731
    result = {
        "bench": "train", "quick": args.quick,
        "ratio_stream_vs_plain_kd": _median(plain_stream.get("bracketed_ratios", [])),
        "ratio_memory_vs_plain_kd": _median(memory.get("bracketed_ratios_kd", [])),
        "ratio_stream_vs_plain": _ratio(rate(stream_big), rate(plain_stream.get("plain_ce"))),
        "ratio_kd_vs_ce": _ratio(rate(memory.get("still_kd")), rate(memory.get("still_ce"))),
        "ratio_memory_ce_vs_plain_ce": _median(memory.get("bracketed_ratios_ce", [])),
        "stream_fixed_s": fixed,
        "rss_private_ratio_10x": _ratio(_get(stream_big, "anon_worker_mib"), _get(stream_small, "anon_worker_mib")),
        "rss_ratio_10x": _ratio(_get(stream_big, "worker_mib"), _get(stream_small, "worker_mib")),
        "trial_overhead_s": _get(tune, "trial_overhead_s"),
        "memory": {"setup": {**MEMORY, "epochs": epochs, **KD}, "store": mem_store, **memory},
        "stream": {"setup": {**STREAM, **KD, "rows": big, "small_rows": small},
                   "stores": {str(k): v for k, v in stores.items()},
                   "still": {str(k): v for k, v in streams.items()}, **plain_stream},
        "sweep": {"grid": "T [2,4] x width [32,64], weight 0.7, 2 epochs, batch 128, digits store, one at a time",
                  **(tune or {})},
        "machine": machine(),
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
