"""One shard of a store, in three steps that either plan can run where it likes.

    rows = read_shard(plan_entry, dataset_spec, measure_rows=64)        # CPU: read, decode
    logits, features = predictor.forward(rows.inputs)                  # the teacher's device
    record = write_shard(rows, logits, features, settings)              # CPU: compress, write

A multi-view store (``store.views`` = K > 1) holds K rows per source row, view-major
(every row's view 0, then every row's view 1, …): the inputs stay one copy per source
row, ``ShardRows.source_index`` says which input each store row augments and
``ShardRows.params`` how (:mod:`still.augment`), and the teacher's device does the
augmenting. The fused plan runs all three in one Ray task; the streaming plan runs them as three
Ray Data stages (:mod:`teacher_infer.pipeline`). Either way a shard is always the same
source rows (the deterministic plan, :mod:`teacher_infer.plan`), its draws are seeded
by (store key, shard index), and its file is renamed into place complete, so a shard
rewritten after a kill is the shard that would have been written.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pyarrow as pa

from still.augment import AugmentConfig
from still.storage import resolve
from teacher_infer import fidelity as fid
from teacher_infer import metrics as tm
from teacher_infer import store as st
from teacher_infer.soft_labels import Ragged, SoftLabelSpec, compress


@dataclasses.dataclass(frozen=True)
class ViewSettings:
    """The views of a multi-view store (one per run).

    Attributes:
        count: K, views per source row (view 0 un-augmented).
        augment: The augmentation of views 1…K−1.
        seed: With each row's id and view, what the view's parameters are a hash of.
    """

    count: int
    augment: AugmentConfig
    seed: int


@dataclasses.dataclass
class ShardRows:
    """A shard's store rows, decoded and ready for the teacher.

    Attributes:
        index: The shard's index in the plan.
        ids: The store rows' ids (Arrow).
        labels: :func:`still.datasets.labels_to_numpy` of the label column, per store row.
        splits: int8 split codes, per store row.
        inputs: ``(n, ...)`` raw inputs of the source rows, in the source's value type
            (uint8 pixels stay uint8).
        measure: bool, per store row: the rows whose fidelity is measured.
        views: int16 view of each store row (None: one view, the source rows themselves).
        source_index: The input row each store row is a view of (None with one view).
        params: int16 ``(rows, P)`` augmentation parameters of each store row (None with one view).
    """

    index: int
    ids: pa.Array
    labels: np.ndarray
    splits: np.ndarray
    inputs: np.ndarray
    measure: np.ndarray
    views: np.ndarray | None = None
    source_index: np.ndarray | None = None
    params: np.ndarray | None = None

    @property
    def view_zero(self) -> np.ndarray | slice:
        """The store rows that are the inputs as they are (all rows of a single-view store)."""
        return slice(None) if self.views is None else self.views == 0

    def store_inputs(self) -> np.ndarray:
        """The raw input of every store row (a self-contained store's ``input`` column), flat."""
        inputs = self.inputs.reshape(len(self.inputs), -1)
        return inputs if self.source_index is None else inputs[self.source_index]


@dataclasses.dataclass(frozen=True)
class WriteSettings:
    """What :func:`write_shard` needs besides the rows and logits (one per run)."""

    soft_labels: SoftLabelSpec
    store_uri: str
    include_inputs: bool
    write: bool
    """Write the shard file in the task (shared storage); False returns its bytes for
    the driver to write (``memory://`` stores, which only the driver's process sees)."""
    seed: int
    """With the shard index, seeds the draws of ``sampled`` storage."""
    feature_dtype: str = "float16"


def read_shard(shard: dict[str, Any], spec: Any, measure_rows: int, views: ViewSettings | None = None) -> ShardRows:
    """Reads and decodes one shard's source rows (and lays out its views).

    Args:
        shard: A plan entry (``index``, ``rows``, ``pieces``).
        spec: The ``DatasetSpec``.
        measure_rows: About how many of the shard's store rows get their fidelity measured.
        views: The views of a multi-view store; None for one view.
    """
    from still.datasets import assign_splits, decode_inputs, labels_to_numpy, read_rows

    fs, paths = spec.arrow_files()
    columns = [spec.id_column, spec.feature_column, spec.label_column] + ([spec.split_column]
                                                                          if spec.split_column else [])
    table = read_rows(fs, paths, shard["pieces"], columns)
    ids = table[spec.id_column].combine_chunks()
    inputs = decode_inputs(table[spec.feature_column], spec, ids)
    source_split = table[spec.split_column].to_numpy() if spec.split_column else None
    labels = labels_to_numpy(table[spec.label_column], spec.task, spec.num_classes)
    splits = assign_splits(ids.to_numpy(zero_copy_only=False), source_split, spec.split_rule)
    if views is None or views.count == 1:
        return ShardRows(index=int(shard["index"]), ids=ids, labels=labels, splits=splits, inputs=inputs,
                         measure=fid.measured_rows(table.num_rows, measure_rows))
    from still.augment import view_params
    from still.datasets.splits import id_keys

    n = table.num_rows
    source_index = np.tile(np.arange(n), views.count)
    view = np.repeat(np.arange(views.count, dtype=np.int16), n)
    keys = id_keys(ids.to_numpy(zero_copy_only=False))[source_index]
    return ShardRows(
        index=int(shard["index"]), ids=ids.take(pa.array(source_index)), labels=labels[source_index],
        splits=splits[source_index], inputs=inputs, measure=fid.measured_rows(len(view), measure_rows),
        views=view, source_index=source_index,
        params=view_params(views.augment, spec.input_shape, keys, view, views.seed),
    )


def write_shard(rows: ShardRows, logits: np.ndarray, features: dict[str, np.ndarray],
                settings: WriteSettings) -> dict[str, Any]:
    """Compresses a shard's logits, measures it, and writes it atomically.

    Teacher metrics (of view 0, the inputs as they are) and fidelity (of every view) are
    computed from the full float32 logits, before compression, and travel in the
    shard's footer as well as in the returned record.

    Returns:
        ``index``, ``name``, ``rows``, ``bytes``, ``sha256``, ``stats`` (JSON: metric
        sums, fidelity sums, the widest sampled row) and ``data`` (the Parquet bytes
        when ``settings.write`` is False, else empty).
    """
    spec = settings.soft_labels
    rng = np.random.default_rng([settings.seed, rows.index])
    outputs = compress(logits, spec, rng)
    stats = tm.empty_stats(spec.task, spec.num_classes)
    plain = rows.view_zero
    tm.accumulate_stats(stats, tm.row_stats(logits[plain], rows.labels[plain], spec.task), rows.splits[plain])
    fidelity = fid.empty_stats()
    measured = np.flatnonzero(rows.measure)
    if len(measured):
        picked = {name: value.take(measured) if isinstance(value, Ragged) else value[measured]
                  for name, value in outputs.items()}
        fid.accumulate_stats(fidelity, fid.measure_rows(logits[measured], picked, spec))
    table = st.build_table(
        rows.ids, rows.labels, rows.splits, outputs,
        inputs=rows.store_inputs() if settings.include_inputs else None,
        features={name: value.astype(settings.feature_dtype, copy=False) for name, value in features.items()},
        task=spec.task, views=rows.views, augment=rows.params,
    )
    support = outputs.get("sample_idx")
    shard_stats = {"metrics": stats, "fidelity": fidelity,
                   "max_support": int(np.diff(support.offsets).max(initial=0)) if support is not None else None}
    data = st.shard_bytes(table, shard_stats)
    name = st.shard_name(rows.index)
    if settings.write:
        resolve(settings.store_uri).join(name).write_atomic(data)
    record = st.shard_record(name, data, table.num_rows)
    return {**record, "index": rows.index, "stats": json.dumps(shard_stats),
            "data": b"" if settings.write else data}
