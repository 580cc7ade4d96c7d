"""Resume: kill -9 a real ``still infer`` mid-run, rerun, and get every id exactly once."""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from _teacher_fixtures import kill_infer_mid_run, synthetic_parquet
from still.checkpoints import save_checkpoint
from still.config import load_config
from still.models import build_model
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.infer import run_infer


@pytest.mark.timeout(420)
def test_kill_dash_nine_then_resume(ray_cluster, tmp_path):
    import torch

    data = synthetic_parquet(tmp_path / "data", rows=30_000, features=784)
    torch.manual_seed(0)
    args = {"input_shape": [784], "num_classes": 10, "width": 1500, "depth": 3}
    teacher = save_checkpoint(str(tmp_path / "teacher.pt"), build_model("mlp", **args), "mlp", args)
    root = tmp_path / "stores"
    overrides = [f"data.source={data}", f"teacher.uri={teacher}", f"store.root={root}", "store.mode=topk",
                 "store.k=5", "infer.shard_rows=500", "infer.batch_size=500", "tracking.enabled=false"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    kill_infer_mid_run([sys.executable, "-m", "still.cli", "infer", *overrides, "ray.num_cpus=2"],
                       tmp_path, env, root)
    (store_dir,) = list(root.iterdir())
    killed_parts = sorted(store_dir.glob("part-*.parquet"))
    assert not (store_dir / st.MANIFEST_NAME).exists()
    with pytest.raises(Exception, match="incomplete"):
        st.open_store(str(store_dir))
    for part in killed_parts:  # only complete shards are ever visible under part-* names
        assert pq.read_metadata(part).num_rows == 500
    planned = 30_000 // 500
    assert 4 <= len(killed_parts) < planned

    summary = run_infer(load_config(InferConfig, None, overrides))
    assert summary["rows"] == 30_000 and summary["store"] == str(store_dir)
    assert summary["shards_resumed"] >= len(killed_parts)
    assert summary["shards_written"] + summary["shards_resumed"] == planned
    assert summary["shards_written"] < planned  # the rerun wrote only the missing shards
    result = st.verify_store(str(store_dir))
    assert result["ok"], result["problems"]
    ids = st.open_store(str(store_dir)).read_table(["id"])["id"].to_numpy()
    assert np.array_equal(np.sort(ids), np.arange(30_000))  # every id exactly once
    assert not list(store_dir.glob(".tmp-*")) and not (store_dir / st.PLAN_NAME).exists()
