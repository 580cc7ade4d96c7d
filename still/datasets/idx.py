"""IDX files (the MNIST format), raw or gzipped, to an id/features/label/split table."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa

from still.errors import StillError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Official split -> (images, labels) file names, each optionally with ``.gz``."""


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Returns the four IDX files of ``directory`` by base name, or None if any is missing."""
    found = {}
    for base in (name for pair in IDX_FILES.values() for name in pair):
        candidates = [p for p in (directory / base, directory / f"{base}.gz") if p.is_file()]
        if not candidates:
            return None
        found[base] = candidates[0]
    return found


def read_idx_table(directory: Path, md5: dict[str, str] | None = None) -> pa.Table:
    """Reads a directory of IDX files into one table, train rows first.

    Args:
        directory: Holds the four files named in :data:`IDX_FILES`.
        md5: Expected md5 of each file's decompressed bytes, by base name; None skips.

    Returns:
        Columns ``id`` int64 (0..N-1), ``features`` fixed_size_list<uint8>[rows*cols],
        ``label`` int64, ``split`` string ("train"/"test").

    Raises:
        StillError: A file is missing, malformed, or has another md5; counts disagree.
    """
    files = find_idx_files(directory)
    if files is None:
        raise StillError(
            f"{directory}: expected IDX files {', '.join(n for p in IDX_FILES.values() for n in p)}"
        )
    images, labels, splits = [], [], []
    for split, (image_name, label_name) in IDX_FILES.items():
        x = _read_idx(files[image_name], (md5 or {}).get(image_name))
        y = _read_idx(files[label_name], (md5 or {}).get(label_name))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise StillError(f"{directory}: {split} images {x.shape} and labels {y.shape} do not match")
        images.append(x)
        labels.append(y)
        splits.append(np.full(len(y), split))
    return example_table(np.concatenate(images), np.concatenate(labels), np.concatenate(splits))


def example_table(features: np.ndarray, labels: np.ndarray, splits: np.ndarray | None) -> pa.Table:
    """Builds the cached table layout from uint8 features of shape (n, *item_shape).

    The item shape is kept in the schema metadata under ``still.item_shape``.
    """
    n = len(features)
    width = int(np.prod(features.shape[1:]))
    columns = {
        "id": pa.array(np.arange(n, dtype=np.int64)),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), width),
        "label": pa.array(labels.astype(np.int64)),
    }
    if splits is not None:
        columns["split"] = pa.array(splits, type=pa.string())
    return pa.table(columns, metadata={"still.item_shape": json.dumps(features.shape[1:])})


def _read_idx(path: Path, md5: str | None) -> np.ndarray:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if md5 is not None and hashlib.md5(data).hexdigest() != md5:
        raise StillError(f"{path}: md5 of its contents is {hashlib.md5(data).hexdigest()}, expected {md5}")
    if len(data) < 4 or data[:3] != b"\0\0\x08":
        raise StillError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise StillError(f"{path}: header says {dims}, file holds {body.size} values")
    return body.reshape(dims)
