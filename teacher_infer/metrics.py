"""Teacher metrics from the FULL float32 logits, as sums that add up across shards.

Each shard keeps its sums in its Parquet footer, so a resumed ``still infer`` reports
metrics over every row without recomputing the shards an earlier run wrote::

    stats = empty_stats(task, C)
    accumulate_stats(stats, row_stats(logits, labels, task), splits)
    finish_metrics(merge_stats([stats, ...]), task)

Only labelled rows enter accuracy, NLL, ECE and F1 (a multi-class label < 0, or a
multi-label row with any entry < 0, is unlabelled); every row enters the entropy.

- multi-class: accuracy, NLL (nats), ECE over 15 equal-width confidence bins, mean
  entropy of softmax(t).
- multi-label (per-class sigmoids): per-label accuracy at 0.5, NLL = mean binary
  cross-entropy per label, ECE over per-label probabilities, mean binary entropy
  per label, and micro and macro F1.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
ECE_BINS = 15


def empty_stats(task: str = "multiclass", num_classes: int = 0) -> dict[str, Any]:
    """Metric sums of zero rows, per split key ``all``/``train``/``val``/``test``."""
    one: dict[str, Any] = {"n": 0, "n_labeled": 0, "correct": 0.0, "nll": 0.0, "entropy": 0.0,
                           "bin_count": [0] * ECE_BINS, "bin_conf": [0.0] * ECE_BINS, "bin_acc": [0.0] * ECE_BINS}
    if task == "multilabel":
        one.update(tp=[0] * num_classes, fp=[0] * num_classes, fn=[0] * num_classes)
    return {name: copy.deepcopy(one) for name in ("all", *SPLIT_NAMES)}


def row_stats(logits: np.ndarray, labels: np.ndarray | None, task: str = "multiclass") -> dict[str, np.ndarray]:
    """Per-row teacher statistics from full logits (before any compression).

    Args:
        logits: ``(n, C)`` float32.
        labels: multi-class ``(n,)`` int (< 0: unlabelled); multi-label ``(n, C)`` 0/1
            (rows with a negative entry: unlabelled); None: no row is labelled.
        task: ``multiclass`` or ``multilabel``.

    Returns:
        ``_labeled`` (bool), ``_entropy``, ``_correct``, ``_nll`` (0 when unlabelled),
        ``_conf`` and ``_hit`` (per ECE sample: ``(n,)`` multi-class, ``(n, C)`` multi-label);
        multi-label adds ``_tp``, ``_fp``, ``_fn`` ``(n, C)``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if task == "multilabel":
        return _multilabel_rows(logits, labels)
    n, num_classes = logits.shape
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    labeled = np.zeros(n, dtype=bool) if labels is None else np.asarray(labels, dtype=np.int64) >= 0
    safe = np.where(labeled, labels if labels is not None else 0, 0).astype(np.int64)
    if labels is not None and labeled.any() and safe.max() >= num_classes:
        from still.errors import StillError

        raise StillError(f"label {int(safe.max())} is out of range for a teacher with {num_classes} outputs")
    correct = (logits.argmax(axis=1) == safe) & labeled
    nll = np.where(labeled, -np.take_along_axis(logp, safe[:, None], axis=1)[:, 0], 0.0)
    return {"_labeled": labeled, "_entropy": -(p * logp).sum(axis=1), "_correct": correct.astype(np.float64),
            "_nll": nll, "_conf": p.max(axis=1), "_hit": correct.astype(np.float64)}


def _multilabel_rows(logits: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    n, num_classes = logits.shape
    p = 1.0 / (1.0 + np.exp(-logits))
    log_p, log_q = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)  # log σ(t), log(1 − σ(t))
    entropy = -(p * log_p + (1 - p) * log_q).mean(axis=1)
    y = np.full((n, num_classes), -1.0) if labels is None else np.asarray(labels, dtype=np.float64)
    labeled = (y >= 0).all(axis=1)
    y = np.where(labeled[:, None], y, 0.0)
    predicted = logits > 0
    positive = y > 0.5
    mask = labeled[:, None]
    bce = -(y * log_p + (1 - y) * log_q).mean(axis=1)
    return {
        "_labeled": labeled, "_entropy": entropy,
        "_correct": np.where(labeled, (predicted == positive).mean(axis=1), 0.0),
        "_nll": np.where(labeled, bce, 0.0),
        "_conf": p, "_hit": positive.astype(np.float64),
        "_tp": predicted & positive & mask, "_fp": predicted & ~positive & mask, "_fn": ~predicted & positive & mask,
    }


def accumulate_stats(stats: dict[str, Any], rows: Mapping[str, np.ndarray], splits: np.ndarray) -> None:
    """Adds per-row statistics (:func:`row_stats`) to per-split metric sums in place."""
    splits = np.asarray(splits)
    labeled = rows["_labeled"]
    for name, mask in (("all", np.ones(len(splits), dtype=bool)), *[(SPLIT_NAMES[i], splits == i) for i in range(3)]):
        if not mask.any():
            continue
        target = stats[name]
        target["n"] += int(mask.sum())
        target["entropy"] += float(rows["_entropy"][mask].sum())
        sel = mask & labeled
        if not sel.any():
            continue
        target["n_labeled"] += int(sel.sum())
        target["correct"] += float(rows["_correct"][sel].sum())
        target["nll"] += float(rows["_nll"][sel].sum())
        conf, hit = rows["_conf"][sel].reshape(-1), rows["_hit"][sel].reshape(-1)
        bins = np.minimum((conf * ECE_BINS).astype(np.int64), ECE_BINS - 1)
        target["bin_count"] = (np.asarray(target["bin_count"]) + np.bincount(bins, minlength=ECE_BINS)).tolist()
        target["bin_conf"] = (np.asarray(target["bin_conf"]) + np.bincount(bins, conf, ECE_BINS)).tolist()
        target["bin_acc"] = (np.asarray(target["bin_acc"]) + np.bincount(bins, hit, ECE_BINS)).tolist()
        for key in ("tp", "fp", "fn"):
            if key in target:
                target[key] = (np.asarray(target[key]) + rows[f"_{key}"][sel].sum(axis=0)).astype(int).tolist()


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums per-shard metric sums (all of one task)."""
    total = copy.deepcopy(dict(parts[0])) if parts else empty_stats()
    for part in parts[1:]:
        for name, values in part.items():
            target = total[name]
            for key, value in values.items():
                if isinstance(value, list):
                    target[key] = [a + b for a, b in zip(target[key], value)]
                else:
                    target[key] += value
    return total


def finish_metrics(stats: Mapping[str, Any], task: str = "multiclass") -> dict[str, Any]:
    """Turns metric sums into the manifest's ``teacher_metrics`` (overall and ``per_split``)."""

    def one(values: Mapping[str, Any]) -> dict[str, Any]:
        n, labeled = values["n"], values["n_labeled"]
        out: dict[str, Any] = {"rows": n, "labeled_rows": labeled, "mean_entropy": values["entropy"] / n if n else None,
                               "accuracy": None, "nll": None, "ece": None}
        if labeled:
            samples = sum(values["bin_count"])
            gaps = np.abs(np.asarray(values["bin_acc"]) - np.asarray(values["bin_conf"]))
            out.update(accuracy=values["correct"] / labeled, nll=values["nll"] / labeled,
                       ece=float(gaps.sum() / samples) if samples else None)
        if task == "multilabel":
            tp, fp, fn = (np.asarray(values[k], dtype=np.float64) for k in ("tp", "fp", "fn"))
            out["f1_micro"] = _f1(tp.sum(), fp.sum(), fn.sum()) if labeled else None
            out["f1_macro"] = float(np.mean([_f1(*c) for c in zip(tp, fp, fn)])) if labeled else None
        return out

    overall = one(stats["all"])
    overall["per_split"] = {name: one(stats[name]) for name in SPLIT_NAMES if stats[name]["n"]}
    overall["ece_bins"] = ECE_BINS
    return overall


def _f1(tp: float, fp: float, fn: float) -> float:
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0
