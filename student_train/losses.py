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
  expectation over the draws, the full KL's gradient (exactly so at the store's grid
  temperatures, where the estimate's normaliser is stored).

Each KL is one ``torch.autograd.Function`` that computes its value and its gradient
with respect to the student's logits in a few passes over ``(n, C)``, from the target
bound at T where rows are made (``teacher_infer.targets.at_temperature``): with
``z = s/T`` and ``q = softmax(z)``, the gradient of a KL whose target is ``p̃`` is
``(W·q − p̃)/T`` (W = Σ p̃: 1 up to the stored values' rounding, but for sampled
estimates). For a top-k row ``p̃`` is p on the top-k and, on the tail, ``p_tail·r``
(``bucket``, r the student's own tail distribution) or ``p_tail/(C − k)`` (``uniform``);
the student's tail is summed from its own maximum, so a confident student's tail mass
never underflows into an infinite loss.
No teacher-side tensor receives a gradient, and at λ = 0 no KL is computed at all. For a
top-k or sampled target the hard term is computed in the same function
(:func:`cross_entropy_and_kl`): the student's log-normaliser is shared (a top-k target's
is the top-k's and the tail's combined), and the gradient of both terms is written into
one ``(n, C)`` buffer, so at T = 1 a distillation step makes fewer passes over the logits
than PyTorch's own cross-entropy alone.

Ensembles of stores average the members' probabilities at T (the mixture is rebuilt
densely on the device). Rows whose label is missing (< 0) are left out of the hard term.

The soft term's divergence (``kd.divergence``) is the forward KL above by default, the
documented convention. ``reverse`` (``KL(q ‖ p)``, mode-seeking) and ``jsd`` (the
generalised Jensen–Shannon divergence of Agarwal et al., 2024, "On-Policy Distillation
of Language Models", arXiv:2306.13649, as TRL's GKD and DistillKit compute it:
``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`` with ``m = β·p + (1 − β)·q``) are computed over the
bins the target knows exactly: every class of a dense target, the k classes plus one
tail bin of a top-k target (the ``bucket`` view: p's tail bin is its exact tail mass,
q's the student's). They take the same T² factor. A sampled target has no such
bins (its estimate is unbiased for the forward KL's gradient only), so it takes the
forward KL alone; multi-label targets too.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from teacher_infer.targets import DenseTarget, SampledAtT, SampledTarget, TeacherTarget, TopKAtT, TopKTarget

TAILS = ("uniform", "bucket")
DIVERGENCES = ("forward", "reverse", "jsd")
Teacher = torch.Tensor | TeacherTarget | Sequence[TeacherTarget] | None


def kd_loss(
    student_logits: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
    tail: str = "bucket",
    divergence: str = "forward",
    jsd_beta: float = 0.5,
) -> dict[str, torch.Tensor | None]:
    """Hinton et al. (2015) distillation loss for single-label classification.

    ``L = (1 − λ)·CE(y, s) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))``, with
    ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` averaged over the batch.

    Args:
        student_logits: ``(n, C)`` raw student logits.
        teacher: ``(n, C)`` raw teacher logits, a target of a store
            (:mod:`teacher_infer.targets`, at any T or bound at ``temperature``), a
            list of targets (an ensemble), or None: plain CE.
        labels: ``(n,)`` int64 class ids; negative means unlabelled.
        temperature: T > 0.
        kd_weight: λ in [0, 1].
        tail: ``uniform`` or ``bucket``: the KL of a top-k target (module docstring).
        divergence: ``forward`` (the KL above), ``reverse`` or ``jsd`` (module docstring).
        jsd_beta: β of ``jsd``, in (0, 1).

    Returns:
        ``{"loss", "ce", "kl"}``: the total and the two unweighted terms (``kl`` is
        the soft term's divergence at temperature T, before the T² factor: the plain
        KL unless ``divergence`` says otherwise; None when not computed: no teacher,
        or λ = 0).
    """
    if teacher is None or kd_weight == 0.0:
        ce = masked_cross_entropy(student_logits, labels)
        return {"loss": ce, "ce": ce, "kl": None}
    if divergence == "forward":
        ce, kl = cross_entropy_and_kl(student_logits, labels, teacher, temperature, tail)
    else:
        ce = masked_cross_entropy(student_logits, labels)
        kl = binned_divergence(student_logits, teacher, temperature, divergence, jsd_beta)
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
    _check_tail(tail)
    return _kl_at(student_logits, _target_at(teacher, temperature), temperature, tail == "uniform")


def cross_entropy_and_kl(student_logits: torch.Tensor, labels: torch.Tensor, teacher: Teacher, temperature: float,
                         tail: str = "bucket") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_cross_entropy` and :func:`soft_kl` together: for a top-k or sampled target in one
    pass over ``(n, C)`` each way (the two terms share the student's softmax; at T = 1 entirely).

    Args:
        student_logits: ``(n, C)``.
        labels: ``(n,)`` int64 class ids; negative means unlabelled.
        teacher: As for :func:`kd_loss` (not None).
        temperature: T > 0.
        tail: ``uniform`` or ``bucket`` (top-k targets only).

    Returns:
        ``(ce, kl)``.
    """
    _check_tail(tail)
    target = _target_at(teacher, temperature)
    if isinstance(target, TopKAtT):
        return _TopKDistill.apply(student_logits, labels, target.idx, target.log_p, target.log_tail, temperature,
                                  tail == "uniform")
    if isinstance(target, SampledAtT):
        return _SampledDistill.apply(student_logits, labels, target.idx, target.log_w, temperature)
    return masked_cross_entropy(student_logits, labels), _kl_at(student_logits, target, temperature, tail == "uniform")


def _check_tail(tail: str) -> None:
    if tail not in TAILS:
        raise ValueError(f"kd.tail must be one of {', '.join(TAILS)}; got {tail!r}")


def _kl_at(student_logits: torch.Tensor, target: TopKAtT | SampledAtT | torch.Tensor, temperature: float,
           uniform: bool) -> torch.Tensor:
    """The forward KL of a target bound at T (:func:`_target_at`)."""
    if isinstance(target, TopKAtT):
        return _TopKDistill.apply(student_logits, None, target.idx, target.log_p, target.log_tail, temperature,
                                  uniform)[1]
    if isinstance(target, SampledAtT):
        return _SampledDistill.apply(student_logits, None, target.idx, target.log_w, temperature)[1]
    return _DenseKL.apply(student_logits, target, temperature)


def _target_at(teacher: Teacher, temperature: float) -> TopKAtT | SampledAtT | torch.Tensor:
    """Any teacher bound at T: a top-k or sampled target, or dense ``(n, C)`` log-probabilities
    (dense logits, dense targets and ensembles' mixtures), no gradient on the teacher side."""
    if isinstance(teacher, (list, tuple)):
        if len(teacher) > 1:
            return _mixture_log_probs(teacher, temperature)
        teacher = teacher[0]
    if isinstance(teacher, torch.Tensor):
        teacher = DenseTarget(teacher)
    if isinstance(teacher, (TopKTarget, SampledTarget)):
        teacher = teacher.at(temperature)
    if isinstance(teacher, (TopKAtT, SampledAtT)):
        _same_temperature(teacher.temperature, temperature)
        return teacher
    with torch.no_grad():
        return teacher.dense_log_probs(temperature)


def binned_divergence(student_logits: torch.Tensor, teacher: Teacher, temperature: float, divergence: str,
                      jsd_beta: float = 0.5) -> torch.Tensor:
    """The reverse KL or generalised JSD at T over the bins a target knows exactly, mean over the batch.

    Bins: every class of a dense target (and of an ensemble's mixture), the k classes
    plus one tail bin of a top-k target. With p the teacher's and q the student's
    probabilities over those bins: ``reverse`` is ``Σ q(log q − log p)``; ``jsd`` is
    ``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`` with ``m = β·p + (1 − β)·q``.

    Args:
        student_logits: ``(n, C)``.
        teacher: As for :func:`kd_loss` (not None; not a sampled target).
        temperature: T > 0.
        divergence: ``reverse`` or ``jsd``.
        jsd_beta: β of ``jsd``, in (0, 1).

    Raises:
        ValueError: An unknown divergence, β outside (0, 1), or a sampled target.
    """
    if divergence not in ("reverse", "jsd"):
        raise ValueError(f"kd.divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"kd.jsd_beta must be in (0, 1), got {jsd_beta}")
    log_p, log_q = _bins(student_logits, teacher, temperature)
    if divergence == "reverse":
        return _kl_rows(log_q, log_p).mean()
    log_m = torch.logaddexp(log_p + math.log(jsd_beta), log_q + math.log1p(-jsd_beta))
    return (jsd_beta * _kl_rows(log_p, log_m) + (1.0 - jsd_beta) * _kl_rows(log_q, log_m)).mean()


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``Σ a(log a − log b)`` per row, 0 where a is."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(dim=1)


def _bins(student_logits: torch.Tensor, teacher: Teacher, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (constant) and the student's (differentiable) log-probabilities over a target's exact bins."""
    target = _target_at(teacher, temperature)
    if isinstance(target, SampledAtT):
        raise ValueError("a sampled store's estimate is unbiased for the forward KL's gradient only: "
                         "kd.divergence=reverse|jsd needs a top-k or dense store")
    if isinstance(target, TopKAtT):
        log_q = _TopKBins.apply(student_logits, target.idx, temperature)
        log_p = target.log_p.to(log_q.dtype)
        if target.tail_classes:
            log_p = torch.cat([log_p, target.log_tail.to(log_q.dtype)[:, None]], dim=1)
        return log_p, log_q
    log_q = torch.log_softmax(_promoted(student_logits) / temperature, dim=1)
    return target.to(log_q.dtype), log_q


def _promoted(logits: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits of autocast are promoted)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _same_temperature(bound: float, asked: float) -> None:
    if not math.isclose(bound, asked, rel_tol=1e-9):
        raise ValueError(f"teacher target bound at T = {bound:g}, loss asked for T = {asked:g}")


def masked_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled rows (label ≥ 0); 0 when none is, without a host sync."""
    labels = labels.long()
    total = F.cross_entropy(student_logits, labels.clamp_min(-1), ignore_index=-1, reduction="sum")
    return total / (labels >= 0).sum().clamp_min(1)


class _TopKDistill(torch.autograd.Function):
    """The cross-entropy with the labels and the KL of a top-k target at T, in one pass each way.

    The KL is over k + 1 bins (bucket) or with the tail spread evenly (uniform). One
    ``(n, C)`` buffer holds the student's tail weights ``w = exp(z − peak)`` (z = s/T, the
    tail summed from its own maximum, so a confident student's tail mass never underflows);
    the full log-normaliser is the top-k's and the tail's combined, so at T = 1 the
    cross-entropy takes no pass of its own. The backward turns that buffer in place into the
    gradient of both terms: on a tail class c both are a per-row multiple of ``w_c``. With
    ``labels`` None only the KL is computed (its first output is 0).
    """

    @staticmethod
    def forward(ctx, logits, labels, idx, log_p, log_tail, temperature, uniform):  # noqa: D102
        z = _promoted(logits.detach())
        n, classes = z.shape
        tail_classes = classes - idx.shape[1]
        log_p, log_tail = log_p.to(z.dtype), log_tail.to(z.dtype)
        p_top, p_tail = log_p.exp(), log_tail.exp()
        z_top = z.gather(1, idx) / temperature
        lse = torch.logsumexp(z_top, dim=1)
        w = total = q_tail = term = None
        if tail_classes:
            w, total, lse_tail = _exp_buffer(z, temperature, leave_out=idx)
            lse = torch.logaddexp(lse, lse_tail)
            log_q_tail = lse_tail - lse
            q_tail = log_q_tail.exp()
            if uniform:  # Σ_tail u(log u − log q_j) = p_tail·(log u + lse − mean_tail z)
                tail_mean = (z.sum(dim=1) / temperature - z_top.sum(dim=1)) / tail_classes
                term = p_tail * (log_tail - math.log(tail_classes) + lse - tail_mean)
            else:
                term = p_tail * (log_tail - log_q_tail)
        kl = (p_top * (log_p - z_top + lse[:, None])).sum(dim=1)
        if term is not None:
            kl = kl + torch.where(p_tail > 0, term, torch.zeros_like(term))
        q_top = (z_top - lse[:, None]).exp()
        ce, labels, row_weight, lse_ce = _hard_term(z, labels, lse, temperature)
        mass = p_top.sum(dim=1) + (p_tail if tail_classes else 0.0)  # 1 up to the target's rounding
        ctx.save_for_backward(idx, p_top, p_tail, mass, q_top, w, total, q_tail, labels, row_weight, lse_ce,
                              z if labels is not None and temperature != 1.0 else None)
        ctx.temperature, ctx.uniform, ctx.tail_classes, ctx.shape = temperature, uniform, tail_classes, (n, classes)
        ctx.dtype = logits.dtype
        return ce, kl.mean()

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):  # noqa: D102
        idx, p_top, p_tail, mass, q_top, w, total, q_tail, labels, row_weight, lse_ce, z = ctx.saved_tensors
        n, classes = ctx.shape
        temperature = ctx.temperature
        kl_scale = grad_kl / (n * temperature)
        ce_rows = None if labels is None else grad_ce * row_weight
        shared = ce_rows is not None and temperature == 1.0  # the CE's softmax is the KL's: one buffer
        top = kl_scale * (mass[:, None] * q_top - p_top)
        if shared:
            top = top + ce_rows[:, None] * q_top
        if w is None:
            out = torch.zeros(n, classes, dtype=p_top.dtype, device=p_top.device)
        else:
            per_row = kl_scale * (mass * q_tail - (0.0 if ctx.uniform else p_tail))
            if shared:
                per_row = per_row + ce_rows * q_tail
            out = w.mul_((per_row / total)[:, None])  # the saved buffer, consumed: a second backward fails loudly
            if ctx.uniform:
                out.sub_((kl_scale * p_tail / ctx.tail_classes)[:, None])
        out.scatter_(1, idx, top)
        _add_hard_gradient(out, z, labels, ce_rows, lse_ce, shared)
        return out.to(ctx.dtype), None, None, None, None, None, None


def _exp_buffer(z: torch.Tensor, temperature: float, leave_out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``exp(z/T − peak)`` in a new ``(n, C)`` buffer (the classes ``leave_out`` at 0), its row sums
    and ``peak + log(sum)``: the log-normaliser at T of the classes kept, from their own maximum."""
    buffer = z / temperature if temperature != 1.0 else z.clone()
    if leave_out is not None:
        buffer.scatter_(1, leave_out, -math.inf)
    peak = buffer.amax(dim=1, keepdim=True)
    buffer.sub_(peak).exp_()
    total = buffer.sum(dim=1)
    return buffer, total, peak[:, 0] + total.log()


def _hard_term(z: torch.Tensor, labels: torch.Tensor | None, lse: torch.Tensor, temperature: float
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The masked cross-entropy of float logits ``z`` from the log-normaliser at T (its own at T = 1).

    Returns:
        ``(ce, labels clamped to ≥ 0, each row's weight in the mean, the log-normaliser at T = 1)``;
        ``(0, None, None, None)`` without labels.
    """
    if labels is None:
        return torch.zeros((), dtype=z.dtype, device=z.device), None, None, None
    labelled = labels >= 0
    labels = labels.long().clamp_min(0)
    row_weight = labelled.to(z.dtype) / labelled.sum().clamp_min(1)  # no host sync
    lse_ce = lse if temperature == 1.0 else torch.logsumexp(z, dim=1)
    return ((lse_ce - z.gather(1, labels[:, None])[:, 0]) * row_weight).sum(), labels, row_weight, lse_ce


def _add_hard_gradient(out: torch.Tensor, z: torch.Tensor | None, labels: torch.Tensor | None,
                       ce_rows: torch.Tensor | None, lse_ce: torch.Tensor | None, shared: bool) -> None:
    """Adds the cross-entropy's gradient ``ce_rows·(softmax(z) − onehot)`` to ``out`` in place; its softmax
    part only when the caller has not folded it in already (``shared``: T = 1)."""
    if ce_rows is None:
        return
    if not shared:
        out.add_((z - lse_ce[:, None]).exp_().mul_(ce_rows[:, None]))
    out.scatter_add_(1, labels[:, None], -ce_rows[:, None])


class _TopKBins(torch.autograd.Function):
    """The student's log-probabilities at T over a top-k target's bins: its k classes, then
    (when there are other classes) their total, ``(n, k + 1)``; the tail summed from its own
    maximum, as in :class:`_TopKDistill`.

    The gradient of ``log q_b`` is ``[c ∈ b]·π(c | b) − q_c`` (π the student's distribution
    within bin b), so an upstream ``g`` gives ``g_i − q_i·Σg`` on a top class and
    ``r_c·(g_tail − q_tail·Σg)`` on a tail class (r the student's tail distribution), all over T.
    """

    @staticmethod
    def forward(ctx, logits, idx, temperature):  # noqa: D102
        z = _scaled(logits, temperature)
        z_top = z.gather(1, idx)
        r = None
        if idx.shape[1] == z.shape[1]:
            log_q = z_top - torch.logsumexp(z_top, dim=1, keepdim=True)
        else:
            masked = z.scatter(1, idx, -math.inf)
            peak = masked.amax(dim=1, keepdim=True)
            r = masked.sub_(peak).exp_()
            total = r.sum(dim=1, keepdim=True)
            r.div_(total)
            log_q = torch.cat([z_top, peak + total.log()], dim=1)
            log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        ctx.save_for_backward(idx, log_q, r)
        ctx.temperature, ctx.dtype, ctx.shape = temperature, logits.dtype, z.shape
        return log_q

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        idx, log_q, r = ctx.saved_tensors
        q = log_q.exp()
        local = grad - q * grad.sum(dim=1, keepdim=True)
        k = idx.shape[1]
        if r is None:
            out = torch.zeros(ctx.shape, dtype=q.dtype, device=q.device)
        else:
            out = r * local[:, k:]
        out.scatter_(1, idx, local[:, :k])
        return (out / ctx.temperature).to(ctx.dtype), None, None


class _SampledDistill(torch.autograd.Function):
    """The cross-entropy with the labels and the KL of a sampled target's Horvitz–Thompson
    estimate at T (its gradient unbiased on the grid), in one pass each way.

    One ``(n, C)`` buffer holds ``exp(z − max z)`` (z = s/T): the student's softmax at T up
    to its sum, which at T = 1 is the cross-entropy's too. The backward turns it into the
    gradient of both terms in place. With ``labels`` None only the KL is computed (its
    first output is 0).
    """

    @staticmethod
    def forward(ctx, logits, labels, idx, log_w, temperature):  # noqa: D102
        z = _promoted(logits.detach())
        buffer, total, lse = _exp_buffer(z, temperature)
        log_w = log_w.to(z.dtype)
        w = log_w.exp()
        drawn = z.gather(1, idx) / temperature
        kl = torch.where(w > 0, w * (log_w - drawn + lse[:, None]), torch.zeros_like(w)).sum(dim=1)
        ce, labels, row_weight, lse_ce = _hard_term(z, labels, lse, temperature)
        ctx.save_for_backward(idx, w, buffer, total, labels, row_weight, lse_ce,
                              z if labels is not None and temperature != 1.0 else None)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return ce, kl.mean()

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):  # noqa: D102
        idx, w, buffer, total, labels, row_weight, lse_ce, z = ctx.saved_tensors
        kl_scale = grad_kl / (len(buffer) * ctx.temperature)
        ce_rows = None if labels is None else grad_ce * row_weight
        shared = ce_rows is not None and ctx.temperature == 1.0
        per_row = kl_scale * w.sum(dim=1) + (ce_rows if shared else 0.0)
        out = buffer.mul_((per_row / total)[:, None])  # the saved buffer, consumed: a second backward fails loudly
        out.scatter_add_(1, idx, -kl_scale * w)
        _add_hard_gradient(out, z, labels, ce_rows, lse_ce, shared)
        return out.to(ctx.dtype), None, None, None, None


class _DenseKL(torch.autograd.Function):
    """KL of a dense target given as log-probabilities at T."""

    @staticmethod
    def forward(ctx, logits, log_p, temperature):  # noqa: D102
        z = _scaled(logits, temperature)
        log_q = torch.log_softmax(z, dim=1)
        log_p = log_p.to(z.dtype)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)
        ctx.save_for_backward(p, log_q)
        ctx.temperature, ctx.dtype = temperature, logits.dtype
        return kl.mean()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        p, log_q = ctx.saved_tensors
        out = log_q.exp().sub_(p).mul_(grad / (len(p) * ctx.temperature))
        return out.to(ctx.dtype), None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``s / T`` in at least float32 (bf16/fp16 logits of autocast are promoted), detached."""
    z = _promoted(logits.detach())
    return z / temperature if temperature != 1.0 else z


def multilabel_kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | DenseTarget | Sequence[DenseTarget] | None,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
    tail: str = "bucket",
    divergence: str = "forward",
    jsd_beta: float = 0.5,
) -> dict[str, torch.Tensor | None]:
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
        divergence: ``forward`` only (the binary KL).
        jsd_beta: Unused.

    Returns:
        ``{"loss", "ce", "kl"}`` as for :func:`kd_loss`.
    """
    if divergence != "forward":
        raise ValueError(f"multi-label distillation takes the forward (binary) KL only, not kd.divergence={divergence}")
    labels = labels.to(student_logits.dtype)
    labelled = (labels >= 0).all(dim=1)
    per_row = F.binary_cross_entropy_with_logits(student_logits, labels.clamp_min(0), reduction="none").mean(dim=1)
    ce = (per_row * labelled).sum() / labelled.sum().clamp_min(1)
    if teacher is None or kd_weight == 0.0:
        return {"loss": ce, "ce": ce, "kl": None}
    with torch.no_grad():
        t = multilabel_teacher_logits(teacher, temperature).to(student_logits.dtype) / temperature
        p = torch.sigmoid(t)
    s = student_logits / temperature
    # KL(Bern(p) ‖ Bern(q)) = p(log p − log q) + (1−p)(log(1−p) − log(1−q)), in log-sigmoid form.
    kl = (p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))).mean()
    loss = (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl}


def hint_loss(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """One FitNets hint term (Romero et al., 2015): ``MSE(W·f_s, f_t)``, the mean over elements
    (:mod:`student_train.hints` pairs the layers and documents the blend)."""
    return F.mse_loss(projected_student, teacher_features.to(projected_student.dtype))


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
    """The teacher's class per row (an ensemble's: the argmax of its mean probabilities)."""
    if isinstance(teacher, torch.Tensor):
        return teacher.argmax(dim=1)
    if isinstance(teacher, (list, tuple)):
        if len(teacher) > 1:
            return _mixture_log_probs(teacher, None).argmax(dim=1)
        teacher = teacher[0]
    return teacher.top1()


def _mixture_log_probs(targets: Sequence[TeacherTarget], temperature: float | None) -> torch.Tensor:
    """log of the members' mean probabilities at T (bound members at their own T; None: T = 1 or bound)."""
    with torch.no_grad():
        stacked = torch.stack([
            t.dense_log_probs() if isinstance(t, (TopKAtT, SampledAtT)) else t.dense_log_probs(temperature or 1.0)
            for t in targets])
        return torch.logsumexp(stacked, dim=0) - math.log(len(targets))
