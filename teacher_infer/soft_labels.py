"""Full teacher logits → the stored teacher-output columns (format v2), on the CPU.

What each storage mode keeps per row, all computed from the teacher's float32 logits
``t`` (C values). ``v = t − max(t)`` are the row's logits shifted so that the largest
is 0: softmax is shift-invariant, and values near 0 are where fp16 is most precise::

    dense    logits        (C,) dtype   t as is (raw, T = 1; multi-label sigmoid logits too)
    topk     topk_idx      (k,) int32   the k largest classes, by decreasing logit
             topk_logit    (k,) dtype   v of those classes (the first is 0)
             logsumexp     ()   float32 log Σ_c exp(v_c)          → p_i = exp(topk_logit_i − logsumexp)
             tail_lognorm  (G,) float32 log Σ_{c ∉ top-k} exp(v_c / T_g) at each grid temperature
    sampled  sample_idx    (m,) int32   the distinct classes among N draws from softmax(t / T_s)
             sample_count  (m,) int16   how often each was drawn (Σ = N)
             sample_logit  (m,) dtype   v of those classes
             logsumexp     ()   float32 as for topk
             lognorm       (G,) float32 log Σ_c exp(v_c / T_g) at each grid temperature

Why the tail is stored, not derived: ``1 − Σ exp(topk_logit − logsumexp)`` cancels
catastrophically when the teacher is confident. fp16 rounding of the top logit
(≈ 5e-4 relative) is then larger than the true tail mass, and the derived tail came
out orders of magnitude wrong (format v1: mean KL 1.37 nats at T = 4 on 1000
classes). ``tail_lognorm`` at T = 1 is the tail's log-mass (minus ``logsumexp``)
summed in float64 over the tail classes themselves, so it is exact whatever the
value dtype.

What a top-k row can and cannot know at T ≠ 1: softmax(t/T) on the top-k support
is exact up to the value dtype; the tail's total mass at T needs Σ_tail exp(v/T),
which depends on the shape of the tail. The store keeps it exactly at the grid
temperatures ``T_g`` (``store.temperatures``, default 1, 2, 4, 8);
:mod:`teacher_infer.targets` interpolates ``log Σ_tail exp(β v)`` linearly in
β = 1/T between them and β = 0, where it is ``log(C − k)`` exactly. That function
is convex in β, so the chord overestimates it; between β = 1/8 and 0 (T > 8) the
error is about σ²β(1/8 − β)/2 in log-mass for tail logits of spread σ (0.4% at
T = 20 for σ = 1.5). How the tail mass is spread over the tail classes is not
stored and cannot be recovered: ``kd.tail`` chooses how the loss treats it.

Sampled rows (Anshumann et al., ACL 2025, "Sparse Logit Sampling", arXiv:2503.16870)
keep the distinct classes of N draws from softmax(t/T_s) with their counts: an
unbiased estimate of the teacher distribution. ``count_i / N`` estimates
softmax(t/T_s)_i, as in the paper. Because each drawn class also keeps its logit and
``lognorm`` holds the normaliser at every grid temperature (T_s is always on it),
:class:`teacher_infer.targets.SampledTarget` reads a lower-variance estimate from the
same row, unbiased at every grid temperature: Horvitz–Thompson, ``p_T(i) / π_i`` with
``π_i = 1 − (1 − q_i)^N`` the chance that the draws include class i. A class drawn
almost surely (the teacher's confident part) is then exact; the noise sits in the
rarely drawn tail, and it grows as T moves away from T_s.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from still.errors import StillError

MODES = ("dense", "topk", "sampled")
TASKS = ("multiclass", "multilabel")
MODE_COLUMNS = {
    "dense": ("logits",),
    "topk": ("topk_idx", "topk_logit", "logsumexp", "tail_lognorm"),
    "sampled": ("sample_idx", "sample_count", "sample_logit", "logsumexp", "lognorm"),
}
"""The teacher-output columns of each storage mode, in shard order."""
MAX_SAMPLES = int(np.iinfo(np.int16).max)


@dataclasses.dataclass(frozen=True)
class SoftLabelSpec:
    """How teacher outputs are stored: the manifest's ``storage`` section, as a value.

    Attributes:
        mode: ``dense``, ``topk`` or ``sampled``.
        num_classes: C, the teacher's outputs.
        dtype: ``float16`` or ``float32``: the type of stored logit values.
        k: Classes kept per row (``topk``).
        samples: Draws per row, N (``sampled``).
        sample_temperature: T_s, the temperature of the distribution drawn from (``sampled``).
        temperatures: The grid of temperatures at which normalisers are stored, ascending;
            always holds 1 (and T_s for ``sampled``).
        task: ``multiclass`` (softmax) or ``multilabel`` (per-class sigmoid; dense only).
    """

    mode: str
    num_classes: int
    dtype: str = "float16"
    k: int = 0
    samples: int = 0
    sample_temperature: float = 1.0
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    task: str = "multiclass"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise StillError(f"store.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.task not in TASKS:
            raise StillError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.task == "multilabel" and self.mode != "dense":
            raise StillError(
                f"store.mode={self.mode} does not apply to multi-label data (independent per-class sigmoid "
                "outputs have no top-k or sampling distribution); use store.mode=dense"
            )
        if self.mode == "topk" and not 1 <= self.k <= self.num_classes:
            raise StillError(f"store.k={self.k} must be in [1, {self.num_classes}], the number of classes")
        if self.mode == "sampled" and not 1 <= self.samples <= MAX_SAMPLES:
            raise StillError(f"store.samples={self.samples} must be in [1, {MAX_SAMPLES}]")
        if self.sample_temperature <= 0 or any(t <= 0 for t in self.temperatures):
            raise StillError("store.temperatures and store.sample_temperature must be > 0")

    @classmethod
    def create(cls, mode: str, num_classes: int, *, dtype: str = "float16", k: int = 0, samples: int = 0,
               sample_temperature: float = 1.0, temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0),
               task: str = "multiclass") -> SoftLabelSpec:
        """Builds a spec, completing the grid (1 and T_s added, sorted, de-duplicated)."""
        grid = set(float(t) for t in temperatures) | {1.0}
        if mode == "sampled":
            grid.add(float(sample_temperature))
        return cls(mode=mode, num_classes=int(num_classes), dtype=dtype, k=int(k) if mode == "topk" else 0,
                   samples=int(samples) if mode == "sampled" else 0,
                   sample_temperature=float(sample_temperature) if mode == "sampled" else 1.0,
                   temperatures=tuple(sorted(grid)) if mode != "dense" else (), task=task)

    @classmethod
    def from_manifest(cls, storage: dict[str, Any], num_classes: int, task: str) -> SoftLabelSpec:
        """The spec recorded in a manifest's ``storage`` section."""
        return cls(mode=storage["mode"], num_classes=int(num_classes), dtype=storage["dtype"],
                   k=int(storage.get("k") or 0), samples=int(storage.get("samples") or 0),
                   sample_temperature=float(storage.get("sample_temperature") or 1.0),
                   temperatures=tuple(float(t) for t in storage.get("temperatures") or ()), task=task)

    def manifest_fields(self) -> dict[str, Any]:
        """The settings as the manifest's ``storage`` section (and the cache key) record them."""
        fields: dict[str, Any] = {"mode": self.mode, "dtype": self.dtype}
        if self.mode == "topk":
            fields["k"] = self.k
        if self.mode == "sampled":
            fields.update(samples=self.samples, sample_temperature=self.sample_temperature)
        if self.mode != "dense":
            fields["temperatures"] = list(self.temperatures)
        return fields

    @property
    def columns(self) -> tuple[str, ...]:
        """The teacher-output columns this spec writes."""
        return MODE_COLUMNS[self.mode]


@dataclasses.dataclass(frozen=True)
class Ragged:
    """A variable-length list column: row r holds ``values[offsets[r]:offsets[r + 1]]``."""

    offsets: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def take(self, rows: np.ndarray) -> Ragged:
        """The given rows, in that order."""
        lengths = np.diff(self.offsets)[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = np.repeat(self.offsets[:-1][rows] - offsets[:-1], lengths)
        return Ragged(offsets, self.values[np.arange(offsets[-1]) + starts])

    def padded(self, width: int, fill: float | int = 0) -> np.ndarray:
        """Returns a ``(rows, width)`` array, rows padded with ``fill`` (and cut at ``width``)."""
        lengths = np.diff(self.offsets)
        out = np.full((len(self), width), fill, dtype=self.values.dtype)
        row = np.repeat(np.arange(len(self)), lengths)
        col = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = col < width
        out[row[keep], col[keep]] = self.values[(np.repeat(self.offsets[:-1], lengths) + col)[keep]]
        return out


def compress(logits: np.ndarray, spec: SoftLabelSpec, rng: np.random.Generator | None = None
             ) -> dict[str, Any]:
    """Turns full float32 logits ``(n, C)`` into the stored teacher-output columns.

    Args:
        logits: The teacher's logits (multi-label: per-class sigmoid logits).
        spec: The storage settings.
        rng: Draws the samples of ``sampled`` rows (required for that mode).

    Returns:
        Column name → values: numpy arrays, or :class:`Ragged` for the ``sampled``
        list columns (the module docstring lists them).

    Raises:
        StillError: Logits of another shape, or NaN/inf logits (naming the first such
            row): no mode can store them faithfully, and ``still infer`` refuses them too.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[1] != spec.num_classes:
        raise StillError(f"teacher logits of shape {logits.shape}, expected (n, {spec.num_classes})")
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise StillError(f"teacher logits hold NaN/inf in {int(bad.sum())} of {len(logits)} rows (first: row "
                         f"{int(np.flatnonzero(bad)[0])}); soft labels need finite logits")
    if spec.mode == "dense":
        return {"logits": logits.astype(spec.dtype)}
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = _logsumexp(shifted, 1.0)
    if spec.mode == "topk":
        idx = top_k(shifted, spec.k)
        tail = shifted.copy()
        np.put_along_axis(tail, idx, -np.inf, axis=1)
        return {
            "topk_idx": idx.astype(np.int32),
            "topk_logit": np.take_along_axis(shifted, idx, axis=1).astype(spec.dtype),
            "logsumexp": lse.astype(np.float32),
            "tail_lognorm": np.stack([_logsumexp(tail, t) for t in spec.temperatures], axis=1).astype(np.float32),
        }
    if rng is None:
        raise StillError("sampled storage needs a random generator (rng)")
    counts = draw_counts(shifted, spec.samples, spec.sample_temperature, rng)
    rows, cols = np.nonzero(counts)
    hits = counts[rows, cols]
    order = np.lexsort((cols, -hits, rows))  # within a row: most drawn first, then by class
    rows, cols, hits = rows[order], cols[order], hits[order]
    offsets = np.zeros(len(logits) + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=len(logits)), out=offsets[1:])
    return {
        "sample_idx": Ragged(offsets, cols.astype(np.int32)),
        "sample_count": Ragged(offsets, hits.astype(np.int16)),
        "sample_logit": Ragged(offsets, shifted[rows, cols].astype(spec.dtype)),
        "logsumexp": lse.astype(np.float32),
        "lognorm": np.stack([_logsumexp(shifted, t) for t in spec.temperatures], axis=1).astype(np.float32),
    }


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of each row, by decreasing value (ties: lower index first)."""
    if k >= values.shape[1]:
        return np.argsort(-values, axis=1, kind="stable")
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(values, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1)


def draw_counts(shifted: np.ndarray, samples: int, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """Draws ``samples`` classes per row from softmax(shifted / temperature); returns counts ``(n, C)``."""
    z = shifted.astype(np.float64) / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return rng.multinomial(samples, p)


def _logsumexp(values: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise log Σ exp(values / temperature), summed in float64; −inf for a row of −inf."""
    peak = values.max(axis=1, keepdims=True)
    finite = np.isfinite(peak)
    safe_peak = np.where(finite, peak, 0.0)
    total = np.exp((values - safe_peak) / temperature, dtype=np.float64).sum(axis=1)
    with np.errstate(divide="ignore"):
        out = safe_peak[:, 0] / temperature + np.log(total)
    return np.where(finite[:, 0], out, -np.inf)
