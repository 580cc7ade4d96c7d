"""Benchmark: language-model training through still vs a plain PyTorch loop; the teacher's forward speed.

    python bench/lm.py                  # ~10 minutes on 2 CPUs
    python bench/lm.py --steps 10       # quicker

Same blocks (``builtin:web-bible`` tokenized with SmolLM2-135M's tokenizer, packed into
blocks of ``--seq-len`` tokens; the cached blocks ``still train`` reads), same model (a
``llama`` student ``--width`` × ``--depth``, vocabulary 49,152, seed 0), same optimizer
(fused AdamW, decay groups, warmup + cosine, clipping at 1.0), batch ``--batch`` blocks:

- ``plain``: a loop in this process over the blocks as one int64 tensor, forward,
  next-token cross-entropy, backward, clip, step; ``--steps`` optimizer steps;
- ``still_in_process``: ``still train ... scaling.num_workers=0 train.max_steps=<steps>``
  as a new process; tokens/s of its epoch (the loop's own clock: reads, steps, nothing
  of start-up or evaluation);
- ``still_ray_worker``: the same with one Ray Train worker.

``ratio_in_process`` = still in process ÷ plain (goal ≥ 0.9); ``ratio_ray_worker``
likewise. Plain runs twice (before and after the still runs); the faster counts.
Then ``builtin:smollm2-135m``'s forward tokens/s in fp32 on ``--teacher-blocks`` blocks
(batch 8) and its load time. The last stdout line is one JSON object, saved to
``bench/results/lm.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, run_still, save_result  # noqa: E402

TOKENIZER = "builtin:smollm2-135m"


def plain_loop(blocks, width: int, depth: int, batch: int, steps: int, lr: float) -> dict:
    """``steps`` optimizer steps of the student over ``blocks`` (int64 tensor), timed."""
    import torch

    from still.lm_models import load_lm_tokenizer, special_token_ids
    from still.models import build_model
    from student_train.lm_loop import causal_lm_loss, decay_groups, next_token_logits

    tokenizer = load_lm_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    model = build_model("llama", width=width, depth=depth, vocab_size=len(tokenizer), max_positions=2048,
                        special_ids=special_token_ids(tokenizer))
    optimizer = torch.optim.AdamW(decay_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), fused=True)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    tokens = 0
    for step in range(steps):
        x = blocks.index_select(0, order[step * batch:(step + 1) * batch])
        loss = causal_lm_loss(next_token_logits(model, x), x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += x.numel()
    seconds = time.perf_counter() - started
    return {"tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 2), "tokens": tokens}


def teacher_forward(blocks, count: int) -> dict:
    """SmolLM2-135M's load time and fp32 forward tokens/s over ``count`` blocks, batch 8."""
    import torch

    from still.lm_models import load_causal_lm

    started = time.perf_counter()
    lm = load_causal_lm(TOKENIZER, with_tokenizer=False)
    load_s = time.perf_counter() - started
    x = blocks[:count]
    with torch.inference_mode():
        lm.model(input_ids=x[:8])  # warm-up at the measured shape
        started = time.perf_counter()
        for start in range(0, len(x), 8):
            lm.model(input_ids=x[start:start + 8])
        seconds = time.perf_counter() - started
    return {"load_s": round(load_s, 1), "tokens_per_s": round(x.numel() / seconds, 1), "tokens": int(x.numel()),
            "params": lm.params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--teacher-blocks", type=int, default=32)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "lm.json"))
    args = parser.parse_args()
    import torch

    from still.config import DataConfig
    from still.text.packing import block_arrays, token_blocks

    torch.set_num_threads(1)  # as a Train worker with one CPU; the plain loop gets the same
    data = DataConfig(source="builtin:web-bible", tokenizer=TOKENIZER, seq_len=args.seq_len)
    blocks_info = token_blocks(data, TOKENIZER)
    _, train = block_arrays(blocks_info, "train")
    blocks = torch.from_numpy(train.astype("int64"))
    lr = 0.003
    common = ["train", "data.source=builtin:web-bible", f"data.tokenizer={TOKENIZER}", f"data.seq_len={args.seq_len}",
              "student.family=llama", f"student.width={args.width}", f"student.depth={args.depth}",
              f"train.batch_size={args.batch}", f"train.lr={lr}", "train.optimizer=adamw", "train.weight_decay=0.1",
              "train.grad_clip=1.0", f"train.max_steps={args.steps}", "train.val_rows=8", "tracking.enabled=false",
              "scaling.cpus_per_worker=1"]
    result: dict = {"bench": "lm", "width": args.width, "depth": args.depth, "seq_len": args.seq_len,
                    "batch": args.batch, "steps": args.steps, "train_blocks": len(blocks), "errors": {},
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}}
    with tempfile.TemporaryDirectory(prefix="still-bench-lm-") as tmp:
        log("plain loop")
        plain = [plain_loop(blocks, args.width, args.depth, args.batch, args.steps, lr)]
        for name, workers in (("still_in_process", 0), ("still_ray_worker", 1)):
            log(name)
            try:
                out = run_still([*common, f"scaling.num_workers={workers}", f"train.output_dir={tmp}/{name}"],
                                cwd=Path(tmp))
                epoch = out["summary"]["history"][0]
                result[name] = {"tokens_per_s": round(epoch["tokens_per_s"], 1), "epoch_s": round(epoch["epoch_s"], 2),
                                "first_batch_s": round(epoch["first_batch_s"], 3), "wall_s": round(out["seconds"], 1)}
            except Exception as exc:  # recorded, the bench goes on
                result["errors"][name] = str(exc).splitlines()[-1][:300]
        log("plain loop again")
        plain.append(plain_loop(blocks, args.width, args.depth, args.batch, args.steps, lr))
        result["plain"] = max(plain, key=lambda p: p["tokens_per_s"])
        result["plain_runs"] = [p["tokens_per_s"] for p in plain]
        for name, key in (("still_in_process", "ratio_in_process"), ("still_ray_worker", "ratio_ray_worker")):
            if name in result:
                result[key] = round(result[name]["tokens_per_s"] / result["plain"]["tokens_per_s"], 3)
        log("teacher forward")
        try:
            torch.set_num_threads(os.cpu_count() or 1)
            result["teacher"] = teacher_forward(blocks, args.teacher_blocks)
        except Exception as exc:
            result["errors"]["teacher"] = str(exc).splitlines()[-1][:300]
    save_result(result, Path(args.out))


if __name__ == "__main__":
    main()
