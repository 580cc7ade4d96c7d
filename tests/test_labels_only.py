"""Labels-only stores: no inputs inside, joined back to the source by the shard plan.

A user's Parquet dataset in two files with small row groups (so shards cut across
files and row groups), a labels-only and a self-contained store of the same teacher:
the joined inputs equal the stored ones byte for byte, a student trains from the
labels-only store in process and on a Ray Train worker, and a changed or missing
source is refused by name.
"""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from still.config import DataConfig, load_config
from still.datasets import load_arrays, resolve_dataset
from still.errors import StillError
from student_train.config import TrainConfig
from student_train.data import resolve_source
from student_train.feed import load_split_arrays
from student_train.driver import JobOptions, train_job
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.infer import run_infer


def _user_parquet(directory):
    """builtin:digits as a user would have it: float features in [0, 1], two files, 100-row groups."""
    spec = resolve_dataset(DataConfig(source="builtin:digits"))
    ids, x, y = load_arrays(spec, splits=("train", "val", "test"))
    directory.mkdir()
    half = len(ids) // 2 + 7
    for name, rows in (("a.parquet", slice(0, half)), ("b.parquet", slice(half, None))):
        flat = x[rows].reshape(len(ids[rows]), -1)
        table = pa.table({"id": ids[rows], "features": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), 64),
                          "label": y[rows]})
        pq.write_table(table, directory / name, row_group_size=100)
    return directory


@pytest.fixture(scope="module")
def stores(ray_cluster, digits_teacher, tmp_path_factory):
    base = tmp_path_factory.mktemp("labels-only")
    data = _user_parquet(base / "data")
    out = {}
    for include in ("false", "true"):
        cfg = load_config(InferConfig, None, [
            f"data.source={data}", f"teacher.uri={digits_teacher}", f"store.root={base / 'stores'}",
            "store.mode=topk", "store.k=5", f"store.include_inputs={include}", "infer.shard_rows=333",
            "tracking.enabled=false"])
        out[include] = run_infer(cfg)
    return base, data, out


@pytest.mark.timeout(300)
def test_labels_only_store_joins_back_exactly(stores):
    base, data, out = stores
    labels_only, self_contained = out["false"], out["true"]
    assert labels_only["key"] != self_contained["key"]
    manifest = st.open_store(labels_only["store"]).manifest
    assert manifest["storage"]["include_inputs"] is False and "input" not in manifest["columns"]
    assert manifest["dataset"]["source"] == str(data)
    assert [s["source_rows"] for s in manifest["shards"][2:4]] == [[[0, 666, 905], [1, 0, 94]], [[1, 94, 427]]]
    assert labels_only["bytes_per_row"] < 0.7 * self_contained["bytes_per_row"]
    assert st.verify_store(labels_only["store"])["ok"]

    joined = load_split_arrays(resolve_source([labels_only["store"]], None))
    stored = load_split_arrays(resolve_source([self_contained["store"]], None))
    for split in ("train", "val", "test"):
        assert set(joined[split]) == set(stored[split])
        for name, values in stored[split].items():
            np.testing.assert_array_equal(joined[split][name], values, err_msg=f"{split}/{name}")


@pytest.mark.timeout(600)
def test_student_trains_from_a_labels_only_store(stores, tmp_path):
    _, _, out = stores
    results = {}
    for workers in (0, 1):  # in process (pyarrow), and a Ray Train worker (Ray Data, one task per shard)
        cfg = load_config(TrainConfig, None, [
            f"store.uri={out['false']['store']}", "student.width=64", "train.epochs=8", "train.seed=0",
            f"scaling.num_workers={workers}", "scaling.cpus_per_worker=0.5", "tracking.enabled=false",
            f"train.output_dir={tmp_path / str(workers)}"])
        results[workers] = train_job(cfg, run_name=f"labels-only-{workers}", options=JobOptions(quiet=True))
    for summary in results.values():
        assert summary["student_test_accuracy"] > 0.9, summary["student_test_accuracy"]


@pytest.mark.timeout(300)
def test_changed_or_missing_source_is_refused(stores, tmp_path):
    base, data, out = stores
    uri = out["false"]["store"]
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    table = pq.read_table(data / "b.parquet")
    x = np.stack(table["features"].to_numpy(zero_copy_only=False))[::-1].copy()
    changed = table.set_column(1, "features", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64))
    try:
        pq.write_table(changed, data / "b.parquet", row_group_size=100)
        with pytest.raises(StillError, match=rf"labels-only, and its source dataset '{data}' has changed"):
            resolve_source([uri], None)
        shutil.rmtree(data)
        with pytest.raises(StillError, match=rf"source dataset '{data}', which cannot be opened: .*does not exist"):
            resolve_source([uri], None)
    finally:
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(moved, data)
    restored = resolve_source([uri], None)  # the restored source is accepted again
    assert restored.dataset is not None and restored.dataset.num_rows * restored.views == restored.num_rows
