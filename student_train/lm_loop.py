"""The per-worker training loop of a causal language model (``student.family=llama``).

The classifier loop's counterpart, on the same sessions (``student_train.loop``:
:class:`~student_train.loop.RaySession` in a Ray Train worker, ``LocalSession`` in
process) and the same feed (``student_train.feed.Feed`` over token blocks: equal steps
on every rank, seeded order, read once or streamed). What a language model adds:

- the loss is next-token cross-entropy over every position of a block (nats/token);
  with a language-model store, ``(1 − λ)·CE + λ·T²·KL`` per position, the KL against
  the stored per-token target (``student_train.losses.kd_loss`` over the block's
  positions as rows: top-k + tail or sampled, on the device);
- AdamW with weight decay on matrices only (not on norms, biases or embeddings),
  linear warmup over ``train.warmup_steps`` then ``train.lr_schedule``, gradient
  clipping (``train.grad_clip``) and accumulation over ``train.grad_accum`` batches
  (DDP syncs gradients on the last batch of a step only);
- bf16 autocast on GPUs (``train.precision``);
- metrics every ``train.log_every`` optimizer steps, not only per epoch, all logged at
  the optimizer step, so that curves of runs with other batch sizes line up by step.

Evaluation (:func:`evaluate_lm`): held-out cross-entropy in nats per token,
perplexity, next-token top-1 accuracy, tokens per second and, on a store's held-out
blocks, top-1 agreement with the teacher.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from still.allocator import reuse_large_allocations
from still.models import build_model
from still.tracking import attach
from student_train.config import TrainConfig
from student_train.data import teacher_prefix
from student_train.feed import TORCH_RNG, Feed, derive_seed
from student_train.loop import LoopSpec, RaySession, loggable, plain_config, start_worker
from student_train.losses import kd_loss
from teacher_infer.targets import TRAINING_COLUMNS_AT, target_from_columns

EVAL_TOKENS_PER_BATCH = 1 << 15  # tokens per evaluation batch (held-out blocks are read once, then batched)


def train_lm_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function of a language model (``TorchTrainer(train_loop_per_worker=...)``)."""
    run_lm_loop(start_worker(config), RaySession())


def next_token_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(batch, seq_len − 1, vocab)``: the logits of positions 0 … seq_len − 2, position t predicting
    token t + 1 of its block. The last position predicts nothing inside the block, so its logits are
    never computed (transformers' ``logits_to_keep``): no copy of the largest array of the step to
    drop them, and none in the backward to pad them back.

    Args:
        model: A transformers causal LM (or one wrapped in DDP).
        x: ``(batch, seq_len)`` int64 token blocks.
    """
    return model(input_ids=x, logits_to_keep=torch.arange(x.shape[1] - 1, device=x.device)).logits


def causal_lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token).

    Args:
        logits: ``(batch, seq_len − 1, vocab)``, :func:`next_token_logits`.
        tokens: ``(batch, seq_len)`` int64, the blocks the logits were computed on.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def token_target(batch: Mapping[str, torch.Tensor], spec: Any, temperature: float) -> Any:
    """A batch's per-token teacher target (bound at ``temperature``), one row per position:
    the store's ``(B, P, …)`` training columns seen as ``(B·P, …)``."""
    prefix = teacher_prefix(0)
    columns = {}
    for name in TRAINING_COLUMNS_AT[spec.mode]:
        values = batch[prefix + name]
        columns[prefix + name] = values.reshape(values.shape[0] * values.shape[1], *values.shape[2:])
    return target_from_columns(columns, spec, prefix=prefix, device=batch["x"].device, temperature=temperature)


def distill_step_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], spec: Any, cfg: TrainConfig
                      ) -> dict[str, torch.Tensor | None]:
    """``(1 − λ)·CE + λ·T²·D`` over every position of the blocks (``student_train.losses.kd_loss``;
    D the forward KL, or ``kd.divergence``), from :func:`next_token_logits`.

    Returns:
        ``{"loss", "ce", "kl"}`` (``kl`` None at λ = 0, where the teacher is not read).
    """
    x = batch["x"]
    flat = logits.reshape(-1, logits.shape[-1])
    kd = cfg.kd
    target = [token_target(batch, spec, kd.temperature)] if kd.weight > 0 else None
    return kd_loss(flat, target, x[:, 1:].reshape(-1), kd.temperature, kd.weight, kd.tail, kd.divergence, kd.jsd_beta)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weight matrices, none on norms, biases and embeddings.

    Tied input/output embeddings are one tensor, counted once (in the no-decay group).
    """
    embeddings = {id(model.get_input_embeddings().weight)}
    decay, keep = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 and id(param) not in embeddings else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": keep, "weight_decay": 0.0, "lr_scale": 1.0}]


def scheduled_lr(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: linear warmup
    over ``train.warmup_steps``, then ``train.lr_schedule`` over the remaining steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "cosine":
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return t.lr


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (``train.precision``): bf16 for ``bf16``, and for
    ``auto`` on a GPU; None (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def evaluate_lm(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                dtype: torch.dtype | None = None) -> dict[str, float | int | None]:
    """Held-out next-token metrics of ``model`` (put in eval mode, restored after).

    Args:
        model: A transformers causal LM (:func:`next_token_logits`).
        batches: Mappings with ``x``: ``(batch, seq_len)`` int64 token blocks on the model's device.
        dtype: Autocast dtype (None: fp32).

    Returns:
        ``ce`` (mean nats per predicted token), ``ppl`` (exp of it), ``accuracy`` (top-1
        next token), ``tokens`` (predicted tokens), ``tokens_per_s``, and ``agreement``
        (top-1 equal to the teacher's, where batches carry the teacher's ``top1``; else None).
    """
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64)
    correct = tokens = agree = 0
    compared = False
    started = time.perf_counter()
    try:
        for batch in batches:
            x = batch["x"]
            with _autocast(x.device, dtype):
                predicted = next_token_logits(model, x).float()
            target = x[:, 1:]
            nll += F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), target.reshape(-1),
                                   reduction="sum").double().cpu()
            guess = predicted.argmax(dim=-1)
            correct += int((guess == target).sum())
            tokens += target.numel()
            if "top1" in batch:
                agree += int((guess == batch["top1"]).sum())
                compared = True
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    ce = float(nll) / tokens if tokens else None
    return {"ce": ce, "ppl": math.exp(ce) if ce is not None and ce < 700 else None,
            "accuracy": correct / tokens if tokens else None, "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "agreement": agree / tokens if compared and tokens else None}


def _eval_batches(batches: Iterable[Mapping[str, torch.Tensor]], seq_len: int) -> Iterator[dict[str, torch.Tensor]]:
    """The feed's evaluation batches cut to ``EVAL_TOKENS_PER_BATCH`` tokens (the logits of a
    large vocabulary are the memory that matters)."""
    rows = max(1, EVAL_TOKENS_PER_BATCH // seq_len)
    for batch in batches:
        for start in range(0, len(batch["x"]), rows):
            yield {k: batch[k][start:start + rows] for k in ("x", "top1") if k in batch}


class Progress:
    """The loss terms and tokens since the last log line, summed on the device (no host sync per batch)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.restart()

    def restart(self) -> None:
        """Counts from now."""
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, CE, KL
        self.batches = self.tokens = 0
        self.kl = False
        self.since = time.perf_counter()

    def add(self, terms: Mapping[str, torch.Tensor | None], tokens: int) -> None:
        """One batch's loss terms (``loss``, ``ce``, ``kl`` or None) and tokens."""
        kl = terms["kl"]
        self.kl = kl is not None
        self.sums += torch.stack([terms["loss"].detach(), terms["ce"].detach(),
                                  kl.detach() if kl is not None else terms["ce"].detach() * 0]).double()
        self.batches += 1
        self.tokens += tokens

    def take(self, world: int) -> dict[str, float]:
        """The mean loss terms and throughput since the last call; restarts the counts."""
        seconds = time.perf_counter() - self.since
        loss, ce, kl = (self.sums / max(1, self.batches)).tolist()
        out = {"train_loss": loss, "train_ce": ce, **({"train_kl": kl} if self.kl else {}),
               "tokens_per_s": self.tokens * world / seconds if seconds > 0 else 0.0}
        self.restart()
        return out


def run_lm_loop(spec: LoopSpec, session: Any) -> dict[str, Any]:
    """Trains a causal LM for ``train.epochs`` (continuing from the session's last checkpoint).

    Returns:
        The last reported metrics (the final epoch's carry the test metrics).
    """
    cfg = spec.cfg
    t = cfg.train
    device = session.device
    reuse_large_allocations()  # the step's (tokens, vocabulary) arrays: see still.allocator
    torch.manual_seed(t.seed)
    net = build_model(cfg.student.family, **dict(spec.model_args))
    state = session.restore()
    if state is not None:
        net.load_state_dict(state["net"])
    model = session.prepare(net)
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(decay_groups(net, t.weight_decay), lr=t.lr, betas=(0.9, 0.95), fused=fused)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    start_epoch = int(state["epoch"]) if state else 0
    history: list[dict[str, Any]] = list(state["history"]) if state else []
    step = int(state["step"]) if state else 0
    tracker = attach(spec.tracking) if session.rank == 0 else attach(None)
    feed = Feed(spec.source, spec.feed_settings(session.world_size), session.rank, session.world_size, device)
    steps_per_epoch = math.ceil(feed.steps / t.grad_accum)
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or steps_per_epoch * t.epochs)
    dtype = autocast_dtype(t.precision, device)
    seq_len = spec.source.input_shape[0]
    teacher = spec.source.teachers[0] if spec.source.has_teacher else None

    def state_now(epoch: int) -> dict[str, Any]:
        return {"net": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                "history": history, "config": plain_config(cfg), "family": cfg.student.family,
                "model_args": dict(spec.model_args)}

    def held_out(split_batches: Iterable[Mapping[str, torch.Tensor]], prefix: str) -> dict[str, Any]:
        result = evaluate_lm(net, _eval_batches(split_batches, seq_len), dtype)
        return {f"{prefix}_ce": result["ce"], f"{prefix}_ppl": result["ppl"], f"{prefix}_accuracy": result["accuracy"],
                f"{prefix}_tokens": result["tokens"], f"{prefix}_tokens_per_s": result["tokens_per_s"],
                **({f"{prefix}_agreement": result["agreement"]} if result["agreement"] is not None else {})}

    metrics: dict[str, Any] = {}
    finished = start_epoch >= t.epochs or step >= total_steps  # a resumed run that had ended
    if not finished:
        feed.hold()
    for epoch in range(start_epoch, start_epoch if finished else t.epochs):
        torch.manual_seed(derive_seed(t.seed, epoch, session.rank, TORCH_RNG))
        started = time.perf_counter()
        progress, epoch_progress = Progress(device), Progress(device)
        epoch_batches, epoch_tokens, first_batch_s = 0, 0, 0.0
        grad_norm = None
        model.train()
        batches = iter(feed.epoch(epoch))
        for index in range(steps_per_epoch):
            if step >= total_steps:  # train.max_steps reached: this epoch ends here
                break
            lr = scheduled_lr(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sizes = feed.sizes[index * t.grad_accum:(index + 1) * t.grad_accum]
            micro = len(sizes)
            for m in range(micro):
                batch = next(batches)
                if not epoch_batches and not m and not index:
                    first_batch_s = time.perf_counter() - started
                x = batch["x"]
                sync = m == micro - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()), _autocast(device, dtype):
                    logits = next_token_logits(model, x)
                    if teacher is None:
                        loss = causal_lm_loss(logits, x)
                        terms = {"loss": loss, "ce": loss, "kl": None}
                    else:
                        terms = distill_step_loss(logits, batch, teacher, cfg)
                        loss = terms["loss"]
                # each batch weighs by its rows: the step's gradient is that of the mean over all its rows
                (loss * (sizes[m] / sum(sizes))).backward()
                progress.add(terms, x.numel())
                epoch_progress.add(terms, x.numel())
                epoch_batches += 1
                epoch_tokens += x.numel()
            if t.grad_clip > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), t.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if t.log_every and step % t.log_every == 0 and step < total_steps:
                line = {**progress.take(session.world_size), "lr": lr, "step": step,
                        **({"grad_norm": grad_norm} if grad_norm is not None else {})}
                if session.rank == 0:
                    tracker.log_metrics(loggable(line), step=step)
                    if not spec.quiet:
                        kl = f" kl {line['train_kl']:.4f}" if "train_kl" in line else ""
                        print(f"[still train] step {step}/{total_steps} loss {line['train_loss']:.4f}{kl} "
                              f"lr {lr:.2e} {line['tokens_per_s']:.0f} tokens/s", flush=True)
        seconds = time.perf_counter() - started
        epoch_terms = epoch_progress.take(session.world_size)
        metrics = {"epoch": epoch + 1, "step": step, "lr": lr,
                   **{k: v for k, v in epoch_terms.items() if k != "tokens_per_s"},
                   "epoch_s": seconds, "first_batch_s": first_batch_s,
                   "tokens_per_s": epoch_tokens * session.world_size / seconds if seconds > 0 else 0.0,
                   "world_size": session.world_size, "resumed_from": start_epoch,
                   **({"grad_norm": grad_norm} if grad_norm is not None else {})}
        if session.rank == 0:
            metrics.update(held_out(feed.val(), "val"))
            last = epoch + 1 == t.epochs or step >= total_steps
            if last:
                metrics.update(held_out(feed.test(), "test"))
            history.append(dict(metrics))
            tracker.log_metrics(loggable(metrics), step=step)
        session.report(metrics, state_now(epoch + 1) if session.rank == 0 else None)
        if session.rank == 0 and not spec.quiet:
            print(_epoch_line(metrics, t.epochs), flush=True)
        if step >= total_steps:
            break
    feed.close()
    if finished:  # report the test metrics again
        metrics = dict(history[-1]) if history else {"epoch": start_epoch}
        metrics["resumed_from"] = start_epoch
        if session.rank == 0:
            metrics.update(held_out(feed.test(), "test"))
        session.report(metrics, None)
    return metrics


def _epoch_line(m: Mapping[str, Any], epochs: int) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"[still train] epoch {m['epoch']}/{epochs} loss {m['train_loss']:.4f} val_ce {fmt(m.get('val_ce'))} "
            f"val_ppl {fmt(m.get('val_ppl'))} val_acc {fmt(m.get('val_accuracy'))}"
            + (f" agreement {fmt(m['val_agreement'])}" if "val_agreement" in m else "")
            + f" {m['tokens_per_s']:.0f} tokens/s")
