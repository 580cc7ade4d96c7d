"""The store reader: open/verify, sparse teacher arrays, format versions, corruption."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _teacher_fixtures import write_small_store
from still.errors import StillError
from teacher_infer import store as st
from teacher_infer.targets import target_from_columns


def test_open_verify_and_corruption(tmp_path):
    uri, logits = write_small_store(tmp_path / "s")
    store = st.open_store(uri)
    assert (store.key, store.num_classes, store.mode, store.k, store.input_shape) == ("k" * 16, 5, "topk", 3, (4,))
    assert store.soft_labels.temperatures == (1.0, 2.0, 4.0, 8.0) and store.max_support == 3
    assert [s["name"] for s in store.manifest["shards"]] == ["part-00000.parquet"]
    table = store.read_table()
    assert table.column_names == ["id", "view", "label", "split", "input",
                                  "topk_idx", "topk_logit", "logsumexp", "tail_lognorm"]
    arrays = st.teacher_arrays({c: table[c] for c in table.column_names}, store.soft_labels, store.max_support)
    target = target_from_columns(arrays, store.soft_labels)
    assert target.top1().tolist() == logits.argmax(1).tolist()
    assert st.verify_store(uri) == {"ok": True, "problems": [], "rows": 10, "shards": 1}
    stats, rows = st.read_shard_stats(store.location.join("part-00000.parquet"))
    assert rows == 10 and stats["metrics"]["all"]["n"] == 10
    path = tmp_path / "s" / "part-00000.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = st.verify_store(uri)
    assert not result["ok"] and any("checksum" in p for p in result["problems"])


@pytest.mark.parametrize("mode", ["dense", "topk", "sampled"])
def test_teacher_arrays_stay_sparse_and_fixed_width(tmp_path, mode):
    uri, _ = write_small_store(tmp_path / mode, mode=mode, rows=40, classes=50, k=4)
    store = st.open_store(uri)
    table = store.read_table()
    arrays = st.teacher_arrays({c: table[c] for c in table.column_names}, store.soft_labels, store.max_support,
                               prefix="t0_")
    widths = {name: a.shape[1:] for name, a in arrays.items()}
    grid = (len(store.soft_labels.temperatures),)
    expected = {
        "dense": {"t0_logits": (50,)},
        "topk": {"t0_topk_idx": (4,), "t0_topk_logp": (4,), "t0_topk_tail": grid},
        "sampled": {"t0_sample_idx": (store.max_support,), "t0_sample_logp": (store.max_support,),
                    "t0_sample_log_inclusion": (store.max_support,), "t0_sample_norm": grid},
    }[mode]
    assert widths == expected
    if mode == "sampled":
        assert store.max_support < 50  # 16 draws: a row never holds all 50 classes
        drawn = np.isfinite(arrays["t0_sample_log_inclusion"])  # padding has inclusion +inf: weight 0
        assert drawn.any(axis=1).all() and (drawn.sum(axis=1) < store.max_support).any()
    if mode != "dense":
        assert all(a.dtype in (np.float32, np.int32) for a in arrays.values())
    # Ray Data hands list columns over as object arrays of arrays: same result
    objects = {c: np.array(table[c].to_pylist(), dtype=object) if pa.types.is_list(table[c].type) else table[c]
               for c in table.column_names}
    again = st.teacher_arrays(objects, store.soft_labels, store.max_support, prefix="t0_")
    for name in arrays:
        np.testing.assert_array_equal(again[name], arrays[name])


def test_verify_catches_bad_teacher_values(tmp_path):
    uri, _ = write_small_store(tmp_path / "s", mode="sampled", rows=12)
    path = tmp_path / "s" / "part-00000.parquet"
    table = pq.read_table(path)
    counts = table["sample_count"].to_pylist()
    counts[3][0] += 1  # one row now claims 17 draws of 16
    bad = table.set_column(table.column_names.index("sample_count"), "sample_count",
                           pa.array(counts, type=table["sample_count"].type))
    pq.write_table(bad, path)
    problems = st.verify_store(uri)["problems"]
    assert any("do not add up to store.samples=16" in p for p in problems)


def test_format_v1_store_is_refused_with_a_rerun_hint(tmp_path):
    uri, _ = write_small_store(tmp_path / "s")
    manifest_path = tmp_path / "s" / st.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StillError, match=r"format version 1; this still reads version 2 only: rerun still infer"):
        st.open_store(uri)
    assert not st.verify_store(uri)["ok"]
    manifest["format_version"] = 3
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StillError, match="upgrade still to read it, or rerun still infer"):
        st.open_store(uri)


def test_the_format_v1_reader_refuses_a_v2_store(tmp_path):
    """The other way round: the reader still shipped before format v2 (from git history)."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", "-C", str(repo), "log", "--format=%H", "--", "teacher_infer/store.py"],
                          capture_output=True, text=True)
    old = ""
    for commit in done.stdout.split() if done.returncode == 0 else []:
        shown = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:teacher_infer/store.py"],
                               capture_output=True, text=True)
        if "\nFORMAT_VERSION = 1\n" in shown.stdout:
            old = shown.stdout
            break
    if not old:
        pytest.skip("no git history with the format v1 reader in this checkout")
    (tmp_path / "store_v1.py").write_text(old)
    module_spec = importlib.util.spec_from_file_location("store_v1", tmp_path / "store_v1.py")
    v1 = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(v1)
    assert v1.FORMAT_VERSION == 1
    uri, _ = write_small_store(tmp_path / "s")
    with pytest.raises(StillError, match="has format version 2; this still reads version 1"):
        v1.open_store(uri)


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
    uri, _ = write_small_store("memory://still-test/reader")
    assert st.verify_store(uri)["ok"]
    assert st.open_store("memory://still-test/reader").read_table().num_rows == 10


def test_inspect_prints_the_fidelity_table(tmp_path, capsys):
    uri, _ = write_small_store(tmp_path / "s")
    summary = st.cli_store("inspect", uri)
    assert set(summary["fidelity"]) == {"1", "2", "4", "8"}
    assert set(summary["fidelity"]["4"]) >= {"kl_mean", "kl_p99", "tail_mass_abs_err"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("fidelity:") and "on 10 rows" in printed[0]
    assert printed[1].split()[:3] == ["T", "KL", "mean"] and [line.split()[0] for line in printed[2:]] == [
        "1", "2", "4", "8"]
