"""Benchmark: per-token stores of a language-model teacher, and students distilled from them.

    python bench/lm_store.py                 # ~25 minutes on 2 CPUs
    python bench/lm_store.py --seeds 1       # quicker, no spread
    python bench/lm_store.py --store DIR     # students only, from an existing top-k store

On ``builtin:web-bible`` blocks of ``--seq-len`` tokens (SmolLM2-135M's tokenizer), with
``builtin:smollm2-135m`` as the teacher:

1. **Capture** (``ratio_capture``, goal ≥ 0.9): ``still infer store.mode=topk store.k=32``
   over ``--blocks`` training blocks (and ``--eval-blocks`` validation blocks), tokens/s
   of its shards (forward, logits in chunks, compression, fidelity, Parquet write; the
   teacher's load and Ray's start-up are reported apart as ``capture_fixed_s``) ÷ a plain
   transformers loop in this process over the same blocks and batch that computes the
   same top-32 (``model(x).logits`` → ``log_softmax`` → ``topk``) and keeps nothing else,
   run once before and once after the capture (the faster run counts: this machine's speed
   drifts over minutes, and a short baseline run caught in a slow minute flatters the ratio).
   ``bytes_per_token`` (goal ≤ 140) and the tail's relative error at T = 1 (goal ≤ 1e-4)
   come from the store's manifest.
2. **Students** (``distilled_minus_ce_only``, goal < 0 by more than the spread): the
   main job's student (``configs/lm.yaml``: llama 128 × 2, batch 8, 4 epochs, AdamW,
   cosine) trained from the store CE-only (λ = 0) and distilled (T = 1, λ = 0.5) with
   ``--seeds`` seeds each; held-out CE on the store's validation blocks, mean ± standard
   error per arm.
3. **Step** (``ratio_kd_step``, goal ≥ 0.8): the distilled students' training tokens/s ÷ the
   CE-only students' (same seeds, same batches: the loop's own clock).

The last stdout line is one JSON object, saved to ``bench/results/lm_store.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, run_still, save_result  # noqa: E402

TEACHER = "builtin:smollm2-135m"
STUDENT = ["student.family=llama", "student.width=128", "student.depth=2", "train.batch_size=8", "train.lr=0.003",
           "train.optimizer=adamw", "train.weight_decay=0.1", "train.lr_schedule=cosine", "train.warmup_steps=8",
           "train.grad_clip=1.0", "train.log_every=0", "train.epochs=4", "scaling.num_workers=0",
           "tracking.enabled=false", "kd.temperature=1"]
DISTILLED_WEIGHT = 0.5


def plain_capture(blocks, batch: int, k: int) -> dict:
    """A plain transformers loop computing the same top-k over ``blocks`` (int64), timed after the load."""
    import torch

    from still.lm_models import load_causal_lm

    lm = load_causal_lm(TEACHER, with_tokenizer=False)
    with torch.inference_mode():
        lm.model(input_ids=blocks[:batch])  # warm-up at the measured shape
        started = time.perf_counter()
        for start in range(0, len(blocks), batch):
            logits = lm.model(input_ids=blocks[start:start + batch]).logits[:, :-1].float()
            torch.topk(torch.log_softmax(logits, dim=-1), k, dim=-1)
        seconds = time.perf_counter() - started
    return {"tokens_per_s": round(blocks.numel() / seconds, 1), "seconds": round(seconds, 1)}


def capture_rate(store: Path) -> dict:
    """Tokens/s of a store's shards from their records (each shard's own clock), and the totals."""
    records = [json.loads(p.read_text()) for p in sorted((store / "records").glob("*.json"))]
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    return {"tokens_per_s": round(tokens / seconds, 1), "shard_seconds": round(seconds, 1), "shards": len(records)}


def mean_se(values: list[float]) -> dict:
    """Mean and standard error of the mean."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": round(statistics.fmean(values), 4), "se": round(se, 4) if se is not None else None,
            "values": [round(v, 4) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--store", help="an existing top-k store of these blocks: skip the capture, train students only")
    parser.add_argument("--plain-blocks", type=int, default=48, help="blocks the plain capture loop runs over")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lm_store.json"))
    args = parser.parse_args()
    import torch

    result: dict = {"bench": "lm_store", "blocks": args.blocks, "eval_blocks": args.eval_blocks,
                    "seq_len": args.seq_len, "seeds": args.seeds, "errors": {},
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    data = ["data.source=builtin:web-bible", f"data.tokenizer={TEACHER}", f"data.seq_len={args.seq_len}"]
    with tempfile.TemporaryDirectory(prefix="still-bench-lm-store-") as tmp:
        work = Path(tmp)
        store = Path(args.store) if args.store else capture(args, data, work, result)
        students(args, store, data, work, result)
    save_result(result, Path(args.out), {k: result.get(k) for k in (
        "ratio_capture", "bytes_per_token", "tail_mass_rel_err_T1", "distilled_minus_ce_only", "ratio_kd_step")})


def capture(args: argparse.Namespace, data: list[str], work: Path, result: dict) -> Path:
    """Section 1: ``still infer`` and the plain loop beside it; returns the store."""
    import torch

    from still.config import DataConfig
    from still.text.packing import block_arrays, token_blocks

    torch.set_num_threads(os.cpu_count() or 1)  # the plain loop as the capture actor (all the cluster's CPUs)
    blocks_info = token_blocks(DataConfig(source="builtin:web-bible", tokenizer=TEACHER, seq_len=args.seq_len),
                               TEACHER)
    _, train = block_arrays(blocks_info, "train")
    blocks = torch.from_numpy(train[:args.plain_blocks].astype("int64"))
    plain_runs = []
    log("capture: plain transformers loop, before")
    plain_runs.append(plain_capture(blocks, max(1, 2048 // args.seq_len), 32))
    log("capture: still infer")
    started = time.perf_counter()
    infer = run_still(["infer", *data, f"teacher.uri={TEACHER}", "store.mode=topk", "store.k=32",
                       f"store.root={work / 'stores'}", f"infer.max_blocks={args.blocks}",
                       f"infer.max_eval_blocks={args.eval_blocks}", "infer.batch_size=2048",
                       "tracking.enabled=false"], cwd=work)["summary"]
    wall = time.perf_counter() - started
    store = Path(infer["store"])
    manifest = json.loads((store / "manifest.json").read_text())
    rate = capture_rate(store)
    result["capture"] = {**rate, "wall_s": round(wall, 1),
                         "capture_fixed_s": round(wall - rate["shard_seconds"], 1),
                         "tokens": manifest["rows"] * args.seq_len, "bytes_per_token": manifest["bytes_per_token"],
                         "teacher_val_ce": manifest["teacher_metrics"]["val"]["ce"],
                         "tail_mass_rel_err_T1": manifest["fidelity"]["1"]["tail_mass_rel_err"],
                         "fidelity": manifest["fidelity"]}
    log("capture: plain transformers loop, after")
    plain_runs.append(plain_capture(blocks, max(1, 2048 // args.seq_len), 32))
    # the machine's speed drifts over minutes: the faster of the runs either side is the baseline
    result["plain_capture"] = {**max(plain_runs, key=lambda r: r["tokens_per_s"]), "runs": plain_runs}
    result["ratio_capture"] = round(rate["tokens_per_s"] / result["plain_capture"]["tokens_per_s"], 3)
    result["bytes_per_token"] = round(manifest["bytes_per_token"], 2)
    result["tail_mass_rel_err_T1"] = result["capture"]["tail_mass_rel_err_T1"]
    return store


def students(args: argparse.Namespace, store: Path, data: list[str], work: Path, result: dict) -> None:
    """Sections 2 and 3: CE-only and distilled students from ``store``, ``--seeds`` seeds each."""
    result["store"] = str(store)
    arms: dict[str, list[dict]] = {"ce_only": [], "distilled": []}
    for seed in range(args.seeds):
        for arm, weight in (("ce_only", 0.0), ("distilled", DISTILLED_WEIGHT)):
            log(f"student {arm}, seed {seed}")
            try:
                out = run_still(["train", f"store.uri={store}", *data, *STUDENT, f"kd.weight={weight}",
                                 f"train.seed={seed}", f"train.name={arm}-{seed}",
                                 f"train.output_dir={work / f'{arm}-{seed}'}"], cwd=work)["summary"]
                arms[arm].append({"seed": seed, "val_ce": out["val_ce"], "val_agreement": out["val_agreement"],
                                  "tokens_per_s": out["tokens_per_s"]})
            except Exception as exc:  # recorded, the bench goes on
                result["errors"][f"{arm}-{seed}"] = str(exc).splitlines()[-1][:300]
    result["students"] = {arm: {"val_ce": mean_se([r["val_ce"] for r in runs]),
                                "val_agreement": mean_se([r["val_agreement"] for r in runs]),
                                "tokens_per_s": mean_se([r["tokens_per_s"] for r in runs]), "runs": runs}
                          for arm, runs in arms.items() if runs}
    if arms["ce_only"] and arms["distilled"]:
        summary = result["students"]
        ce_only, distilled = summary["ce_only"]["val_ce"], summary["distilled"]["val_ce"]
        result["distilled_minus_ce_only"] = round(distilled["mean"] - ce_only["mean"], 4)
        if ce_only["se"] is not None and distilled["se"] is not None:
            result["difference_se"] = round(math.hypot(ce_only["se"], distilled["se"]), 4)
        result["ratio_kd_step"] = round(summary["distilled"]["tokens_per_s"]["mean"]
                                        / summary["ce_only"]["tokens_per_s"]["mean"], 3)


if __name__ == "__main__":
    main()
