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

import dataclasses
import hashlib
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from still.config import DataConfig
from still.datasets.cache import ROWS_PER_FILE, cache_root, part_files, read_info, table_fingerprint, write_cache
from still.datasets.spec import DatasetSpec, split_rule
from still.storage import Location

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """A folder of class folders of images, as one listing found it.

    Attributes:
        classes: ``{class_name: [image paths, sorted]}``, class names sorted.
        stamp: Hash of the images' paths, sizes and modification times (finds the cache).
    """

    classes: dict[str, list[str]]
    stamp: str


def find_image_folder(location: Location) -> ImageFolder | None:
    """The image folder at ``location`` (one recursive listing), or None when it is not one.

    A folder that holds any ``.parquet`` file is a Parquet dataset, not an image folder.
    """
    if not location.fs.isdir(location.path):
        return None
    listing = location.fs.find(location.path, detail=True)
    if any(path.endswith(".parquet") for path in listing):
        return None
    classes: dict[str, list[str]] = {}
    stamp = hashlib.sha256()
    for path in sorted(listing):  # class folder first in each path: sorted by class, then by name
        relative = posixpath.relpath(path, location.path).split("/")
        if len(relative) == 2 and relative[1].lower().endswith(IMAGE_SUFFIXES) and relative[1][:1] != ".":
            classes.setdefault(relative[0], []).append(path)
            info = listing[path]
            stamp.update(f"{path}\0{info.get('size')}\0{info.get('mtime', info.get('LastModified', ''))}\n".encode())
    return ImageFolder(classes, stamp.hexdigest()[:16]) if classes else None


def resolve_image_folder(location: Location, folder: ImageFolder, cfg: DataConfig) -> DatasetSpec:
    """The spec of an image folder, building its Parquet cache on first use (streamed, 10,000 images a file)."""
    from still.datasets.parquet import channel_mean, image_settings

    directory = cache_root() / "datasets" / f"folder-{folder.stamp}" / "parquet"
    info = read_info(directory)
    if info is None:
        info = {"num_rows": sum(len(paths) for paths in folder.classes.values()), "classes": sorted(folder.classes),
                "source": location.uri}
        write_cache(_folder_parts(location, folder, info), directory, info)
    first_path = folder.classes[sorted(folder.classes)[0]][0]
    image, shape = image_settings(location.fs.cat_file(first_path), cfg, repr(first_path))
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


def _folder_parts(location: Location, folder: ImageFolder, info: dict[str, Any]) -> Iterator[pa.Table]:
    """The cache's tables, ROWS_PER_FILE images each; sets ``info["fingerprint"]`` when exhausted.

    ``write_cache`` writes ``info`` after the last table, so the content hash of every
    image (chained over the parts, ``path`` left out) is in it by then.
    """
    rows = [(path, label) for label, name in enumerate(sorted(folder.classes)) for path in folder.classes[name]]
    digest = hashlib.sha256()
    for start in range(0, len(rows), ROWS_PER_FILE):
        part = rows[start:start + ROWS_PER_FILE]
        table = pa.table({
            "id": pa.array(range(start, start + len(part)), pa.int64()),
            "image": pa.array([location.fs.cat_file(path) for path, _ in part], pa.binary()),
            "label": pa.array([label for _, label in part], pa.int64()),
            "path": pa.array([posixpath.relpath(path, location.path) for path, _ in part]),
        })
        digest.update(table_fingerprint(table.drop_columns(["path"])).encode())
        yield table
    info["fingerprint"] = digest.hexdigest()
