"""Held-out metrics: accuracy, NLL and top-1 agreement with the teacher.

Works on any iterable of device batches (``x``, ``y``, and the teacher columns a
``teacher_of`` callable turns into the teacher's targets), so the in-process path and
Ray Data shards share it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from student_train.losses import multilabel_teacher_logits, teacher_top1


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    multilabel: bool = False,
    teacher_of: Callable[[Mapping[str, Any]], Any] | None = None,
) -> dict[str, float | int | None]:
    """Evaluates ``model`` (put in eval mode, restored after) on labelled batches.

    Args:
        model: Maps ``x`` to logits.
        batches: Mappings with ``x`` (the model input), ``y`` and whatever ``teacher_of``
            reads, as tensors on the model's device.
        multilabel: Per-class sigmoid outputs: accuracy is per label, NLL is BCE, plus
            micro/macro F1 and mean average precision.
        teacher_of: Returns a batch's teacher (targets of ``teacher_infer.targets``, a
            list for an ensemble) or None.

    Returns:
        ``accuracy``, ``nll`` (mean over labelled rows), ``errors`` and ``count``
        (labelled rows), ``agreement`` (top-1 agreement with the teacher over all
        rows, None without a teacher), ``teacher_accuracy`` (multi-class with a
        teacher); multi-label adds ``f1_micro``, ``f1_macro``, ``mean_ap``.
    """
    was_training = model.training
    model.eval()
    correct = count = agree = rows = teacher_correct = 0
    nll_sum = 0.0
    has_teacher = False
    scores, truths = [], []
    try:
        for batch in batches:
            x, y = batch["x"], batch["y"]
            logits = model(x).float()
            teacher = teacher_of(batch) if teacher_of is not None else None
            if multilabel:
                labelled = (y >= 0).all(dim=1)
                if labelled.any():
                    yl, ll = y[labelled].float(), logits[labelled]
                    correct += int(((ll > 0).float() == yl).sum()) / y.shape[1]
                    nll_sum += float(F.binary_cross_entropy_with_logits(ll, yl, reduction="sum")) / y.shape[1]
                    count += int(labelled.sum())
                    scores.append(ll.cpu())
                    truths.append(yl.cpu())
                if teacher is not None:
                    has_teacher = True
                    t = multilabel_teacher_logits(teacher, 1.0)
                    agree += int(((logits > 0) == (t > 0)).sum()) / y.shape[1]
            else:
                labelled = y >= 0
                if labelled.any():
                    yl, ll = y[labelled], logits[labelled]
                    correct += int((ll.argmax(dim=1) == yl).sum())
                    nll_sum += float(F.cross_entropy(ll, yl, reduction="sum"))
                    count += int(labelled.sum())
                if teacher is not None:
                    has_teacher = True
                    top = teacher_top1(teacher)
                    agree += int((logits.argmax(dim=1) == top).sum())
                    teacher_correct += int((top[labelled] == y[labelled]).sum())
            rows += len(x)
    finally:
        model.train(was_training)
    result = {
        "accuracy": correct / count if count else None,
        "nll": nll_sum / count if count else None,
        "errors": int(round(count - correct)) if count else 0,
        "count": count,
        "agreement": agree / rows if has_teacher and rows else None,
        "teacher_accuracy": teacher_correct / count if has_teacher and count and not multilabel else None,
    }
    if multilabel:
        result.update(multilabel_scores(torch.cat(scores), torch.cat(truths)) if scores
                      else {"f1_micro": None, "f1_macro": None, "mean_ap": None})
    return result


def multilabel_scores(logits: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Micro and macro F1 at σ = 0.5, and mean average precision over classes with a positive.

    Args:
        logits: ``(n, C)`` per-class logits.
        truth: ``(n, C)`` 0/1.
    """
    predicted, positive = logits > 0, truth > 0.5
    tp = (predicted & positive).sum(dim=0).double()
    fp = (predicted & ~positive).sum(dim=0).double()
    fn = (~predicted & positive).sum(dim=0).double()
    f1 = torch.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.ones_like(tp))
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1)
    precisions = []
    for c in range(logits.shape[1]):
        hits = positive[logits[:, c].argsort(descending=True), c].double()
        if hits.sum() > 0:
            at_hit = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
            precisions.append(float((at_hit * hits).sum() / hits.sum()))
    return {"f1_micro": float(micro), "f1_macro": float(f1.mean()),
            "mean_ap": sum(precisions) / len(precisions) if precisions else None}
