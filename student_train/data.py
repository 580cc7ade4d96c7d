"""Training data: a store (or several) or a plain dataset, as training arrays per split.

One conversion, :func:`convert_batch`, turns a raw batch (store columns, or a
dataset's id/features/label/split columns) into the arrays the loop consumes:

    x      (n, prod(input_shape))      the raw input as stored (uint8 pixels stay uint8);
                                       the training device normalises it
                                       (``Source.normalisation``: scale, mean/std, shape)
    y      int64 (n,) class ids, -1 when unlabelled; multi-label: int8 (n, C) 0/1, -1 rows unlabelled
    split  int8 (n,)                   0 train, 1 val, 2 test (dropped once a split is selected)
    t<i>_* the training columns of store i, fixed-width and still sparse
           (``teacher_infer.store.teacher_arrays``: k ids and log-probabilities per row
           for top-k, the padded draws for sampled, C logits only for dense stores)
    hint_<layer> (n, prod(shape))      train split: a stored teacher layer (``Source.features``),
                                       flattened, in the store's dtype (hint distillation)
    sample int64 (n,)                  train split: a key of the row's id (the worker sorts
                                       its rows by it, so memory ingest is deterministic;
                                       multi-view stores draw one view per sample with it)
    aug    int16 (n, P)                multi-view stores, train split: each row's view
                                       (``still.augment``), replayed on the device
    view   int16 (n,)                  multi-view stores, train split: the row's view
                                       (:func:`one_view_mask`)

Nothing grows before it reaches the worker: no float copy of the inputs, no dense
``(n, C)`` teacher array in Ray Data or the object store. The loop moves a batch to
its device and builds the input and the teacher's target there
(``teacher_infer.targets.target_from_columns``).

Two ways to get there, one conversion: :func:`ray_datasets` builds one Ray Data
dataset per split (what the TorchTrainer's workers read through
``get_dataset_shard``), and :func:`load_split_arrays` reads the same files with plain
pyarrow into memory (the in-process path: no Ray tasks at all, so Tune trials with
fractional CPUs never wait on read tasks).

A store's split dataset reads only the shards whose footer statistics say they hold
that split (:func:`teacher_infer.store.check_shards`, read once when the store is
opened), and keeps only that split's rows: val and test cost their own shards, not a
pass over the store. Streamed training visits the shards in a new random order every
epoch and mixes rows in the worker's shuffle buffer (``train.shuffle_buffer``).

Multi-view stores: the training split holds every view of each sample (``train.views=all``)
or, per epoch, the one view :func:`one_view_mask` draws for it (``one``); held-out
splits are evaluated on view 0, the inputs as they are.

Ensembles: stores of one dataset share ids; rows are joined by id, each store's
columns keep their own prefix, and the loss averages the members' probabilities at
T on the device (``student_train.losses``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from still.augment import AugmentConfig, param_names
from still.errors import StillError
from teacher_infer.soft_labels import SoftLabelSpec

SPLITS = {"train": 0, "val": 1, "test": 2}
READ_CHUNK_ROWS = 65_536  # rows a read task converts at a time
TRAIN_BLOCK_BYTES = 8 << 20  # Ray Data blocks of the training datasets stay under this


@dataclasses.dataclass(frozen=True)
class Source:
    """Everything the workers need to read and convert the data; built on the driver.

    Attributes:
        kind: ``store`` or ``dataset``.
        name: Store URI(s) or dataset name, for messages.
        inputs: Per input (store, or the dataset): ``(filesystem_uri, paths)``.
        num_classes: C.
        class_names: Class names.
        input_shape: Shape of one model input.
        input_scale: Preprocessing: model input = raw × this.
        task: ``multiclass`` or ``multilabel``.
        features: The primary store's stored teacher layers that training reads
            (``teacher_infer.store.StoredFeature``: layer, column, shape; only those
            ``kd.hints`` uses, ``student_train.hints.keep_hinted_layers``).
        num_rows: Rows in the (primary) input.
        columns: Names of the dataset's id, feature, label and split columns.
        split_rule: The dataset's split rule (unused for stores: they carry ``split``).
        manifests: The stores' manifests.
        teachers: Per store, how its teacher outputs are stored.
        max_support: Per store, the width its teacher columns are padded to.
        dataset: The source ``DatasetSpec``: what a plain run reads, or what the rows of
            a labels-only store are joined back to for their inputs; None otherwise.
        normalisation: How raw inputs become model inputs (scale, mean/std, shape).
        shards: The primary store's shards as their footers describe them
            (``teacher_infer.store.ShardLayout``: rows, split codes present).
        split_rows: Store rows per split name, where known (stores record them).
        views: K, rows per sample of a multi-view store (1 otherwise).
        augment: The augmentation a multi-view store's views were made with.
    """

    kind: str
    name: str
    inputs: tuple[tuple[str, tuple[str, ...]], ...]
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    input_scale: float
    task: str = "multiclass"
    features: tuple[Any, ...] = ()
    num_rows: int = 0
    columns: tuple[str, str, str, str | None] = ("id", "input", "label", "split")
    split_rule: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    manifests: tuple[Mapping[str, Any], ...] = ()
    teachers: tuple[SoftLabelSpec, ...] = ()
    max_support: tuple[int, ...] = ()
    dataset: Any = None
    normalisation: Any = None
    shards: tuple[Any, ...] = ()
    split_rows: Mapping[str, int] = dataclasses.field(default_factory=dict)
    views: int = 1
    augment: AugmentConfig = AugmentConfig()

    @property
    def labels_only(self) -> bool:
        """True when the primary store's inputs are read from its source dataset."""
        return self.kind == "store" and self.dataset is not None

    @property
    def has_teacher(self) -> bool:
        """True when the data carries teacher outputs."""
        return self.kind == "store"

    def row_bytes(self) -> int:
        """Bytes of one converted row (x, y, split, teacher columns, f) in memory; an upper bound
        (inputs counted as 4 bytes a value, though uint8 inputs stay 1)."""
        n = 4 * math.prod(self.input_shape) + 17 + (self.num_classes if self.task == "multilabel" else 0)
        if self.views > 1:
            n += 10 + 2 * len(param_names(self.augment))
        for spec, width in zip(self.teachers, self.max_support):
            value = 2 if spec.dtype == "float16" else 4
            grid = 4 * (1 + len(spec.temperatures))
            n += {"dense": value * spec.num_classes, "topk": width * (4 + value) + grid,
                  "sampled": width * (4 + 2 + value) + grid}[spec.mode]
        return n + 4 * sum(math.prod(f.shape) for f in self.features)

    def read_columns(self, index: int) -> list[str]:
        """Columns to read from input ``index``."""
        if self.kind == "dataset":
            id_col, feat, label, split = self.columns
            return [id_col, feat, label] + ([split] if split else [])
        teacher = list(self.teachers[index].columns)
        if index > 0:
            return ["id"] + teacher
        views = ["view", "augment"] if self.views > 1 else []
        return ["id", "label", "split", *views, "input"] + teacher + [f.column for f in self.features]


def resolve_source(store_uris: Sequence[str], data_cfg: Any, *, verify: bool = False) -> Source:
    """Opens and checks the stores (or the dataset) before any training starts.

    Every open checks the manifests, each shard's size and footer schema
    (:func:`teacher_infer.store.check_shards`: milliseconds, no data page read).

    Args:
        store_uris: Zero, one or several store URIs.
        data_cfg: The ``data`` section (used when there is no store).
        verify: Also re-read every shard against its manifest (``verify_store``:
            checksums, values, unique ids), as ``train.verify_store=true`` asks.

    Raises:
        StillError: A store is incomplete, of another format version, has a missing,
            resized or unreadable shard, fails verification, is labels-only and its
            source is missing or changed, or the stores of an ensemble disagree on
            classes or task.
    """
    from still.datasets import Normalisation

    if not store_uris:
        from still.datasets import resolve_dataset

        spec = resolve_dataset(data_cfg)
        fs_uri = spec.filesystem_uri
        return Source(
            kind="dataset", name=spec.name, inputs=((fs_uri, tuple(_paths(spec.files))),),
            num_classes=spec.num_classes, class_names=tuple(spec.class_names),
            input_shape=tuple(spec.input_shape), input_scale=float(spec.input_scale), task=spec.task,
            num_rows=spec.num_rows, columns=(spec.id_column, spec.feature_column, spec.label_column,
                                             spec.split_column),
            split_rule=dict(spec.split_rule), dataset=spec, normalisation=Normalisation.of(spec),
        )
    from teacher_infer.store import check_shards, open_store, source_dataset, verify_store

    stores, layouts = [], []
    for uri in store_uris:
        store = open_store(uri)
        layouts.append(check_shards(store))
        if verify:
            report = verify_store(uri)
            if not report["ok"]:
                raise StillError(f"store {uri!r} fails verification: {'; '.join(report['problems'][:3])}")
        stores.append(store)
    first = stores[0]
    dataset = None if first.include_inputs else source_dataset(first)
    for other in stores[1:]:
        if other.num_classes != first.num_classes:
            raise StillError(f"ensemble stores disagree on classes: {first.uri!r} has {first.num_classes}, "
                             f"{other.uri!r} has {other.num_classes}")
        if other.task != first.task:
            raise StillError(f"ensemble stores disagree on task: {first.uri!r} vs {other.uri!r}")
        if first.views > 1 or other.views > 1:
            raise StillError(f"ensembles of multi-view stores are not supported ({first.uri!r}: {first.views} "
                             f"views, {other.uri!r}: {other.views}): their rows join by id, one row per sample")
        if other.num_rows != first.num_rows:
            raise StillError(f"ensemble stores must cover the same rows: {first.uri!r} has {first.num_rows}, "
                             f"{other.uri!r} has {other.num_rows}")
    per_split = first.manifest.get("teacher_metrics", {}).get("per_split", {})
    return Source(
        kind="store", name=",".join(s.uri for s in stores),
        inputs=tuple((s.uri, tuple(resolve_path(u) for u in s.shard_uris())) for s in stores),
        num_classes=first.num_classes, class_names=tuple(first.class_names), input_shape=tuple(first.input_shape),
        input_scale=first.input_scale, task=first.task, features=first.features, num_rows=first.num_rows,
        manifests=tuple(s.manifest for s in stores), teachers=tuple(s.soft_labels for s in stores),
        max_support=tuple(s.max_support for s in stores), dataset=dataset,
        normalisation=Normalisation.of(first.manifest["preprocessing"]), shards=tuple(layouts[0]),
        split_rows={name: int(per_split.get(name, {}).get("rows", 0)) * first.views for name in SPLITS}
        if per_split else {},
        views=first.views, augment=first.augment,
    )


def _paths(uris: Sequence[str]) -> list[str]:
    return [resolve_path(u) for u in uris]


def resolve_path(uri: str) -> str:
    """The path of ``uri`` on its pyarrow filesystem."""
    from still.storage import resolve

    return resolve(uri).path


# --------------------------------------------------------------------------- conversion


def hint_key(layer: str) -> str:
    """The training column of stored teacher layer ``layer`` (``Source.features``)."""
    return f"hint_{layer}"


def teacher_prefix(index: int) -> str:
    """The column prefix of store ``index``'s teacher columns in a converted batch."""
    return f"t{index}_"


def convert_batch(batch: Mapping[str, Any], source: Source) -> dict[str, np.ndarray]:
    """Turns a raw batch of the primary input into model-ready arrays (module docstring).

    Args:
        batch: Column name → values (numpy, object arrays of arrays, or Arrow arrays).
            Ensemble members' teacher columns arrive already converted, under their
            prefixes (``t1_…``), and pass through.
        source: The resolved :class:`Source`.
    """
    from still.datasets import column_matrix, decode_inputs, labels_to_numpy
    from still.datasets.splits import id_keys

    if source.kind == "dataset":
        from still.datasets import assign_splits

        id_col, feat, label_col, split_col = source.columns
        ids = _numpy(batch[id_col])
        source_split = _numpy(batch[split_col]) if split_col and split_col in batch else None
        return {
            "x": _raw_inputs(decode_inputs(batch[feat], source.dataset), source),
            "y": labels_to_numpy(batch[label_col], source.task, source.num_classes),
            "split": assign_splits(ids, source_split, source.split_rule).astype(np.int8),
            "sample": id_keys(ids).view(np.int64),
        }
    from teacher_infer.store import teacher_arrays

    out = {
        "x": _raw_inputs(column_matrix(batch["input"]), source),
        "y": labels_to_numpy(batch["label"], source.task, source.num_classes),
        "split": _numpy(batch["split"]).astype(np.int8),
    }
    out.update(teacher_arrays(batch, source.teachers[0], source.max_support[0], prefix=teacher_prefix(0)))
    for index in range(1, len(source.teachers)):
        prefix = teacher_prefix(index)
        out.update({name: _numpy(value) for name, value in batch.items() if name.startswith(prefix)})
    for feature in source.features:
        out[hint_key(feature.layer)] = column_matrix(batch[feature.column])
    out["sample"] = id_keys(_numpy(batch["id"])).view(np.int64)
    if source.views > 1:
        out["aug"] = column_matrix(batch["augment"]).astype(np.int16, copy=False)
        out["view"] = _numpy(batch["view"]).astype(np.int16, copy=False)
    return out


VIEW_COLUMNS = ("aug", "view", "sample")
"""Training columns of views and order (evaluation needs neither)."""


def train_only(name: str) -> bool:
    """True for training columns held-out splits drop: views, order and hint targets."""
    return name in VIEW_COLUMNS or name.startswith("hint_")


def one_view_mask(sample: np.ndarray, view: np.ndarray, views: int, seed: int) -> np.ndarray:
    """The rows holding the one view drawn for each sample (``train.views=one``).

    The view is a hash of (sample key, seed): every worker and read task that holds a
    sample's rows draws the same one, so each sample is trained on once per epoch
    whatever the sharding.

    Args:
        sample: int64 sample keys (the ``sample`` training column).
        view: The rows' views.
        views: K.
        seed: The epoch's seed.
    """
    from still.datasets.splits import splitmix64

    key = splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))
    drawn = splitmix64(np.asarray(sample, dtype=np.int64).view(np.uint64) ^ key) % np.uint64(views)
    return drawn.astype(np.int64) == np.asarray(view, dtype=np.int64)


def _raw_inputs(raw: np.ndarray, source: Source) -> np.ndarray:
    """Raw input rows, flat, in their stored dtype (the device normalises them: ``Source.normalisation``)."""
    per_row = math.prod(source.input_shape)
    if raw.size != len(raw) * per_row:
        raise StillError(f"inputs of {source.name!r}: rows of {raw.size // max(len(raw), 1)} values, expected "
                         f"{per_row} {tuple(source.input_shape)}")
    return np.ascontiguousarray(raw.reshape(len(raw), per_row))


def _numpy(values: Any) -> np.ndarray:
    """A column as numpy: list columns 2-D (:func:`still.datasets.column_matrix`), others as they are."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        kind = values.type
        if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or isinstance(kind, pa.BaseExtensionType):
            from still.datasets import column_matrix

            return column_matrix(values)
        return values.to_numpy(zero_copy_only=False)
    return np.asarray(values)


# --------------------------------------------------------------------------- in memory (plain pyarrow)


def load_split_arrays(source: Source, splits: Sequence[str] = ("train", "val", "test"),
                      *, include_val: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Reads the whole source once with pyarrow and returns ``{split: arrays}`` (in-process path).

    ``include_val``: the ``train`` arrays hold the train and val rows (``train.include_val``).

    Raises:
        StillError: A shard cannot be read (named, with the store).
    """
    import pyarrow.parquet as pq

    from still.storage import resolve

    tables = []
    for index, (fs_uri, paths) in enumerate(source.inputs):
        if index == 0 and source.kind == "store":
            tables.append(pa.concat_tables(read_store_shard(source, i) for i in range(len(paths))))
            continue
        fs = resolve(fs_uri).arrow_fs()
        tables.append(pq.read_table(list(paths), columns=source.read_columns(index), filesystem=fs))
    batch: dict[str, Any] = {name: tables[0][name] for name in tables[0].column_names}
    if len(tables) > 1:
        ids = _numpy(batch["id"])
        for index, table in enumerate(tables[1:], start=1):
            rows = _align(ids, _numpy(table["id"]), source.name)
            batch.update({name: values[rows] for name, values in _member_columns(table, source, index).items()
                          if name != "id"})
    arrays = convert_batch(batch, source)
    return {name: select_split(arrays, split_codes(name, include_val)) for name in splits}


def split_codes(split: str, include_val: bool = False) -> tuple[int, ...]:
    """The split codes a named split selects (train and val for ``train`` with include_val)."""
    return (SPLITS["train"], SPLITS["val"]) if split == "train" and include_val else (SPLITS[split],)


def _align(ids: np.ndarray, other_ids: np.ndarray, name: str) -> np.ndarray:
    order = np.argsort(other_ids, kind="stable")
    pos = np.searchsorted(other_ids[order], ids)
    pos = np.clip(pos, 0, len(order) - 1)
    found = other_ids[order][pos] == ids
    if not found.all():
        raise StillError(f"ensemble stores {name!r} do not share ids ({int((~found).sum())} rows unmatched)")
    return order[pos]


def select_split(arrays: Mapping[str, np.ndarray], codes: Sequence[int]) -> dict[str, np.ndarray]:
    """The rows of the given split codes (0 train, 1 val, 2 test), without the ``split`` column.

    Held-out splits keep view 0 only (multi-view stores), without :data:`VIEW_COLUMNS`.
    """
    keep = np.isin(arrays["split"], list(codes))
    held_out = SPLITS["train"] not in codes
    if held_out and "view" in arrays:
        keep &= arrays["view"] == 0
    return {k: np.ascontiguousarray(v[keep]) for k, v in arrays.items()
            if k != "split" and not (held_out and train_only(k))}


def read_store_shard(source: Source, index: int, codes: Sequence[int] | None = None) -> pa.Table:
    """Shard ``index`` of the primary store (inputs joined from the source when labels-only).

    Args:
        source: A store source.
        index: The shard's position in the manifest.
        codes: Keep only the rows of these split codes (None: all rows).

    Raises:
        StillError: The shard cannot be read or decoded: names the store and the shard,
            and says to run ``still store verify`` (a shard can be truncated or
            rewritten after the store was opened, in the middle of training).
    """
    from still.storage import resolve
    from teacher_infer.store import Store, read_joined_shard

    store = Store(resolve(source.inputs[0][0]), dict(source.manifests[0]))
    name = store.manifest["shards"][index]["name"]
    try:
        table = read_joined_shard(store, index, source.read_columns(0), source.dataset)
    except StillError:
        raise
    except Exception as exc:  # a corrupt shard raises several Arrow and OS error types
        raise StillError(f"store {store.uri!r}: shard {name} cannot be read ({type(exc).__name__}: "
                         f"{str(exc)[:120]}); run still store verify {store.uri}") from None
    return table if codes is None else _rows_of_splits(table, codes)


def _rows_of_splits(table: pa.Table, codes: Sequence[int]) -> pa.Table:
    """The rows of ``table`` whose ``split`` is one of ``codes`` (held-out splits: view 0 only)."""
    import pyarrow.compute as pc

    keep = pc.is_in(table["split"], value_set=pa.array(list(codes), pa.int8()))
    if SPLITS["train"] not in codes and "view" in table.column_names:
        keep = pc.and_(keep, pc.equal(table["view"], 0))
    return table.filter(keep)


# --------------------------------------------------------------------------- Ray Data


def ray_datasets(source: Source, *, materialize: bool, include_val: bool = False,
                 shuffle: bool = False, one_view: bool = False) -> dict[str, Any]:
    """Builds ``{"train", "val", "test"}`` Ray Data datasets of training arrays.

    Args:
        source: The resolved source.
        materialize: Execute once now and keep the converted blocks in the object
            store (small data: no read tasks competing with train workers for CPUs).
        include_val: ``train`` holds the train and val rows (``train.include_val``).
        shuffle: The ``train`` dataset of a store visits its shards in a new random
            order on every pass (streamed training).
        one_view: The ``train`` dataset of a multi-view store keeps, on every pass, one
            view per sample (drawn afresh each pass; streamed training with
            ``train.views=one``). Memory ingest draws in the worker instead.
    """
    converted = None  # one pipeline of every row, its split kept: a dataset (split by rule) or an ensemble
    if source.kind == "dataset":
        converted = _dataset_pipeline(source)
    elif len(source.inputs) > 1:
        converted = _ensemble_pipeline(source)
    if converted is not None and materialize:
        converted = converted.materialize()  # convert (and join) once, select thrice
    datasets = {}
    for name in SPLITS:
        codes = split_codes(name, include_val)
        if converted is not None:
            ds = converted.map_batches(_select_for_ray, fn_kwargs={"codes": codes}, batch_format="pyarrow",
                                       batch_size=None, zero_copy_batch=True)
        else:
            train = name == "train"
            ds = _store_split_pipeline(source, codes, shuffle=shuffle and train, one_view=one_view and train,
                                       streamed=not materialize)
        # materialised here, on the driver: no map task left to compete with the workers for CPUs
        datasets[name] = ds.materialize() if materialize else ds
    return datasets


def _store_split_pipeline(source: Source, codes: Sequence[int], *, shuffle: bool, one_view: bool,
                          streamed: bool) -> Any:
    """One split of a store: a read task per shard that holds the split, yielding converted chunks.

    A task converts its shard ``READ_CHUNK_ROWS`` rows at a time and Ray keeps its
    output blocks under ``TRAIN_BLOCK_BYTES``: what a worker holds stays the same size
    however large the shards (or the store) grow. A ``streamed`` training split leaves
    out what only memory ingest uses (``view``, ``sample``: the one-view draw, if any,
    is made here).
    """
    import ray.data

    shards = [i for i, layout in enumerate(source.shards) if set(layout.splits) & set(codes)]
    with _block_size(TRAIN_BLOCK_BYTES):
        items = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=max(1, len(shards)))
        if shuffle:
            items = items.randomize_block_order()  # reshuffled on every execution: a new shard order each epoch
        return items.map_batches(_converted_shards_for_ray, batch_size=1, batch_format="pyarrow",
                                 fn_kwargs={"source": source, "codes": tuple(codes), "one_view": one_view,
                                            "streamed": streamed})


def _ensemble_pipeline(source: Source) -> Any:
    """Every row of an ensemble's primary store, joined by id to each member's teacher columns, split kept."""
    import ray.data

    shards = range(len(source.inputs[0][1]))
    with _block_size(TRAIN_BLOCK_BYTES):
        ds = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=max(1, len(shards)))
        ds = ds.map_batches(_read_shards_for_ray, fn_kwargs={"source": source}, batch_size=1,
                            batch_format="pyarrow")
        for index in range(1, len(source.inputs)):
            ds = ds.join(_member_pipeline(source, index), join_type="inner", num_partitions=max(1, len(shards)),
                         on=("id",))
        return ds.map_batches(_convert_for_ray, fn_kwargs={"source": source, "keep_split": True},
                              batch_format="pyarrow", batch_size=READ_CHUNK_ROWS, zero_copy_batch=True)


@contextlib.contextmanager
def _block_size(limit: int) -> Iterator[None]:
    """Datasets created inside get this ``target_max_block_size`` (a dataset copies the context it is made in)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size
    context.target_max_block_size = limit
    try:
        yield
    finally:
        context.target_max_block_size = saved


def _dataset_pipeline(source: Source) -> Any:
    import ray.data

    from still.storage import resolve

    fs_uri, paths = source.inputs[0]
    ds = ray.data.read_parquet(list(paths), filesystem=resolve(fs_uri).arrow_fs(), columns=source.read_columns(0))
    return ds.map_batches(_convert_for_ray, fn_kwargs={"source": source, "keep_split": True},
                          batch_format="pyarrow", batch_size=4096, zero_copy_batch=True)


def _member_pipeline(source: Source, index: int) -> Any:
    """An ensemble member's ids and teacher columns (every shard: members are sharded their own way)."""
    import ray.data

    from still.storage import resolve

    fs_uri, paths = source.inputs[index]
    ds = ray.data.read_parquet(list(paths), filesystem=resolve(fs_uri).arrow_fs(), columns=source.read_columns(index))
    return ds.map_batches(_member_columns, fn_kwargs={"source": source, "index": index},
                          batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def _read_shards_for_ray(batch: Any, source: Source) -> pa.Table:
    return pa.concat_tables([read_store_shard(source, int(i)) for i in batch["shard"].to_pylist()])


def _converted_shards_for_ray(batch: Any, source: Source, codes: tuple[int, ...], one_view: bool,
                              streamed: bool) -> Iterator[pa.Table]:
    # A fresh draw on every execution, i.e. every epoch (a sample's views all lie in one shard).
    seed = int(np.random.default_rng().integers(1 << 62))
    for index in batch["shard"].to_pylist():
        table = read_store_shard(source, int(index), codes)
        for start in range(0, table.num_rows, READ_CHUNK_ROWS):
            chunk = table.slice(start, READ_CHUNK_ROWS)
            arrays = convert_batch({c: chunk[c] for c in chunk.column_names}, source)
            arrays.pop("split")
            if one_view:
                keep = one_view_mask(arrays["sample"], arrays["view"], source.views, seed)
                arrays = {name: values[keep] for name, values in arrays.items()}
            held_out = SPLITS["train"] not in codes
            drop = ("view", "sample") if streamed and not held_out else ()
            yield arrow_table({name: values for name, values in arrays.items()
                               if name not in drop and not (held_out and train_only(name))})


def _member_columns(table: Any, source: Source, index: int) -> dict[str, np.ndarray]:
    """An ensemble member's ids and its teacher columns, fixed-width, under its prefix."""
    from teacher_infer.store import teacher_arrays

    columns = {c: table[c] for c in table.column_names}
    arrays = teacher_arrays(columns, source.teachers[index], source.max_support[index], prefix=teacher_prefix(index))
    return {"id": _numpy(table["id"]), **arrays}


def _convert_for_ray(table: Any, source: Source, keep_split: bool = False) -> pa.Table:
    arrays = convert_batch({c: table[c] for c in table.column_names}, source)
    if not keep_split:
        arrays.pop("split")
    return arrow_table(arrays)


def _select_for_ray(table: pa.Table, codes: tuple[int, ...]) -> pa.Table:
    held_out = SPLITS["train"] not in codes
    drop = ["split"] + [c for c in table.column_names if held_out and train_only(c)]
    return _rows_of_splits(table, codes).drop_columns(drop)


def arrow_table(arrays: Mapping[str, np.ndarray]) -> pa.Table:
    """Training arrays as an Arrow table of Ray tensor columns.

    Built here rather than by Ray from numpy: Ray makes tensor columns only of
    non-empty arrays, and falls back to pickling the column for a block where a split
    has no rows. A tensor column stays one whether or not the block is empty.
    """
    from ray.data.extensions import ArrowTensorArray

    return pa.table({name: ArrowTensorArray.from_numpy(value) if value.ndim > 1 else pa.array(value)
                     for name, value in arrays.items()})

