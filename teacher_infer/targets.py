"""Stored teacher-output columns → the teacher's target distribution at temperature T.

The reader half of :mod:`teacher_infer.soft_labels`, in torch, so it runs wherever
the columns are: on a training worker's device (the student's loss never sees a
dense ``(n, C)`` teacher array built anywhere else), or on the CPU when ``still
infer`` measures fidelity. One target class per storage mode::

    target = target_from_columns(batch, spec, prefix="t0_", device="cuda")
    target.top1()                          # the teacher's predicted class per row
    TopKTarget.parts(T)                    # log-probs on the top-k, log tail mass at T
    SampledTarget.weights(T)               # an unbiased estimate of softmax(t/T) on the drawn classes
    target.dense_log_probs(T)              # (n, C), for tests, ensembles and fidelity

Top-k at temperature T (β = 1/T), with ``v`` the stored shifted logits, ``lse`` the
stored log-normaliser and ``A(β)`` the tail's log-normaliser::

    τ    = exp(A(1) − lse)                           tail mass at T = 1, exact
    c    = log(1 − τ) − logsumexp(v − lse)           renormalises the (rounded) top-k so
                                                     that top-k mass + τ = 1 exactly
    a_i  = β·(v_i + c),   Z = logsumexp(a_1…a_k, A(β))
    log p_i = a_i − Z,    log p_tail = A(β) − Z

At T = 1 this gives back τ exactly, whatever the dtype of ``v``. ``A(β)`` is stored
at the grid temperatures and interpolated between them (:func:`lognorm_at`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch

from still.errors import StillError
from teacher_infer.soft_labels import SoftLabelSpec


def lognorm_at(values: torch.Tensor, temperatures: Sequence[float], temperature: float,
               at_infinity: float) -> torch.Tensor:
    """A stored log-normaliser at any temperature, exact on the grid.

    ``log Σ exp(β·v)`` is convex in β = 1/T; it is interpolated linearly in β between
    the grid points and β = 0 (T = ∞), where it equals ``at_infinity`` (log of the
    number of classes summed over). Below the smallest grid temperature the last
    segment is extended.

    Args:
        values: ``(n, G)`` the normaliser at each grid temperature.
        temperatures: The G grid temperatures, ascending (the manifest's order).
        temperature: T > 0.
        at_infinity: The normaliser's value at β = 0.

    Returns:
        ``(n,)`` the normaliser at ``temperature``.
    """
    betas = [1.0 / t for t in temperatures]
    beta = 1.0 / temperature
    for index, b in enumerate(betas):
        if math.isclose(b, beta, rel_tol=1e-12, abs_tol=0.0):
            return values[:, index]
    if math.isinf(at_infinity):
        return torch.full_like(values[:, 0], at_infinity)
    # knots ascending in β: β = 0, then the grid from the highest temperature down
    knot_betas = [0.0] + betas[::-1]
    knot_values = [torch.full_like(values[:, 0], at_infinity)] + [values[:, i] for i in reversed(range(len(betas)))]
    segment = next((i for i in range(len(knot_betas) - 1) if beta <= knot_betas[i + 1]), len(knot_betas) - 2)
    lo, hi = knot_betas[segment], knot_betas[segment + 1]
    weight = (beta - lo) / (hi - lo)
    return knot_values[segment] + weight * (knot_values[segment + 1] - knot_values[segment])


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler, 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclasses.dataclass
class DenseTarget:
    """All C teacher logits (dense stores, online teachers, multi-label stores).

    Attributes:
        logits: ``(n, C)`` raw logits (multi-label: per-class sigmoid logits).
        task: ``multiclass`` or ``multilabel``.
    """

    logits: torch.Tensor
    task: str = "multiclass"

    def dense_log_probs(self, temperature: float) -> torch.Tensor:
        """``log softmax(t / T)`` (multi-class only)."""
        return torch.log_softmax(self.logits / temperature, dim=1)

    def top1(self) -> torch.Tensor:
        """The teacher's class per row."""
        return self.logits.argmax(dim=1)


@dataclasses.dataclass
class TopKTarget:
    """A top-k row: exact probabilities on k classes, exact tail mass at the grid temperatures.

    Attributes:
        idx: ``(n, k)`` int64 class ids, by decreasing logit.
        logit: ``(n, k)`` shifted logits ``v`` (float32 on the device).
        lse: ``(n,)`` ``log Σ_c exp(v_c)``.
        tail_lognorm: ``(n, G)`` ``log Σ_tail exp(v / T_g)``.
        temperatures: The grid, ascending (holds 1).
        num_classes: C.
    """

    idx: torch.Tensor
    logit: torch.Tensor
    lse: torch.Tensor
    tail_lognorm: torch.Tensor
    temperatures: tuple[float, ...]
    num_classes: int

    @property
    def k(self) -> int:
        """Classes kept per row."""
        return int(self.idx.shape[1])

    @property
    def tail_classes(self) -> int:
        """C − k, the classes whose mass is only known in total."""
        return self.num_classes - self.k

    def parts(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The target at T in k + 1 bins (module docstring).

        Returns:
            ``(log p_top (n, k), log p_tail (n,))``; ``log p_tail`` is −inf when k = C.
        """
        tail_at_1 = self.tail_lognorm[:, self.temperatures.index(1.0)] - self.lse
        correction = log1mexp(tail_at_1) - torch.logsumexp(self.logit - self.lse[:, None], dim=1)
        scaled = (self.logit + correction[:, None]) / temperature
        at_infinity = math.log(self.tail_classes) if self.tail_classes else -math.inf
        tail = lognorm_at(self.tail_lognorm, self.temperatures, temperature, at_infinity)
        log_z = torch.logsumexp(torch.cat([scaled, tail[:, None]], dim=1), dim=1)
        return scaled - log_z[:, None], tail - log_z

    def dense_log_probs(self, temperature: float) -> torch.Tensor:
        """``(n, C)`` log-probabilities at T: exact on the top-k, the tail mass spread evenly."""
        top, tail = self.parts(temperature)
        fill = tail - math.log(self.tail_classes) if self.tail_classes else tail
        out = fill[:, None].expand(-1, self.num_classes).clone()
        return out.scatter(1, self.idx, top)

    def top1(self) -> torch.Tensor:
        """The teacher's class per row."""
        return self.idx[:, 0]


@dataclasses.dataclass
class SampledTarget:
    """A sampled row: the distinct classes of N draws from softmax(t / T_s), their counts and logits.

    Attributes:
        idx: ``(n, m)`` int64 drawn classes (padding: count 0).
        count: ``(n, m)`` float draws per class.
        logit: ``(n, m)`` shifted logits ``v`` of the drawn classes.
        lognorm: ``(n, G)`` ``log Σ_c exp(v_c / T_g)``.
        temperatures: The grid, ascending (holds 1 and T_s).
        samples: N.
        sample_temperature: T_s.
        num_classes: C.
    """

    idx: torch.Tensor
    count: torch.Tensor
    logit: torch.Tensor
    lognorm: torch.Tensor
    temperatures: tuple[float, ...]
    samples: int
    sample_temperature: float
    num_classes: int

    def log_weights(self, temperature: float) -> torch.Tensor:
        """``(n, m)`` log of the unbiased estimate of softmax(t / T) on the drawn classes.

        A Horvitz–Thompson estimate: a drawn class i gets ``p_T(i) / π_i``, with ``p_T(i)``
        from its stored logit and the stored normaliser, and ``π_i = 1 − (1 − q_i)^N``
        the probability that N draws from ``q = softmax(t/T_s)`` include it. Its
        expectation over the draws is softmax(t/T) exactly where the normaliser at T
        is stored exactly (the grid). Unlike ``count_i / N`` (reweighted by
        ``p_T(i)/q_i``) it is exact for a class that is drawn almost surely, so the
        confident part of the teacher carries no sampling noise. Padding entries are −inf.
        """
        log_q = self.logit / self.sample_temperature - self.lognorm[:, self.temperatures.index(self.sample_temperature)][:, None]
        log_miss = self.samples * torch.log1p(-log_q.exp().clamp_max(1.0))  # log (1 − q)^N
        log_included = torch.log(-torch.expm1(log_miss))  # log π
        norm = lognorm_at(self.lognorm, self.temperatures, temperature, math.log(self.num_classes))
        log_w = self.logit / temperature - norm[:, None] - log_included
        return torch.where(self.count > 0, log_w, torch.full_like(log_w, -math.inf))

    def weights(self, temperature: float) -> torch.Tensor:
        """``(n, m)`` the unbiased estimate of softmax(t / T) on the drawn classes (0 on padding)."""
        return torch.exp(self.log_weights(temperature))

    def dense_log_probs(self, temperature: float) -> torch.Tensor:
        """``(n, C)`` log of the estimate (−inf on classes never drawn)."""
        out = torch.zeros(self.idx.shape[0], self.num_classes, dtype=self.logit.dtype, device=self.logit.device)
        out = out.scatter_add(1, self.idx, self.weights(temperature))
        return torch.log(out)

    def top1(self) -> torch.Tensor:
        """The drawn class with the largest logit per row (the teacher's class when it was drawn)."""
        masked = torch.where(self.count > 0, self.logit, torch.full_like(self.logit, -math.inf))
        return self.idx.gather(1, masked.argmax(dim=1, keepdim=True))[:, 0]


TeacherTarget = DenseTarget | TopKTarget | SampledTarget


def target_from_columns(columns: Mapping[str, Any], spec: SoftLabelSpec, *, prefix: str = "",
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TeacherTarget:
    """Builds the target of a batch from its teacher columns (fixed-width, as the trainer gets them).

    Args:
        columns: Column name → tensor or numpy array: the mode's columns
            (:data:`teacher_infer.soft_labels.MODE_COLUMNS`), each named ``prefix + name``;
            ``sampled`` list columns padded to one width (count 0 on padding).
        spec: The store's storage settings.
        prefix: Name prefix of this store's columns in the batch.
        device: Where the target lives (moved with ``non_blocking``).
        dtype: The floating type the target computes in.
    """

    def get(name: str, dtype: torch.dtype) -> torch.Tensor:
        key = prefix + name
        if key not in columns:
            raise StillError(f"batch has no teacher column {key!r} (a {spec.mode} store's columns: "
                             f"{', '.join(prefix + c for c in spec.columns)})")
        return torch.as_tensor(columns[key]).to(device, non_blocking=True).to(dtype)

    if spec.mode == "dense":
        return DenseTarget(get("logits", dtype), spec.task)
    if spec.mode == "topk":
        return TopKTarget(get("topk_idx", torch.int64), get("topk_logit", dtype), get("logsumexp", dtype),
                          get("tail_lognorm", dtype), spec.temperatures, spec.num_classes)
    return SampledTarget(get("sample_idx", torch.int64), get("sample_count", dtype),
                         get("sample_logit", dtype), get("lognorm", dtype),
                         spec.temperatures, spec.samples, spec.sample_temperature, spec.num_classes)
