"""Knowledge-distillation losses, one convention (DESIGN.md).

Multi-class (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531):

    L = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))  [+ β·MSE(P·f_s, f_t)]

The T² factor keeps the soft term's gradients on the same scale as the hard term's
as T changes. Multi-label stores use per-class sigmoid targets: the hard term is
binary cross-entropy with the 0/1 labels, the soft term the binary KL between
sigmoid(t/T) and sigmoid(s/T), averaged over classes, again scaled by T². Each term
is returned separately so it can be logged on its own.

The teacher side arrives as a target of the store's mode
(:mod:`teacher_infer.targets`), built on the training device from the sparse stored
columns; the KL is computed without a dense teacher array where the mode allows:

- ``dense`` (and online teachers): KL over all C classes.
- ``topk``: the top-k probabilities are exact and so is the tail's total mass at T
  (at the store's grid temperatures; interpolated between them). How that mass
  spreads over the C − k tail classes is unknown; ``kd.tail`` chooses the loss:

  - ``uniform``: KL against the dense target whose tail classes share the tail mass
    evenly, computed sparsely: ``Σ_top p_i(log p_i − log q_i) + p_tail·log u −
    u·Σ_tail log q_j`` with ``u = p_tail/(C − k)``. It also pulls the student's tail
    towards flat.
  - ``bucket``: KL over k + 1 bins, the k classes and one tail bin:
    ``Σ_top p_i(log p_i − log q_i) + p_tail(log p_tail − log q_tail)`` with ``q_tail``
    the student's total tail mass. It says nothing about the tail's shape.

- ``sampled``: ``Σ_drawn p̂_i(log p̂_i − log q_i)`` with p̂ an unbiased estimate of
  softmax(t/T) on the drawn classes (Anshumann et al., 2025; the Horvitz–Thompson
  weights of ``teacher_infer.targets.SampledTarget``): its gradient is, in
  expectation over the draws, the full KL's gradient.

Ensembles of stores average the members' probabilities at T (the mixture is rebuilt
densely on the device). Rows whose label is missing (< 0) are left out of the hard term.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from teacher_infer.targets import DenseTarget, SampledTarget, TeacherTarget, TopKTarget

TAILS = ("uniform", "bucket")
Teacher = torch.Tensor | TeacherTarget | Sequence[TeacherTarget] | None


def kd_loss(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
    tail: str = "bucket",
) -> dict[str, torch.Tensor]:
    """Hinton et al. (2015) distillation loss for single-label classification.

    ``L = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))``, with
    ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` averaged over the batch.

    Args:
        student_logits: ``(n, C)`` raw student logits.
        teacher: ``(n, C)`` raw teacher logits, a target of a store
            (:mod:`teacher_infer.targets`), a list of targets (an ensemble), or None: plain CE.
        labels: ``(n,)`` int64 class ids; negative means unlabelled.
        temperature: T > 0.
        kd_weight: λ in [0, 1].
        tail: ``uniform`` or ``bucket``: the KL of a top-k target (module docstring).

    Returns:
        ``{"loss", "ce", "kl"}``: the total and the two unweighted terms (``kl`` is
        the plain KL at temperature T, before the T² factor).
    """
    ce = _masked_ce(student_logits, labels)
    if teacher is None:
        return {"loss": ce, "ce": ce, "kl": ce.new_zeros(())}
    if kd_weight == 0.0:  # plain CE; the KL is still worth logging
        with torch.no_grad():
            kl = soft_kl(student_logits, teacher, temperature, tail)
        return {"loss": ce, "ce": ce, "kl": kl}
    kl = soft_kl(student_logits, teacher, temperature, tail)
    loss = (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def soft_kl(student_logits: torch.Tensor, teacher: Teacher, temperature: float, tail: str = "bucket") -> torch.Tensor:
    """KL(teacher at T ‖ softmax(s/T)), mean over the batch, for any kind of teacher target.

    Args:
        student_logits: ``(n, C)``.
        teacher: As for :func:`kd_loss` (not None).
        temperature: T > 0.
        tail: ``uniform`` or ``bucket`` (top-k targets only).
    """
    if tail not in TAILS:
        raise ValueError(f"kd.tail must be one of {', '.join(TAILS)}; got {tail!r}")
    if isinstance(teacher, torch.Tensor):
        teacher = DenseTarget(teacher)
    if isinstance(teacher, (list, tuple)):
        if len(teacher) > 1:
            return _dense_kl(_mixture_log_probs(teacher, temperature), student_logits, temperature)
        teacher = teacher[0]
    if isinstance(teacher, TopKTarget):
        return _topk_kl(student_logits, teacher, temperature, tail)
    if isinstance(teacher, SampledTarget):
        return _sampled_kl(student_logits, teacher, temperature)
    return _dense_kl(teacher.dense_log_probs(temperature), student_logits, temperature)


def multilabel_kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | DenseTarget | Sequence[DenseTarget] | None,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
    tail: str = "bucket",
) -> dict[str, torch.Tensor]:
    """Distillation for multi-label tasks: per-class sigmoid targets, BCE at temperature T.

    ``L = (1 − λ)·BCE(y, σ(s)) + λ·T²·mean_c KL(Bern(σ(t_c/T)) ‖ Bern(σ(s_c/T)))``; the
    binary KL equals ``BCE(σ(t/T), s/T) − H(σ(t/T))``, so it is 0 when s = t and
    has the same gradient as BCE against the soft targets (Hinton et al., 2015,
    applied per class).

    Args:
        student_logits: ``(n, C)`` raw logits.
        teacher: ``(n, C)`` raw teacher logits, a dense multi-label store's target, a
            list of them (an ensemble: σ(t_i/T) averaged), or None.
        labels: ``(n, C)`` 0/1 targets (float or int); rows with any negative entry
            are unlabelled and left out of the hard term.
        temperature: T > 0.
        kd_weight: λ in [0, 1].
        tail: Unused (multi-label stores are dense); the same signature as :func:`kd_loss`.

    Returns:
        ``{"loss", "ce", "kl"}`` as for :func:`kd_loss`.
    """
    labels = labels.to(student_logits.dtype)
    labelled = (labels >= 0).all(dim=1)
    if labelled.any():
        ce = F.binary_cross_entropy_with_logits(student_logits[labelled], labels[labelled])
    else:
        ce = student_logits.sum() * 0.0
    if teacher is None:
        return {"loss": ce, "ce": ce, "kl": ce.new_zeros(())}
    teacher_logits = multilabel_teacher_logits(teacher, temperature)

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
    """One FitNets hint term (Romero et al., 2015): ``MSE(W·f_s, f_t)``, the mean over elements
    (:mod:`student_train.hints` pairs the layers and documents the blend)."""
    return F.mse_loss(projected_student, teacher_features.to(projected_student.dtype))


def _masked_ce(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    labelled = labels >= 0
    if bool(labelled.all()):
        return F.cross_entropy(student_logits, labels)
    if not bool(labelled.any()):
        return student_logits.sum() * 0.0
    return F.cross_entropy(student_logits[labelled], labels[labelled])


def multilabel_teacher_logits(teacher: torch.Tensor | DenseTarget | Sequence[DenseTarget],
                              temperature: float) -> torch.Tensor:
    """Per-class teacher logits; an ensemble's as ``T·logit(mean_i σ(t_i/T))``."""
    members = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    logits = [m.logits if isinstance(m, DenseTarget) else m for m in members]
    if len(logits) == 1:
        return logits[0]
    p = torch.stack([torch.sigmoid(t / temperature) for t in logits]).mean(dim=0).clamp(1e-12, 1 - 1e-12)
    return temperature * torch.logit(p)


def teacher_top1(teacher: torch.Tensor | TeacherTarget | Sequence[TeacherTarget]) -> torch.Tensor:
    """The teacher's class per row (an ensemble's: the argmax of its mean probabilities at T = 1)."""
    if isinstance(teacher, torch.Tensor):
        return teacher.argmax(dim=1)
    if isinstance(teacher, (list, tuple)):
        if len(teacher) > 1:
            return _mixture_log_probs(teacher, 1.0).argmax(dim=1)
        teacher = teacher[0]
    return teacher.top1()


def _mixture_log_probs(targets: Sequence[TeacherTarget], temperature: float) -> torch.Tensor:
    stacked = torch.stack([t.dense_log_probs(temperature) for t in targets])
    return torch.logsumexp(stacked, dim=0) - math.log(len(targets))


def _plogp_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``p·(log p − log q)`` elementwise, 0 where p = 0 (also when log_q = −inf there)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def _dense_kl(log_p: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    return _plogp_ratio(log_p.to(log_q.dtype), log_q).sum(dim=1).mean()


def _topk_kl(student_logits: torch.Tensor, target: TopKTarget, temperature: float, tail: str) -> torch.Tensor:
    scaled = student_logits / temperature
    log_norm = torch.logsumexp(scaled, dim=1)
    scaled_top = scaled.gather(1, target.idx)
    log_p_top, log_p_tail = (part.to(scaled.dtype) for part in target.parts(temperature))
    p_top = log_p_top.exp()
    # Σ_top p_i(log p_i − log q_i) with log q_i = s_i/T − log_norm; every top-k p_i is > 0
    kl = (p_top * (log_p_top - scaled_top)).sum(dim=1) + p_top.sum(dim=1) * log_norm
    if target.tail_classes == 0:
        return kl.mean()
    p_tail = log_p_tail.exp()
    if tail == "bucket":
        log_q_tail = torch.logsumexp(scaled.scatter(1, target.idx, -math.inf), dim=1) - log_norm
        kl = kl + torch.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail))
    else:
        # Σ_tail u(log u − log q_j) with u = p_tail/(C − k) and log q_j = s_j/T − log_norm
        # = p_tail·(log u + log_norm − mean_tail(s/T)), summing no log-probabilities.
        tail_mean = (scaled.sum(dim=1) - scaled_top.sum(dim=1)) / target.tail_classes
        log_u = log_p_tail - math.log(target.tail_classes)
        kl = kl + p_tail * (log_u + log_norm - tail_mean)
    return kl.mean()


def _sampled_kl(student_logits: torch.Tensor, target: SampledTarget, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_w = target.log_weights(temperature).to(log_q.dtype)
    return _plogp_ratio(log_w, log_q.gather(1, target.idx)).sum(dim=1).mean()
