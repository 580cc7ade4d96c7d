"""Knowledge-distillation losses, one convention (DESIGN.md).

Multi-class (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531):

    L = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))  [+ β·MSE(P·f_s, f_t)]

The T² factor keeps the soft term's gradients on the same scale as the hard term's
as T changes. Multi-label stores use per-class sigmoid targets: the hard term is
binary cross-entropy with the 0/1 labels, the soft term the binary KL between
sigmoid(t/T) and sigmoid(s/T), averaged over classes, again scaled by T². Each term
is returned separately so it can be logged on its own.

Teacher logits are raw (T = 1) as stored; top-k stores are first rebuilt to dense
logits exact on their support (``teacher_infer.store.dense_teacher_logits``).
Rows whose label is missing (< 0) are left out of the hard term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
) -> dict[str, torch.Tensor]:
    """Hinton et al. (2015) distillation loss for single-label classification.

    ``L = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))``, with
    ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` averaged over the batch.

    Args:
        student_logits: ``(n, C)`` raw student logits.
        teacher_logits: ``(n, C)`` raw teacher logits, or None: plain CE.
        labels: ``(n,)`` int64 class ids; negative means unlabelled.
        temperature: T > 0.
        kd_weight: λ in [0, 1].

    Returns:
        ``{"loss", "ce", "kl"}``: the total and the two unweighted terms (``kl`` is
        the plain KL at temperature T, before the T² factor).
    """
    ce = _masked_ce(student_logits, labels)
    if teacher_logits is None:
        return {"loss": ce, "ce": ce, "kl": ce.new_zeros(())}
    if kd_weight == 0.0:  # plain CE; the KL is still worth logging
        with torch.no_grad():
            kl = _soft_kl(student_logits, teacher_logits, temperature)
        return {"loss": ce, "ce": ce, "kl": kl}
    kl = _soft_kl(student_logits, teacher_logits, temperature)
    loss = (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def multilabel_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
) -> dict[str, torch.Tensor]:
    """Distillation for multi-label tasks: per-class sigmoid targets, BCE at temperature T.

    ``L = (1 − λ)·BCE(y, σ(s)) + λ·T²·mean_c KL(Bern(σ(t_c/T)) ‖ Bern(σ(s_c/T)))``; the
    binary KL equals ``BCE(σ(t/T), s/T) − H(σ(t/T))``, so it is 0 when s = t and
    has the same gradient as BCE against the soft targets (Hinton et al., 2015,
    applied per class).

    Args:
        student_logits: ``(n, C)`` raw logits.
        teacher_logits: ``(n, C)`` raw teacher logits or None.
        labels: ``(n, C)`` 0/1 targets (float or int); rows with any negative entry
            are unlabelled and left out of the hard term.
        temperature: T > 0.
        kd_weight: λ in [0, 1].

    Returns:
        ``{"loss", "ce", "kl"}`` as for :func:`kd_loss`.
    """
    labels = labels.to(student_logits.dtype)
    labelled = (labels >= 0).all(dim=1)
    if labelled.any():
        ce = F.binary_cross_entropy_with_logits(student_logits[labelled], labels[labelled])
    else:
        ce = student_logits.sum() * 0.0
    if teacher_logits is None:
        return {"loss": ce, "ce": ce, "kl": ce.new_zeros(())}

    def binary_kl() -> torch.Tensor:
        t = teacher_logits.to(student_logits.dtype) / temperature
        s = student_logits / temperature
        p = torch.sigmoid(t)
        # KL(Bern(p) ‖ Bern(q)) = p(log p − log q) + (1−p)(log(1−p) − log(1−q)), in log-sigmoid form.
        kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
        return kl.mean()

    if kd_weight == 0.0:
        with torch.no_grad():
            kl = binary_kl()
        return {"loss": ce, "ce": ce, "kl": kl}
    kl = binary_kl()
    loss = (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def hint_loss(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets-style hint (Romero et al., 2015): ``MSE(P·f_s, f_t)``, mean over elements."""
    return F.mse_loss(projected_student, teacher_features.to(projected_student.dtype))


def _masked_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labelled = labels >= 0
    if bool(labelled.all()):
        return F.cross_entropy(student_logits, labels)
    if not bool(labelled.any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits[labelled], labels[labelled])


def _soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.to(student_logits.dtype) / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
