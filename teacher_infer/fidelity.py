"""Fidelity: how close the stored teacher outputs are to the full teacher output.

``still infer`` measures it on a sample of rows, from the same float32 logits the
columns were compressed from, and records it in the manifest and the MLflow run::

    fidelity = {"1": {"kl_mean", "kl_p99", "tail_mass_abs_err", "tail_mass_rel_err", "tv_mean"},
                "2": {...}, "4": {...}, "8": {...}}

Per temperature T, with p = softmax(t/T) the full teacher and r the target rebuilt
from the stored columns (``dense_log_probs``: top-k exact, the tail mass at T spread
evenly over the tail classes):

- ``kl_mean``, ``kl_p99``: KL(p ‖ r) over the measured rows (nats). Sampled rows are a
  random, unbiased estimate that is 0 on classes never drawn, so KL(p ‖ estimate) is
  infinite; for them r is what the row knows exactly instead (p on the drawn
  classes, computed from their stored logits and normaliser, the rest spread evenly):
  the information a sampled row keeps, comparable with top-k at equal bytes.
- ``tail_mass_abs_err`` (mean) and ``tail_mass_rel_err`` (max): the error of the mass
  the target gives to the classes not stored (top-k: the tail; sampled: the classes
  never drawn, whose mass the estimate sets to 0 and puts on the drawn ones). Dense
  stores have no tail: 0.
- ``tv_mean``: total variation ½·Σ|p − r̂| between the teacher and the target the
  loss uses (``dense_log_probs``; for sampled rows the estimate itself).

Multi-label stores compare per-class sigmoids instead: the mean binary KL and the
mean |σ(t/T) − σ(r/T)|.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from teacher_infer.soft_labels import SoftLabelSpec
from teacher_infer.targets import SampledTarget, TopKTarget, lognorm_at, prepare, target_from_columns

TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
"""The temperatures fidelity is reported at (keys "1", "2", "4", "8")."""
FIELDS = ("kl", "tail_abs", "tail_rel", "tv")


def measure_rows(logits: np.ndarray, columns: Mapping[str, Any], spec: SoftLabelSpec,
                 temperatures: Sequence[float] = TEMPERATURES) -> dict[str, np.ndarray]:
    """Per-row fidelity of stored columns against the logits they came from.

    Args:
        logits: ``(n, C)`` float32, the full teacher output.
        columns: :func:`teacher_infer.soft_labels.compress` output for the same rows.
        spec: The storage settings.
        temperatures: Where to measure.

    Returns:
        ``{"kl", "tail_abs", "tail_rel", "tv"}``, each ``(n, len(temperatures))`` float64.
    """
    full = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    target = target_from_columns(prepare(columns, spec), spec, dtype=torch.float64)
    out = {name: np.zeros((len(full), len(temperatures))) for name in FIELDS}
    for j, temperature in enumerate(temperatures):
        if spec.task == "multilabel":
            values = _multilabel(full, target.logits, temperature)
        else:
            values = _multiclass(full, target, temperature)
        for name, value in values.items():
            out[name][:, j] = value.numpy()
    return out


def _multiclass(full: torch.Tensor, target: Any, temperature: float) -> dict[str, torch.Tensor]:
    log_p = torch.log_softmax(full / temperature, dim=1)
    p = log_p.exp()
    estimate = target.dense_log_probs(temperature)
    tv = 0.5 * (p - estimate.exp()).abs().sum(dim=1)
    zeros = torch.zeros(len(full), dtype=full.dtype)
    if isinstance(target, TopKTarget):
        true_tail = (1.0 - p.gather(1, target.idx).sum(dim=1)).clamp_min(0.0)
        stored_tail = target.parts(temperature)[1].exp()
        known = estimate
    elif isinstance(target, SampledTarget):
        drawn = _drawn_mask(target)
        true_tail = 1.0 - (p * drawn).sum(dim=1)
        stored_tail = 1.0 - (estimate.exp() * drawn).sum(dim=1)
        known = _exact_on_draws(target, drawn, temperature)
    else:
        return {"kl": _kl(log_p, estimate), "tail_abs": zeros, "tail_rel": zeros, "tv": tv}
    error = (stored_tail - true_tail).abs()
    relative = torch.where(true_tail > 0, error / true_tail.clamp_min(1e-300), zeros)
    return {"kl": _kl(log_p, known), "tail_abs": error, "tail_rel": relative, "tv": tv}


def _drawn_mask(target: SampledTarget) -> torch.Tensor:
    mask = torch.zeros(target.idx.shape[0], target.num_classes, dtype=torch.float64)
    return mask.scatter_add(1, target.idx, target.drawn().double()).clamp_max(1.0)


def _exact_on_draws(target: SampledTarget, drawn: torch.Tensor, temperature: float) -> torch.Tensor:
    """What a sampled row knows exactly: softmax(t/T) on its drawn classes, the rest spread evenly."""
    norm = torch.from_numpy(lognorm_at(target.norm.numpy(), target.spec.temperatures, temperature,
                                       math.log(target.num_classes)))
    on_draws = target.log_p / temperature - norm[:, None]
    exact = torch.zeros_like(drawn).scatter_add(1, target.idx, torch.where(target.drawn(), on_draws.exp(), 0.0))
    rest = (1.0 - exact.sum(dim=1)).clamp_min(1e-30)  # rounding can leave nothing for classes of tiny mass
    unseen = (target.num_classes - drawn.sum(dim=1)).clamp_min(1.0)
    return torch.log(torch.where(drawn > 0, exact, (rest / unseen)[:, None]))


def _kl(log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p)).sum(dim=1).clamp_min(0.0)


def _multilabel(full: torch.Tensor, stored: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    a, b = full / temperature, stored / temperature
    p = torch.sigmoid(a)
    kl = p * (torch.nn.functional.logsigmoid(a) - torch.nn.functional.logsigmoid(b)) + (1 - p) * (
        torch.nn.functional.logsigmoid(-a) - torch.nn.functional.logsigmoid(-b))
    zeros = torch.zeros(len(full), dtype=full.dtype)
    return {"kl": kl.mean(dim=1), "tail_abs": zeros, "tail_rel": zeros,
            "tv": (p - torch.sigmoid(b)).abs().mean(dim=1)}


HIST_PER_DECADE = 24
HIST_FLOOR = -12.0  # log10 of the smallest KL the histogram tells apart from 0


def empty_stats(temperatures: Sequence[float] = TEMPERATURES) -> dict[str, Any]:
    """Fidelity sums of zero measured rows; like the teacher metrics they add up across shards.

    KL quantiles come from a histogram of log10(KL) with 24 bins per decade, so
    ``kl_p99`` is the upper edge of its bin: at most 10% above the exact quantile.
    """
    g = len(temperatures)
    return {"n": 0, "kl_sum": [0.0] * g, "kl_hist": [{} for _ in range(g)], "tail_abs_sum": [0.0] * g,
            "tail_rel_max": [0.0] * g, "tv_sum": [0.0] * g}


def accumulate_stats(stats: dict[str, Any], rows: Mapping[str, np.ndarray]) -> None:
    """Adds per-row fidelity (:func:`measure_rows`) to fidelity sums in place."""
    kl = rows["kl"]
    stats["n"] += len(kl)
    for j in range(kl.shape[1]):
        stats["kl_sum"][j] += float(kl[:, j].sum())
        stats["tail_abs_sum"][j] += float(rows["tail_abs"][:, j].sum())
        stats["tv_sum"][j] += float(rows["tv"][:, j].sum())
        stats["tail_rel_max"][j] = max(stats["tail_rel_max"][j], float(rows["tail_rel"][:, j].max(initial=0.0)))
        bins, counts = np.unique(_bin(kl[:, j]), return_counts=True)
        hist = stats["kl_hist"][j]
        for b, c in zip(bins.tolist(), counts.tolist()):
            hist[str(b)] = hist.get(str(b), 0) + c


def _bin(kl: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        decades = np.log10(np.clip(np.nan_to_num(kl, nan=np.inf), 10.0**HIST_FLOOR, 1e12)) - HIST_FLOOR
    return np.floor(decades * HIST_PER_DECADE).astype(np.int64)


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums per-shard fidelity sums."""
    total = empty_stats()
    for part in parts:
        total["n"] += part["n"]
        for j in range(len(TEMPERATURES)):
            for key in ("kl_sum", "tail_abs_sum", "tv_sum"):
                total[key][j] += part[key][j]
            total["tail_rel_max"][j] = max(total["tail_rel_max"][j], part["tail_rel_max"][j])
            for b, c in part["kl_hist"][j].items():
                total["kl_hist"][j][b] = total["kl_hist"][j].get(b, 0) + c
    return total


def summarize(stats: Mapping[str, Any], temperatures: Sequence[float] = TEMPERATURES) -> dict[str, dict[str, float]]:
    """Turns fidelity sums into the manifest's ``fidelity``.

    Returns:
        ``{"1": {"kl_mean", "kl_p99", "tail_mass_abs_err", "tail_mass_rel_err", "tv_mean"}, ...}``;
        empty when no row was measured.
    """
    n = stats["n"]
    if not n:
        return {}
    out = {}
    for j, temperature in enumerate(temperatures):
        out[f"{temperature:g}"] = {
            "kl_mean": stats["kl_sum"][j] / n,
            "kl_p99": _quantile(stats["kl_hist"][j], 0.99, n),
            "tail_mass_abs_err": stats["tail_abs_sum"][j] / n,
            "tail_mass_rel_err": stats["tail_rel_max"][j],
            "tv_mean": stats["tv_sum"][j] / n,
        }
    return out


def _quantile(hist: Mapping[str, int], q: float, n: int) -> float:
    seen = 0
    for b in sorted(int(k) for k in hist):
        seen += hist[str(b)]
        if seen >= q * n:
            return 0.0 if b == 0 else float(10.0 ** ((b + 1) / HIST_PER_DECADE + HIST_FLOOR))
    return 0.0


def measured_rows(num_rows: int, sample: int) -> np.ndarray:
    """Which of a shard's ``num_rows`` rows to measure: every ``stride``-th, about ``sample`` in all."""
    if sample <= 0 or num_rows <= 0:
        return np.zeros(num_rows, dtype=bool)
    stride = max(1, math.ceil(num_rows / sample))
    mask = np.zeros(num_rows, dtype=bool)
    mask[::stride] = True
    return mask
