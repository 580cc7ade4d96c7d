"""Benchmark: ``still infer`` (Ray Data, embedded local Ray) vs a plain PyTorch loop.

    python bench/infer.py                                # 1M rows, and 10M for memory: ~35 minutes on 2 CPUs
    python bench/infer.py --rows 50000 --rss-rows 0      # smoke run

Same data (``--rows`` rows of 784 uint8 features, Parquet), same teacher (MLP
784-1200-1200-10, random init, a still checkpoint), same outputs (top-k k=10 fp16,
ids and labels, raw inputs passed through, Parquet shards):

- ``plain``: one process reads the Parquet row groups, runs the teacher under
  ``torch.inference_mode`` with torch's default threads, compresses, writes Parquet
  (run twice, before and after the still runs; the faster one is the baseline);
- ``still cold``: ``still infer --json`` as a new process, what a user runs: Python
  imports, Ray start-up and worker start included;
- ``still warm``: ``run_infer`` in this process after a 20k-row warm-up run (Ray and
  its task workers up, the model loaded in them), into a new store root (not a cache
  hit), for each plan (``fused``, ``streaming``; an actor pool starts with each run).

rows/s = rows / wall seconds of the whole call. Memory: the peak RSS of the driver and
of the largest Ray worker during a labels-only ``still infer`` of ``--rows`` rows and of
``--rss-rows`` rows (``rss_ratio_10x`` = their ratio; streaming keeps it flat). Then
bytes per row of dense fp32, dense fp16 and top-k (k=10) stores of a 10-class and a
1000-class teacher, self-contained and labels-only. Progress goes to stderr; the last
stdout line is one JSON object (also saved to ``bench/results/infer.json``) with
``ratio`` (still warm, fused ÷ plain), ``ratio_cold``, ``ratio_streaming``,
``rss_ratio_10x``, ``bytes_per_row_labels_only`` and ``bytes_per_row_self_contained``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

# bench/common.py: these scripts run as python bench/<name>.py
from common import log, make_data, make_teacher, run_still, save_result

HERE = Path(__file__).resolve().parent


def plain_loop(data: Path, teacher_uri: str, out: Path, batch_size: int, k: int = 10) -> dict:
    """Single-process baseline: read Parquet → forward → top-k → write Parquet."""
    import torch

    from still.checkpoints import load_checkpoint
    from teacher_infer.soft_labels import SoftLabelSpec, compress
    from teacher_infer.store import build_table

    start = time.perf_counter()
    model, _ = load_checkpoint(teacher_uri)
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    for index, path in enumerate(sorted(data.glob("*.parquet"))):
        pfile = pq.ParquetFile(path)
        for g in range(pfile.metadata.num_row_groups):
            table = pfile.read_row_group(g)
            raw = table["features"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, 784)
            parts = []
            for lo in range(0, len(raw), batch_size):
                x = torch.from_numpy(raw[lo:lo + batch_size].astype(np.float32)) * (1 / 255)
                with torch.inference_mode():
                    parts.append(model(x).numpy())
            logits = np.concatenate(parts)
            outputs = compress(logits, SoftLabelSpec.create("topk", logits.shape[1], k=k, dtype="float16"))
            result = build_table(table["id"], table["label"].to_numpy(), np.zeros(table.num_rows, np.int8), outputs,
                                 inputs=table["features"].combine_chunks())
            pq.write_table(result, out / f"part-{index:03d}-{g:05d}.parquet", compression="zstd", compression_level=1)
            rows += table.num_rows
    seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1)}


def _cli_args(data: Path, teacher_uri: str, root: Path, extra: list[str]) -> list[str]:
    return ["infer", f"data.source={data}", f"teacher.uri={teacher_uri}", f"store.root={root}", "store.mode=topk",
            "store.k=10", "tracking.enabled=false", *extra]


def still_cold(data: Path, teacher_uri: str, root: Path, extra: list[str]) -> dict:
    """``still infer --json`` as a fresh process (Ray started and stopped inside it), with its peak memory.

    Returns:
        rows, seconds, rows_per_s, bytes_per_row, and the peak RSS (MiB) of that
        process (the driver) and of its largest Ray worker.
    """
    run = run_still(_cli_args(data, teacher_uri, root, extra))
    summary, seconds = run["summary"], run["seconds"]
    return {"rows": summary["rows"], "seconds": round(seconds, 2), "rows_per_s": round(summary["rows"] / seconds, 1),
            "bytes_per_row": summary["bytes_per_row"], "driver_mib": run["driver_mib"],
            "worker_mib": run["worker_mib"]}


def still_run(data: Path, teacher_uri: str, root: Path, extra: list[str]) -> dict:
    from still.config import load_config
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    config = load_config(InferConfig, None, [f"data.source={data}", f"teacher.uri={teacher_uri}", f"store.root={root}",
                                             "store.mode=topk", "store.k=10", "tracking.enabled=false", *extra])
    start = time.perf_counter()
    summary = run_infer(config)
    seconds = time.perf_counter() - start
    assert not summary["cache_hit"]
    return {"rows": summary["rows"], "seconds": round(seconds, 2), "rows_per_s": round(summary["rows"] / seconds, 1),
            "bytes_per_row": summary["bytes_per_row"], "teacher_accuracy": summary["teacher_accuracy"]}


def bytes_per_row(work: Path, rows: int) -> dict:
    """Store bytes per row by mode, for a 10-class and a 1000-class teacher."""
    from still.config import load_config
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    result = {}
    for classes in (10, 1000):
        data = make_data(work / f"bpr-data-{classes}", rows, classes=classes, files=1, seed=classes)
        teacher = make_teacher(work / f"bpr-teacher-{classes}.pt", classes, width=256)
        for label, overrides in (("dense_fp32", ["store.mode=dense", "store.dtype=float32"]),
                                 ("dense_fp16", ["store.mode=dense", "store.dtype=float16"]),
                                 ("topk10_fp16", ["store.mode=topk", "store.k=10", "store.dtype=float16"])):
            for inputs in (True, False):  # self-contained, labels-only
                config = load_config(InferConfig, None, [
                    f"data.source={data}", f"teacher.uri={teacher}", f"store.root={work / 'bpr-stores'}",
                    "tracking.enabled=false", f"store.include_inputs={str(inputs).lower()}", *overrides])
                summary = run_infer(config)
                name = f"{classes}cls_{label}" + ("" if inputs else "_no_inputs")
                result[name] = summary["bytes_per_row"]
                log(f"bytes/row {name}: {summary['bytes_per_row']}")
    return result


def peak_memory(data: Path, teacher_uri: str, root: Path, extra: list[str]) -> dict:
    """Peak RSS (MiB) of the driver and of the largest Ray worker during a labels-only ``still infer``."""
    import ray

    ray.shutdown()  # so that only the measured run's workers are sampled
    run = still_cold(data, teacher_uri, root, [*extra, "store.include_inputs=false"])
    return {k: run[k] for k in ("rows", "rows_per_s", "driver_mib", "worker_mib")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rss-rows", type=int, default=10_000_000, help="rows of the second memory run (0: skip it)")
    parser.add_argument("--bpr-rows", type=int, default=20_000, help="rows for the bytes-per-row part")
    parser.add_argument("--batch-size", type=int, default=4096, help="teacher batch (both sides)")
    parser.add_argument("--shard-rows", type=int, default=0, help="still infer.shard_rows (0: auto)")
    parser.add_argument("--torch-threads", type=int, default=0, help="still infer.torch_threads")
    parser.add_argument("--work", default="", help="scratch directory (default: a temp dir, removed after)")
    parser.add_argument("--out", default=str(HERE / "results" / "infer.json"))
    args = parser.parse_args(argv)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="still-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        log(f"generating {args.rows} rows in {work}")
        data = work / f"data-{args.rows}"
        if not data.exists():
            make_data(data, args.rows)
        teacher = make_teacher(work / "teacher.pt", 10)
        extra = [f"infer.batch_size={args.batch_size}", f"infer.shard_rows={args.shard_rows}",
                 f"infer.torch_threads={args.torch_threads}", "store.include_inputs=true"]

        log("plain loop")
        plain = plain_loop(data, teacher, work / "plain-out", args.batch_size)
        log(f"plain: {plain}")
        log("still infer, cold: a new `still infer` process")
        cold = still_cold(data, teacher, work / "stores-cold", extra)
        log(f"still cold: {cold}")
        log("warm-up: Ray up, task workers started, torch imported and the model loaded in them")
        warmup = make_data(work / "warmup", 20_000, files=1, seed=1)
        still_run(warmup, teacher, work / "stores-warmup", [*extra, "infer.plan=fused"])
        warm = {}
        for plan in ("fused", "streaming"):
            log(f"still infer, warm, {plan} plan")
            warm[plan] = still_run(data, teacher, work / f"stores-warm-{plan}", [*extra, f"infer.plan={plan}"])
            log(f"still warm {plan}: {warm[plan]}")
        log("plain loop again (same conditions as warm)")
        plain2 = plain_loop(data, teacher, work / "plain-out-2", args.batch_size)
        log(f"plain again: {plain2}")
        plain_best = max(plain["rows_per_s"], plain2["rows_per_s"])
        memory = {args.rows: peak_memory(data, teacher, work / "stores-rss", extra[:-1])}
        log(f"memory: {memory}")
        if args.rss_rows:
            big = work / f"data-{args.rss_rows}"
            if not big.exists():
                make_data(big, args.rss_rows, files=max(4, args.rss_rows // 250_000))
            memory[args.rss_rows] = peak_memory(big, teacher, work / "stores-rss-big", extra[:-1])
            log(f"memory: {memory}")
        shutil.rmtree(work / "plain-out", ignore_errors=True)
        bpr = bytes_per_row(work, args.bpr_rows)
        import torch

        rss_ratio = None
        if args.rss_rows:
            small, large = memory[args.rows], memory[args.rss_rows]
            rss_ratio = round(max(large["driver_mib"] / small["driver_mib"], large["worker_mib"] / small["worker_mib"]),
                              3)
        result = {
            "bench": "infer",
            "rows": args.rows,
            "features": "784 x uint8",
            "teacher": "mlp 784-1200-1200-10 (random init)",
            "store": "topk k=10 float16, inputs passed through",
            "cpus": os.cpu_count(),
            "torch_threads_plain": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "shard_rows": args.shard_rows or "auto",
            "plain": plain,
            "plain_again": plain2,
            "still_cold": cold,
            "still_warm": warm["fused"],
            "still_warm_streaming": warm["streaming"],
            "ratio": round(warm["fused"]["rows_per_s"] / plain_best, 3),
            "ratio_cold": round(cold["rows_per_s"] / plain_best, 3),
            "ratio_streaming": round(warm["streaming"]["rows_per_s"] / plain_best, 3),
            "peak_rss": {str(k): v for k, v in memory.items()},
            "rss_ratio_10x": rss_ratio,
            "bytes_per_row": bpr,
            "bytes_per_row_rows": args.bpr_rows,
            "bytes_per_row_labels_only": bpr["10cls_topk10_fp16_no_inputs"],
            "bytes_per_row_self_contained": bpr["10cls_topk10_fp16"],
        }
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    save_result(result, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
