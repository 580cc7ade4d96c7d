"""Feature columns (Arrow, numpy, Ray Data batches) to model-ready float32 arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from still.errors import StillError


def column_matrix(values: Any, dtype: Any = None) -> np.ndarray:
    """Any per-row fixed-width column as a 2-D ``(n, width)`` numpy array (the one owner of this).

    Args:
        values: A pyarrow (Chunked)Array of fixed-size lists, lists, nested lists or
            tensors (flattened per row); a numeric numpy array (``(n,)`` becomes
            ``(n, 1)``, ``(n, a, b)`` becomes ``(n, a·b)``); or the numpy object array of
            per-row arrays that Ray Data hands to ``map_batches``.
        dtype: Cast to this type (no copy when it already is).

    Returns:
        Zero-copy where Arrow and numpy allow it.

    Raises:
        StillError: Rows hold different numbers of values.
    """
    n, flat = _rows_and_values(values)
    if n and flat.size % n:
        raise StillError(f"rows hold different numbers of values ({flat.size} values over {n} rows)")
    matrix = flat.reshape(n, flat.size // n if n else 0)
    return matrix.astype(dtype, copy=False) if dtype is not None else matrix


def features_to_numpy(values: Any, input_shape: tuple[int, ...], input_scale: float = 1.0) -> np.ndarray:
    """Converts a feature column to float32 of shape ``(n, *input_shape)``, scaled.

    Args:
        values: What :func:`column_matrix` takes.
        input_shape: The shape of one example (``DatasetSpec.input_shape``).
        input_scale: Multiplier applied to the raw values (``DatasetSpec.input_scale``).

    Returns:
        A new float32 array ``raw * input_scale``.

    Raises:
        StillError: The values do not hold ``prod(input_shape)`` numbers per row.
    """
    from still.datasets.inputs import Normalisation

    n, flat = _rows_and_values(values)
    per_row = int(np.prod(input_shape))
    if flat.size != n * per_row:
        raise StillError(
            f"features: expected {per_row} values per row {tuple(input_shape)}, got {flat.size} for {n} rows"
        )
    return Normalisation(tuple(input_shape), input_scale).apply_numpy(flat.reshape(n, per_row))


def flat_values(values: Any) -> np.ndarray:
    """Every value of a column, nested lists flattened, as one 1-D numpy array (rows may differ in length)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return _arrow_values(values)
    return _rows_and_values(values)[1].reshape(-1)


def _rows_and_values(values: Any) -> tuple[int, np.ndarray]:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return len(values), _arrow_values(values)
    array = np.asarray(values)
    if array.dtype == object:
        return len(array), (np.stack([np.asarray(row) for row in array]) if len(array) else np.zeros(0))
    return len(array), array


def _arrow_values(array: pa.Array) -> np.ndarray:
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    while (
        pa.types.is_list(array.type)
        or pa.types.is_large_list(array.type)
        or pa.types.is_fixed_size_list(array.type)
    ):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False)


def labels_to_numpy(values: Any, task: str, num_classes: int) -> np.ndarray:
    """Converts a label column to numpy, marking unlabelled rows.

    Args:
        values: A pyarrow (Chunked)Array, numpy array, or Ray Data's object array.
            Multi-class: integers, nulls allowed. Multi-label: per row either a
            multi-hot fixed-size list of C numbers or a list of class ids; null rows
            allowed.
        task: ``multiclass`` or ``multilabel``.
        num_classes: C.

    Returns:
        Multi-class: int64 ``(n,)``, -1 where unlabelled (null or negative).
        Multi-label: int8 ``(n, C)`` 0/1, a row of -1 where unlabelled.

    Raises:
        StillError: A multi-hot row is not C wide, or a class id is out of range.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if task == "multiclass":
        if isinstance(values, pa.Array):
            values = values.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
        array = np.asarray(values)
        if array.dtype == object:
            array = np.array([-1 if v is None else v for v in array], dtype=np.float64)
        if np.issubdtype(array.dtype, np.floating):
            array = np.where(np.isnan(array), -1, array)
        return np.where(array < 0, -1, array).astype(np.int64)
    if isinstance(values, pa.Array) and pa.types.is_fixed_size_list(values.type) or (
            isinstance(values, np.ndarray) and values.dtype != object and values.ndim == 2):
        return _multi_hot(values, num_classes)
    rows = values.to_pylist() if isinstance(values, pa.Array) else list(values)
    out = np.full((len(rows), num_classes), -1, dtype=np.int8)
    for i, row in enumerate(rows):
        if row is None:
            continue
        ids = np.asarray(row, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise StillError(f"label row {i} names class {int(ids.max())}, outside [0, {num_classes})")
        out[i] = 0
        out[i, ids] = 1
    return out


def _multi_hot(values: Any, num_classes: int) -> np.ndarray:
    """Multi-hot rows (Arrow fixed-size list with null rows, or a 2-D array) as int8, -1 rows for nulls."""
    if isinstance(values, pa.Array):
        width = values.type.list_size
        nulls = values.is_null().to_numpy(zero_copy_only=False)
        flat = values.flatten().to_numpy(zero_copy_only=False) if width else np.zeros(0)
        hot = np.zeros((len(values), width), dtype=np.int8)
        hot[~nulls] = flat.reshape(-1, width).astype(np.int8) if flat.size else hot[~nulls]
        hot[nulls] = -1
    else:
        hot = np.asarray(values).astype(np.int8)
        width = hot.shape[1]
    if width != num_classes:
        raise StillError(f"multi-hot labels are {width} wide, expected {num_classes}")
    return hot
