"""The store reader API: dense_teacher_logits golden values, compression, open/verify."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from still.errors import StillError
from still.storage import resolve
from teacher_infer import store as st


def _softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_dense_teacher_logits_golden():
    # Hand-checked: logits [2, 1, 0, -1], k = 2 -> p = [0.6439, 0.2369, 0.0871, 0.0321],
    # lse = 2.4402, tail mass 0.1192 -> each tail logit log(0.1192 / 2) + lse = log((1 + e^-1) / 2) = -0.3799.
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32)
    packed = st.compress(logits, "topk", 2, "float32")
    assert packed["topk_idx"].tolist() == [[0, 1]]
    np.testing.assert_allclose(packed["logsumexp"], [2.4401897], rtol=1e-6)
    full = st.dense_teacher_logits(packed, 4)
    np.testing.assert_allclose(full, [[2.0, 1.0, -0.3798854, -0.3798854]], rtol=1e-5)
    probs = _softmax(full)
    np.testing.assert_allclose(probs[0, :2], [0.6439142, 0.2368828], rtol=1e-5)
    np.testing.assert_allclose(probs[0, 2:].sum(), 0.0871443 + 0.0320586, rtol=1e-5)


def test_dense_teacher_logits_reproduces_topk_probs_and_tail():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(64, 100)).astype(np.float32)
    for dtype in ("float32", "float16"):
        packed = st.compress(logits, "topk", 7, dtype)
        # as Ray Data hands list columns over: object arrays of 1-D arrays
        as_objects = {k: (np.array(list(v), dtype=object) if v.ndim == 2 else v) for k, v in packed.items()}
        full = st.dense_teacher_logits(as_objects, 100)
        assert full.shape == (64, 100) and full.dtype == np.float32
        p_true = _softmax(logits)
        p_rebuilt = _softmax(full)
        idx = packed["topk_idx"].astype(np.int64)
        stored = np.exp(packed["topk_logit"].astype(np.float64) - packed["logsumexp"][:, None])
        np.testing.assert_allclose(np.take_along_axis(p_rebuilt, idx, 1), stored, rtol=1e-4, atol=1e-7)
        tol = 1e-6 if dtype == "float32" else 5e-3
        np.testing.assert_allclose(np.take_along_axis(p_rebuilt, idx, 1), np.take_along_axis(p_true, idx, 1), atol=tol)
        tail_true = 1 - np.take_along_axis(p_true, idx, 1).sum(1)
        tail_rebuilt = 1 - np.take_along_axis(p_rebuilt, idx, 1).sum(1)
        np.testing.assert_allclose(tail_rebuilt, tail_true, atol=tol)
    dense = st.dense_teacher_logits(st.compress(logits, "dense", 0, "float32"), 100)
    np.testing.assert_array_equal(dense, logits)


def test_topk_k_equals_classes_is_exact():
    logits = np.array([[0.5, -1.0, 3.0]], dtype=np.float32)
    full = st.dense_teacher_logits(st.compress(logits, "topk", 3, "float32"), 3)
    np.testing.assert_allclose(full, logits, rtol=1e-6)


def _write_tiny_store(directory, mode="topk"):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(10, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 10)
    splits = np.zeros(10, dtype=np.int8)
    stats = st.empty_stats()
    st.accumulate_stats(stats, st.row_stats(logits, labels), splits, True)
    table = st.build_table(np.arange(10), labels, splits, st.compress(logits, mode, 3, "float16"),
                           inputs=rng.integers(0, 255, (10, 4)).astype(np.uint8))
    data = st.shard_bytes(table, stats)
    loc = resolve(str(directory))
    loc.join(st.shard_name(0)).write_atomic(data)
    manifest = {
        "format": st.FORMAT_NAME, "format_version": st.FORMAT_VERSION, "key": "abc", "rows": 10,
        "num_classes": 5, "storage": {"mode": mode, "k": 3 if mode == "topk" else None, "dtype": "float16",
                                      "include_inputs": True, "feature_layer": ""},
        "preprocessing": {"input_shape": [4], "input_scale": 1 / 255},
        "teacher": {"fingerprint": "f" * 64}, "dataset": {"name": "x", "fingerprint": "d"},
        "shards": [st.shard_record(st.shard_name(0), data, 10)],
        "teacher_metrics": st.finish_metrics(stats),
    }
    st.write_manifest(loc, manifest)
    return loc, logits


def test_open_verify_and_corruption(tmp_path):
    loc, logits = _write_tiny_store(tmp_path / "s")
    store = st.open_store(loc.uri)
    assert (store.key, store.num_classes, store.mode, store.k, store.input_shape) == ("abc", 5, "topk", 3, (4,))
    assert store.shard_uris() == [str(tmp_path / "s" / "part-00000.parquet")]
    table = store.read_table()
    assert table.column_names == ["id", "view", "label", "split", "input", "topk_idx", "topk_logit", "logsumexp"]
    full = st.dense_teacher_logits({c: table[c] for c in table.column_names}, 5)
    assert full.argmax(1).tolist() == logits.argmax(1).tolist()
    assert st.verify_store(loc.uri) == {"ok": True, "problems": [], "rows": 10, "shards": 1}
    assert json.loads(pq.ParquetFile(loc.join("part-00000.parquet").path).metadata.metadata[st.STATS_METADATA_KEY])
    # corrupt a byte in the middle of the shard
    path = tmp_path / "s" / "part-00000.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = st.verify_store(loc.uri)
    assert not result["ok"] and any("checksum" in p for p in result["problems"])


def test_open_store_rejects_non_stores(tmp_path):
    with pytest.raises(StillError, match="does not exist"):
        st.open_store(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StillError, match="not a store"):
        st.open_store(str(tmp_path / "empty"))
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "part-00000.parquet").write_bytes(b"x")
    with pytest.raises(StillError, match="incomplete"):
        st.open_store(str(tmp_path / "partial"))


def test_memory_store_roundtrip():
    loc, _ = _write_tiny_store("memory://still-test/reader")
    assert st.verify_store(loc.uri)["ok"]
    assert st.open_store("memory://still-test/reader").read_table().num_rows == 10
