"""Tasks composed from pairs of real images: more classes, or several labels, from the same data.

No dataset with 100+ classes or with several labels per image ships on these
machines, and nothing may be downloaded from a hub; these two compositions build
such tasks from real handwritten digits, deterministically (a fixed seed), each
image paired with another of the same official split:

- :func:`pairs_table`: the two images side by side; the label is the two-digit
  number ``10·left + right`` (100 classes). A model must recognise both digits and
  their order; the teacher's mistakes spread over related classes (``37`` vs ``87``),
  which is the dark knowledge a top-k store must keep.
- :func:`overlay_table`: the two images overlaid (pixel-wise maximum); the label is
  the multi-hot set of the digits present (one or two of 10 classes).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

SEED = 20150309  # arXiv:1503.02531's submission date: any fixed value would do


def _partners(splits: np.ndarray | None, n: int, copies: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) row indices: every row ``copies`` times, each with a partner of its own split."""
    groups = [np.arange(n)] if splits is None else [np.flatnonzero(splits == s) for s in np.unique(splits)]
    first, second = [], []
    for group in groups:
        for _ in range(copies):
            partner = rng.permutation(group)
            same = partner == group  # a row paired with itself: swap with a neighbour
            partner[same] = np.roll(partner, 1)[same]
            first.append(group)
            second.append(partner)
    return np.concatenate(first), np.concatenate(second)


def _images(table: pa.Table) -> tuple[np.ndarray, tuple[int, ...]]:
    shape = tuple(json.loads(table.schema.metadata[b"still.item_shape"]))
    flat = table["features"].combine_chunks().flatten().to_numpy()
    return flat.reshape(table.num_rows, *shape), shape


def _table(features: np.ndarray, labels: pa.Array, splits: np.ndarray | None, item_shape: tuple[int, ...]) -> pa.Table:
    columns = {
        "id": pa.array(np.arange(len(features), dtype=np.int64)),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), int(np.prod(item_shape))),
        "label": labels,
    }
    if splits is not None:
        columns["split"] = pa.array(splits, type=pa.string())
    return pa.table(columns, metadata={"still.item_shape": json.dumps(list(item_shape))})


def pairs_table(base: pa.Table, copies: int = 1) -> pa.Table:
    """Two digits side by side, label ``10·left + right`` (100 classes).

    Args:
        base: A cached digit table (``id``, ``features`` uint8 with ``still.item_shape``
            metadata, ``label`` 0–9, optional ``split``).
        copies: Composed rows per base row (each with another partner).
    """
    images, shape = _images(base)
    splits = base["split"].to_numpy(zero_copy_only=False) if "split" in base.column_names else None
    labels = base["label"].to_numpy()
    first, second = _partners(splits, base.num_rows, copies, np.random.default_rng(SEED))
    if len(shape) == 2:  # images (H, W): concatenate the columns
        features, item_shape = np.concatenate([images[first], images[second]], axis=2), (shape[0], 2 * shape[1])
    else:  # flat vectors: concatenate them
        features, item_shape = np.concatenate([images[first], images[second]], axis=1), (2 * shape[0],)
    composed = pa.array((10 * labels[first] + labels[second]).astype(np.int64))
    return _table(features, composed, None if splits is None else splits[first], item_shape)


def overlay_table(base: pa.Table, copies: int = 1) -> pa.Table:
    """Two digits overlaid (pixel-wise max), label the multi-hot set of both digits (10 classes).

    Args:
        base: As for :func:`pairs_table`.
        copies: Composed rows per base row.
    """
    images, shape = _images(base)
    splits = base["split"].to_numpy(zero_copy_only=False) if "split" in base.column_names else None
    labels = base["label"].to_numpy()
    first, second = _partners(splits, base.num_rows, copies, np.random.default_rng(SEED + 1))
    features = np.maximum(images[first], images[second])
    hot = np.zeros((len(first), 10), dtype=np.int8)
    hot[np.arange(len(first)), labels[first]] = 1
    hot[np.arange(len(first)), labels[second]] = 1
    multi_hot = pa.FixedSizeListArray.from_arrays(pa.array(hot.reshape(-1)), 10)
    return _table(features, multi_hot, None if splits is None else splits[first], shape)
