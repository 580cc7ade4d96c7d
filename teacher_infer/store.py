"""The soft-label store, format v2: its one owner (writer helpers AND reader).

A store is a directory ``<store.root>/<key>/`` on any storage URI::

    part-00000.parquet ... part-NNNNN.parquet   shards, each renamed into place complete
    manifest.json                               written last, atomically

Columns (docs/internals.md): ``id``, ``view`` (int16, 0), ``label`` (int64, nullable;
multi-label: fixed_size_list<int8>[C] multi-hot, nullable), ``split`` (int8: 0 train,
1 val, 2 test), ``input`` in self-contained stores only (fixed_size_list of the decoded
raw input; model input = ``(input × input_scale − mean) / std`` shaped ``input_shape``;
labels-only stores read it from their source, :func:`read_shard_rows`), then the teacher outputs of the storage
mode (:mod:`teacher_infer.soft_labels` says what each holds and why), and one
``features_<layer>`` column per stored teacher layer (``teacher.feature_layers``:
fixed_size_list of the flattened output, its shape in ``storage.feature_shapes``).
A directory without ``manifest.json`` is incomplete: no reader accepts it.

Format v2 (this version) replaced v1's top-k columns, whose tail mass was derived by a
cancellation that fp16 rounding decided: a v1 store is refused with a message to
rerun ``still infer``, never read into wrong numbers (v1 readers refuse v2 stores on
``format_version`` the same way).

Reader API used by training and tuning::

    store = open_store("stores/3f2a…")        # StillError unless complete, format v2
    store.soft_labels                         # SoftLabelSpec: mode, k, grid, task…
    arrays = teacher_arrays(batch, store.soft_labels, store.max_support)  # fixed-width, sparse, on the CPU
    target = teacher_infer.targets.target_from_columns(arrays, store.soft_labels)  # on the device
    layouts = check_shards(store)             # every open: sizes, footer schemas, split codes
    verify_store(uri) -> {"ok": bool, "problems": [...]}   # on demand: every byte
    dataset = source_dataset(store)           # labels-only: the source, fingerprint-checked
    table = read_shard_rows(store, 0, rows, columns, dataset)  # rows of a shard, with their inputs
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import posixpath
import sys
import zlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from still.augment import AugmentConfig
from still.datasets.arrays import column_matrix, flat_values
from still.errors import StillError
from still.storage import Location, resolve
from teacher_infer.encodings import column_encodings
from teacher_infer.soft_labels import MODE_COLUMNS, Ragged, SoftLabelSpec
from teacher_infer.targets import prepare

FORMAT_VERSION = 2
FORMAT_NAME = "still-soft-label-store"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "_plan.json"
STATS_METADATA_KEY = b"still.shard_stats"
BASE_COLUMNS = ("id", "view", "label", "split")
RERUN_HINT = "rerun still infer with the same settings to write it in this format"
ROW_GROUP_ROWS = 65_536  # a shard's row groups hold at most this many rows…
ROW_GROUP_BYTES = 32 << 20  # …and about this many bytes in memory


def feature_column(layer: str) -> str:
    """The column that holds teacher layer ``layer``'s outputs: ``features_<layer>``, dots as ``_``."""
    return "features_" + "".join(c if c.isalnum() or c == "_" else "_" for c in layer)


@dataclasses.dataclass(frozen=True)
class StoredFeature:
    """One stored teacher layer.

    Attributes:
        layer: The layer name (``teacher.feature_layers``).
        column: Its column (:func:`feature_column`).
        shape: The shape of one row's output (``(C, H, W)`` for a feature map).
    """

    layer: str
    column: str
    shape: tuple[int, ...]


def shard_name(index: int) -> str:
    """Returns the file name of shard ``index`` (``part-00003.parquet``)."""
    return f"part-{index:05d}.parquet"


# --------------------------------------------------------------------------- reading


class Store:
    """A complete soft-label store (its manifest was found and parsed).

    Attributes:
        location: Where the store directory lives.
        manifest: The parsed ``manifest.json``.
    """

    def __init__(self, location: Location, manifest: dict[str, Any]) -> None:
        self.location = location
        self.manifest = manifest

    @property
    def uri(self) -> str:
        """The store directory's URI."""
        return self.location.uri

    @property
    def key(self) -> str:
        """The content-addressed cache key."""
        return self.manifest["key"]

    @property
    def num_classes(self) -> int:
        """C, the teacher's number of outputs."""
        return int(self.manifest["num_classes"])

    @property
    def mode(self) -> str:
        """``dense``, ``topk`` or ``sampled``."""
        return self.manifest["storage"]["mode"]

    @property
    def k(self) -> int | None:
        """Classes kept per row in ``topk`` mode; None otherwise."""
        return self.manifest["storage"].get("k")

    @property
    def task(self) -> str:
        """``multiclass`` or ``multilabel``."""
        return self.manifest.get("task", "multiclass")

    @property
    def soft_labels(self) -> SoftLabelSpec:
        """How the teacher outputs are stored (mode, dtype, k, samples, temperature grid, task)."""
        return SoftLabelSpec.from_manifest(self.manifest["storage"], self.num_classes, self.task)

    @property
    def max_support(self) -> int:
        """The most classes any row stores: k for ``topk``, the widest row for ``sampled``, C for ``dense``."""
        storage = self.manifest["storage"]
        if storage["mode"] == "sampled":
            return int(storage["max_support"])
        return int(storage.get("k") or self.num_classes)

    @property
    def include_inputs(self) -> bool:
        """True when the shards carry the raw inputs (``input`` column)."""
        return bool(self.manifest["storage"].get("include_inputs", True))

    @property
    def views(self) -> int:
        """K, rows per sample (1: the inputs as they are)."""
        return int(self.manifest["storage"].get("views", 1))

    @property
    def augment(self) -> AugmentConfig:
        """The augmentation of views 1…K−1 (none for a single-view store)."""
        return AugmentConfig(**self.manifest["storage"].get("augment", {}))

    @property
    def features(self) -> tuple[StoredFeature, ...]:
        """The stored teacher layers, in ``teacher.feature_layers`` order."""
        storage = self.manifest["storage"]
        shapes = storage.get("feature_shapes", {})
        return tuple(StoredFeature(layer, feature_column(layer), tuple(shapes[layer]))
                     for layer in storage.get("feature_layers", ()))

    @property
    def fidelity(self) -> dict[str, dict[str, float]]:
        """The measured fidelity per temperature (:mod:`teacher_infer.fidelity`)."""
        return dict(self.manifest.get("fidelity") or {})

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input (``input`` holds its flattened raw values)."""
        return tuple(self.manifest["preprocessing"]["input_shape"])

    @property
    def input_scale(self) -> float:
        """Model input = raw ``input`` × this."""
        return float(self.manifest["preprocessing"]["input_scale"])

    @property
    def teacher_fingerprint(self) -> str:
        """sha256 of the teacher's weights and architecture."""
        return self.manifest["teacher"]["fingerprint"]

    @property
    def num_rows(self) -> int:
        """Rows in the store."""
        return int(self.manifest["rows"])

    @property
    def class_names(self) -> list[str]:
        """Class names, index = class id."""
        return list(self.manifest.get("class_names", []))

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Reads the whole store into one Arrow table (small stores, tests, tools)."""
        tables = [
            pq.read_table(self.location.join(s["name"]).path, columns=columns, filesystem=self.location.arrow_fs())
            for s in self.manifest["shards"]
        ]
        return pa.concat_tables(tables) if tables else pa.table({})

    def __repr__(self) -> str:
        return f"Store({self.uri!r}, key={self.key}, rows={self.num_rows}, mode={self.mode})"


def source_dataset(store: Store) -> Any:
    """The dataset a labels-only store's rows join back to, checked against the manifest.

    Resolves ``dataset.source`` with the settings recorded in the manifest and compares
    its fingerprint with the one the store was written from: a moved, missing or changed
    source is refused, never read as other inputs.

    Raises:
        StillError: Naming the store, the source and what is wrong with it.
    """
    from still.config import DataConfig, ImageConfig
    from still.datasets import resolve_dataset

    recorded = store.manifest["dataset"]
    source = recorded["source"]
    settings = dict(recorded.get("config") or {})
    image = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in (settings.pop("image", None)
                                                                                 or {}).items()})
    try:
        spec = resolve_dataset(DataConfig(source=source, image=image, **settings))
    except StillError as exc:
        raise StillError(f"store {store.uri!r} is labels-only: its inputs are read from the source dataset "
                         f"{source!r}, which cannot be opened: {exc}") from None
    if spec.fingerprint != recorded["fingerprint"] or spec.num_rows * store.views != store.num_rows:
        raise StillError(
            f"store {store.uri!r} is labels-only, and its source dataset {source!r} has changed since the store was "
            f"written (fingerprint {spec.fingerprint[:12]}…, {spec.num_rows} rows; the store was made from "
            f"{recorded['fingerprint'][:12]}…, {store.num_rows // store.views} rows): its inputs would not match the "
            "teacher's outputs. Restore the source, or rerun still infer on it"
        )
    return spec


def read_shard_columns(store: Store, index: int, columns: Sequence[str],
                       row_groups: Sequence[int] | None = None) -> pa.Table:
    """Columns of shard ``index`` (of some of its row groups): small ones (``id``, ``split``, ``view``) to plan
    reads with.

    Raises:
        StillError: The shard cannot be read (named, with the store; run ``still store verify``).
    """
    loc = store.location.join(store.manifest["shards"][index]["name"])
    with _shard_errors(store, index), loc.fs.open(loc.path, "rb") as handle:
        pfile = pq.ParquetFile(handle)
        groups = range(pfile.metadata.num_row_groups) if row_groups is None else row_groups
        return pfile.read_row_groups(list(groups), columns=list(columns), use_threads=False)


def shard_row_groups(store: Store, index: int) -> list[int]:
    """The row count of each row group of shard ``index`` (its footer).

    Raises:
        StillError: The shard cannot be read (named, with the store; run ``still store verify``).
    """
    loc = store.location.join(store.manifest["shards"][index]["name"])
    with _shard_errors(store, index), loc.fs.open(loc.path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def read_shard_rows(store: Store, index: int, positions: np.ndarray, columns: Sequence[str],
                    dataset: Any) -> pa.Table:
    """Rows ``positions`` of shard ``index`` (ascending), with their inputs when ``input`` is asked for.

    Reads only the row groups that hold those rows, one at a time. A labels-only store's
    ``input`` comes from its source (:func:`source_dataset`): each store row is a source
    row of the shard's ``source_rows`` (multi-view stores are view-major in a shard: row
    ``v·n + j`` is view v of the shard's source row j), and only the range of source rows
    the asked rows span is read. The source rows' ids must be the store rows' ids.

    Args:
        store: The store.
        index: Position of the shard in the manifest.
        positions: Ascending row positions within the shard.
        columns: Store columns to read (``input`` included or not).
        dataset: :func:`source_dataset` of a labels-only store (None for a self-contained one).

    Raises:
        StillError: The shard cannot be read (named, with the store; run ``still store verify``), or
            its rows are not the source rows it records (the source changed in place).
    """
    shard = store.manifest["shards"][index]
    loc = store.location.join(shard["name"])
    positions = np.asarray(positions, dtype=np.int64)
    join = "input" in columns and not store.include_inputs
    wanted = [c for c in columns if c != "input" or store.include_inputs]
    if join and "id" not in wanted:
        wanted.append("id")
    with _shard_errors(store, index):
        with loc.fs.open(loc.path, "rb") as handle:
            table = _take_rows(pq.ParquetFile(handle), positions, wanted)
        if not join:
            return table.select(list(columns))
        return table.append_column("input", _source_inputs(store, shard, positions, table["id"], dataset)
                                   ).select(list(columns))


def _source_inputs(store: Store, shard: Mapping[str, Any], positions: np.ndarray, ids: Any,
                   dataset: Any) -> pa.FixedSizeListArray:
    """The decoded inputs of a labels-only shard's rows ``positions``, read from the source rows they are."""
    from still.datasets import decode_inputs, read_rows

    width = math.prod(store.input_shape)
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    if not len(positions):
        return pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(0, np.uint8)), width)
    source_positions = positions % (int(shard["rows"]) // store.views)
    first, last = int(source_positions.min()), int(source_positions.max()) + 1
    fs, paths = dataset.arrow_files()
    source = read_rows(fs, paths, _slice_pieces(shard["source_rows"], first, last),
                       [dataset.id_column, dataset.feature_column])
    # the covering range is read and decoded whole, then indexed in numpy (Arrow's take is slow on lists)
    offsets = source_positions - first
    source_ids = source[dataset.id_column].to_numpy(zero_copy_only=False)[offsets]
    if not np.array_equal(source_ids, ids.to_numpy(zero_copy_only=False)):
        raise StillError(f"store {store.uri!r}: shard {shard['name']}'s rows are not rows "
                         f"{shard['source_rows']} of {dataset.name!r} (the ids differ)")
    raw = decode_inputs(source[dataset.feature_column], dataset, source[dataset.id_column])
    flat = raw.reshape(len(raw), -1)[offsets]
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), width)


def _take_rows(pfile: pq.ParquetFile, positions: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows ``positions`` (ascending, distinct) of a Parquet file, reading one row group at a time."""
    meta = pfile.metadata
    parts, start = [], 0
    for group in range(meta.num_row_groups):
        stop = start + meta.row_group(group).num_rows
        lo, hi = np.searchsorted(positions, [start, stop])
        if hi > lo:
            rows = pfile.read_row_group(group, columns=columns, use_threads=False)
            if hi - lo < rows.num_rows:  # a boolean filter: Arrow's take is many times slower on list columns
                keep = np.zeros(rows.num_rows, dtype=bool)
                keep[positions[lo:hi] - start] = True
                rows = rows.filter(pa.array(keep))
            parts.append(rows)
        start = stop
    return pa.concat_tables(parts) if parts else pfile.schema_arrow.empty_table().select(columns)


def _slice_pieces(pieces: Sequence[Sequence[int]], start: int, stop: int) -> list[list[int]]:
    """Rows ``start`` to ``stop`` of the concatenation of ``[file, first, last]`` row pieces, as pieces."""
    out, offset = [], 0
    for file_index, first, last in pieces:
        length = int(last) - int(first)
        lo, hi = max(start - offset, 0), min(stop - offset, length)
        if hi > lo:
            out.append([int(file_index), int(first) + lo, int(first) + hi])
        offset += length
    return out


@contextlib.contextmanager
def _shard_errors(store: Store, index: int) -> Iterator[None]:
    """Turns a shard's read errors (a truncated or rewritten file) into a StillError naming it."""
    name = store.manifest["shards"][index]["name"]
    try:
        yield
    except StillError:
        raise
    except Exception as exc:  # a corrupt shard raises several Arrow and OS error types
        raise StillError(f"store {store.uri!r}: shard {name} cannot be read ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); run still store verify {store.uri}") from None


def open_store(uri: str) -> Store:
    """Opens a complete store.

    Raises:
        StillError: ``uri`` does not exist, is not a store, is incomplete (no
            manifest: still being written, or its writer was killed), or its manifest
            is unreadable or of another format version (the message says to rerun
            ``still infer``).
    """
    location = resolve(uri)
    if not location.exists():
        raise StillError(f"store {uri!r} does not exist (expected a directory written by still infer)")
    if not location.fs.isdir(location.path):
        raise StillError(f"{uri!r} is not a store (expected a directory with {MANIFEST_NAME} and part-*.parquet)")
    manifest_loc = location.join(MANIFEST_NAME)
    if not manifest_loc.exists():
        shards = location.fs.glob(posixpath.join(location.path, "part-*.parquet"))
        if shards or location.join(PLAN_NAME).exists():
            raise StillError(
                f"store {uri!r} is incomplete: {len(shards)} shard(s) but no {MANIFEST_NAME} "
                "(rerun the same still infer to finish it)"
            )
        raise StillError(f"{uri!r} is not a store (no {MANIFEST_NAME}; expected a directory written by still infer)")
    try:
        manifest = manifest_loc.read_json()
    except (ValueError, OSError) as exc:
        raise StillError(f"store {uri!r} has an unreadable {MANIFEST_NAME} ({type(exc).__name__})") from None
    if isinstance(manifest, dict) and manifest.get("format", "").startswith("still-lm-store"):
        raise StillError(f"store {uri!r} is a language-model store (per-token targets of "
                         f"{manifest.get('teacher', {}).get('uri')!r}): a classifier student cannot read it; train "
                         "a language model from it (student.family=llama)")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StillError(f"{uri!r} is not a still store ({MANIFEST_NAME} lacks format {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise StillError(
            f"store {uri!r} has format version {version!r}; this still reads version {FORMAT_VERSION} only: "
            + ("upgrade still to read it, or " if newer else "") + RERUN_HINT
        )
    return Store(location, manifest)


def _ragged(values: Any) -> Ragged:
    """A variable-length list column (Arrow list, or Ray Data's object array of arrays) as :class:`Ragged`."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        offsets = values.offsets.to_numpy() - values.offsets[0].as_py()
        return Ragged(offsets.astype(np.int64), values.flatten().to_numpy(zero_copy_only=False))
    rows = [np.asarray(row) for row in np.asarray(values, dtype=object)]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return Ragged(offsets, np.concatenate(rows) if rows else np.zeros(0))


def teacher_arrays(batch: Mapping[str, Any], spec: SoftLabelSpec, max_support: int, *,
                   prefix: str = "") -> dict[str, np.ndarray]:
    """A batch's teacher columns as training columns: fixed width, still sparse, what training ships.

    Nothing is expanded to ``(n, C)`` (only a dense store is dense, and keeps its
    stored dtype). The T-independent part of the target is computed here, on the CPU
    (:func:`teacher_infer.targets.prepare`); :func:`teacher_infer.targets.target_from_columns`
    finishes it on the training device.

    Args:
        batch: Column name → values (Arrow arrays, numpy, or Ray Data's object arrays).
        spec: The store's :attr:`Store.soft_labels`.
        max_support: :attr:`Store.max_support`: ``sampled`` rows are padded to this
            width, so every batch of a store has the same shapes.
        prefix: Prepended to each output name (ensemble members: ``t1_``…).

    Raises:
        StillError: A column of the mode is missing, or has the wrong width.
    """
    missing = [c for c in spec.columns if c not in batch]
    if missing:
        raise StillError(f"batch lacks the {spec.mode} store columns {', '.join(missing)}")
    stored: dict[str, np.ndarray] = {}
    for name in spec.columns:
        values = batch[name]
        if name in ("sample_idx", "sample_count", "sample_logit"):
            stored[name] = _ragged(values).padded(max_support)
        elif name == "logsumexp":
            stored[name] = np.asarray(values.to_numpy(zero_copy_only=False) if hasattr(values, "to_numpy") else values)
        else:
            stored[name] = column_matrix(values)
    width = {"logits": spec.num_classes, "topk_idx": spec.k, "tail_lognorm": len(spec.temperatures),
             "lognorm": len(spec.temperatures)}
    for name, expected in width.items():
        if name in stored and stored[name].shape[1:] != (expected,):
            raise StillError(f"store column {name!r} holds {stored[name].shape[1:]} values per row, expected {expected}")
    out = {}
    for name, array in prepare(stored, spec).items():
        array = np.ascontiguousarray(array)
        out[prefix + name] = array if array.flags.writeable else array.copy()  # torch wants writable memory
    return out


# --------------------------------------------------------------------------- writing


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix)
    width = matrix.shape[1] if matrix.ndim > 1 else 1
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), width)


def _label_array(labels: Any, n: int, task: str) -> pa.Array:
    """The ``label`` column: int64 (multi-class) or multi-hot fixed_size_list<int8>[C], nulls kept.

    Numpy labels mark unlabelled rows with -1 (multi-class) or a row of -1 (multi-label).
    """
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    if isinstance(labels, pa.Array):
        return labels.cast(pa.int64()) if task == "multiclass" else labels
    if labels is None:
        return pa.nulls(n, pa.int64())
    labels = np.asarray(labels)
    if task == "multiclass":
        labels = labels.astype(np.int64)
        return pa.array(labels, mask=labels < 0)
    hot = labels.astype(np.int8)
    values = pa.array(np.where(hot < 0, 0, hot).reshape(-1))
    mask = pa.array((hot < 0).any(axis=1))
    return pa.FixedSizeListArray.from_arrays(values, hot.shape[1], mask=mask)


def _list_column(values: Ragged | np.ndarray) -> pa.ListArray:
    """A list<> column (not fixed-size, per the format: rows may differ in length)."""
    if not isinstance(values, Ragged):
        n, width = values.shape
        values = Ragged(np.arange(0, (n + 1) * width, width, dtype=np.int64), np.ascontiguousarray(values).reshape(-1))
    return pa.ListArray.from_arrays(pa.array(values.offsets.astype(np.int32)), pa.array(values.values))


def build_table(
    ids: Any,
    labels: Any,
    splits: np.ndarray,
    outputs: Mapping[str, Any],
    inputs: pa.Array | np.ndarray | None = None,
    features: Mapping[str, np.ndarray] | None = None,
    task: str = "multiclass",
    views: np.ndarray | None = None,
    augment: np.ndarray | None = None,
) -> pa.Table:
    """Builds one shard's Arrow table in the format-v2 column order.

    Args:
        ids: int64 or string ids (numpy or Arrow).
        labels: Labels: numpy (-1 marks unlabelled; multi-label ``(n, C)`` 0/1 with -1 rows)
            or Arrow with nulls kept; None makes a null column.
        splits: int8 split codes.
        outputs: :func:`teacher_infer.soft_labels.compress` output.
        inputs: Raw inputs: an Arrow fixed_size_list column (passed through as is)
            or a 2-D numpy array; None to leave them out.
        features: Teacher layer name → its ``(n, ...)`` outputs (flattened into
            :func:`feature_column` columns, in this order), or None.
        task: ``multiclass`` or ``multilabel`` (the label column's type).
        views: int16 view of each row (None: all view 0).
        augment: int16 ``(n, P)`` augmentation parameters of each row's view (multi-view
            stores only: the ``augment`` column, after ``split``).
    """
    n = len(splits)
    id_array = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids)
    if pa.types.is_integer(id_array.type):
        id_array = id_array.cast(pa.int64())
    columns: dict[str, Any] = {
        "id": id_array,
        "view": pa.array(np.zeros(n, dtype=np.int16) if views is None else np.asarray(views, dtype=np.int16)),
        "label": _label_array(labels, n, task),
        "split": pa.array(np.asarray(splits, dtype=np.int8)),
    }
    if augment is not None:
        columns["augment"] = _fixed_list(np.asarray(augment, dtype=np.int16))
    if inputs is not None:
        columns["input"] = inputs if isinstance(inputs, (pa.Array, pa.ChunkedArray)) else _fixed_list(inputs)
    for name, values in outputs.items():
        if name in ("logits", "tail_lognorm", "lognorm"):
            columns[name] = _fixed_list(values)
        elif name == "logsumexp":
            columns[name] = pa.array(values)
        else:
            columns[name] = _list_column(values)
    for layer, values in (features or {}).items():
        columns[feature_column(layer)] = _fixed_list(np.asarray(values).reshape(n, -1))
    return pa.table(columns)


def shard_bytes(table: pa.Table, stats: Mapping[str, Any]) -> bytes:
    """Serialises a shard to Parquet bytes, its metric sums in the file's metadata.

    Keeping the per-shard metric sums inside the shard makes a shard self-describing:
    a resumed run aggregates teacher metrics over shards written by an earlier run
    without recomputing anything.
    """
    sink = io.BytesIO()
    # Row groups are what training reads at a time (student_train.reader): bounded in rows and bytes, so
    # a reader's memory and its time to a first batch do not grow with the shard.
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    group_rows = max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes))
    # In the file's key-value metadata only (schema metadata would be written twice, once more inside
    # the serialised Arrow schema), zlib-compressed: on small shards these bytes are much of the file.
    with pq.ParquetWriter(sink, table.schema, compression="zstd", compression_level=1,
                          **column_encodings(table.schema)) as writer:
        writer.write_table(table, row_group_size=group_rows)
        writer.add_key_value_metadata({STATS_METADATA_KEY: zlib.compress(json.dumps(stats).encode(), 9)})
    return sink.getvalue()


def write_manifest(store_dir: Location, manifest: Mapping[str, Any]) -> None:
    """Writes ``manifest.json`` atomically: the step that makes a store complete."""
    data = json.dumps(manifest, indent=1, sort_keys=False, default=str).encode()
    store_dir.join(MANIFEST_NAME).write_atomic(data)


def shard_record(name: str, data: bytes, rows: int) -> dict[str, Any]:
    """The manifest entry of a shard: name, rows, bytes, sha256 of the file."""
    return {"name": name, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_shard_stats(location: Location) -> tuple[dict[str, Any], int]:
    """Reads a shard's metric sums and row count from its Parquet footer."""
    with location.fs.open(location.path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    raw = (meta.metadata or {}).get(STATS_METADATA_KEY)
    if raw is None:
        raise StillError(f"shard {location.uri!r} has no still stats in its footer")
    return json.loads(zlib.decompress(raw)), meta.num_rows


def file_sha256(location: Location) -> tuple[str, int]:
    """Returns (sha256 hex, size in bytes) of a file."""
    digest = hashlib.sha256()
    size = 0
    with location.fs.open(location.path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# --------------------------------------------------------------------------- verify / inspect


def expected_schema_columns(manifest: Mapping[str, Any]) -> list[str]:
    """The columns every shard of a store with this manifest must have, in order."""
    columns = list(BASE_COLUMNS)
    if manifest["storage"].get("views", 1) > 1:
        columns.append("augment")
    if manifest["storage"].get("include_inputs", True):
        columns.append("input")
    columns += list(MODE_COLUMNS[manifest["storage"]["mode"]])
    columns += [feature_column(layer) for layer in manifest["storage"].get("feature_layers", ())]
    return columns


def verify_store(uri: str) -> dict[str, Any]:
    """Re-reads every shard of a store and checks it against its manifest.

    Checks: the manifest opens; every listed shard exists, its sha256 and row count
    match, its columns are the format's, the teacher columns hold sane values
    (:func:`_check_values`), ids are unique across the store (each holds views 0…K−1
    once in a multi-view store), the total matches
    ``rows``, and no unlisted shard lies in the directory.

    Returns:
        ``{"ok": bool, "problems": [str, ...], "rows": int, "shards": int}``.
    """
    try:
        store = open_store(uri)
    except StillError as exc:
        return {"ok": False, "problems": [str(exc)], "rows": 0, "shards": 0}
    problems: list[str] = []
    expected = expected_schema_columns(store.manifest)
    ids: list[np.ndarray] = []
    views: list[np.ndarray] = []
    total = 0
    listed = {s["name"] for s in store.manifest["shards"]}
    on_disk = {posixpath.basename(p) for p in store.location.fs.glob(posixpath.join(store.location.path, "part-*.parquet"))}
    for extra in sorted(on_disk - listed):
        problems.append(f"{extra}: shard not listed in the manifest")
    for shard in store.manifest["shards"]:
        loc = store.location.join(shard["name"])
        if not loc.exists():
            problems.append(f"{shard['name']}: missing")
            continue
        with loc.fs.open(loc.path, "rb") as handle:
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            problems.append(f"{shard['name']}: checksum mismatch (sha256 {digest[:12]}…, manifest {shard['sha256'][:12]}…)")
        try:
            # One thread: a decode error raised on Arrow's CPU pool can leave a worker thread that aborts the
            # interpreter at exit ("terminate called without an active exception", pyarrow 25 on 2 CPUs, seen
            # with read_table and with ParquetFile.read() alike). Verification hashes serially anyway.
            table = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=False)
        except Exception as exc:  # corrupt bytes raise several Arrow error types
            problems.append(f"{shard['name']}: unreadable Parquet ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if table.num_rows != shard["rows"]:
            problems.append(f"{shard['name']}: {table.num_rows} rows, manifest says {shard['rows']}")
        if table.column_names != expected:
            problems.append(f"{shard['name']}: columns {table.column_names}, expected {expected}")
        problems += [f"{shard['name']}: {p}" for p in _check_values(table, store.soft_labels)]
        if "id" in table.column_names and "view" in table.column_names:
            ids.append(table["id"].to_numpy(zero_copy_only=False))
            views.append(table["view"].to_numpy())
        total += table.num_rows
    if total != store.num_rows and not any("unreadable" in p or "missing" in p for p in problems):
        problems.append(f"store has {total} rows, manifest says {store.num_rows}")
    if ids:
        problems += _view_problems(np.concatenate(ids), np.concatenate(views), store.views)
    return {"ok": not problems, "problems": problems, "rows": total, "shards": len(store.manifest["shards"])}


def _view_problems(ids: np.ndarray, views: np.ndarray, count: int) -> list[str]:
    """Each id must hold views 0…count−1, each once (for one view: ids are unique)."""
    problems = []
    if len(views) and (views.min() < 0 or views.max() >= count):
        problems.append(f"view numbers outside [0, {count})")
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > count]
    if len(dup):
        problems.append(f"{len(dup)} duplicate ids (e.g. {dup[:3].tolist()})")
    if count > 1:
        from still.datasets.splits import id_keys

        pairs = np.unique(np.stack([id_keys(ids), views.astype(np.uint64)], 1), axis=0)
        if len(pairs) != len(ids) or np.any(counts != count):
            problems.append(f"ids do not each hold views 0…{count - 1} once")
    return problems


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """What a shard's footer says, read by :func:`check_shards` when a store is opened for training.

    Attributes:
        name: The shard's file name.
        rows: Its row count.
        splits: The split codes its rows may hold (from the ``split`` column's min/max statistics).
    """

    name: str
    rows: int
    splits: tuple[int, ...]


def check_shards(store: Store) -> list[ShardLayout]:
    """Cheap integrity on every open: each listed shard exists at its recorded size, with the format's schema.

    Reads one directory listing and each shard's Parquet footer (in parallel threads, so
    a remote store costs one round trip per shard, not per byte); no data page is read.
    :func:`verify_store` is the full check (checksums, values, unique ids).

    Returns:
        Per shard, in manifest order, its :class:`ShardLayout`.

    Raises:
        StillError: Naming the store and the first shard that is missing, of another
            size than the manifest records, unreadable, or of another schema or row count.
    """
    from concurrent.futures import ThreadPoolExecutor

    expected = expected_schema_columns(store.manifest)
    shards = store.manifest["shards"]
    infos = store.location.fs.ls(store.location.path, detail=True)
    sizes = {posixpath.basename(str(info["name"]).rstrip("/")): info.get("size") for info in infos}

    def footer(shard: Mapping[str, Any]) -> ShardLayout:
        name = shard["name"]
        if name not in sizes:
            raise StillError(f"store {store.uri!r}: shard {name} is missing (still store verify checks the rest)")
        if sizes[name] != shard["bytes"]:
            raise StillError(f"store {store.uri!r}: shard {name} has {sizes[name]} bytes, the manifest records "
                             f"{shard['bytes']} (truncated or rewritten; run still store verify)")
        loc = store.location.join(name)
        try:
            with loc.fs.open(loc.path, "rb") as handle:
                meta = pq.ParquetFile(handle).metadata
        except Exception as exc:  # a corrupt footer raises several Arrow error types
            raise StillError(f"store {store.uri!r}: shard {name} is unreadable ({type(exc).__name__}: "
                             f"{str(exc)[:80]}); run still store verify") from None
        columns = meta.schema.to_arrow_schema().names
        if columns != expected or meta.num_rows != shard["rows"]:
            raise StillError(f"store {store.uri!r}: shard {name} holds {meta.num_rows} rows of columns {columns}; "
                             f"the manifest records {shard['rows']} rows of {expected}")
        return ShardLayout(name, meta.num_rows, _split_codes(meta, columns.index("split")))

    with ThreadPoolExecutor(max_workers=min(16, max(1, len(shards)))) as pool:
        return list(pool.map(footer, shards))


def _split_codes(meta: pq.FileMetaData, column: int) -> tuple[int, ...]:
    """The split codes a shard may hold: every code within its row groups' min/max statistics."""
    codes: set[int] = set()
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(column).statistics
        if meta.row_group(group).num_rows == 0:
            continue
        if stats is None or not stats.has_min_max:
            return (0, 1, 2)
        codes.update(range(int(stats.min), int(stats.max) + 1))
    return tuple(sorted(codes))


def _check_values(table: pa.Table, spec: SoftLabelSpec) -> list[str]:
    """Problems with a shard's teacher values: NaN/inf, class ids out of range, draws that do not add up."""
    problems = []

    def flat(name: str) -> np.ndarray:
        return flat_values(table[name])

    features = [name for name in table.column_names if name.startswith("features_")]
    for name in ("logits", "topk_logit", "sample_logit", "logsumexp", "lognorm", "tail_lognorm", *features):
        if name not in table.column_names:
            continue
        values = flat(name).astype(np.float32)
        # an empty tail (k = C) has log-mass −inf; nothing else may be infinite or NaN
        bad = np.isnan(values) | (values == np.inf) | ((values == -np.inf) if name != "tail_lognorm" else False)
        if bad.any():
            problems.append(f"{int(bad.sum())} NaN/inf values in {name}")
    for name in ("topk_idx", "sample_idx"):
        if name in table.column_names:
            idx = flat(name)
            if idx.size and (idx.min() < 0 or idx.max() >= spec.num_classes):
                problems.append(f"{name} outside [0, {spec.num_classes})")
    if "sample_count" in table.column_names:
        draws = _ragged(table["sample_count"])
        sums = np.add.reduceat(draws.values.astype(np.int64), draws.offsets[:-1]) if len(draws.values) else []
        if np.diff(draws.offsets).min(initial=1) < 1 or np.any(np.asarray(sums) != spec.samples):
            problems.append(f"sample_count rows do not add up to store.samples={spec.samples}")
    return problems


def inspect_store(uri: str) -> dict[str, Any]:
    """Returns a flat summary of a store's manifest, its ``fidelity`` and the manifest itself."""
    store = open_store(uri)
    m = store.manifest
    metrics = m.get("teacher_metrics", {})
    storage = m["storage"]
    summary: dict[str, Any] = {
        "store": store.uri,
        "key": store.key,
        "format_version": m["format_version"],
        "created": m.get("created"),
        "rows": store.num_rows,
        "shards": len(m["shards"]),
        "mode": store.mode,
        "k": store.k,
        **({"samples": storage["samples"], "sample_temperature": storage["sample_temperature"]}
           if store.mode == "sampled" else {}),
        "temperatures": storage.get("temperatures"),
        "dtype": storage["dtype"],
        "include_inputs": store.include_inputs,
        "views": store.views,
        **({"augment": store.augment.to_dict()} if store.views > 1 else {}),
        "feature_layers": {f.layer: "x".join(map(str, f.shape)) for f in store.features},
        "num_classes": store.num_classes,
        "task": store.task,
        "input_shape": "x".join(map(str, store.input_shape)),
        "input_scale": store.input_scale,
        "bytes_per_row": m.get("bytes_per_row"),
        "teacher_uri": m["teacher"].get("uri"),
        "teacher_fingerprint": store.teacher_fingerprint,
        "precision": m.get("precision", "fp32"),
        "dataset": m["dataset"].get("name"),
        "dataset_source": m["dataset"].get("source"),
        "dataset_fingerprint": m["dataset"].get("fingerprint"),
    }
    for name in ("accuracy", "nll", "ece", "mean_entropy", "f1_micro", "f1_macro"):
        if name in metrics:
            summary[f"teacher_{name}"] = metrics.get(name)
    for split, values in metrics.get("per_split", {}).items():
        summary[f"rows_{split}"] = values.get("rows")
        summary[f"teacher_accuracy_{split}"] = values.get("accuracy")
    summary["fidelity"] = store.fidelity
    summary["fidelity_rows"] = m.get("fidelity_rows")
    summary["manifest"] = m
    return summary


def format_fidelity(fidelity: Mapping[str, Mapping[str, float]], rows: int | None = None) -> str:
    """The fidelity table ``still store inspect`` prints: one row per temperature."""
    if not fidelity:
        return "fidelity: not measured"
    lines = [f"fidelity: the stored target vs the full teacher output, on {rows} rows (teacher_infer.fidelity)",
             f"{'T':>4}  {'KL mean':>10}  {'KL p99':>10}  {'tail err':>9}  {'tail rel':>9}  {'TV mean':>8}"]
    for temperature, f in fidelity.items():
        lines.append(f"{temperature:>4}  {f['kl_mean']:>10.3g}  {f['kl_p99']:>10.3g}  {f['tail_mass_abs_err']:>9.2g}  "
                     f"{f.get('tail_mass_rel_err', float('nan')):>9.2g}  {f.get('tv_mean', float('nan')):>8.3g}")
    return "\n".join(lines)


def cli_store(action: str, uri: str) -> dict[str, Any]:
    """``still store inspect|verify URI``.

    Returns:
        inspect: the manifest summary (raises StillError for a non-store); the
        fidelity table is printed first;
        verify: ``{ok, problems, rows, shards}`` plus ``_exit_code: 1`` when not ok.
    """
    from teacher_infer import lm_store

    manifest = lm_store.read_manifest(uri) if resolve(uri).exists() else None
    language_model = manifest is not None and lm_store.is_lm_manifest(manifest)
    if action == "inspect":
        if language_model:
            summary = lm_store.inspect_lm_store(uri)
            print(format_fidelity(summary["fidelity"], summary["fidelity_positions"]).replace(" rows ", " positions "),
                  flush=True)
            return summary
        summary = inspect_store(uri)
        print(format_fidelity(summary["fidelity"], summary["fidelity_rows"]), flush=True)
        return summary
    if action == "verify":
        result = lm_store.verify_lm_store(uri) if language_model else verify_store(uri)
        if not result["ok"]:
            for problem in result["problems"]:
                print(f"still: problem: {uri}: {problem}", file=sys.stderr)
            result["_exit_code"] = 1
        result["store"] = uri
        return result
    raise StillError(f"unknown store action {action!r}; expected inspect or verify")
