"""Stores on S3: a real moto S3 server on 127.0.0.1, real ``still`` processes talking to it.

Both cases go through the CLI in subprocesses (their embedded Ray workers inherit the
endpoint and credentials): a labels-only store of a source that is itself on S3,
a cache hit, ``store verify`` and a student trained from it; and ``kill -9`` of a
``still infer`` writing to S3 mid-run, then a rerun that writes only the missing shards.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _teacher_fixtures import kill_infer_mid_run, still_cli, synthetic_parquet, wide_mlp_teacher

pytest.importorskip("s3fs", reason="the s3 extra (pip install -e '.[s3]') is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra) is not installed")


@pytest.fixture(scope="module")
def s3_env():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("still")
    try:
        yield env, fs
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _still(args, cwd, env, timeout=300):
    done = still_cli(args, cwd, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_labels_only_store_on_s3_from_a_source_on_s3(s3_env, digits_teacher, tmp_path):
    env, fs = s3_env
    from still.config import DataConfig
    from still.datasets import load_arrays, resolve_dataset

    spec = resolve_dataset(DataConfig(source="builtin:digits"))
    ids, x, y = load_arrays(spec, splits=("train", "val", "test"))
    table = pa.table({"id": ids, "features": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64),
                      "label": y})
    with fs.open("still/data/digits.parquet", "wb") as handle:
        pq.write_table(table, handle, row_group_size=256)

    infer = ["infer", "data.source=s3://still/data", f"teacher.uri={digits_teacher}", "store.root=s3://still/stores",
             "store.mode=topk", "store.k=5", "store.include_inputs=false", "--json"]
    first = _still(infer, tmp_path, env)
    assert first["store"].startswith("s3://still/stores/") and first["rows"] == 1797 and not first["cache_hit"]
    fs.invalidate_cache()
    assert fs.exists(f"{first['store']}/manifest.json")
    assert not fs.glob(f"{first['store']}/.tmp-*") and not fs.exists(f"{first['store']}/_plan.json")
    again = _still(infer, tmp_path, env)
    assert again["cache_hit"] and again["key"] == first["key"] and again["shards_written"] == 0
    verify = _still(["store", "verify", first["store"], "--json"], tmp_path, env)
    assert verify["ok"] and verify["rows"] == 1797

    # in the driver (no Ray Train worker group to start): the store's shards read back from S3
    student = _still(["train", f"store.uri={first['store']}", "student.width=64", "train.epochs=8",
                      "scaling.num_workers=0", f"train.output_dir={tmp_path / 's'}", "--json"], tmp_path, env,
                     timeout=500)
    assert student["student_test_accuracy"] > 0.9


@pytest.mark.timeout(600)
def test_kill_dash_nine_on_s3_then_resume(s3_env, tmp_path):
    env, fs = s3_env
    data = synthetic_parquet(tmp_path / "data", rows=10_000, features=784)
    teacher = wide_mlp_teacher(tmp_path / "teacher.pt")
    args = ["infer", f"data.source={data}", f"teacher.uri={teacher}", "store.root=s3://still/killed",
            "store.mode=topk", "store.k=5", "infer.shard_rows=250", "infer.batch_size=250",
            "tracking.enabled=false", "ray.num_cpus=2"]
    full = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env}

    def shards_on_s3():
        fs.invalidate_cache()
        return fs.glob("still/killed/*/part-*.parquet")

    kill_infer_mid_run([sys.executable, "-m", "still_cli", *args], tmp_path, full, list_shards=shards_on_s3)
    fs.invalidate_cache()
    (store_dir,) = fs.ls("still/killed")
    killed = fs.glob(f"{store_dir}/part-*.parquet")
    assert not fs.exists(f"{store_dir}/manifest.json") and 4 <= len(killed) < 40
    for part in killed:  # whole shards only, under their final names
        with fs.open(part, "rb") as handle:
            assert pq.ParquetFile(handle).metadata.num_rows == 250

    summary = _still(args + ["--json"], tmp_path, env)
    assert summary["rows"] == 10_000 and summary["shards_resumed"] >= len(killed)
    assert summary["shards_written"] + summary["shards_resumed"] == 40
    fs.invalidate_cache()
    ids = np.concatenate([pq.read_table(fs.open(p, "rb"), columns=["id"])["id"].to_numpy()
                          for p in sorted(fs.glob(f"{store_dir}/part-*.parquet"))])
    assert np.array_equal(np.sort(ids), np.arange(10_000))  # every id exactly once
    assert _still(["store", "verify", f"s3://{store_dir}", "--json"], tmp_path, env)["ok"]
