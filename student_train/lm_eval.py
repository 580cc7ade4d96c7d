"""``still eval``: a language model's held-out cross-entropy on the token blocks of a text source.

What a pretrained teacher (``builtin:smollm2-135m``) or any ``save_pretrained`` model
scores on the same held-out books a student is validated on: the blocks are made with
``data.tokenizer`` (default: the model's own) and ``data.seq_len`` exactly as
``still train`` makes them (``still.text.packing``, cached and shared). Runs in this
process, on the first GPU when there is one.

    still eval model.uri=builtin:smollm2-135m data.source=builtin:web-bible data.seq_len=256 --json
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterator

import numpy as np
import torch

from still.errors import StillError
from still.tracking import open_run
from student_train.config import EvalConfig
from student_train.data import resolve_block_source
from student_train.lm_loop import autocast_dtype, evaluate_lm

DEFAULT_EXPERIMENT = "still-eval"


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Loads the model, makes (or finds) the blocks, evaluates each split; one MLflow run.

    Returns:
        ``checkpoint`` (the model evaluated), ``params``, ``vocab_size``, per split
        ``<split>_ce`` (nats/token), ``<split>_ppl``, ``<split>_accuracy``, ``<split>_tokens``,
        and ``tokens_per_s`` (forward passes), ``load_s``, ``seconds``.

    Raises:
        StillError: A model or tokenizer that cannot be loaded (naming the missing file),
            ``data.seq_len`` beyond the model's positions, a bad text source.
    """
    from still.lm_models import check_seq_len, check_vocab, load_causal_lm
    from student_train.reader import Reader, share, unit_order

    if not cfg.model.uri:
        raise StillError("model.uri is required: builtin:smollm2-135m, a .gguf file or a save_pretrained directory")
    started = time.perf_counter()
    tokenizer_uri = cfg.data.tokenizer or cfg.model.uri
    data = dataclasses.replace(cfg.data, tokenizer=tokenizer_uri)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    lm = load_causal_lm(cfg.model.uri, device=device, with_tokenizer=False)
    check_seq_len(lm.model.config, data.seq_len, what="model")
    source = resolve_block_source(data, tokenizer_uri)
    check_vocab(lm.vocab_size, source.blocks.vocab_size)
    dtype = autocast_dtype(cfg.eval.precision, device)
    reader = Reader(source)
    summary: dict[str, Any] = {"checkpoint": cfg.model.uri, "params": lm.params, "vocab_size": lm.vocab_size,
                               "seq_len": data.seq_len, "blocks_key": source.blocks.key, "load_s": lm.load_s}
    tokens = seconds = 0.0
    with open_run(cfg, cfg.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=f"eval-{source.blocks.key[:8]}",
                  tags={"still.verb": "eval", "still.model": cfg.model.uri, "blocks.key": source.blocks.key}) as tracker:
        for split in cfg.eval.splits:
            code = {"train": 0, "val": 1, "test": 2}[split]
            counts = [u.items((code,)) for u in source.units]
            arrays = reader.read_all(share(counts, unit_order(source.units, None), 1, 0), (code,), None)
            blocks = arrays["x"][:cfg.eval.max_blocks or None]
            result = evaluate_lm(lm.model, _batches(blocks, cfg.eval.batch_size, device), dtype)
            summary.update({f"{split}_ce": result["ce"], f"{split}_ppl": result["ppl"],
                            f"{split}_accuracy": result["accuracy"], f"{split}_tokens": result["tokens"]})
            if result["tokens_per_s"]:
                tokens += result["tokens"]
                seconds += result["tokens"] / result["tokens_per_s"]
        summary["tokens_per_s"] = tokens / seconds if seconds else None
        tracker.log_metrics({k: float(v) for k, v in summary.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}, step=0)
        summary["run_id"] = tracker.run_id or None
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _batches(blocks: np.ndarray, batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(blocks), batch_size):
        yield {"x": torch.from_numpy(blocks[start:start + batch_size].astype(np.int64)).to(device)}


def format_eval_table(summary: dict[str, Any]) -> str:
    """The lines ``still eval`` prints before its summary."""
    lines = []
    for split in ("train", "val", "test"):
        if f"{split}_ce" in summary and summary[f"{split}_ce"] is not None:
            lines.append(f"{split}: {summary[f'{split}_ce']:.4f} nats/token, perplexity {summary[f'{split}_ppl']:.2f}, "
                         f"next-token accuracy {summary[f'{split}_accuracy']:.4f} ({summary[f'{split}_tokens']:,} tokens)")
    if summary.get("tokens_per_s"):
        lines.append(f"{summary['tokens_per_s']:,.0f} tokens/s; {summary['params']:,} parameters")
    return "\n".join(lines)
