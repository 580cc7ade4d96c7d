"""Reading training data: units, each worker's share of an epoch, and a streamed epoch.

Every worker reads its own rows straight from the store's (or dataset's) Parquet
files; no Ray Data pipeline stands between the files and the loop. What is read
and in which order is a pure function of the config, the epoch and the worker's
rank, so that

- every rank takes the same number of optimizer steps in every epoch, whatever the
  block sizes, ingest mode or view policy (a rank that took one step more would wait
  forever in the gradient all-reduce of a step no other rank takes);
- one config and seed gives the same batches, hence the same losses, run after run
  and after a resume (nothing depends on which task finished first);
- an epoch starts in milliseconds (a row group read, no pipeline to start), a read
  holds one row group at a time, and a worker's memory is its shuffle pool plus a few
  row groups, whatever the store's size (no object-store pages).

Units. A source is read in *units* (:func:`scan_units`, once on the driver): a row
group of a single-view store shard or of a dataset file, or a whole shard of a
multi-view store (whose K views of a sample lie in one shard, view-major). Each unit
knows how many *items* it holds per split: rows, or the samples of a multi-view
shard (a sample counts once, whichever of its views an epoch trains on).

Shares. An epoch visits the units in an order (:func:`unit_order`: the stored order
for memory ingest, a fresh seeded permutation per epoch for streaming) and splits
the concatenation of their items into ``world`` contiguous ranges of equal length
(±1): :func:`share`. A rank's :class:`Piece` list names the item ranges it reads.
Every rank computes every rank's rows, so all agree on :func:`steps_per_epoch`.

Streaming. :class:`StreamedEpoch` reads a rank's pieces in a background thread
(two pieces ahead), converts them (``student_train.data.convert_rows``) and binds
the teacher columns to the run's temperature, mixes the rows in a :class:`ShufflePool`
(host memory, bounded in bytes, rows from several units of a shuffled order) and cuts
them into exactly ``steps`` batches (:func:`exact_batches`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from still.errors import StillError
from student_train.data import (SPLITS, Source, bind_temperature, convert_rows, drawn_view, is_teacher_column,
                                teacher_prefix)

POOL_BYTES = 128 << 20  # the most a streaming worker's automatic shuffle pool holds


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of the source read at once.

    Attributes:
        file: The store shard's or the dataset file's index.
        row_groups: The file's row groups it spans (all of them for a multi-view shard).
        first_row: The file row its first row is.
        rows: File rows it spans.
        counts: Items per split code (0 train, 1 val, 2 test): rows, or samples of a
            multi-view shard.
    """

    file: int
    row_groups: tuple[int, ...]
    first_row: int
    rows: int
    counts: tuple[int, int, int]

    def items(self, codes: Sequence[int]) -> int:
        """Items of these split codes."""
        return sum(self.counts[c] for c in codes)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Items ``start`` to ``stop`` (of the chosen split codes) of unit ``unit``."""

    unit: int
    start: int
    stop: int


# --------------------------------------------------------------------------- units (driver)


def scan_units(source: Source) -> tuple[Unit, ...]:
    """The source's units with their items per split; reads footers and the small split (and view) columns.

    Raises:
        StillError: A shard or file cannot be read, or a multi-view shard is not laid out
            view-major (naming it).
    """
    if source.kind == "dataset":
        return _dataset_units(source.dataset)
    if source.kind == "blocks":
        return _block_units(source.blocks)
    if source.kind == "lm_store":
        return _lm_store_units(source.primary)
    store = source.primary
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(store.manifest["shards"])))) as pool:
        per_shard = list(pool.map(lambda i: _store_units(store, i), range(len(store.manifest["shards"]))))
    return tuple(unit for units in per_shard for unit in units)


def _store_units(store: Any, index: int) -> list[Unit]:
    from teacher_infer.store import read_shard_columns, shard_row_groups

    columns = ["split", "view"] if store.views > 1 else ["split"]
    table = read_shard_columns(store, index, columns)
    split = table["split"].to_numpy()
    sizes = shard_row_groups(store, index)
    if store.views == 1:
        units, start = [], 0
        for group, rows in enumerate(sizes):
            counts = np.bincount(split[start:start + rows], minlength=3)[:3]
            units.append(Unit(index, (group,), start, rows, tuple(int(c) for c in counts)))
            start += rows
        return units
    per_view = len(split) // store.views
    expected = np.repeat(np.arange(store.views, dtype=np.int16), per_view)
    view = table["view"].to_numpy()
    if len(split) % store.views or not np.array_equal(view, expected) or not all(
            np.array_equal(split[:per_view], split[v * per_view:(v + 1) * per_view]) for v in range(store.views)):
        raise StillError(f"store {store.uri!r}: shard {store.manifest['shards'][index]['name']} is not laid out as "
                         f"{store.views} views of its rows, view-major (rerun still infer)")
    counts = np.bincount(split[:per_view], minlength=3)[:3]
    return [Unit(index, tuple(range(len(sizes))), 0, len(split), tuple(int(c) for c in counts))]


def _dataset_units(spec: Any) -> tuple[Unit, ...]:
    fs, paths = spec.arrow_files()
    columns = [spec.id_column] + ([spec.split_column] if spec.split_column else [])
    units = []
    for index, path in enumerate(paths):
        with fs.open_input_file(path) as handle:
            pfile = pq.ParquetFile(handle)
            start = 0
            for group in range(pfile.metadata.num_row_groups):
                table = pfile.read_row_group(group, columns=columns)
                codes = _dataset_splits(table, spec)
                counts = np.bincount(codes, minlength=3)[:3]
                units.append(Unit(index, (group,), start, table.num_rows, tuple(int(c) for c in counts)))
                start += table.num_rows
    return tuple(units)


def _block_units(blocks: Any) -> tuple[Unit, ...]:
    from still.storage import resolve

    return _row_group_units([resolve(path) for path in blocks.files])


def _lm_store_units(store: Any) -> tuple[Unit, ...]:
    return _row_group_units(store.shard_paths)


def _row_group_units(locations: Sequence[Any]) -> tuple[Unit, ...]:
    """One unit per row group of files with a ``split`` column (token blocks, language-model stores)."""
    units = []
    for index, location in enumerate(locations):
        with location.fs.open(location.path, "rb") as handle:
            pfile = pq.ParquetFile(handle)
            start = 0
            for group in range(pfile.metadata.num_row_groups):
                split = pfile.read_row_group(group, columns=["split"])["split"].to_numpy()
                counts = np.bincount(split, minlength=3)[:3]
                units.append(Unit(index, (group,), start, len(split), tuple(int(c) for c in counts)))
                start += len(split)
    return tuple(units)


def _dataset_splits(table: pa.Table, spec: Any) -> np.ndarray:
    from still.datasets import assign_splits

    ids = table[spec.id_column].to_numpy(zero_copy_only=False)
    source_split = table[spec.split_column].to_numpy(zero_copy_only=False) if spec.split_column else None
    return assign_splits(ids, source_split, spec.split_rule)


# --------------------------------------------------------------------------- shares and steps


def unit_order(units: Sequence[Unit], seed: int | None) -> list[int]:
    """The order an epoch visits the units in: as stored (None), or a permutation seeded by ``seed``."""
    if seed is None:
        return list(range(len(units)))
    return [int(i) for i in np.random.default_rng(seed).permutation(len(units))]


def share(counts: Sequence[int], order: Sequence[int], world: int, rank: int) -> list[Piece]:
    """Rank ``rank``'s contiguous ``1/world`` of the items of the units in ``order``.

    Args:
        counts: Items per unit (of the split codes read).
        order: The order the units are visited in.
        world: Ranks.
        rank: This rank.
    """
    total = sum(counts[u] for u in order)
    lo, hi = total * rank // world, total * (rank + 1) // world
    pieces, offset = [], 0
    for unit in order:
        start, stop = max(lo - offset, 0), min(hi - offset, counts[unit])
        if stop > start:
            pieces.append(Piece(unit, start, stop))
        offset += counts[unit]
    return pieces


def share_items(counts: Sequence[int], world: int) -> list[int]:
    """Items of each rank's :func:`share` (the same whatever the order)."""
    total = sum(counts)
    return [total * (r + 1) // world - total * r // world for r in range(world)]


def steps_per_epoch(rows_per_rank: Sequence[int], batch_size: int) -> int:
    """The optimizer steps every rank takes in an epoch: enough for the rank with the most rows."""
    return max(1, max(math.ceil(rows / batch_size) for rows in rows_per_rank))


def batch_sizes(rows: int, steps: int, batch_size: int) -> list[int]:
    """A rank's batch sizes: ``steps`` batches of ``batch_size`` rows, the last one holding what is left
    (at least one row; a rank with fewer rows than that repeats some of its rows)."""
    last = min(batch_size, max(1, rows - (steps - 1) * batch_size))
    return [batch_size] * (steps - 1) + [last]


# --------------------------------------------------------------------------- reading pieces


class Reader:
    """Reads pieces of a source as training arrays; one per process, made from the pickled :class:`Source`.

    Args:
        source: The resolved source.
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self._members: list[_MemberColumns] | None = None
        self._tokens: _BlockTokens | None = None

    def read(self, piece: Piece, codes: Sequence[int], one_view_seed: int | None = None) -> dict[str, np.ndarray]:
        """A piece's rows as training arrays (``student_train.data.convert_rows``), teacher columns unbound.

        Args:
            piece: The items to read.
            codes: The split codes the items count (a held-out split reads view 0 only).
            one_view_seed: Multi-view training rows: read the view drawn for each
                sample with this seed (streamed ``train.views=one``); None: every view.
        """
        source = self.source
        unit = source.units[piece.unit]
        train = SPLITS["train"] in codes
        if source.kind == "dataset":
            table = self._dataset_rows(unit, piece, codes)
        elif source.kind == "blocks":
            table = self._block_rows(unit, piece, codes)
        elif source.kind == "lm_store":
            table = self._lm_store_rows(unit, piece, codes)
        elif source.views > 1:
            table = self._multiview_rows(unit, piece, codes, one_view_seed)
        else:
            table = self._store_rows(unit, piece, codes)
        arrays = convert_rows(table, source, train)
        if len(source.stores) > 1:
            arrays.update(self._member_columns(table["id"].to_numpy(zero_copy_only=False)))
        return arrays

    def read_all(self, pieces: Sequence[Piece], codes: Sequence[int], temperature: float | None,
                 one_view_seed: int | None = None) -> dict[str, np.ndarray]:
        """Pieces read one after the other and concatenated (teacher columns bound at ``temperature``)."""
        parts = [self.bound(self.read(p, codes, one_view_seed), temperature) for p in pieces]
        if not parts:
            empty = self.read(Piece(0, 0, 0), codes, one_view_seed)
            return self.bound(empty, temperature)
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def bound(self, arrays: dict[str, np.ndarray], temperature: float | None) -> dict[str, np.ndarray]:
        """``arrays`` with teacher columns bound at ``temperature`` (None: as they are)."""
        return arrays if temperature is None else bind_temperature(arrays, self.source, temperature)

    def _store_rows(self, unit: Unit, piece: Piece, codes: Sequence[int]) -> pa.Table:
        from teacher_infer.store import read_shard_columns, read_shard_rows

        store = self.source.primary
        split = read_shard_columns(store, unit.file, ["split"], unit.row_groups)["split"].to_numpy()
        positions = np.flatnonzero(np.isin(split, codes))[piece.start:piece.stop] + unit.first_row
        return read_shard_rows(store, unit.file, positions, self.source.store_columns(codes), self.source.dataset)

    def _multiview_rows(self, unit: Unit, piece: Piece, codes: Sequence[int], one_view_seed: int | None) -> pa.Table:
        from still.datasets.splits import id_keys
        from teacher_infer.store import read_shard_columns, read_shard_rows

        store = self.source.primary
        views = store.views
        index = read_shard_columns(store, unit.file, ["id", "split"])
        per_view = index.num_rows // views
        split = index["split"].to_numpy()[:per_view]
        samples = np.flatnonzero(np.isin(split, codes))[piece.start:piece.stop]
        if SPLITS["train"] not in codes:
            chosen = np.zeros(len(samples), dtype=np.int64)
        elif one_view_seed is not None:
            ids = index["id"].to_numpy(zero_copy_only=False)[:per_view][samples]
            chosen = drawn_view(id_keys(ids).view(np.int64), views, one_view_seed)
        else:
            chosen = None
        if chosen is None:
            positions = (np.arange(views)[:, None] * per_view + samples[None, :]).ravel()
        else:
            positions = chosen * per_view + samples
        positions = np.sort(positions)
        table = read_shard_rows(store, unit.file, positions, self.source.store_columns(codes), self.source.dataset)
        if "view" in table.column_names and not np.array_equal(table["view"].to_numpy(), positions // per_view):
            raise StillError(f"store {store.uri!r}: shard {store.manifest['shards'][unit.file]['name']} is not "
                             "laid out view-major (rerun still infer)")
        return table

    def _dataset_rows(self, unit: Unit, piece: Piece, codes: Sequence[int]) -> pa.Table:
        spec = self.source.dataset
        fs, paths = spec.arrow_files()
        columns = [spec.id_column, spec.feature_column, spec.label_column] + (
            [spec.split_column] if spec.split_column else [])
        try:
            with fs.open_input_file(paths[unit.file]) as handle:
                table = pq.ParquetFile(handle).read_row_group(unit.row_groups[0], columns=columns, use_threads=False)
        except Exception as exc:  # a file changed or gone since the run began
            raise StillError(f"dataset {spec.name!r}: {paths[unit.file]} cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
        positions = np.flatnonzero(np.isin(_dataset_splits(table, spec), codes))[piece.start:piece.stop]
        return table.take(pa.array(positions))

    def _block_rows(self, unit: Unit, piece: Piece, codes: Sequence[int]) -> pa.Table:
        path = self.source.blocks.files[unit.file]
        try:
            table = pq.ParquetFile(path).read_row_group(unit.row_groups[0], columns=["id", "input_ids", "split"],
                                                        use_threads=False)
        except Exception as exc:  # a cache file changed or gone since the run began
            raise StillError(f"token blocks {path} cannot be read ({type(exc).__name__}: {str(exc)[:120]})") from None
        positions = np.flatnonzero(np.isin(table["split"].to_numpy(), codes))[piece.start:piece.stop]
        return table.take(pa.array(positions))

    def _lm_store_rows(self, unit: Unit, piece: Piece, codes: Sequence[int]) -> pa.Table:
        store = self.source.primary
        location = store.shard_paths[unit.file]
        try:
            with location.fs.open(location.path, "rb") as handle:
                table = pq.ParquetFile(handle).read_row_group(
                    unit.row_groups[0], columns=["id", "split", *store.stored_columns], use_threads=False)
        except Exception as exc:  # a shard changed or gone since the run began
            raise StillError(f"store {store.uri!r}: shard {location.path} cannot be read ({type(exc).__name__}: "
                             f"{str(exc)[:120]})") from None
        positions = np.flatnonzero(np.isin(table["split"].to_numpy(), codes))[piece.start:piece.stop]
        table = table.take(pa.array(positions))
        if self._tokens is None:
            self._tokens = _BlockTokens(self.source.blocks)
        tokens = self._tokens.of(table["id"].to_numpy(), store.uri)
        return table.append_column("input_ids", pa.FixedSizeListArray.from_arrays(tokens.reshape(-1), tokens.shape[1]))

    def _member_columns(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        if self._members is None:
            self._members = [_MemberColumns(self.source, index) for index in range(1, len(self.source.stores))]
        out: dict[str, np.ndarray] = {}
        for member in self._members:
            out.update(member.rows_of(ids))
        return out


class _BlockTokens:
    """Every block's tokens, sorted by block id (loaded once per process: 2 bytes a token)."""

    def __init__(self, blocks: Any) -> None:
        tables = [pq.read_table(path, columns=["id", "input_ids"]) for path in blocks.files]
        table = pa.concat_tables(tables)
        ids = table["id"].to_numpy()
        order = np.argsort(ids, kind="stable")
        flat = table["input_ids"].combine_chunks().flatten().to_numpy()
        self.ids = ids[order]
        self.tokens = flat.reshape(len(ids), blocks.seq_len)[order]
        self.path = blocks.path

    def of(self, ids: np.ndarray, store_uri: str) -> np.ndarray:
        """The tokens of these blocks, in their order.

        Raises:
            StillError: A block id the token blocks do not hold.
        """
        position = np.clip(np.searchsorted(self.ids, ids), 0, max(0, len(self.ids) - 1))
        found = self.ids[position] == ids if len(self.ids) else np.zeros(len(ids), bool)
        if not found.all():
            raise StillError(f"store {store_uri!r}: {int((~found).sum())} block ids are not among the token blocks "
                             f"in {self.path} (the blocks changed since still infer)")
        return self.tokens[position]


class _MemberColumns:
    """An ensemble member's training columns for every row, sorted by id (loaded once per process)."""

    def __init__(self, source: Source, index: int) -> None:
        from teacher_infer.store import read_shard_columns, teacher_arrays

        store = source.stores[index]
        columns = ["id", *store.soft_labels.columns]
        tables = [read_shard_columns(store, i, columns) for i in range(len(store.manifest["shards"]))]
        table = pa.concat_tables(tables)
        ids = table["id"].to_numpy(zero_copy_only=False)
        order = np.argsort(ids, kind="stable")
        arrays = teacher_arrays({c: table[c] for c in table.column_names}, store.soft_labels, store.max_support,
                                prefix=teacher_prefix(index))
        self.ids = ids[order]
        self.arrays = {name: values[order] for name, values in arrays.items()}
        self.name = store.uri

    def rows_of(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The member's columns for these ids, in their order."""
        position = np.clip(np.searchsorted(self.ids, ids), 0, max(0, len(self.ids) - 1))
        found = self.ids[position] == ids if len(self.ids) else np.zeros(len(ids), bool)
        if not found.all():
            raise StillError(f"ensemble store {self.name!r} lacks {int((~found).sum())} ids of the primary store")
        return {name: values[position] for name, values in self.arrays.items()}


# --------------------------------------------------------------------------- mixing and batching


class ShufflePool:
    """Mixes a stream of row chunks through a pool of rows in host memory.

    The first ``capacity`` rows fill the pool; after that every incoming row takes
    the slot of a row sent out (slots visited in a fresh random permutation per cycle,
    so no slot is taken twice in a cycle); at the end the pool drains in random order.
    Chunks of any size, larger than the pool too, pass through.

    Args:
        capacity: Rows in the pool (at least 1).
        rng: The epoch's generator (the same mixing run after run).
    """

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity = max(1, int(capacity))
        self.rng = rng

    def mix(self, chunks: Iterable[Mapping[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Yields the rows of ``chunks``, each once, mixed."""
        pool: dict[str, np.ndarray] = {}
        filled, cursor, order = 0, self.capacity, np.zeros(0, dtype=np.int64)
        for chunk in chunks:
            n, offset = _rows(chunk), 0
            if not pool and n:
                pool = {k: np.empty((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in chunk.items()}
            while offset < n:
                if filled < self.capacity:
                    take = min(self.capacity - filled, n - offset)
                    for k, v in chunk.items():
                        pool[k][filled:filled + take] = v[offset:offset + take]
                    filled, offset = filled + take, offset + take
                    continue
                if cursor == self.capacity:
                    order, cursor = self.rng.permutation(self.capacity), 0
                take = min(n - offset, self.capacity - cursor)
                slots = order[cursor:cursor + take]
                cursor += take
                out = {k: np.take(v, slots, axis=0) for k, v in pool.items()}  # take: ~2x faster than v[slots]
                for k, v in chunk.items():
                    pool[k][slots] = v[offset:offset + take]
                offset += take
                yield out
        if filled:
            drain = self.rng.permutation(filled)
            for start in range(0, filled, 1 << 16):
                yield {k: np.take(v, drain[start:start + (1 << 16)], axis=0) for k, v in pool.items()}


def exact_batches(chunks: Iterable[Mapping[str, np.ndarray]], sizes: Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
    """Cuts a stream of row chunks into batches of exactly ``sizes`` rows, whatever the chunk boundaries.

    Rows beyond the batches are not read any further; a stream that ends early is
    topped up by repeating its first chunk (a rank that holds a row fewer than another).

    Raises:
        StillError: The stream held no row at all.
    """
    pending: collections.deque[dict[str, np.ndarray]] = collections.deque()
    held, first = 0, None
    chunks = iter(chunks)
    for size in sizes:
        while held < size:
            chunk = next(chunks, None)
            if chunk is None:
                if first is None:
                    raise StillError("the training stream held no rows")
                chunk = first
            if _rows(chunk):
                first = chunk if first is None else first
                pending.append(dict(chunk))
                held += _rows(chunk)
        parts, need = [], size
        while need:
            head = pending[0]
            n = _rows(head)
            if n <= need:
                parts.append(pending.popleft())
                need -= n
            else:
                parts.append({k: v[:need] for k, v in head.items()})
                pending[0] = {k: v[need:] for k, v in head.items()}
                need = 0
        held -= size
        yield parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _rows(chunk: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values()))) if chunk else 0


class StreamedEpoch:
    """One rank's epoch of a streamed split: exactly ``len(sizes)`` batches.

    With ``threads`` (for a consumer in the training process itself: the test split's
    evaluation) the pieces are read ahead and mixed in background threads while the
    consumer works. Without, everything runs in the calling thread: the way for a reader
    process beside the training one (``student_train.prefetch``), which then keeps to one
    core. Measured on 2 cores: read-ahead threads there took 1.7 cores for 30% more rows
    a second than one thread, and the training step, which needs only a third of that
    rate, lost 11% of its core to them.

    Args:
        reader: The process's :class:`Reader`.
        pieces: The rank's pieces, in the order they are read.
        codes: Split codes.
        sizes: The batch sizes (:func:`batch_sizes`).
        pool_rows: Rows in the shuffle pool (0: no mixing; evaluation).
        seed: Seeds the pool's mixing.
        temperature: Binds the teacher columns (None: left unbound).
        one_view_seed: Multi-view training rows: the epoch's view draw (None: every view).
        drop: Columns the loop does not use (read, then left out of the batches).
        keep_teacher: Keep the stores' teacher columns (False: the loss does not read them).
        threads: Read ahead and mix in background threads (True), or in the calling thread.
        lookahead: Pieces read ahead of the one being mixed (with ``threads``).
    """

    def __init__(self, reader: Reader, pieces: Sequence[Piece], codes: Sequence[int], sizes: Sequence[int], *,
                 pool_rows: int, seed: int, temperature: float | None, one_view_seed: int | None = None,
                 drop: Sequence[str] = (), keep_teacher: bool = True, threads: bool = True,
                 lookahead: int = 2) -> None:
        self.reader, self.pieces, self.codes, self.sizes = reader, list(pieces), tuple(codes), list(sizes)
        self.pool_rows, self.seed, self.temperature = pool_rows, seed, temperature
        self.one_view_seed, self.drop, self.lookahead = one_view_seed, set(drop), lookahead
        self.keep_teacher, self.threads = keep_teacher, threads
        self._queue: queue.Queue = queue.Queue(maxsize=4)
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if not self.threads:
            yield from self._batches(self._read(piece) for piece in self.pieces)
            return
        thread = threading.Thread(target=self._produce, name="still-reader", daemon=True)
        thread.start()
        try:
            for _ in self.sizes:
                item = self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            while thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()

    def _chunks(self) -> Iterator[dict[str, np.ndarray]]:
        with ThreadPoolExecutor(max_workers=max(1, self.lookahead), thread_name_prefix="still-read") as pool:
            ahead: collections.deque = collections.deque()
            pieces = iter(self.pieces)
            while True:
                while len(ahead) < max(1, self.lookahead):
                    piece = next(pieces, None)
                    if piece is None:
                        break
                    ahead.append(pool.submit(self._read, piece))
                if not ahead or self._stop.is_set():
                    return
                yield ahead.popleft().result()

    def _read(self, piece: Piece) -> dict[str, np.ndarray]:
        arrays = self.reader.read(piece, self.codes, self.one_view_seed)
        if not self.keep_teacher:
            return {k: v for k, v in arrays.items() if k not in self.drop and not is_teacher_column(k)}
        arrays = self.reader.bound(arrays, self.temperature)
        return {k: v for k, v in arrays.items() if k not in self.drop}

    def _batches(self, chunks: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        if self.pool_rows:
            chunks = ShufflePool(self.pool_rows, np.random.default_rng(self.seed)).mix(chunks)
        return exact_batches(chunks, self.sizes)

    def _produce(self) -> None:
        try:
            for batch in self._batches(self._chunks()):
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._queue.put(exc)

