"""Resume: kill -9 a real ``still infer`` mid-run, rerun, and get every id exactly once (both plans)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from _teacher_fixtures import assert_killed_store, kill_infer_mid_run, synthetic_parquet, wide_mlp_teacher
from still.config import load_config
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.infer import run_infer

# 60 shards: enough that the kill lands mid-run, small enough to be quick
ROWS, SHARD = 15_000, 250


@pytest.mark.timeout(420)
@pytest.mark.parametrize("plan", ["fused", "streaming"])
def test_kill_dash_nine_then_resume(ray_cluster, tmp_path, plan):

    data = synthetic_parquet(tmp_path / "data", rows=ROWS, features=784)
    teacher = wide_mlp_teacher(tmp_path / "teacher.pt")
    root = tmp_path / "stores"
    overrides = [f"data.source={data}", f"teacher.uri={teacher}", f"store.root={root}", "store.mode=topk",
                 "store.k=5", f"infer.shard_rows={SHARD}", f"infer.batch_size={SHARD}",
                 "tracking.enabled=false", f"infer.plan={plan}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    kill_infer_mid_run([sys.executable, "-m", "still_cli", "infer", *overrides, "ray.num_cpus=2"],
                       tmp_path, env, root)
    planned = ROWS // SHARD
    store_dir, killed_parts = assert_killed_store(root, shard_rows=SHARD, planned=planned)

    summary = run_infer(load_config(InferConfig, None, overrides))
    assert summary["rows"] == ROWS and summary["store"] == str(store_dir)
    assert summary["shards_resumed"] >= len(killed_parts)
    assert summary["shards_written"] + summary["shards_resumed"] == planned
    assert summary["shards_written"] < planned  # the rerun wrote only the missing shards
    result = st.verify_store(str(store_dir))
    assert result["ok"], result["problems"]
    ids = st.open_store(str(store_dir)).read_table(["id"])["id"].to_numpy()
    assert np.array_equal(np.sort(ids), np.arange(ROWS))  # every id exactly once
    assert not list(store_dir.glob(".tmp-*")) and not (store_dir / st.PLAN_NAME).exists()
