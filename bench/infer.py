"""Benchmark: ``still infer`` (Ray Data, embedded local Ray) vs a plain PyTorch loop.

    python bench/infer.py                      # 1,000,000 rows, ~10 minutes on 2 CPUs
    python bench/infer.py --rows 50000         # smoke run
    python bench/infer.py --rows 200000 --batch-size 8192 --shard-rows 25000

Same data (``--rows`` rows of 784 uint8 features, Parquet), same teacher (MLP
784-1200-1200-10, random init, a still checkpoint), same outputs (top-k k=10 fp16,
ids, labels and raw inputs passed through, Parquet shards):

- ``plain``: one process reads the Parquet row groups, runs the teacher under
  ``torch.inference_mode`` with torch's default threads, compresses, writes Parquet;
- ``still cold``: ``run_infer`` in a fresh process, Ray start-up included;
- ``still warm``: ``run_infer`` again into a new store root (not a cache hit), Ray and
  its workers already up.

rows/s = rows / wall seconds of the whole call. Then bytes per row of dense fp32,
dense fp16 and top-k (k=10) stores of a 10-class and a 1000-class teacher (with and
without the raw inputs). Progress goes to stderr; the last stdout line is one JSON
object (also saved to ``bench/results/infer.json``) whose ``ratio`` is still warm ÷ plain.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def make_data(directory: Path, rows: int, classes: int = 10, files: int = 4, seed: int = 0) -> Path:
    """Writes ``rows`` rows of (id, features uint8[784], label) as ``files`` Parquet files."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = -(-rows // files)
    for index, start in enumerate(range(0, rows, per_file)):
        stop = min(start + per_file, rows)
        table_rows = []
        for chunk in range(start, stop, 50_000):
            n = min(50_000, stop - chunk)
            x = rng.integers(0, 256, (n, 784), dtype=np.uint8)
            table_rows.append(pa.table({
                "id": np.arange(chunk, chunk + n, dtype=np.int64),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 784),
                "label": rng.integers(0, classes, n).astype(np.int64),
            }))
        pq.write_table(pa.concat_tables(table_rows), directory / f"part-{index:03d}.parquet",
                       row_group_size=10_000, compression="zstd", compression_level=1)
    return directory


def make_teacher(path: Path, classes: int, width: int = 1200) -> str:
    import torch

    from still.checkpoints import save_checkpoint
    from still.models import build_model

    torch.manual_seed(0)
    args = {"input_shape": [784], "num_classes": classes, "width": width, "depth": 2}
    return save_checkpoint(str(path), build_model("mlp", **args), "mlp", args)


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
            for inputs in (True, False):
                config = load_config(InferConfig, None, [
                    f"data.source={data}", f"teacher.uri={teacher}", f"store.root={work / 'bpr-stores'}",
                    "tracking.enabled=false", f"store.include_inputs={str(inputs).lower()}", *overrides])
                summary = run_infer(config)
                name = f"{classes}cls_{label}" + ("" if inputs else "_no_inputs")
                result[name] = summary["bytes_per_row"]
                log(f"bytes/row {name}: {summary['bytes_per_row']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
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

        log("plain loop")
        plain = plain_loop(data, teacher, work / "plain-out", args.batch_size)
        log(f"plain: {plain}")
        extra = [f"infer.batch_size={args.batch_size}", f"infer.shard_rows={args.shard_rows}",
                 f"infer.torch_threads={args.torch_threads}"]
        log("still infer, cold (Ray start-up included)")
        cold = still_run(data, teacher, work / "stores-cold", extra)
        log(f"still cold: {cold}")
        log("still infer, warm")
        warm = still_run(data, teacher, work / "stores-warm", extra)
        log(f"still warm: {warm}")
        log("plain loop again (same conditions as warm)")
        plain2 = plain_loop(data, teacher, work / "plain-out-2", args.batch_size)
        log(f"plain again: {plain2}")
        plain_best = max(plain["rows_per_s"], plain2["rows_per_s"])
        bpr = bytes_per_row(work, args.bpr_rows)
        import torch

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
            "still_warm": warm,
            "ratio": round(warm["rows_per_s"] / plain_best, 3),
            "ratio_cold": round(cold["rows_per_s"] / plain_best, 3),
            "bytes_per_row": bpr,
            "bytes_per_row_rows": args.bpr_rows,
        }
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
