"""Datasets: every source becomes Parquet with known columns (docs/internals.md, "Datasets").

Typical use::

    spec = resolve_dataset(DataConfig(source="builtin:mnist"))
    ids, x, y = load_arrays(spec, splits=("test",))            # small data, in memory
    fs, paths = spec.arrow_files()
    ds = ray.data.read_parquet(paths, filesystem=fs)           # anything, streamed

Built-ins and id-less Parquet are cached under ``$STILL_CACHE_DIR`` (default
``~/.cache/still``) in ``datasets/<name>/parquet/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from still.config import DataConfig
from still.datasets.arrays import column_matrix, features_to_numpy, labels_to_numpy
from still.datasets.inputs import Normalisation, decode_inputs
from still.datasets.rows import read_rows
from still.datasets.builtin import BUILTINS, resolve_builtin, resolve_idx_dir
from still.datasets.cache import cache_root
from still.datasets.folder import find_image_folder, resolve_image_folder
from still.datasets.idx import find_idx_files
from still.datasets.parquet import resolve_parquet
from still.datasets.spec import DatasetSpec
from still.datasets.splits import SPLIT_CODES, assign_splits
from still.errors import StillError
from still.storage import resolve

__all__ = [
    "BUILTINS",
    "Normalisation",
    "SPLIT_CODES",
    "DatasetSpec",
    "assign_splits",
    "cache_root",
    "column_matrix",
    "decode_inputs",
    "features_to_numpy",
    "labels_to_numpy",
    "load_arrays",
    "read_rows",
    "resolve_dataset",
]


def resolve_dataset(cfg: DataConfig) -> DatasetSpec:
    """Resolves ``cfg.source`` to a :class:`DatasetSpec`, checking it before any work.

    Args:
        cfg: ``source`` is ``builtin:<name>``, a local directory of the four MNIST-layout
            IDX files, a folder of class folders of images (``<class>/<image>.png``), or a
            Parquet file/directory URI whose columns ``cfg`` names (numbers, or encoded images).

    Raises:
        StillError: The source is unknown, missing, unreadable or lacks a column.
    """
    if cfg.source.startswith("builtin:"):
        return resolve_builtin(cfg.source.removeprefix("builtin:"), cfg)
    location = resolve(cfg.source)
    if location.is_local and find_idx_files(Path(location.path)) is not None:
        return resolve_idx_dir(Path(location.path), cfg)
    folder = find_image_folder(location) if location.exists() else None
    if folder is not None:
        return resolve_image_folder(location, folder, cfg)
    return resolve_parquet(cfg)


def load_arrays(
    spec: DatasetSpec, splits: Sequence[str] = ("train",)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads the rows of the given splits into memory (for small data and baselines).

    Args:
        spec: A resolved dataset.
        splits: Any of "train", "val", "test" (as :func:`assign_splits` assigns them).

    Returns:
        ``(ids, x, y)``: ids, float32 model inputs ``(n, *input_shape)`` (decoded, scaled
        and normalised as :class:`Normalisation` says), and labels (:func:`labels_to_numpy`: int64, or int8 multi-hot
        rows for multi-label data), in file order.
    """
    unknown = sorted(set(splits) - set(SPLIT_CODES))
    if unknown:
        raise StillError(f"unknown split {unknown[0]!r}; choose from {', '.join(SPLIT_CODES)}")
    fs, paths = spec.arrow_files()
    columns = [spec.id_column, spec.feature_column, spec.label_column]
    table = pq.read_table(
        paths, columns=columns + ([spec.split_column] if spec.split_column else []), filesystem=fs
    )
    ids = table[spec.id_column].to_numpy()
    source = table[spec.split_column].to_numpy() if spec.split_column else None
    keep = np.isin(assign_splits(ids, source, spec.split_rule), [SPLIT_CODES[s] for s in splits])
    kept_ids = table[spec.id_column].filter(pa.array(keep))
    x = Normalisation.of(spec).apply_numpy(decode_inputs(table[spec.feature_column].filter(pa.array(keep)), spec,
                                                         kept_ids))
    labels = labels_to_numpy(table[spec.label_column].filter(pa.array(keep)), spec.task, spec.num_classes)
    return ids[keep], x, labels
