"""One shard of a store, in three steps that either plan can run where it likes.

    rows = read_shard(plan_entry, dataset_spec, measure_rows=64)        # CPU: read, decode
    logits, features = predictor.forward(rows.inputs)                  # the teacher's device
    record = write_shard(rows, logits, features, settings)              # CPU: compress, write

The fused plan runs all three in one Ray task; the streaming plan runs them as three
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

from still.storage import resolve
from teacher_infer import fidelity as fid
from teacher_infer import metrics as tm
from teacher_infer import store as st
from teacher_infer.soft_labels import Ragged, SoftLabelSpec, compress


@dataclasses.dataclass
class ShardRows:
    """A shard's source rows, decoded and ready for the teacher.

    Attributes:
        index: The shard's index in the plan.
        ids: The rows' ids (Arrow).
        labels: :func:`still.datasets.labels_to_numpy` of the label column.
        splits: int8 split codes.
        inputs: ``(n, ...)`` raw inputs in the source's value type (uint8 pixels stay uint8).
        measure: bool ``(n,)``: the rows whose fidelity is measured.
    """

    index: int
    ids: pa.Array
    labels: np.ndarray
    splits: np.ndarray
    inputs: np.ndarray
    measure: np.ndarray


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


def read_shard(shard: dict[str, Any], spec: Any, measure_rows: int) -> ShardRows:
    """Reads and decodes one shard's source rows.

    Args:
        shard: A plan entry (``index``, ``rows``, ``pieces``).
        spec: The ``DatasetSpec``.
        measure_rows: About how many of the shard's rows get their fidelity measured.
    """
    from still.datasets import assign_splits, decode_inputs, labels_to_numpy, read_rows

    fs, paths = spec.arrow_files()
    columns = [spec.id_column, spec.feature_column, spec.label_column] + ([spec.split_column]
                                                                          if spec.split_column else [])
    table = read_rows(fs, paths, shard["pieces"], columns)
    ids = table[spec.id_column].combine_chunks()
    inputs = decode_inputs(table[spec.feature_column], spec, ids)
    source_split = table[spec.split_column].to_numpy() if spec.split_column else None
    return ShardRows(
        index=int(shard["index"]),
        ids=ids,
        labels=labels_to_numpy(table[spec.label_column], spec.task, spec.num_classes),
        splits=assign_splits(ids.to_numpy(zero_copy_only=False), source_split, spec.split_rule),
        inputs=inputs,
        measure=fid.measured_rows(table.num_rows, measure_rows),
    )


def write_shard(rows: ShardRows, logits: np.ndarray, features: np.ndarray | None,
                settings: WriteSettings) -> dict[str, Any]:
    """Compresses a shard's logits, measures it, and writes it atomically.

    Teacher metrics and fidelity are computed from the full float32 logits, before
    compression, and travel in the shard's footer as well as in the returned record.

    Returns:
        ``index``, ``name``, ``rows``, ``bytes``, ``sha256``, ``stats`` (JSON: metric
        sums, fidelity sums, the widest sampled row) and ``data`` (the Parquet bytes
        when ``settings.write`` is False, else empty).
    """
    spec = settings.soft_labels
    rng = np.random.default_rng([settings.seed, rows.index])
    outputs = compress(logits, spec, rng)
    stats = tm.empty_stats(spec.task, spec.num_classes)
    tm.accumulate_stats(stats, tm.row_stats(logits, rows.labels, spec.task), rows.splits)
    fidelity = fid.empty_stats()
    measured = np.flatnonzero(rows.measure)
    if len(measured):
        picked = {name: value.take(measured) if isinstance(value, Ragged) else value[measured]
                  for name, value in outputs.items()}
        fid.accumulate_stats(fidelity, fid.measure_rows(logits[measured], picked, spec))
    table = st.build_table(
        rows.ids, rows.labels, rows.splits, outputs,
        inputs=rows.inputs.reshape(len(rows.inputs), -1) if settings.include_inputs else None,
        features=features.astype(settings.feature_dtype, copy=False) if features is not None else None,
        task=spec.task,
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
