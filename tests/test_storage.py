"""Storage URIs resolve to one filesystem view for fsspec and pyarrow."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from still.errors import StillError
from still.storage import resolve


def test_local_paths_and_file_uris_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("stores").uri == str(tmp_path / "stores")
    assert resolve(f"file://{tmp_path}/x").uri == str(tmp_path / "x")
    assert resolve("stores").join("a", "b.parquet").uri == str(tmp_path / "stores/a/b.parquet")


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = resolve(str(tmp_path / "dir" / "manifest.json"))
    target.write_atomic(b'{"a": 1}')
    target.write_atomic(b'{"a": 2}')
    assert target.read_json() == {"a": 2}
    assert os.listdir(tmp_path / "dir") == ["manifest.json"]


def test_memory_uri_works_for_parquet_through_pyarrow():
    location = resolve("memory://still-test/storage/t.parquet")
    location.fs.makedirs("/still-test/storage", exist_ok=True)
    table = pa.table({"id": [1, 2, 3]})
    pq.write_table(table, location.path, filesystem=location.arrow_fs())
    assert pq.read_table(location.path, filesystem=location.arrow_fs()).num_rows == 3
    assert location.uri == "memory:///still-test/storage/t.parquet"


def test_local_scheme_is_refused_with_the_reason():
    with pytest.raises(StillError, match="local://"):
        resolve("local:///data")


def test_cloud_scheme_names_the_extra_when_missing():
    try:  # setup.sh installs the s3 extra (the S3 tests need it), not the gcs one
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StillError, match=r"still\[gcs\]"):
            resolve("gs://bucket/stores")
    else:
        pytest.skip("gcsfs is installed here")
