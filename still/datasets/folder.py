"""Image folders (``<root>/<class_name>/<image>.png|jpg|…``) as a cached Parquet dataset.

The folder is read once into ``$STILL_CACHE_DIR/datasets/folder-<stamp>/parquet/``
with columns ``id`` (row number, files in sorted path order), ``image`` (the encoded
bytes, not decoded: the cache is no bigger than the folder), ``label`` (the index of
the class folder, names sorted) and ``path``. The cache is found again by a stamp of
the file names, sizes and modification times; the dataset's fingerprint is the
content hash of the cached table, so a copy of the same folder elsewhere has the same
fingerprint (and a store made from it stays valid), and a changed image does not.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Any

import pyarrow as pa

from still.config import DataConfig
from still.datasets.cache import cache_root, chunks, part_files, read_info, table_fingerprint, write_cache
from still.datasets.spec import DatasetSpec, split_rule
from still.errors import StillError
from still.storage import Location

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(location: Location) -> dict[str, list[str]] | None:
    """``{class_name: [paths]}`` when ``location`` is a folder of class folders of images, else None."""
    if not location.fs.isdir(location.path):
        return None
    classes: dict[str, list[str]] = {}
    for path in sorted(location.fs.find(location.path)):
        relative = posixpath.relpath(path, location.path).split("/")
        if len(relative) == 2 and relative[1].lower().endswith(IMAGE_SUFFIXES) and relative[1][:1] != ".":
            classes.setdefault(relative[0], []).append(path)
    return classes or None


def resolve_image_folder(location: Location, classes: dict[str, list[str]], cfg: DataConfig) -> DatasetSpec:
    """The spec of an image folder, building its Parquet cache on first use."""
    from still.datasets.parquet import channel_mean, image_settings

    stamp = hashlib.sha256()
    for path in (p for name in sorted(classes) for p in classes[name]):
        info = location.fs.info(path)
        stamp.update(f"{path}\0{info.get('size')}\0{info.get('mtime', info.get('LastModified', ''))}\n".encode())
    directory = cache_root() / "datasets" / f"folder-{stamp.hexdigest()[:16]}" / "parquet"
    info = read_info(directory)
    if info is None:
        table = _folder_table(location, classes)
        info = {"fingerprint": table_fingerprint(table.drop_columns(["path"])), "num_rows": table.num_rows,
                "classes": sorted(classes), "source": location.uri}
        write_cache(chunks(table), directory, info)
    first = location.fs.cat_file(classes[sorted(classes)[0]][0])
    image, shape = image_settings(first, cfg, f"{classes[sorted(classes)[0]][0]!r}")
    return DatasetSpec(
        name=location.uri,
        files=part_files(directory),
        filesystem_uri=str(directory),
        fingerprint=info["fingerprint"],
        num_rows=info["num_rows"],
        num_classes=len(info["classes"]),
        class_names=tuple(info["classes"]),
        input_shape=shape,
        id_column="id",
        feature_column="image",
        label_column="label",
        split_column=None,
        input_scale=1 / 255,
        split_rule=split_rule(cfg, None),
        image=image,
        mean=channel_mean(cfg, shape, "images"),
        std=tuple(cfg.image.std),
    )


def _folder_table(location: Location, classes: dict[str, list[str]]) -> pa.Table:
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(sorted(classes)):
        paths += classes[name]
        labels += [label] * len(classes[name])
    blobs: list[Any] = [location.fs.cat_file(path) for path in paths]
    if not paths:
        raise StillError(f"image folder {location.uri!r} holds no images")
    return pa.table({
        "id": pa.array(range(len(paths)), pa.int64()),
        "image": pa.array(blobs, pa.binary()),
        "label": pa.array(labels, pa.int64()),
        "path": pa.array([posixpath.relpath(p, location.path) for p in paths]),
    })
