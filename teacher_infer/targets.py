"""Stored teacher-output columns → the teacher's target distribution at temperature T.

The reader half of :mod:`teacher_infer.soft_labels`, in two steps:

1. :func:`prepare` (numpy, float64, once per batch on the CPU side, in the data
   pipeline) turns the stored columns into *training columns*: still sparse, fixed
   width, with everything that does not depend on T already computed.
2. :func:`target_from_columns` (torch) wraps those columns into a target on whatever
   device they are moved to: the training worker's (the student's loss never sees a
   dense ``(n, C)`` teacher array built anywhere else), or the CPU when ``still
   infer`` measures fidelity. What is left per step is a handful of ops.

::

    arrays = prepare(compress(logits, spec, rng), spec)  # or teacher_infer.store.teacher_arrays(batch, …)
    target = target_from_columns(arrays, spec, device="cuda")
    target.top1()                                        # the teacher's class per row
    TopKTarget.parts(T)                                  # log-probs on the top-k, log tail mass at T
    SampledTarget.log_weights(T)                         # an unbiased estimate of softmax(t/T) on the draws
    target.dense_log_probs(T)                            # (n, C): tests, ensembles and fidelity

Top-k (β = 1/T; stored: ``v`` the shifted logits, ``lse`` their log-normaliser,
``A(β)`` the tail's log-normaliser at the grid temperatures)::

    τ        = exp(A(1) − lse)                      tail mass at T = 1, exact
    log p_i  = v_i + log(1 − τ) − logsumexp(v)      top-k log-probabilities at T = 1, renormalised
                                                    so that top-k mass + τ = 1 exactly (topk_logp)
    a(β)     = A(β) − β·lse                         the tail's weight in the same units (topk_tail)
    at T:    log p_i(T) = β·log p_i − Z,  log p_tail(T) = a(β) − Z,  Z = log(Σ_i exp(β·log p_i) + exp(a(β)))

(the renormalisation shifts only the top-k, by the rounding of their stored values.)
At T = 1 this gives back τ exactly, whatever the dtype of ``v``; ``a(β)`` is exact on
the grid and interpolated between (:func:`lognorm_at`).

Sampled (draws from ``q = softmax(t/T_s)``)::

    log p_i   = v_i − lse                           (sample_logp)
    log π_i   = log(1 − (1 − q_i)^N)                the chance that N draws include i (sample_log_inclusion)
    L(β)      = log Σ_c exp(β·v_c) − β·lse          (sample_norm; L(1) = 0, L(0) = log C)
    estimate  = exp(β·log p_i − L(β) − log π_i)     on the drawn classes: Horvitz–Thompson, unbiased
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from still.errors import StillError
from teacher_infer.soft_labels import Ragged, SoftLabelSpec

TRAINING_COLUMNS = {
    "dense": ("logits",),
    "topk": ("topk_idx", "topk_logp", "topk_tail"),
    "sampled": ("sample_idx", "sample_logp", "sample_log_inclusion", "sample_norm"),
}
"""The training columns :func:`prepare` returns for each storage mode."""


def prepare(columns: Mapping[str, Any], spec: SoftLabelSpec) -> dict[str, np.ndarray]:
    """Stored teacher columns → training columns (module docstring).

    Args:
        columns: The mode's stored columns as numpy: ``(n, k)`` / ``(n, m)`` lists
            (``sampled`` padded with count 0, or :class:`~teacher_infer.soft_labels.Ragged`
            as ``compress`` returns them), ``(n,)`` ``logsumexp``, ``(n, G)`` normalisers.
        spec: The store's storage settings.

    Returns:
        :data:`TRAINING_COLUMNS` of the mode: class ids as int32, values as float32
        (dense logits keep their stored dtype).
    """
    if spec.mode == "dense":
        return {"logits": np.asarray(columns["logits"])}
    ragged = [v for v in columns.values() if isinstance(v, Ragged)]
    if ragged:  # pad to the widest row
        width = max(1, int(np.diff(ragged[0].offsets).max(initial=1)))
        columns = {name: v.padded(width) if isinstance(v, Ragged) else v for name, v in columns.items()}
    lse = np.asarray(columns["logsumexp"], dtype=np.float64)
    betas = 1.0 / np.asarray(spec.temperatures, dtype=np.float64)
    if spec.mode == "topk":
        v = np.asarray(columns["topk_logit"], dtype=np.float64)
        tail = np.asarray(columns["tail_lognorm"], dtype=np.float64)
        tail_at_1 = tail[:, spec.temperatures.index(1.0)] - lse
        top_mass = np.log(-np.expm1(tail_at_1)) if spec.k < spec.num_classes else np.zeros_like(lse)
        v_peak = v.max(axis=1, keepdims=True)
        top_norm = v_peak[:, 0] + np.log(np.exp(v - v_peak).sum(axis=1))
        with np.errstate(invalid="ignore"):  # an empty tail (k = C) is −inf at every temperature
            tail_weight = tail - betas[None, :] * lse[:, None]
        return {
            "topk_idx": np.asarray(columns["topk_idx"], dtype=np.int32),
            "topk_logp": (v + (top_mass - top_norm)[:, None]).astype(np.float32),
            "topk_tail": tail_weight.astype(np.float32),
        }
    v = np.asarray(columns["sample_logit"], dtype=np.float64)
    drawn = np.asarray(columns["sample_count"]) > 0
    norm = np.asarray(columns["lognorm"], dtype=np.float64)
    log_q = v / spec.sample_temperature - norm[:, spec.temperatures.index(spec.sample_temperature)][:, None]
    with np.errstate(divide="ignore"):
        log_inclusion = np.log(-np.expm1(spec.samples * np.log1p(-np.minimum(np.exp(log_q), 1.0))))
    return {
        "sample_idx": np.asarray(columns["sample_idx"], dtype=np.int32),
        "sample_logp": np.where(drawn, v - lse[:, None], 0.0).astype(np.float32),
        "sample_log_inclusion": np.where(drawn, log_inclusion, np.inf).astype(np.float32),  # padding: weight 0
        "sample_norm": (norm - betas[None, :] * lse[:, None]).astype(np.float32),
    }


def lognorm_at(values: torch.Tensor, temperatures: Sequence[float], temperature: float,
               at_infinity: float) -> torch.Tensor:
    """A stored log-normaliser at any temperature, exact on the grid.

    ``log Σ exp(β·v)`` is convex in β = 1/T; it is interpolated linearly in β between
    the grid points and β = 0 (T = ∞), where it equals ``at_infinity`` (log of the
    number of classes summed over). Below the smallest grid temperature the last
    segment is extended. (Subtracting ``β·lse``, as the training columns do, keeps
    all of this: a linear term in β is interpolated exactly.)

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
        log_p: ``(n, k)`` log-probabilities at T = 1 (renormalised with the exact tail).
        tail: ``(n, G)`` the tail's log-weight at each grid temperature (module docstring).
        temperatures: The grid, ascending (holds 1).
        num_classes: C.
    """

    idx: torch.Tensor
    log_p: torch.Tensor
    tail: torch.Tensor
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
        scaled = self.log_p / temperature
        at_infinity = math.log(self.tail_classes) if self.tail_classes else -math.inf
        tail = lognorm_at(self.tail, self.temperatures, temperature, at_infinity)
        log_z = torch.logaddexp(torch.logsumexp(scaled, dim=1), tail)
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
    """A sampled row: the distinct classes of N draws from softmax(t / T_s), as training columns.

    Attributes:
        idx: ``(n, m)`` int64 drawn classes (padding: any id, inclusion +inf).
        log_p: ``(n, m)`` their log-probabilities at T = 1.
        log_inclusion: ``(n, m)`` log π_i, the chance that the draws include class i.
        norm: ``(n, G)`` L(β) at each grid temperature (module docstring).
        temperatures: The grid, ascending (holds 1 and T_s).
        num_classes: C.
    """

    idx: torch.Tensor
    log_p: torch.Tensor
    log_inclusion: torch.Tensor
    norm: torch.Tensor
    temperatures: tuple[float, ...]
    num_classes: int

    def log_weights(self, temperature: float) -> torch.Tensor:
        """``(n, m)`` log of the unbiased estimate of softmax(t / T) on the drawn classes.

        A Horvitz–Thompson estimate: a drawn class i gets ``p_T(i) / π_i``. Its
        expectation over the draws is softmax(t/T) exactly where the normaliser at T
        is stored exactly (the grid). Unlike ``count_i / N`` (reweighted by
        ``p_T(i)/q_i``) it is exact for a class that is drawn almost surely, so the
        confident part of the teacher carries no sampling noise. Padding is −inf.
        """
        norm = lognorm_at(self.norm, self.temperatures, temperature, math.log(self.num_classes))
        return self.log_p / temperature - norm[:, None] - self.log_inclusion

    def weights(self, temperature: float) -> torch.Tensor:
        """``(n, m)`` the unbiased estimate of softmax(t / T) on the drawn classes (0 on padding)."""
        return torch.exp(self.log_weights(temperature))

    def dense_log_probs(self, temperature: float) -> torch.Tensor:
        """``(n, C)`` log of the estimate (−inf on classes never drawn)."""
        out = torch.zeros(self.idx.shape[0], self.num_classes, dtype=self.log_p.dtype, device=self.log_p.device)
        out = out.scatter_add(1, self.idx, self.weights(temperature))
        return torch.log(out)

    def drawn(self) -> torch.Tensor:
        """``(n, m)`` True on drawn classes, False on padding."""
        return torch.isfinite(self.log_inclusion)

    def top1(self) -> torch.Tensor:
        """The drawn class with the largest logit per row (the teacher's class when it was drawn)."""
        masked = torch.where(self.drawn(), self.log_p, torch.full_like(self.log_p, -math.inf))
        return self.idx.gather(1, masked.argmax(dim=1, keepdim=True))[:, 0]


TeacherTarget = DenseTarget | TopKTarget | SampledTarget


def target_from_columns(columns: Mapping[str, Any], spec: SoftLabelSpec, *, prefix: str = "",
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TeacherTarget:
    """Builds the target of a batch from its training columns (:func:`prepare`).

    Args:
        columns: Column name → tensor or numpy array: :data:`TRAINING_COLUMNS` of the
            mode, each named ``prefix + name``.
        spec: The store's storage settings.
        prefix: Name prefix of this store's columns in the batch.
        device: Where the target lives (moved with ``non_blocking``).
        dtype: The floating type the target computes in.
    """

    def get(name: str, kind: torch.dtype) -> torch.Tensor:
        key = prefix + name
        if key not in columns:
            raise StillError(f"batch has no teacher column {key!r} (a {spec.mode} store's training columns: "
                             f"{', '.join(prefix + c for c in TRAINING_COLUMNS[spec.mode])})")
        return torch.as_tensor(columns[key]).to(device, non_blocking=True).to(kind)

    if spec.mode == "dense":
        return DenseTarget(get("logits", dtype), spec.task)
    if spec.mode == "topk":
        return TopKTarget(get("topk_idx", torch.int64), get("topk_logp", dtype), get("topk_tail", dtype),
                          spec.temperatures, spec.num_classes)
    return SampledTarget(get("sample_idx", torch.int64), get("sample_logp", dtype),
                         get("sample_log_inclusion", dtype), get("sample_norm", dtype),
                         spec.temperatures, spec.num_classes)
