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
    SampledTarget.at(T).log_w                            # the estimate of softmax(t/T) on the draws, at T
    target.dense_log_probs(T)                            # (n, C): tests, ensembles and fidelity
    bound = at_temperature(arrays, spec, T)              # a training run's one T, bound where rows are made
    target_from_columns(bound, spec, temperature=T)      # TopKAtT / SampledAtT: what the loss reads

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
                                                    where L(β) is stored (the grid); interpolated between
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

_NARROW = 16  # rows up to this wide take their peak column by column (row_logsumexp)


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
        top_norm = row_logsumexp(v)
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


def row_logsumexp(values: np.ndarray) -> np.ndarray:
    """``log Σ_j exp(values[i, j])`` of each row of an ``(n, k)`` array, shifted by the row's peak.

    A store's rows are narrow (k of 5 to 64) and numpy reduces a short last axis
    slowly (``max(axis=1)`` took 4.7 ms on 65,536 × 5, six times a maximum over the k
    columns): the peak is taken column by column and the sum by ``einsum``.
    """
    width = values.shape[1]
    if width > _NARROW:
        peak = values.max(axis=1)
    else:
        peak = values[:, 0].copy()
        for column in range(1, width):
            np.maximum(peak, values[:, column], out=peak)
    peak[np.isneginf(peak)] = 0.0  # a row without mass: log 0 = −inf below, not −inf − (−inf)
    with np.errstate(divide="ignore"):
        return peak + np.log(np.einsum("ij->i", np.exp(values - peak[:, None])))


def lognorm_at(values: np.ndarray, temperatures: Sequence[float], temperature: float,
               at_infinity: float) -> np.ndarray:
    """A stored log-normaliser at any temperature on or above the grid, exact on the grid.

    ``log Σ exp(β·v)`` is convex in β = 1/T; it is interpolated linearly in β between
    the grid points and β = 0 (T = ∞), where it equals ``at_infinity`` (log of the
    number of classes summed over). (Subtracting ``β·lse``, as the training columns
    do, keeps all of this: a linear term in β is interpolated exactly.) A row whose
    normaliser is −inf at a knot (no finite mass there: a tail that underflowed) stays
    −inf between that knot and the next: no mass, never NaN.

    Args:
        values: ``(n, G)`` the normaliser at each grid temperature.
        temperatures: The G grid temperatures, ascending (the manifest's order).
        temperature: T, at least the smallest grid temperature (below it the chord
            would be extrapolated: :func:`check_temperature` refuses that first).
        at_infinity: The normaliser's value at β = 0.

    Returns:
        ``(n,)`` the normaliser at ``temperature``, float64.

    Raises:
        StillError: ``temperature`` lies below the grid.
    """
    values = np.asarray(values, dtype=np.float64)
    check_temperature(temperature, temperatures)
    betas = [1.0 / t for t in temperatures]
    beta = 1.0 / temperature
    for index, b in enumerate(betas):
        if math.isclose(b, beta, rel_tol=1e-12, abs_tol=0.0):
            return values[:, index].copy()
    if math.isinf(at_infinity):
        return np.full(len(values), at_infinity)
    # knots ascending in β: β = 0, then the grid from the highest temperature down
    knot_betas = [0.0] + betas[::-1]
    segment = next(i for i in range(len(knot_betas) - 1) if beta <= knot_betas[i + 1])
    lo = np.full(len(values), at_infinity) if segment == 0 else values[:, len(betas) - segment]
    hi = values[:, len(betas) - 1 - segment]
    weight = (beta - knot_betas[segment]) / (knot_betas[segment + 1] - knot_betas[segment])
    empty = np.isneginf(lo) | np.isneginf(hi)
    with np.errstate(invalid="ignore"):
        return np.where(empty, -np.inf, lo + weight * (hi - lo))


def check_temperature(temperature: float, temperatures: Sequence[float], what: str = "kd.temperature") -> None:
    """Refuses a temperature below a store's grid, where its normalisers would be extrapolated.

    On the grid they are exact, between grid points and above it interpolated towards
    T = ∞ (where they are known exactly); below the smallest grid temperature the last
    chord would be extended, and the tail mass came out 1.55 nats wrong at T = 0.5 on a
    grid starting at 1.

    Raises:
        StillError: Naming ``what``, the grid, and how to write a store whose grid reaches T.
    """
    if temperatures and temperature < min(temperatures) * (1 - 1e-12):
        raise StillError(
            f"{what}={temperature:g} is below the store's temperature grid {list(temperatures)}: a top-k or "
            "sampled store knows its normalisers on the grid and interpolates above it, but cannot extrapolate "
            f"below it. Write the store with store.temperatures=[{temperature:g}, {', '.join(f'{t:g}' for t in temperatures)}]"
        )


TRAINING_COLUMNS_AT = {
    "dense": ("logits",),
    "topk": ("topk_idx", "topk_logp_at", "topk_logtail_at"),
    "sampled": ("sample_idx", "sample_logw_at", "sample_top1"),
}
"""The columns :func:`at_temperature` returns for each storage mode: the target at one T."""


def at_temperature(columns: Mapping[str, np.ndarray], spec: SoftLabelSpec, temperature: float,
                   prefix: str = "") -> dict[str, np.ndarray]:
    """Training columns (:func:`prepare`) → the target at one temperature, still sparse (numpy).

    What a training run needs once per row, computed where rows are made (the reader,
    or once over arrays held in memory) instead of on every step: a run's T is fixed.

    - ``topk``: ``topk_logp_at`` the k log-probabilities at T and ``topk_logtail_at``
      the tail's log-mass at T (−inf when k = C), float32; ``topk_idx`` as it was.
    - ``sampled``: ``sample_logw_at`` the log of the unbiased estimate of softmax(t/T)
      on the draws (−inf on padding), ``sample_top1`` the drawn class of largest logit.
    - ``dense``: the logits as they are (T is applied with the student's on the device).

    Args:
        columns: Training columns, each named ``prefix + name``.
        spec: The store's storage settings.
        temperature: T (at least the grid's smallest temperature).
        prefix: Name prefix of this store's columns (ensemble members: ``t1_``…).

    Returns:
        :data:`TRAINING_COLUMNS_AT` of the mode, each named ``prefix + name``.
    """
    get = {name: columns[prefix + name] for name in TRAINING_COLUMNS[spec.mode]}
    if spec.mode == "dense":
        return {prefix + "logits": get["logits"]}
    if spec.mode == "topk":
        log_p_top, log_tail = topk_parts(get["topk_logp"], get["topk_tail"], spec, temperature)
        return {prefix + "topk_idx": get["topk_idx"], prefix + "topk_logp_at": log_p_top.astype(np.float32),
                prefix + "topk_logtail_at": log_tail.astype(np.float32)}
    log_p = np.asarray(get["sample_logp"], dtype=np.float64)
    drawn = np.isfinite(get["sample_log_inclusion"])
    norm = lognorm_at(get["sample_norm"], spec.temperatures, temperature, math.log(spec.num_classes))
    with np.errstate(invalid="ignore"):
        log_w = np.where(drawn, log_p / temperature - norm[:, None] - get["sample_log_inclusion"], -np.inf)
    best = np.argmax(np.where(drawn, log_p, -np.inf), axis=1)
    return {prefix + "sample_idx": get["sample_idx"], prefix + "sample_logw_at": log_w.astype(np.float32),
            prefix + "sample_top1": np.take_along_axis(get["sample_idx"], best[:, None], axis=1)[:, 0]}


def topk_parts(log_p: np.ndarray, tail: np.ndarray, spec: SoftLabelSpec,
               temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """A top-k target at T in k + 1 bins (module docstring), float64.

    Args:
        log_p: ``(n, k)`` the top-k log-probabilities at T = 1 (``topk_logp``).
        tail: ``(n, G)`` the tail's log-weight at the grid temperatures (``topk_tail``).
        spec: The store's storage settings.
        temperature: T.

    Returns:
        ``(log p_top (n, k), log p_tail (n,))``; ``log p_tail`` is −inf when k = C.
    """
    tail_classes = spec.num_classes - np.shape(log_p)[1]
    scaled = np.asarray(log_p, dtype=np.float64) / temperature
    at_infinity = math.log(tail_classes) if tail_classes else -math.inf
    log_tail = lognorm_at(tail, spec.temperatures, temperature, at_infinity)
    log_z = np.logaddexp(row_logsumexp(scaled), log_tail)
    return scaled - log_z[:, None], log_tail - log_z


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
    """A top-k row at every temperature: exact probabilities on k classes, the tail mass exact on the grid.

    What fidelity measurement and tests use; training binds its one T where rows are
    made (:func:`at_temperature`) and gets a :class:`TopKAtT`.

    Attributes:
        idx: ``(n, k)`` int64 class ids, by decreasing logit.
        log_p: ``(n, k)`` log-probabilities at T = 1 (renormalised with the exact tail).
        tail: ``(n, G)`` the tail's log-weight at each grid temperature (module docstring).
        spec: The store's storage settings (grid, C).
    """

    idx: torch.Tensor
    log_p: torch.Tensor
    tail: torch.Tensor
    spec: SoftLabelSpec

    @property
    def num_classes(self) -> int:
        """C."""
        return self.spec.num_classes

    @property
    def tail_classes(self) -> int:
        """C − k, the classes whose mass is only known in total."""
        return self.num_classes - int(self.idx.shape[1])

    def parts(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p_top (n, k), log p_tail (n,))`` at T (:func:`topk_parts`), on this target's device."""
        top, tail = topk_parts(self.log_p.detach().cpu().double().numpy(), self.tail.detach().cpu().double().numpy(),
                               self.spec, temperature)
        as_tensor = lambda a: torch.from_numpy(a).to(self.log_p.device, self.log_p.dtype)  # noqa: E731
        return as_tensor(top), as_tensor(tail)

    def at(self, temperature: float) -> TopKAtT:
        """This target at one temperature."""
        top, tail = self.parts(temperature)
        return TopKAtT(self.idx, top, tail, temperature, self.num_classes)

    def dense_log_probs(self, temperature: float) -> torch.Tensor:
        """``(n, C)`` log-probabilities at T: exact on the top-k, the tail mass spread evenly."""
        return self.at(temperature).dense_log_probs()

    def top1(self) -> torch.Tensor:
        """The teacher's class per row."""
        return self.idx[:, 0]


@dataclasses.dataclass
class TopKAtT:
    """A top-k target at the run's temperature: what the loss reads every step.

    Attributes:
        idx: ``(n, k)`` int64 class ids, by decreasing logit.
        log_p: ``(n, k)`` log-probabilities at T.
        log_tail: ``(n,)`` the tail's log-mass at T (−inf when k = C, or no mass).
        temperature: T.
        num_classes: C.
    """

    idx: torch.Tensor
    log_p: torch.Tensor
    log_tail: torch.Tensor
    temperature: float
    num_classes: int

    @property
    def tail_classes(self) -> int:
        """C − k."""
        return self.num_classes - int(self.idx.shape[1])

    def dense_log_probs(self, temperature: float | None = None) -> torch.Tensor:
        """``(n, C)`` log-probabilities at T, the tail mass spread evenly over the tail classes."""
        _check_bound(self.temperature, temperature)
        fill = self.log_tail - math.log(self.tail_classes) if self.tail_classes else self.log_tail
        out = fill[:, None].expand(-1, self.num_classes).clone()
        return out.scatter(1, self.idx, self.log_p)

    def top1(self) -> torch.Tensor:
        """The teacher's class per row."""
        return self.idx[:, 0]


@dataclasses.dataclass
class SampledTarget:
    """A sampled row at every temperature: the distinct classes of N draws from softmax(t / T_s).

    Attributes:
        idx: ``(n, m)`` int64 drawn classes (padding: any id, inclusion +inf).
        log_p: ``(n, m)`` their log-probabilities at T = 1.
        log_inclusion: ``(n, m)`` log π_i, the chance that the draws include class i.
        norm: ``(n, G)`` L(β) at each grid temperature (module docstring).
        spec: The store's storage settings (grid, C).
    """

    idx: torch.Tensor
    log_p: torch.Tensor
    log_inclusion: torch.Tensor
    norm: torch.Tensor
    spec: SoftLabelSpec

    @property
    def num_classes(self) -> int:
        """C."""
        return self.spec.num_classes

    def at(self, temperature: float) -> SampledAtT:
        """This target at one temperature (:func:`at_temperature`).

        A Horvitz–Thompson estimate: a drawn class i gets ``p_T(i) / π_i``. Its
        expectation over the draws is softmax(t/T) exactly where the normaliser at T
        is stored exactly: on the grid (between grid points the normaliser is
        interpolated, so the estimate is close to unbiased, not exactly). Unlike
        ``count_i / N`` (reweighted by ``p_T(i)/q_i``) it is exact for a class that is
        drawn almost surely, so the confident part of the teacher carries no sampling
        noise.
        """
        columns = {"sample_idx": self.idx.cpu().numpy(), "sample_logp": self.log_p.detach().cpu().double().numpy(),
                   "sample_log_inclusion": self.log_inclusion.detach().cpu().double().numpy(),
                   "sample_norm": self.norm.detach().cpu().double().numpy()}
        bound = at_temperature(columns, self.spec, temperature)
        device, dtype = self.log_p.device, self.log_p.dtype
        return SampledAtT(self.idx, torch.from_numpy(bound["sample_logw_at"]).to(device, dtype),
                          torch.from_numpy(bound["sample_top1"]).to(device), temperature, self.num_classes)

    def dense_log_probs(self, temperature: float) -> torch.Tensor:
        """``(n, C)`` log of the estimate (−inf on classes never drawn)."""
        return self.at(temperature).dense_log_probs()

    def drawn(self) -> torch.Tensor:
        """``(n, m)`` True on drawn classes, False on padding."""
        return torch.isfinite(self.log_inclusion)

    def top1(self) -> torch.Tensor:
        """The drawn class with the largest logit per row (the teacher's class when it was drawn)."""
        masked = torch.where(self.drawn(), self.log_p, torch.full_like(self.log_p, -math.inf))
        return self.idx.gather(1, masked.argmax(dim=1, keepdim=True))[:, 0]


@dataclasses.dataclass
class SampledAtT:
    """A sampled target at the run's temperature: what the loss reads every step.

    Attributes:
        idx: ``(n, m)`` int64 drawn classes (padding: any id, weight 0).
        log_w: ``(n, m)`` log of the unbiased estimate of softmax(t/T) on them (−inf on padding).
        best: ``(n,)`` the drawn class of largest logit (the teacher's class when it was drawn).
        temperature: T.
        num_classes: C.
    """

    idx: torch.Tensor
    log_w: torch.Tensor
    best: torch.Tensor
    temperature: float
    num_classes: int

    def dense_log_probs(self, temperature: float | None = None) -> torch.Tensor:
        """``(n, C)`` log of the estimate (−inf on classes never drawn)."""
        _check_bound(self.temperature, temperature)
        out = torch.zeros(self.idx.shape[0], self.num_classes, dtype=self.log_w.dtype, device=self.log_w.device)
        return torch.log(out.scatter_add(1, self.idx, self.log_w.exp()))

    def top1(self) -> torch.Tensor:
        """The teacher's class per row (among the draws)."""
        return self.best


def _check_bound(bound: float, asked: float | None) -> None:
    if asked is not None and not math.isclose(asked, bound, rel_tol=1e-9):
        raise ValueError(f"a target bound at T = {bound:g} was asked for T = {asked:g}")


TeacherTarget = DenseTarget | TopKTarget | SampledTarget | TopKAtT | SampledAtT


def target_from_columns(columns: Mapping[str, Any], spec: SoftLabelSpec, *, prefix: str = "",
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        temperature: float | None = None) -> TeacherTarget:
    """Builds the target of a batch from its columns, on ``device``.

    Args:
        columns: Column name → tensor or numpy array, each named ``prefix + name``:
            :data:`TRAINING_COLUMNS` of the mode (a target at every T), or, with
            ``temperature``, :data:`TRAINING_COLUMNS_AT` (:func:`at_temperature`'s).
        spec: The store's storage settings.
        prefix: Name prefix of this store's columns in the batch.
        device: Where the target lives (moved with ``non_blocking``).
        dtype: The floating type the target computes in.
        temperature: The T the columns were bound at; None: unbound columns.
    """
    names = TRAINING_COLUMNS if temperature is None else TRAINING_COLUMNS_AT

    def get(name: str, kind: torch.dtype) -> torch.Tensor:
        key = prefix + name
        if key not in columns:
            raise StillError(f"batch has no teacher column {key!r} (a {spec.mode} store's training columns: "
                             f"{', '.join(prefix + c for c in names[spec.mode])})")
        values = columns[key]
        if isinstance(values, torch.Tensor) and values.dtype == kind and values.device == device:
            return values  # what the training loop hands over every step: nothing to convert
        return torch.as_tensor(values).to(device, non_blocking=True).to(kind)

    if spec.mode == "dense":
        return DenseTarget(get("logits", dtype), spec.task)
    if temperature is not None:
        if spec.mode == "topk":
            return TopKAtT(get("topk_idx", torch.int64), get("topk_logp_at", dtype), get("topk_logtail_at", dtype),
                           temperature, spec.num_classes)
        return SampledAtT(get("sample_idx", torch.int64), get("sample_logw_at", dtype), get("sample_top1", torch.int64),
                          temperature, spec.num_classes)
    if spec.mode == "topk":
        return TopKTarget(get("topk_idx", torch.int64), get("topk_logp", dtype), get("topk_tail", dtype), spec)
    return SampledTarget(get("sample_idx", torch.int64), get("sample_logp", dtype),
                         get("sample_log_inclusion", dtype), get("sample_norm", dtype), spec)
