"""Feature columns (Arrow, numpy, Ray Data batches) to model-ready float32 arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from still.errors import StillError


def features_to_numpy(values: Any, input_shape: tuple[int, ...], input_scale: float = 1.0) -> np.ndarray:
    """Converts a feature column to float32 of shape ``(n, *input_shape)``, scaled.

    Args:
        values: A pyarrow (Chunked)Array of fixed-size lists, lists or tensors; a
            numeric numpy array with one row per example; or the numpy object array
            of per-row arrays that Ray Data hands to ``map_batches``.
        input_shape: The shape of one example (``DatasetSpec.input_shape``).
        input_scale: Multiplier applied to the raw values (``DatasetSpec.input_scale``).

    Returns:
        A new float32 array ``raw * input_scale``.

    Raises:
        StillError: The values do not hold ``prod(input_shape)`` numbers per row.
    """
    n, flat = _rows_and_values(values)
    per_row = int(np.prod(input_shape))
    if flat.size != n * per_row:
        raise StillError(
            f"features: expected {per_row} values per row {tuple(input_shape)}, got {flat.size} for {n} rows"
        )
    out = flat.reshape(n, *input_shape).astype(np.float32)
    if input_scale != 1.0:
        out *= np.float32(input_scale)
    return out


def _rows_and_values(values: Any) -> tuple[int, np.ndarray]:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return len(values), _arrow_values(values)
    array = np.asarray(values)
    if array.dtype == object:
        return len(array), (np.stack(list(array)) if len(array) else array)
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
