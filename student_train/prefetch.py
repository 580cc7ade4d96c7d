"""Streamed epochs made in a reader process and handed to the training process through shared memory.

Reading a streamed epoch (Parquet decode, joining the source rows, binding the teacher
columns, mixing in the shuffle pool, cutting batches) costs about a microsecond a row
in numpy and pyarrow. In a thread of the training process it holds the GIL against
the training step for much of that time; in its own process it runs beside the step
on another core. :class:`EpochPrefetcher` runs it in one PyTorch ``DataLoader`` worker
(forked, so nothing is pickled and nothing is imported anew) for the whole run: the
worker makes epoch after epoch, so the next epoch's pool fills while the current one's
validation runs.

Batches cross in groups of about ``GROUP_BYTES`` (one shared-memory segment per column
a group, not per batch) and are cut back into the epoch's exact batches here. A group
never spans two epochs. What each batch holds is unchanged: the same function of the
seed, the epoch and the rank as when read in a thread.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from still.errors import StillError

GROUP_BYTES = 4 << 20  # rows a transfer carries: large enough that the per-transfer cost vanishes
SIZES, ERROR = "__sizes__", "__error__"


class _Epochs(IterableDataset):
    """Every epoch from ``first`` on, in groups of whole batches (runs in the reader process)."""

    def __init__(self, make_epoch: Callable[[int], Iterable[Mapping[str, np.ndarray]]], first: int,
                 group: int) -> None:
        self.make_epoch, self.first, self.group = make_epoch, first, group

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        try:
            for epoch in itertools.count(self.first):
                batches = iter(self.make_epoch(epoch))
                while chunk := list(itertools.islice(batches, self.group)):
                    joined = {k: np.concatenate([b[k] for b in chunk]) if len(chunk) > 1 else chunk[0][k]
                              for k in chunk[0]}
                    joined[SIZES] = np.array([len(next(iter(b.values()))) for b in chunk], dtype=np.int64)
                    yield joined
        except StillError as exc:  # a user's error: its message alone, not a worker traceback
            yield {ERROR: str(exc)}


class EpochPrefetcher:
    """Streamed epochs of one worker, made ahead in a reader process.

    Args:
        make_epoch: The epoch's batches (numpy) from its number; called in the reader process.
        steps: Batches in every epoch.
        group: Batches a transfer carries (:func:`group_batches`).
        seed: Seeds the DataLoader's own generator, so that starting the reader draws
            nothing from torch's global generator (the training's dropout stream).
    """

    def __init__(self, make_epoch: Callable[[int], Iterable[Mapping[str, np.ndarray]]], steps: int, group: int,
                 seed: int) -> None:
        self.make_epoch, self.steps, self.group, self.seed = make_epoch, steps, max(1, group), seed
        self._groups: Iterator[dict] | None = None
        self._next_epoch = -1

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch ``epoch``'s batches as host tensors; an epoch left unfinished restarts the reader."""
        if self._groups is None or epoch != self._next_epoch:
            self._start(epoch)
        given = 0
        try:
            while given < self.steps:
                group = next(self._groups)
                if ERROR in group:
                    raise StillError(group[ERROR])
                sizes = group.pop(SIZES).tolist()
                start = 0
                for size in sizes:
                    yield {k: v[start:start + size] for k, v in group.items()}
                    start += size
                    given += 1
        finally:
            if given == self.steps:
                self._next_epoch = epoch + 1
            else:
                self.close()

    def close(self) -> None:
        """Stops the reader process (it is started again by the next :meth:`epoch`)."""
        self._groups = None  # the DataLoader iterator's finaliser stops its worker

    def _start(self, epoch: int) -> None:
        self.close()
        loader = DataLoader(_Epochs(self.make_epoch, epoch, self.group), batch_size=None, num_workers=1,
                            prefetch_factor=6, generator=torch.Generator().manual_seed(self.seed))
        self._groups = iter(loader)
        self._next_epoch = epoch


def group_batches(sizes: Sequence[int], row_bytes: int) -> int:
    """Batches a transfer carries: about ``GROUP_BYTES`` of rows, at least one batch."""
    batch = max(1, max(sizes, default=1) * max(1, row_bytes))
    return max(1, GROUP_BYTES // batch)
