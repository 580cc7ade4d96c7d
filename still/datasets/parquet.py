"""Any Parquet dataset URI (local, file://, s3://, gs://, memory://) to a DatasetSpec."""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from still.config import DataConfig
from still.datasets.cache import cache_root, part_files, read_info, write_cache
from still.datasets.inputs import decode_image, image_bytes, is_image_type
from still.datasets.spec import DatasetSpec, split_rule
from still.errors import StillError
from still.storage import Location, resolve


def resolve_parquet(cfg: DataConfig) -> DatasetSpec:
    """Checks a Parquet dataset's columns and describes it, reading only footers and labels.

    Without an id column, a copy with ``id`` = global row index (files in sorted order)
    is cached under ``$STILL_CACHE_DIR/datasets/parquet-<fingerprint>/``.

    Raises:
        StillError: The URI is missing or unreadable, holds no .parquet files, or lacks
            the feature or label column (the message lists the columns it has).
    """
    uri = cfg.source
    location = resolve(uri)
    files = _list_parquet(location, uri)
    fs = location.arrow_fs()
    with _readable(uri):
        footers = [_footer(location, path) for path in files]
        metadata = [pq.ParquetFile(pa.BufferReader(footer)).metadata for _, footer in footers]
        schema = metadata[0].schema.to_arrow_schema()
        _check_columns(schema, cfg)
        labels = pq.read_table(files, columns=[cfg.label_column], filesystem=fs)[cfg.label_column]
        field = schema.field(cfg.feature_column)
        if is_image_type(field.type):
            image, input_shape = _image_layout(field, fs, files[0], cfg)
            input_scale = 1 / 255
        else:
            image = None
            input_shape, input_scale = _feature_layout(field, fs, files[0], uri)
        task, num_classes = label_layout(labels)
    fingerprint = _fingerprint(location, files, footers)
    split_column = cfg.split_column if cfg.split_column in schema.names else None
    if cfg.id_column in schema.names:
        uris, filesystem_uri = tuple(_uri(location, path) for path in files), location.uri
    else:
        directory = _with_ids(fs, files, cfg.id_column, fingerprint)
        uris, filesystem_uri = part_files(directory), str(directory)
    return DatasetSpec(
        name=uri,
        files=uris,
        filesystem_uri=filesystem_uri,
        fingerprint=fingerprint,
        num_rows=sum(m.num_rows for m in metadata),
        num_classes=num_classes,
        class_names=tuple(str(i) for i in range(num_classes)),
        input_shape=input_shape,
        id_column=cfg.id_column,
        feature_column=cfg.feature_column,
        label_column=cfg.label_column,
        split_column=split_column,
        input_scale=input_scale,
        split_rule=split_rule(cfg, split_column),
        task=task,
        image=image,
        mean=channel_mean(cfg, input_shape, "images" if image else "inputs"),
        std=tuple(cfg.image.std),
    )


def channel_mean(cfg: DataConfig, input_shape: tuple[int, ...], what: str) -> tuple[float, ...]:
    """``data.image.mean``, checked to have one value per channel (the first axis of the input).

    Raises:
        StillError: Naming the key, the source and its shape.
    """
    mean = tuple(cfg.image.mean)
    if mean and (len(input_shape) < 2 or input_shape[0] != len(mean)):
        channels = f"{input_shape[0]} channel(s)" if len(input_shape) >= 2 else "no channel axis"
        raise StillError(f"data.image.mean has {len(mean)} values but the {what} of {cfg.source!r} have {channels} "
                         f"(shape {tuple(input_shape)}, channels first)")
    return mean


def _image_layout(field: pa.Field, fs: pafs.FileSystem, first_file: str, cfg: DataConfig
                  ) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The resolved image settings and input shape, from the first image of the dataset."""
    first = next(pq.ParquetFile(first_file, filesystem=fs).iter_batches(batch_size=1, columns=[field.name]))
    return image_settings(image_bytes(first.column(0))[0], cfg, "the first image")


def image_settings(first: bytes | None, cfg: DataConfig, name: str) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Resolves ``data.image`` against a dataset's first image: the decode settings and (C, H, W).

    Raises:
        StillError: The image does not decode.
    """
    image = {"mode": cfg.image.mode, "resize": cfg.image.resize, "crop": cfg.image.crop}
    pixels = decode_image(first, image, name, cfg.source)
    image["mode"] = "L" if pixels.shape[0] == 1 else "RGB"
    return image, tuple(pixels.shape)


def label_layout(labels: pa.ChunkedArray | pa.Array) -> tuple[str, int]:
    """The task and number of classes a label column implies.

    Integers: ``multiclass`` with max + 1 classes. A fixed-size list (multi-hot): ``multilabel``
    with its width. A list of class ids: ``multilabel`` with max id + 1.
    """
    kind = labels.type
    if pa.types.is_fixed_size_list(kind):
        return "multilabel", kind.list_size
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        flat = pc.list_flatten(labels)
        return "multilabel", int(pc.max(flat).as_py() or 0) + 1
    return "multiclass", int(pc.max(labels).as_py()) + 1


@contextlib.contextmanager
def _readable(uri: str) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowException, OSError) as exc:
        raise StillError(f"dataset {uri!r} is not readable Parquet: {exc}".splitlines()[0]) from None


def _list_parquet(location: Location, uri: str) -> list[str]:
    if not location.exists():
        raise StillError(f"dataset {uri!r} does not exist")
    if location.fs.isfile(location.path):
        return [location.path]
    files = sorted(
        path
        for path in location.fs.find(location.path)
        if path.endswith(".parquet")
        and not any(part[:1] in "._" for part in posixpath.relpath(path, location.path).split("/"))
    )
    if not files:
        raise StillError(f"dataset {uri!r} holds no .parquet files")
    return files


def _footer(location: Location, path: str) -> tuple[int, bytes]:
    """Returns a file's size and its Parquet footer (metadata, length, magic)."""
    size = location.fs.size(path)
    tail = location.fs.cat_file(path, start=max(size - 8, 0))
    length = int.from_bytes(tail[:4], "little")
    if size < 12 or tail[4:] != b"PAR1" or length + 12 > size:
        raise StillError(f"{_uri(location, path)} is not a Parquet file")
    return size, location.fs.cat_file(path, start=size - 8 - length)


def _fingerprint(location: Location, files: list[str], footers: list[tuple[int, bytes]]) -> str:
    """sha256 over each file's relative name, size and footer: cheap and content-sensitive."""
    digest = hashlib.sha256()
    for path, (size, footer) in zip(files, footers):
        name = posixpath.relpath(path, location.path) if path != location.path else posixpath.basename(path)
        digest.update(f"{name}\0{size}\0".encode())
        digest.update(footer)
    return digest.hexdigest()


def _check_columns(schema: pa.Schema, cfg: DataConfig) -> None:
    for role, column in (("feature", cfg.feature_column), ("label", cfg.label_column)):
        if column not in schema.names:
            raise StillError(
                f"dataset {cfg.source!r} has no {role} column {column!r} (data.{role}_column); "
                f"its columns are: {', '.join(schema.names)}"
            )
    label_type = schema.field(cfg.label_column).type
    item = label_type.value_type if pa.types.is_list(label_type) or pa.types.is_fixed_size_list(label_type) else None
    if not (pa.types.is_integer(label_type) or (item is not None and (pa.types.is_integer(item)
                                                                     or pa.types.is_boolean(item)))):
        raise StillError(
            f"dataset {cfg.source!r}: label column {cfg.label_column!r} must be integers (multi-class), or a "
            f"multi-hot fixed-size list or a list of class ids (multi-label); got {label_type}"
        )


def _feature_layout(
    field: pa.Field, fs: pafs.FileSystem, first_file: str, uri: str
) -> tuple[tuple[int, ...], float]:
    """Returns (input_shape, input_scale) of a fixed-size list, list or tensor column."""
    kind = field.type
    if isinstance(kind, pa.FixedShapeTensorType):
        shape = tuple(kind.shape)
    elif pa.types.is_fixed_size_list(kind):
        shape = (kind.list_size,)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        first = next(
            pq.ParquetFile(first_file, filesystem=fs).iter_batches(batch_size=1, columns=[field.name])
        )
        shape = (len(first.column(0)[0]),)
    else:
        shape = ()
    if not shape or not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
        raise StillError(
            f"dataset {uri!r}: feature column {field.name!r} must be a fixed-size list or tensor of numbers, "
            f"got {kind}"
        )
    return shape, 1 / 255 if kind.value_type == pa.uint8() else 1.0


def _with_ids(fs: pafs.FileSystem, files: list[str], id_column: str, fingerprint: str) -> Path:
    """Returns a cached copy of the data with ``id_column`` = global row index, building it once."""
    directory = cache_root() / "datasets" / f"parquet-{fingerprint[:16]}" / "parquet"
    if read_info(directory) is None:
        write_cache(_numbered(fs, files, id_column), directory, {"fingerprint": fingerprint})
    return directory


def _numbered(fs: pafs.FileSystem, files: list[str], id_column: str) -> Iterator[pa.Table]:
    start = 0
    for path in files:
        table = pq.read_table(path, filesystem=fs)
        ids = np.arange(start, start + table.num_rows, dtype=np.int64)
        start += table.num_rows
        yield table.add_column(0, id_column, pa.array(ids))


def _uri(location: Location, path: str) -> str:
    return path if location.is_local else f"{location.uri.split('://')[0]}://{path}"
