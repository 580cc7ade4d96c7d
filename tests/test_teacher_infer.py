"""still infer end to end on builtin:digits: real local Ray, real Parquet, real MLflow."""

from __future__ import annotations

import math
import time

import mlflow
import numpy as np
import pyarrow as pa
import pytest

from _teacher_fixtures import train_digits_teacher
from still.config import load_config
from teacher_infer import infer as infer_mod
from teacher_infer import store as st
from teacher_infer import teachers
from teacher_infer.config import InferConfig


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", steps=300)


def _config(teacher, root, *overrides):
    return load_config(InferConfig, None, [f"teacher.uri={teacher}", f"store.root={root}", "data.source=builtin:digits",
                                           *overrides])


@pytest.mark.timeout(240)
def test_infer_modes_schema_metrics_and_cache_hit(ray_cluster, teacher_ckpt, tmp_path, mlflow_sqlite, monkeypatch):
    root = tmp_path / "stores"
    cases = [
        (("store.mode=dense", "store.dtype=float32"), pa.float32(), ["logits"]),
        (("store.mode=dense", "store.dtype=float16", "teacher.feature_layer=body"), pa.float16(), ["logits", "features"]),
        (("store.mode=topk", "store.k=3"), pa.float16(), ["topk_idx", "topk_logit", "logsumexp"]),
    ]
    keys = set()
    for overrides, value_type, out_columns in cases:
        summary = infer_mod.run_infer(_config(teacher_ckpt, root, *overrides))
        assert summary["rows"] == 1797 and summary["cache_hit"] is False
        assert summary["teacher_accuracy"] > 0.8
        keys.add(summary["key"])
        store = st.open_store(summary["store"])
        assert store.uri == str(root / summary["key"])
        table = store.read_table()
        assert table.column_names == ["id", "view", "label", "split", "input", *out_columns]
        assert table.num_rows == 1797 and len(np.unique(table["id"].to_numpy())) == 1797
        assert table.schema.field("input").type == pa.list_(pa.uint8(), 64)
        value_column = "logits" if "logits" in out_columns else "topk_logit"
        assert table.schema.field(value_column).type.value_type == value_type
        m = store.manifest
        for field in ("format_version", "key", "teacher", "dataset", "preprocessing", "storage", "num_classes",
                      "class_names", "task", "rows", "shards", "teacher_metrics", "bytes_per_row",
                      "package_versions", "created", "split_rule"):
            assert field in m, field
        assert m["teacher"]["fingerprint"] == teachers.load_teacher(str(teacher_ckpt)).fingerprint
        metrics = m["teacher_metrics"]
        assert 0 <= metrics["ece"] < 0.2 and metrics["nll"] > 0 and metrics["mean_entropy"] > 0
        assert set(metrics["per_split"]) == {"train", "val", "test"}
        assert sum(v["rows"] for v in metrics["per_split"].values()) == 1797
        assert all(s["sha256"] and s["rows"] for s in m["shards"]) and m["bytes_per_row"] > 0
        # auto shard size: two shards per CPU of the Ray cluster (4 in the fixture), not of this machine
        cluster_cpus = int(ray_cluster.cluster_resources()["CPU"])
        assert [s["rows"] for s in m["shards"]][0] == math.ceil(1797 / (2 * cluster_cpus))
        assert st.verify_store(store.uri)["ok"]
        full = st.dense_teacher_logits({c: table[c] for c in table.column_names}, 10)
        assert (full.argmax(1) == table["label"].to_numpy()).mean() == pytest.approx(metrics["accuracy"])
    assert len(keys) == 3
    # the top-k store computed its metrics from the FULL logits: same as the dense store's
    dense = st.open_store(str(root / sorted(keys)[0])).manifest["teacher_metrics"]
    assert summary["teacher_accuracy"] == pytest.approx(dense["accuracy"])

    # a second identical run: the existing store, without loading the teacher or running Ray
    def boom(*_a, **_k):
        raise AssertionError("the teacher must not be loaded on a cache hit")

    monkeypatch.setattr(teachers, "load_teacher", boom)
    monkeypatch.setattr(infer_mod, "_run_shards", boom)
    start = time.perf_counter()
    again = infer_mod.run_infer(_config(teacher_ckpt, root, "store.mode=topk", "store.k=3"))
    assert time.perf_counter() - start < 5
    assert again["cache_hit"] is True and again["key"] == summary["key"] and again["rows"] == 1797
    client = mlflow.MlflowClient(tracking_uri=mlflow_sqlite)
    experiment = client.get_experiment_by_name("still-infer")
    runs = client.search_runs([experiment.experiment_id])
    hits = [r for r in runs if r.data.tags.get("cache_hit") == "true"]
    assert len(runs) == 4 and len(hits) == 1
    assert hits[0].data.tags["store_key"] == summary["key"]
    full_run = next(r for r in runs if r.data.tags.get("store_key") == summary["key"] and r is not hits[0])
    assert full_run.data.metrics["rows"] == 1797 and full_run.data.metrics["rows_per_s"] > 0
    assert full_run.data.params["store.mode"] == "topk"


@pytest.mark.timeout(120)
def test_memory_store_root(ray_cluster, teacher_ckpt):
    config = _config(teacher_ckpt, "memory://still-tests/stores", "store.mode=topk", "store.k=2",
                     "tracking.enabled=false", "infer.shard_rows=600")
    summary = infer_mod.run_infer(config)
    assert summary["store"].startswith("memory://") and summary["rows"] == 1797
    assert summary["shards_written"] == 3
    assert st.verify_store(summary["store"])["ok"]
    assert st.open_store(summary["store"]).read_table(["id"]).num_rows == 1797
