"""The resolved description of a dataset that every stage reads."""

from __future__ import annotations

import dataclasses
from typing import Any

import pyarrow.fs as pafs

from still.config import DataConfig
from still.storage import resolve


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset as Parquet files with known columns (see docs/internals.md, "Datasets").

    Attributes:
        name: "mnist", "fashion-mnist", "digits", an IDX directory's name, or the URI.
        files: Parquet file URIs, sorted (what ``ray.data.read_parquet`` gets).
        filesystem_uri: A URI for ``still.storage.resolve(...).arrow_fs()``.
        fingerprint: sha256 hex, the content identity of the data (enters store keys).
        num_rows: Rows over all files.
        num_classes: max(label) + 1.
        class_names: One name per class.
        input_shape: Shape of one example, e.g. (1, 28, 28) or (64,).
        id_column: Unique id per row (int64 or string).
        feature_column: Fixed-size list or tensor column of numbers.
        label_column: Integer class label.
        split_column: The source's own train/val/test column; None: splits by id hash.
        input_scale: Model input = raw feature * input_scale.
        split_rule: ``{"val_fraction", "test_fraction", "seed", "source_split_column"}``,
            what :func:`still.datasets.assign_splits` takes; recorded in manifests.
        task: ``multiclass`` (an integer label per row) or ``multilabel`` (a multi-hot
            fixed-size list or a list of class ids per row).
        image: For encoded-image feature columns: ``{"mode", "resize", "crop"}`` as
            resolved (:mod:`still.datasets.inputs` decodes with it); None for numbers.
        mean: Per-channel mean subtracted after ``input_scale`` (empty: none).
        std: Per-channel standard deviation divided by (empty: none).
    """

    name: str
    files: tuple[str, ...]
    filesystem_uri: str
    fingerprint: str
    num_rows: int
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    id_column: str
    feature_column: str
    label_column: str
    split_column: str | None
    input_scale: float
    split_rule: dict[str, Any]
    task: str = "multiclass"
    image: dict[str, Any] | None = None
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def preprocessing(self) -> dict[str, Any]:
        """Everything that turns a source row into a model input (enters cache keys and manifests)."""
        doc: dict[str, Any] = {"input_shape": list(self.input_shape), "input_scale": float(self.input_scale)}
        if self.mean:
            doc.update(mean=list(self.mean), std=list(self.std))
        if self.image:
            doc["image"] = dict(self.image)
        return doc

    def arrow_files(self) -> tuple[pafs.FileSystem, list[str]]:
        """Returns a pyarrow filesystem and the files' paths on it.

        ``pq.read_table(paths, filesystem=fs)`` and
        ``ray.data.read_parquet(paths, filesystem=fs)`` both take this pair.
        """
        fs = resolve(self.filesystem_uri).arrow_fs()
        return fs, [resolve(uri).path for uri in self.files]


def split_rule(cfg: DataConfig, split_column: str | None) -> dict[str, Any]:
    """Returns the split rule of ``cfg`` for data whose own split column is ``split_column``."""
    return {
        "val_fraction": cfg.val_fraction,
        "test_fraction": cfg.test_fraction,
        "seed": cfg.split_seed,
        "source_split_column": split_column,
    }
