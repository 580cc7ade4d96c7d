"""Held-out metrics: accuracy, NLL and top-1 agreement with the teacher.

Works on in-memory arrays or on any iterable of converted batches (``x``, ``y``,
optionally ``t``), so the in-process path and Ray Data shards share it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F


def batches_of(arrays: Mapping[str, np.ndarray], batch_size: int = 4096) -> Iterable[dict[str, torch.Tensor]]:
    """Splits in-memory arrays into tensor batches, in order."""
    n = len(arrays["y"])
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    for start in range(0, n, batch_size):
        yield {k: v[start : start + batch_size] for k, v in tensors.items()}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    multilabel: bool = False,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float | int | None]:
    """Evaluates ``model`` (put in eval mode, restored after) on labelled batches.

    Args:
        model: Maps ``x`` to logits.
        batches: Mappings with ``x``, ``y`` and optionally ``t`` (teacher logits).
        multilabel: Per-class sigmoid outputs: accuracy is per label, NLL is BCE.
        teacher: An online teacher (used when batches carry no ``t``).
        device: Where the model lives.

    Returns:
        ``accuracy``, ``nll`` (mean over labelled rows), ``errors`` and ``count``
        (labelled rows), ``agreement`` (top-1 agreement with the teacher over all
        rows, None without a teacher), ``teacher_accuracy`` (multi-class with a teacher).
    """
    was_training = model.training
    model.eval()
    correct = count = agree = rows = teacher_correct = 0
    nll_sum = 0.0
    has_teacher = False
    try:
        for batch in batches:
            x = torch.as_tensor(batch["x"]).to(device)
            y = torch.as_tensor(batch["y"]).to(device)
            logits = model(x).float()
            t = batch.get("t") if hasattr(batch, "get") else None
            if t is None and teacher is not None:
                t = teacher(x)
            if multilabel:
                labelled = (y >= 0).all(dim=1)
                if labelled.any():
                    yl, ll = y[labelled].float(), logits[labelled]
                    correct += int(((ll > 0).float() == yl).sum()) / y.shape[1]
                    nll_sum += float(F.binary_cross_entropy_with_logits(ll, yl, reduction="sum")) / y.shape[1]
                    count += int(labelled.sum())
                if t is not None:
                    has_teacher = True
                    agree += int(((logits > 0) == (torch.as_tensor(t).to(device) > 0)).sum()) / y.shape[1]
            else:
                labelled = y >= 0
                if labelled.any():
                    yl, ll = y[labelled], logits[labelled]
                    correct += int((ll.argmax(dim=1) == yl).sum())
                    nll_sum += float(F.cross_entropy(ll, yl, reduction="sum"))
                    count += int(labelled.sum())
                if t is not None:
                    has_teacher = True
                    top = torch.as_tensor(t).to(device).argmax(dim=1)
                    agree += int((logits.argmax(dim=1) == top).sum())
                    teacher_correct += int((top[labelled] == y[labelled]).sum())
            rows += len(x)
    finally:
        model.train(was_training)
    return {
        "accuracy": correct / count if count else None,
        "nll": nll_sum / count if count else None,
        "errors": int(round(count - correct)) if count else 0,
        "count": count,
        "agreement": agree / rows if has_teacher and rows else None,
        "teacher_accuracy": teacher_correct / count if has_teacher and count and not multilabel else None,
    }
