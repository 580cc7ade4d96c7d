"""Streamed epochs made in a reader process and handed to the training process through a shared ring.

Reading a streamed epoch (Parquet decode, joining the source rows, binding the teacher
columns, mixing in the shuffle pool, cutting batches, and on a CPU device making the
model input) costs about 1.3 µs a row in numpy and pyarrow (a 10M-row labels-only
store). In a thread of the training process it holds the GIL against the training step;
in its own process it runs beside the step on another core. :class:`EpochPrefetcher`
runs it in one PyTorch ``DataLoader`` worker (forked, so nothing is pickled and nothing
is imported anew) for the whole run: the worker makes epoch after epoch, so the next
epoch's pool fills while the current one's validation runs. It runs at the lowest CPU
priority (:func:`yield_the_core`).

The two processes share a ring of slots of anonymous shared memory, mapped once before
the fork. The worker concatenates a group of whole batches (about ``GROUP_BYTES``) straight
into the next slot and hands the ``DataLoader`` only the slot's number and layout; the trainer
copies the group out and cuts it into the epoch's exact batches. A slot is written again
only after the trainer has copied it: the ``DataLoader`` lets its worker run at most
``PREFETCH`` groups ahead of the group the trainer last received, and the ring has more
slots than that. No shared-memory segment is made, passed or faulted in per transfer
(the ``DataLoader``'s own transport did that for every column of every group, each
through a socket handshake with the busy worker: 5 to 12 ms of the trainer's time a
group), and nothing is left in ``/dev/shm`` when either process is killed. A group too
large for a slot travels the ``DataLoader``'s way instead. A group never spans two epochs.

What each batch holds is unchanged: the same function of the seed, the epoch and the
rank as when read in a thread.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from still.errors import StillError

GROUP_BYTES = 4 << 20  # rows a transfer carries: large enough that the per-transfer cost vanishes
PREFETCH = 4  # groups the worker may make ahead of the trainer
SLOTS = PREFETCH + 2  # more than the groups in flight: a slot is never written while it is read
ALIGN = 64
ERROR = "__error__"

Batch = Mapping[str, np.ndarray]
Layout = list[tuple[str, str, tuple[int, ...], int]]  # (column, dtype, shape, offset in the slot)


class _Epochs(IterableDataset):
    """Every epoch from ``first`` on, in groups of whole batches written into the ring (runs in the worker)."""

    def __init__(self, make_epoch: Callable[[int], Iterable[Batch]], first: int, group: int, ring: mmap.mmap,
                 slot_bytes: int) -> None:
        self.make_epoch, self.first, self.group = make_epoch, first, group
        self.ring, self.slot_bytes = ring, slot_bytes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield_the_core()
        slots = itertools.cycle(range(SLOTS))
        try:
            for epoch in itertools.count(self.first):
                batches = iter(self.make_epoch(epoch))
                while chunk := list(itertools.islice(batches, self.group)):
                    sizes = [len(next(iter(b.values()))) for b in chunk]
                    layout = pack_layout({k: (v.dtype, (sum(sizes), *v.shape[1:])) for k, v in chunk[0].items()})
                    name, dtype, shape, offset = layout[-1]
                    if offset + _nbytes(dtype, shape) > self.slot_bytes:
                        yield {"sizes": sizes, "inline": {k: np.concatenate([b[k] for b in chunk]) for k in chunk[0]}}
                        continue
                    slot = next(slots)
                    for name, dtype, shape, offset in layout:  # each column concatenated straight into the slot
                        into = np.frombuffer(self.ring, np.dtype(dtype), math.prod(shape),
                                             slot * self.slot_bytes + offset).reshape(shape)
                        np.concatenate([b[name] for b in chunk], out=into)
                    yield {"sizes": sizes, "slot": slot, "layout": layout}
        except StillError as exc:  # a user's error: its message alone, not a worker traceback
            yield {ERROR: str(exc)}


def yield_the_core() -> None:
    """Lowers the reader process to the lowest CPU priority (niceness 19).

    The reader makes batches ahead into the ring; the training step is what the run waits
    for. On a machine with every core busy (the reader, the step and Ray's own processes
    on two cores) the step then keeps its core when they meet on one, and the ring absorbs
    the reader's delays; with a core to spare nothing changes.
    """
    os.nice(max(0, 19 - os.nice(0)))


class EpochPrefetcher:
    """Streamed epochs of one worker, made ahead in a reader process.

    Args:
        make_epoch: The epoch's batches (numpy) from its number; called in the reader process.
        steps: Batches in every epoch.
        group: Batches a transfer carries (:func:`group_batches`).
        slot_bytes: Bytes of one ring slot (:func:`slot_bytes`).
        seed: Seeds the DataLoader's own generator, so that starting the reader draws
            nothing from torch's global generator (the training's dropout stream).
    """

    def __init__(self, make_epoch: Callable[[int], Iterable[Batch]], steps: int, group: int, slot_bytes: int,
                 seed: int) -> None:
        self.make_epoch, self.steps, self.group, self.seed = make_epoch, steps, max(1, group), seed
        self.slot_bytes = -(-max(1, slot_bytes) // ALIGN) * ALIGN
        self._ring: mmap.mmap | None = None
        self._groups: Iterator[dict] | None = None
        self._next_epoch = -1

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Epoch ``epoch``'s batches as host tensors; an epoch left unfinished restarts the reader."""
        if self._groups is None or epoch != self._next_epoch:
            self._start(epoch)
        given = 0
        try:
            while given < self.steps:
                group, sizes = self._receive()
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
        self._ring = None  # unmapped once nothing refers to it

    def _start(self, epoch: int) -> None:
        self.close()
        self._ring = mmap.mmap(-1, SLOTS * self.slot_bytes)  # anonymous and shared: the fork sees the same pages
        loader = DataLoader(_Epochs(self.make_epoch, epoch, self.group, self._ring, self.slot_bytes), batch_size=None,
                            num_workers=1, prefetch_factor=PREFETCH, generator=torch.Generator().manual_seed(self.seed))
        self._groups = iter(loader)
        self._next_epoch = epoch

    def _receive(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The next group, copied out of its slot (which the worker may then fill again)."""
        message = next(self._groups)
        if ERROR in message:
            raise StillError(message[ERROR])
        if "inline" in message:
            return dict(message["inline"]), message["sizes"]
        base = message["slot"] * self.slot_bytes
        group = {name: torch.from_numpy(_copy_out(self._ring, base + offset, dtype, shape))
                 for name, dtype, shape, offset in message["layout"]}
        return group, message["sizes"]


def _copy_out(ring: mmap.mmap, offset: int, dtype: str, shape: Sequence[int]) -> np.ndarray:
    """A column of a slot, copied into the trainer's own memory."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(ring, np.dtype(dtype), count, offset).reshape(shape).copy()


def pack_layout(columns: Mapping[str, tuple[np.dtype, Sequence[int]]]) -> Layout:
    """Where each column of a group (its dtype and shape) lies in a slot: one after another, each
    ``ALIGN``-aligned."""
    layout, offset = [], 0
    for name, (dtype, shape) in columns.items():
        layout.append((name, np.dtype(dtype).str, tuple(shape), offset))
        offset += -(-_nbytes(dtype, shape) // ALIGN) * ALIGN
    return layout


def _nbytes(dtype: Any, shape: Sequence[int]) -> int:
    return np.dtype(dtype).itemsize * math.prod(shape)


def group_batches(sizes: Sequence[int], row_bytes: int) -> int:
    """Batches a transfer carries: about ``GROUP_BYTES`` of rows, at least one batch."""
    batch = max(1, max(sizes, default=1) * max(1, row_bytes))
    return max(1, GROUP_BYTES // batch)


def slot_bytes(sizes: Sequence[int], row_bytes: int, group: int) -> int:
    """A ring slot: a group's estimated bytes, with room for the estimate to be short by half."""
    return group * max(sizes, default=1) * max(1, row_bytes) * 3 // 2
