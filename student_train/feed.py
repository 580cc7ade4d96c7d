"""A worker's data: its training batches epoch by epoch, its validation and test splits.

:class:`Feed` is what the loop asks for data. It reads through
``student_train.reader`` and hands out batches on the training device, the raw
inputs normalised there (``Source.normalisation``) and the teacher columns bound to
the run's temperature (``student_train.data.bind_temperature``).

- ``memory`` ingest reads the rank's share of the training rows once (every view of
  its samples, for a multi-view store) and holds it on the device; an epoch is a
  seeded permutation of it (of the view drawn for each sample, with ``train.views=one``).
- ``stream`` ingest reads the rank's share of the epoch anew every epoch: the units in
  a fresh seeded order, mixed in a host-memory shuffle pool (``StreamedEpoch``), made
  in a reader process beside the training one (``student_train.prefetch``).

Either way an epoch is exactly :attr:`Feed.steps` batches on every rank (the rank
with the most rows sets it; a rank with fewer repeats a few of its rows), and what
each batch holds is a function of the seed, the epoch and the rank alone.

Validation is read once per run (rank 0) and held in host memory: the whole split, or,
when it holds more than ``train.val_rows`` rows (or ``VAL_BYTES``), a fixed sample of
whole units in a seeded order (``val_rows`` in the metrics says how many rows it is); the
test split is streamed once, at the end.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from student_train.data import SPLITS, Source, is_teacher_column, split_codes
from student_train.prefetch import EpochPrefetcher, group_batches, slot_bytes
from student_train.reader import (
    POOL_BYTES,
    Piece,
    Reader,
    StreamedEpoch,
    batch_sizes,
    share,
    share_items,
    steps_per_epoch,
    unit_order,
)

EVAL_BATCH = 4096
POOL_MIN_ROWS = 1 << 18
VAL_BYTES = 256 << 20  # validation rows held beyond this are sampled down to it


@dataclasses.dataclass(frozen=True)
class FeedSettings:
    """How a worker is fed, beside its source; part of the ``LoopSpec``.

    Attributes:
        ingest: ``memory`` or ``stream``.
        batch_size: Rows per batch on this worker (the global batch ÷ workers).
        temperature: T the teacher columns are bound at.
        seed: ``train.seed``.
        views: ``train.views``: ``one`` or ``all`` (multi-view stores).
        include_val: The training split holds the val rows too.
        pool_rows: Rows in a streaming worker's shuffle pool.
        teacher_in_loss: The training batches carry the stores' teacher columns (False at
            λ = 0: nothing reads them there, so they are neither gathered nor moved).
        val_rows: ``train.val_rows``: validation rows to hold (0: all).
    """

    ingest: str
    batch_size: int
    temperature: float
    seed: int
    views: str = "one"
    include_val: bool = False
    pool_rows: int = 0
    teacher_in_loss: bool = True
    val_rows: int = 0


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed of ``seed`` and ``parts`` (epoch, rank, purpose): independent streams, reproducible."""
    return int(np.random.SeedSequence([seed & (2**63 - 1), *parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# purposes of derive_seed
UNIT_ORDER, POOL_MIX, BATCH_ORDER, TORCH_RNG, VIEW_DRAW, AUGMENT, READER = range(7)


def pool_rows(requested: int, source: Source, batch_size: int) -> int:
    """``train.shuffle_buffer`` resolved: as asked, or the most of four units' rows, 16 batches and
    ``POOL_MIN_ROWS``; at most ``POOL_BYTES`` of rows either way (the cap is in bytes, on every device).

    The first batch of an epoch waits for the pool to fill: ``POOL_MIN_ROWS`` keeps that
    under half a second at the reader's rate on one core, while a small store is mixed whole.
    """
    cap = max(1, POOL_BYTES // max(1, source.row_bytes()))
    if requested:
        return min(requested, cap)
    unit_rows = max((u.rows for u in source.units), default=1)
    return int(min(cap, max(16 * batch_size, 4 * unit_rows, POOL_MIN_ROWS)))


class Feed:
    """One worker's data.

    Args:
        source: The resolved source.
        settings: How it is fed.
        rank: This worker's rank.
        world: Workers.
        device: The training device.
        arrays: ``{split: arrays}`` already in memory (a sweep's shared arrays,
            teacher columns unbound), or None: read them.
    """

    def __init__(self, source: Source, settings: FeedSettings, rank: int, world: int, device: torch.device,
                 arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        self.source, self.settings, self.rank, self.world, self.device = source, settings, rank, world, device
        self.reader = Reader(source)
        self.shared = arrays
        self.codes = split_codes("train", settings.include_val)
        self.one_view = source.views > 1 and settings.views == "one"
        counts = [u.items(self.codes) for u in source.units]
        self.counts = counts
        per_rank = [n * (source.views if source.views > 1 and not self.one_view else 1)
                    for n in share_items(counts, world)]
        self.rows = per_rank[rank]
        self.steps = steps_per_epoch(per_rank, settings.batch_size)
        self.sizes = batch_sizes(self.rows, self.steps, settings.batch_size)
        self._memory: dict[str, torch.Tensor] | None = None
        self._sample: np.ndarray | None = None  # memory ingest of a multi-view store: each row's sample and view
        self._view: np.ndarray | None = None
        self._val: dict[str, np.ndarray] | None = None
        self._prefetcher: EpochPrefetcher | None = None

    # ------------------------------------------------------------------ training

    def hold(self) -> None:
        """Memory ingest: reads the rank's share onto the device now (before the first epoch's clock)."""
        if self.settings.ingest == "memory":
            self._memory_tensors()

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The epoch's :attr:`steps` training batches, on the device."""
        s = self.settings
        if s.ingest == "memory":
            yield from self._memory_epoch(epoch, derive_seed(s.seed, epoch, VIEW_DRAW))
            return
        if self._prefetcher is None:
            row_bytes = self.source.row_bytes()
            group = group_batches(self.sizes, row_bytes)
            self._prefetcher = EpochPrefetcher(self._reader_epoch, len(self.sizes), group,
                                               slot_bytes(self.sizes, row_bytes, group),
                                               derive_seed(s.seed, self.rank, READER))
        for batch in self._prefetcher.epoch(epoch):
            yield self.to_device(batch, normalised=self.device.type == "cpu")

    def _reader_epoch(self, epoch: int) -> Iterator[Mapping[str, np.ndarray]]:
        """What the reader process makes: :meth:`streamed_epoch`, and for a CPU device the model input
        too (there the reader's core makes it, not the training one; a GPU gets raw rows, fewer bytes)."""
        batches = self.streamed_epoch(epoch)
        if self.device.type != "cpu":
            yield from batches
            return
        for batch in batches:
            yield {**batch, "x": self.source.normalisation.apply_numpy(batch["x"])}

    def streamed_epoch(self, epoch: int) -> StreamedEpoch:
        """Epoch ``epoch`` of streamed ingest as numpy batches: the rank's units in a fresh seeded order,
        mixed in the shuffle pool (what the reader process runs, in its one thread)."""
        s = self.settings
        order = unit_order(self.source.units, derive_seed(s.seed, epoch, UNIT_ORDER))
        return StreamedEpoch(self.reader, share(self.counts, order, self.world, self.rank), self.codes, self.sizes,
                             pool_rows=s.pool_rows, seed=derive_seed(s.seed, epoch, self.rank, POOL_MIX),
                             temperature=s.temperature,
                             one_view_seed=derive_seed(s.seed, epoch, VIEW_DRAW) if self.one_view else None,
                             drop=("view", "sample"), keep_teacher=s.teacher_in_loss, threads=False)

    def close(self) -> None:
        """Stops the streaming reader process, if one runs."""
        if self._prefetcher is not None:
            self._prefetcher.close()

    def _memory_epoch(self, epoch: int, view_seed: int) -> Iterator[dict[str, torch.Tensor]]:
        tensors = self._memory_tensors()
        total = len(tensors["x"])
        if self.one_view:
            from student_train.data import one_view_mask

            rows = np.flatnonzero(one_view_mask(self._sample, self._view, self.source.views, view_seed))
        else:
            rows = np.arange(total)
        order = rows[np.random.default_rng(derive_seed(self.settings.seed, epoch, self.rank, BATCH_ORDER))
                     .permutation(len(rows))]
        needed = sum(self.sizes)
        if len(order) < needed:  # this rank holds fewer rows than the rank that sets the steps
            order = np.resize(order, needed) if len(order) else np.zeros(needed, dtype=np.int64)
        index = torch.from_numpy(order).to(self.device)
        start = 0
        for size in self.sizes:
            picked = index[start:start + size]
            start += size
            yield {k: v.index_select(0, picked) for k, v in tensors.items()}

    def _memory_tensors(self) -> dict[str, torch.Tensor]:
        if self._memory is None:
            if self.shared is not None:
                arrays = self.reader.bound(dict(self._shared_share()), self.settings.temperature)
            else:
                pieces = share(self.counts, unit_order(self.source.units, None), self.world, self.rank)
                arrays = self.reader.read_all(pieces, self.codes, self.settings.temperature)
            self._sample, self._view = arrays.pop("sample", None), arrays.pop("view", None)
            if not self.settings.teacher_in_loss:
                arrays = {k: v for k, v in arrays.items() if not is_teacher_column(k)}
            tensors = self.to_device(arrays)
            # class ids as int64 once (gather and scatter take no other), not on every step
            self._memory = {k: v.long() if is_teacher_column(k) and k.endswith("_idx") else v
                            for k, v in tensors.items()}
        return self._memory

    def _shared_share(self) -> Mapping[str, np.ndarray]:
        if self.world != 1:
            raise ValueError("shared arrays serve one worker (in-process trials)")
        return self.shared["train"]

    # ------------------------------------------------------------------ held out

    def val(self) -> Iterator[dict[str, torch.Tensor]]:
        """The validation split (read once, held in host memory), in evaluation batches."""
        if self._val is None:
            self._val = self._held_out("val", self.settings.val_rows)
        yield from self._batches(self._val)

    @property
    def val_rows(self) -> int:
        """Validation rows evaluated (fewer than the split holds when it was sampled down to ``VAL_BYTES``)."""
        return 0 if self._val is None else len(self._val["x"])

    def test(self) -> Iterator[dict[str, torch.Tensor]]:
        """The test split, streamed once, in evaluation batches."""
        if self.shared is not None:
            yield from self._batches(self.reader.bound(dict(self.shared["test"]), self.settings.temperature))
            return
        codes = (SPLITS["test"],)
        counts = [u.items(codes) for u in self.source.units]
        total = sum(counts)
        if not total:
            return
        steps = math.ceil(total / EVAL_BATCH)
        stream = StreamedEpoch(self.reader, share(counts, unit_order(self.source.units, None), 1, 0), codes,
                               batch_sizes(total, steps, EVAL_BATCH), pool_rows=0, seed=0,
                               temperature=self.settings.temperature)
        for batch in stream:
            yield self.to_device(batch)

    def _held_out(self, split: str, rows: int) -> dict[str, np.ndarray]:
        """A held-out split read once: whole, or (over ``rows``, or over ``VAL_BYTES``) the first
        ``rows`` items of its units in a seeded order."""
        if self.shared is not None:
            return self.reader.bound(dict(self.shared[split]), self.settings.temperature)
        codes = (SPLITS[split],)
        counts = [u.items(codes) for u in self.source.units]
        limit = max(1, VAL_BYTES // max(1, self.source.row_bytes()))
        limit = min(limit, rows) if rows else limit
        sampled = sum(counts) > limit
        order = unit_order(self.source.units, derive_seed(self.settings.seed, 0, UNIT_ORDER) if sampled else None)
        pieces = _first_items(counts, order, limit)
        return self.reader.read_all(pieces, codes, self.settings.temperature)

    def _batches(self, arrays: Mapping[str, np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        rows = len(arrays["x"])
        for start in range(0, rows, EVAL_BATCH):
            yield self.to_device({k: v[start:start + EVAL_BATCH] for k, v in arrays.items()})

    # ------------------------------------------------------------------ device

    def to_device(self, batch: Mapping[str, np.ndarray | torch.Tensor], normalised: bool = False
                  ) -> dict[str, torch.Tensor]:
        """A batch (numpy or host tensors) on the device, its raw ``x`` normalised into the model input there
        (unless ``normalised``: ``x`` is the model input already)."""
        out = {name: values if isinstance(values, torch.Tensor) else _host_tensor(values)
               for name, values in batch.items()}
        if self.device.type != "cpu":
            cuda = self.device.type == "cuda"
            out = {name: (t.pin_memory() if cuda else t).to(self.device, non_blocking=cuda) for name, t in out.items()}
        if not normalised:
            out["x"] = self.source.normalisation.apply(out["x"])
        return out


def _host_tensor(values: np.ndarray) -> torch.Tensor:
    """A numpy column as a host tensor, without a copy where it is contiguous."""
    with warnings.catch_warnings():
        # arrays shared through Ray's object store are read-only; training never writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(values))


def _first_items(counts: Sequence[int], order: Sequence[int], limit: int) -> list[Piece]:
    """Pieces holding the first ``limit`` items of the units in ``order``."""
    pieces, left = [], limit
    for unit in order:
        take = min(counts[unit], left)
        if take:
            pieces.append(Piece(unit, 0, take))
            left -= take
        if not left:
            break
    return pieces


def load_split_arrays(source: Source, include_val: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Every split of a source in memory, teacher columns unbound (a sweep shares these between trials).

    The training split holds every view of a multi-view store's samples (each trial draws its own).
    """
    reader = Reader(source)
    out = {}
    for split in SPLITS:
        codes = split_codes(split, include_val)
        counts = [u.items(codes) for u in source.units]
        out[split] = reader.read_all(share(counts, unit_order(source.units, None), 1, 0), codes, None)
    return out

