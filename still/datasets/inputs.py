"""Source feature columns to raw input rows: numbers as they are, images decoded.

    raw = decode_inputs(table["features"], spec, ids)   # (n, *spec.input_shape), raw dtype

Numeric columns (fixed-size lists, lists, tensors) keep their value type. Encoded
images (PNG/JPEG bytes: a binary column, or a struct with a ``bytes`` field as
Hugging Face datasets write it) are decoded with Pillow, converted to the resolved
mode, resized (shorter side), centre-cropped, and returned as uint8 ``(n, C, H, W)``.
Scaling and mean/std normalisation are not done here: they run on the teacher's
device (``teacher_infer.predictor.Normalisation``) and in the student's batches.

torchvision is not used: checked 2026-12-01, ``pip install torchvision`` beside the CPU
torch 2.13 resolves torchvision 0.29.1, which requires torch 2.14.1 and pulls the CUDA 13
build with some twenty ``nvidia-*`` wheels (several GB); nothing here needs more than
Pillow's decode and resize.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pyarrow as pa

from still.datasets.arrays import column_matrix
from still.errors import StillError


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """How raw source rows become model inputs: ``(raw × scale − mean[c]) / std[c]``.

    Attributes:
        input_shape: Shape of one model input (channels first for images).
        scale: Multiplier of the raw values (1/255 for uint8 pixels).
        mean: Per-channel mean subtracted after scaling (empty: none).
        std: Per-channel standard deviation divided by (empty: none).
    """

    input_shape: tuple[int, ...]
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @classmethod
    def of(cls, spec: Any) -> Normalisation:
        """The normalisation of a ``DatasetSpec`` (or a store's preprocessing section)."""
        get = spec.get if isinstance(spec, dict) else (lambda name, default=None: getattr(spec, name, default))
        return cls(tuple(get("input_shape")), float(get("input_scale", 1.0)), tuple(get("mean", ()) or ()),
                   tuple(get("std", ()) or ()))

    def apply(self, raw: Any) -> Any:
        """The float32 model input of raw rows ``(n, ...)`` (a torch tensor, on its own device)."""
        import torch

        x = raw.reshape(raw.shape[0], *self.input_shape).float()
        if self.scale != 1.0:
            x = x * self.scale
        if self.mean:
            view = (1, len(self.mean)) + (1,) * (len(self.input_shape) - 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).reshape(view)
            std = torch.tensor(self.std, dtype=torch.float32, device=x.device).reshape(view)
            x = (x - mean) / std
        return x

    def apply_numpy(self, raw: np.ndarray) -> np.ndarray:
        """:meth:`apply` for numpy rows (on the CPU)."""
        import torch

        # Arrow hands Ray Data batches out read-only; torch needs a writable array.
        return self.apply(torch.from_numpy(np.require(raw, requirements=("C", "W")))).numpy()


def is_image_type(kind: pa.DataType) -> bool:
    """True for a column type that holds encoded images (binary, or a struct with ``bytes``)."""
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return True
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0


def decode_inputs(column: Any, spec: Any, ids: Any = None) -> np.ndarray:
    """Raw input rows of a feature column.

    Args:
        column: The feature column (Arrow, or Ray Data's numpy batch column).
        spec: The ``DatasetSpec`` (its ``input_shape`` and ``image`` settings).
        ids: The rows' ids, named in errors about single images.

    Raises:
        StillError: A row does not hold ``prod(input_shape)`` values, or an image does
            not decode or ends at another size.
    """
    if spec.image:
        return decode_images(column, spec.image, tuple(spec.input_shape), ids, spec.name)
    matrix = column_matrix(column)
    per_row = int(np.prod(spec.input_shape))
    if matrix.shape[1] != per_row and len(matrix):
        raise StillError(f"dataset {spec.name!r}: input rows hold {matrix.shape[1]} values, expected {per_row} "
                         f"{tuple(spec.input_shape)}")
    return matrix.reshape(len(matrix), *spec.input_shape)


def image_bytes(column: Any) -> list[bytes | None]:
    """The encoded bytes of each row of an image column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.Array):
        if pa.types.is_struct(column.type):
            column = column.field("bytes")
        return column.to_pylist()
    return [row["bytes"] if isinstance(row, dict) else row for row in np.asarray(column, dtype=object)]


def decode_images(column: Any, image: dict[str, Any], input_shape: tuple[int, ...], ids: Any,
                  source: str) -> np.ndarray:
    """Decodes encoded images to uint8 ``(n, C, H, W)`` of ``input_shape``."""
    blobs = image_bytes(column)
    out = np.empty((len(blobs), *input_shape), dtype=np.uint8)
    for row, blob in enumerate(blobs):
        pixels = decode_image(blob, image, lambda: _row_name(ids, row), source)
        if pixels.shape != input_shape:
            raise StillError(
                f"dataset {source!r}: image {_row_name(ids, row)} is {_size(pixels.shape)} after preprocessing, "
                f"others are {_size(input_shape)}; set data.image.resize and data.image.crop to give every image "
                "one size"
            )
        out[row] = pixels
    return out


def decode_image(blob: bytes | None, image: dict[str, Any], name: Any, source: str) -> np.ndarray:
    """One image's bytes to uint8 ``(C, H, W)``: decode, convert, resize, centre crop.

    Args:
        blob: PNG/JPEG (anything Pillow reads) bytes.
        image: ``{"mode", "resize", "crop"}``; mode ``auto`` keeps grey images ``L``.
        name: What to call the image in errors (or a callable giving it).
        source: The dataset, for errors.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if not blob:
            raise ValueError("empty")
        with Image.open(io.BytesIO(blob)) as img:
            mode = image["mode"] if image["mode"] != "auto" else ("L" if img.mode in ("L", "1", "I;16") else "RGB")
            img = img.convert(mode)
            if image.get("resize"):
                img = _resize_shorter(img, int(image["resize"]))
            if image.get("crop"):
                img = _centre_crop(img, int(image["crop"]))
            pixels = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        label = name() if callable(name) else name
        raise StillError(f"dataset {source!r}: image {label} cannot be decoded ({type(exc).__name__}: "
                         f"{str(exc)[:80]})") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _resize_shorter(img: Any, size: int) -> Any:
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img if target == (w, h) else img.resize(target, Image.Resampling.BILINEAR)


def _centre_crop(img: Any, size: int) -> Any:
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"{w}x{h} is smaller than data.image.crop={size}")
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _row_name(ids: Any, row: int) -> str:
    if ids is None:
        return f"at row {row}"
    value = ids[row]
    value = value.as_py() if hasattr(value, "as_py") else value
    return f"id {value!r}"


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[-1]}x{shape[-2]} ({shape[0]} channel{'s' if shape[0] != 1 else ''})"
