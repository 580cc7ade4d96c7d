"""still infer end to end on builtin:digits: real local Ray, real Parquet, real MLflow."""

from __future__ import annotations

import math
import time
from pathlib import Path

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
from teacher_infer.targets import target_from_columns


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    return train_digits_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt", steps=300)


def _config(teacher, root, *overrides):
    return load_config(InferConfig, None, [f"teacher.uri={teacher}", f"store.root={root}", "data.source=builtin:digits",
                                           *overrides])


def _assert_shard_encodings(store_dir: Path, schema: pa.Schema) -> None:
    """Float leaves byte-stream-split without a dictionary (fast to decode, small), ids plain, every other
    column dictionary-encoded, lists of uint8 inputs and class ids included (``teacher_infer.encodings``)."""
    import pyarrow.parquet as pq

    group = pq.ParquetFile(min(store_dir.glob("part-*.parquet"))).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema.split(".")[0]: group.column(i).encodings
                 for i in range(group.num_columns)}
    for field in schema:
        value = getattr(field.type, "value_type", field.type)
        if pa.types.is_floating(value):
            assert "BYTE_STREAM_SPLIT" in encodings[field.name], (field.name, encodings[field.name])
            assert "RLE_DICTIONARY" not in encodings[field.name], (field.name, encodings[field.name])
        elif field.name != "id":
            assert "RLE_DICTIONARY" in encodings[field.name], (field.name, encodings[field.name])
    assert "RLE_DICTIONARY" not in encodings["id"]


@pytest.mark.timeout(240)
def test_infer_modes_schema_metrics_and_cache_hit(ray_cluster, teacher_ckpt, tmp_path, mlflow_sqlite, monkeypatch):
    root = tmp_path / "stores"
    cases = [
        (("store.mode=dense", "store.dtype=float32"), pa.float32(), ["logits"]),
        (("store.mode=dense", "store.dtype=float16", "teacher.feature_layers=[body]"), pa.float16(),
         ["logits", "features_body"]),
        (("store.mode=sampled", "store.samples=32", "store.sample_temperature=2"), pa.float16(),
         ["sample_idx", "sample_count", "sample_logit", "logsumexp", "lognorm"]),
        (("store.mode=topk", "store.k=3"), pa.float16(), ["topk_idx", "topk_logit", "logsumexp", "tail_lognorm"]),
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
        _assert_shard_encodings(Path(store.uri), table.schema)
        assert table.num_rows == 1797 and len(np.unique(table["id"].to_numpy())) == 1797
        assert table.schema.field("input").type == pa.list_(pa.uint8(), 64)
        value_column = {"dense": "logits", "topk": "topk_logit", "sampled": "sample_logit"}[store.mode]
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
        arrays = st.teacher_arrays({c: table[c] for c in table.column_names}, store.soft_labels, store.max_support)
        top1 = target_from_columns(arrays, store.soft_labels).top1().numpy()
        agreement = (top1 == table["label"].to_numpy()).mean()
        if store.mode == "sampled":  # 32 draws at T = 2 miss the teacher's class on a few rows
            assert agreement == pytest.approx(metrics["accuracy"], abs=0.02)
        else:
            assert agreement == pytest.approx(metrics["accuracy"])
        fidelity = summary["fidelity"]
        assert fidelity == m["fidelity"] and set(fidelity) == {"1", "2", "4", "8"}
        assert m["fidelity_rows"] == 1797  # fewer rows than infer.fidelity_rows: every row is measured
        if store.mode == "topk":
            assert fidelity["1"]["tail_mass_abs_err"] < 1e-6 and fidelity["4"]["kl_mean"] > 0
        if store.mode == "dense":
            assert fidelity["4"]["kl_mean"] < 1e-5 and fidelity["4"]["tail_mass_abs_err"] == 0
    assert len(keys) == 4
    # the top-k store computed its metrics from the FULL logits: same as the dense store's
    dense = st.open_store(str(root / sorted(keys)[0])).manifest["teacher_metrics"]
    assert summary["teacher_accuracy"] == pytest.approx(dense["accuracy"])

    # a second identical run: the existing store, without loading the teacher or running Ray
    def boom(*_a, **_k):
        raise AssertionError("the teacher must not be loaded on a cache hit")

    monkeypatch.setattr(teachers, "load_teacher", boom)
    monkeypatch.setattr(infer_mod, "run_shards", boom)
    start = time.perf_counter()
    again = infer_mod.run_infer(_config(teacher_ckpt, root, "store.mode=topk", "store.k=3"))
    assert time.perf_counter() - start < 5
    assert again["cache_hit"] is True and again["key"] == summary["key"] and again["rows"] == 1797
    client = mlflow.MlflowClient(tracking_uri=mlflow_sqlite)
    experiment = client.get_experiment_by_name("still-infer")
    runs = client.search_runs([experiment.experiment_id])
    hits = [r for r in runs if r.data.tags.get("cache_hit") == "true"]
    assert len(runs) == 5 and len(hits) == 1
    assert hits[0].data.tags["store_key"] == summary["key"]
    full_run = next(r for r in runs if r.data.tags.get("store_key") == summary["key"] and r is not hits[0])
    assert full_run.data.metrics["rows"] == 1797 and full_run.data.metrics["rows_per_s"] > 0
    assert full_run.data.params["store.mode"] == "topk"
    assert full_run.data.metrics["fidelity_tail_mass_abs_err_T1"] < 1e-6 and "fidelity_kl_p99_T8" in full_run.data.metrics


@pytest.mark.timeout(120)
def test_memory_store_root(ray_cluster, teacher_ckpt):
    config = _config(teacher_ckpt, "memory://still-tests/stores", "store.mode=topk", "store.k=2",
                     "tracking.enabled=false", "infer.shard_rows=600")
    summary = infer_mod.run_infer(config)
    assert summary["store"].startswith("memory://") and summary["rows"] == 1797
    assert summary["shards_written"] == 3
    assert st.verify_store(summary["store"])["ok"]
    assert st.open_store(summary["store"]).read_table(["id"]).num_rows == 1797


@pytest.mark.timeout(120)
def test_unlabelled_rows_stay_out_of_teacher_metrics(ray_cluster, teacher_ckpt, tmp_path):
    import pyarrow.parquet as pq

    from still.config import DataConfig
    from still.datasets import resolve_dataset

    digits = pq.read_table(resolve_dataset(DataConfig(source="builtin:digits")).files[0])
    labels = digits["label"].to_numpy()
    missing = np.arange(len(labels)) % 3 == 0
    pixels = digits["features"].combine_chunks().flatten().to_numpy().astype(np.float32) / 16  # as the teacher saw them
    data = tmp_path / "partly_labelled.parquet"
    pq.write_table(pa.table({"id": digits["id"], "features": pa.FixedSizeListArray.from_arrays(pa.array(pixels), 64),
                             "label": pa.array(labels, mask=missing)}), data)
    summary = infer_mod.run_infer(_config(teacher_ckpt, tmp_path / "stores", "store.mode=dense", "store.dtype=float32",
                                          "tracking.enabled=false", f"data.source={data}"))
    store = st.open_store(summary["store"])
    table = store.read_table(["label", "logits"])
    assert table["label"].null_count == int(missing.sum())
    metrics = store.manifest["teacher_metrics"]
    assert metrics["rows"] == len(labels) and metrics["labeled_rows"] == int((~missing).sum())
    logits = np.stack(table["logits"].to_numpy(zero_copy_only=False))
    stored_labels = table["label"].to_numpy(zero_copy_only=False)
    labelled = ~np.isnan(stored_labels.astype(float))
    expected = (logits[labelled].argmax(1) == stored_labels[labelled].astype(int)).mean()
    assert metrics["accuracy"] == pytest.approx(expected)
    # class 0 is not where unlabelled rows go: with every row counted as 0, accuracy would drop by a third
    assert metrics["accuracy"] > 0.9


@pytest.mark.timeout(300)
def test_streaming_plan_and_precision(ray_cluster, teacher_ckpt, tmp_path):
    """The streaming plan (read tasks → actor pool → write tasks) writes the fused plan's
    store exactly; the precision enters the key and the manifest and changes the logits."""
    overrides = ("store.mode=sampled", "store.samples=16", "teacher.feature_layers=[body]", "tracking.enabled=false")
    fused = infer_mod.run_infer(_config(teacher_ckpt, tmp_path / "fused", *overrides, "infer.plan=fused",
                                        "infer.shard_rows=500"))
    streaming = infer_mod.run_infer(_config(teacher_ckpt, tmp_path / "streaming", *overrides, "infer.plan=streaming",
                                            "infer.shard_rows=500"))
    assert fused["key"] == streaming["key"]  # the plan is a speed setting
    manifests = [st.open_store(s["store"]).manifest for s in (fused, streaming)]
    assert [m["inference"]["plan"] for m in manifests] == ["fused", "streaming"]
    assert manifests[1]["precision"] == "fp32" and len(manifests[1]["shards"]) == 4
    tables = [st.open_store(s["store"]).read_table().sort_by("id") for s in (fused, streaming)]
    assert tables[0].column_names == tables[1].column_names
    for name in tables[0].column_names:  # draws too: they are seeded by (key, shard)
        assert tables[0][name].equals(tables[1][name]), name

    bf16 = infer_mod.run_infer(_config(teacher_ckpt, tmp_path / "fused", "store.mode=dense", "store.dtype=float32",
                                       "infer.precision=bf16", "tracking.enabled=false"))
    fp32 = infer_mod.run_infer(_config(teacher_ckpt, tmp_path / "fused", "store.mode=dense", "store.dtype=float32",
                                       "tracking.enabled=false"))
    assert bf16["key"] != fp32["key"] and st.open_store(bf16["store"]).manifest["precision"] == "bf16"
    low, full = (np.stack(st.open_store(s["store"]).read_table(["logits"])["logits"].to_numpy(zero_copy_only=False))
                 for s in (bf16, fp32))
    assert not np.array_equal(low, full) and np.abs(low - full).max() < 0.1 * np.abs(full).max()
    assert (low.argmax(1) == full.argmax(1)).mean() > 0.98
