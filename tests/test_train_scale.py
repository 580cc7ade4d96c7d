"""Training at scale: streamed ingest, live MLflow metrics, cheap integrity, bad input.

Real local Ray (the session's ``ray_cluster``), real Parquet stores from ``still infer``,
a real MLflow server process for tracking. Shared fixtures: tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _console import CHATTER, console_lines

from still.config import DataConfig, load_config
from still.datasets import load_arrays, resolve_dataset
from still.errors import StillError
from student_train.config import TrainConfig
from student_train.driver import JobOptions, train_job
from teacher_infer.config import InferConfig
from teacher_infer.infer import run_infer


def _cfg(tmp_path, *overrides):
    return load_config(TrainConfig, None, [
        "student.width=64", "student.depth=1", "train.epochs=4", "train.batch_size=64", "train.lr=0.005",
        "scaling.cpus_per_worker=1", "tracking.enabled=false", f"train.output_dir={tmp_path / 'out'}", *overrides,
    ])


def _digits_parquet(path: Path, *, sort_by_label: bool) -> Path:
    """builtin:digits as one Parquet file, in its own order or sorted by class (ids, hence splits, unchanged)."""
    spec = resolve_dataset(DataConfig(source="builtin:digits"))
    ids, x, y = load_arrays(spec, splits=("train", "val", "test"))
    order = np.argsort(y, kind="stable") if sort_by_label else np.arange(len(y))
    flat = x[order].reshape(len(order), -1)
    pq.write_table(pa.table({"id": ids[order], "label": y[order],
                             "features": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])}),
                   path)
    return path


def _numbered_epoch(epoch: int, fail_at: int = -1):
    """40 batches whose values say their epoch and position; the 11th is wider, and one dtype is odd."""
    for i in range(40):
        if i == fail_at:
            raise StillError("shard part-00007.parquet cannot be read")
        rows = 9 if i == 10 else 4
        yield {"x": np.full((rows, 3), epoch * 100 + i, np.float32), "y": np.full(rows, i, np.int16)}


@pytest.mark.timeout(60)
def test_the_reader_ring_hands_over_every_batch_intact_and_restarts_an_unfinished_epoch():
    from student_train.prefetch import EpochPrefetcher

    def expected(epoch):
        return [epoch * 100 + i for i in range(40)]

    # a slot holds 3 batches of 4 rows: groups cycle the ring many times; the group with the
    # 9-row batch does not fit a slot and travels the DataLoader's way
    prefetcher = EpochPrefetcher(_numbered_epoch, steps=40, group=3, slot_bytes=3 * 4 * (12 + 2) + 128, seed=0)
    for epoch in (0, 1, 2):
        batches = list(prefetcher.epoch(epoch))
        assert [int(b["x"][0, 0]) for b in batches] == expected(epoch)
        assert all((b["x"] == b["x"][0, 0]).all() and (b["y"] == i).all() for i, b in enumerate(batches))
        assert [len(b["y"]) for b in batches] == [9 if i == 10 else 4 for i in range(40)]
        assert batches[0]["y"].dtype == torch.int16
    for batch in prefetcher.epoch(3):  # left after one batch: the next asks for epoch 3 again
        break
    assert [int(b["x"][0, 0]) for b in prefetcher.epoch(3)] == expected(3)
    prefetcher.close()
    failing = EpochPrefetcher(lambda e: _numbered_epoch(e, fail_at=25), steps=40, group=3, slot_bytes=1 << 12, seed=0)
    with pytest.raises(StillError, match="part-00007.parquet cannot be read"):
        list(failing.epoch(0))


def _niceness_epoch(epoch: int):
    yield {"nice": np.array([os.nice(0)], np.int64)}


@pytest.mark.timeout(60)
def test_the_reader_process_yields_its_core_to_the_training_step():
    from student_train.prefetch import EpochPrefetcher

    before = os.nice(0)
    prefetcher = EpochPrefetcher(_niceness_epoch, steps=1, group=1, slot_bytes=1 << 10, seed=0)
    assert [int(b["nice"][0]) for b in prefetcher.epoch(0)] == [19]
    prefetcher.close()
    assert os.nice(0) == before  # the training process keeps its own priority


def test_the_shuffle_pool_yields_every_row_once_and_mixes_a_sorted_stream():
    from student_train.reader import ShufflePool, exact_batches

    labels = np.arange(10).repeat(1000)  # 10 classes, sorted: the worst order
    chunks = [{"y": labels[i:i + 500], "x": np.arange(i, i + 500)[:, None].repeat(3, 1)} for i in range(0, 10_000, 500)]
    out = list(ShufflePool(3000, np.random.default_rng(0)).mix(chunks))
    x = np.concatenate([c["x"] for c in out])
    assert sorted(x[:, 0].tolist()) == list(range(10_000))  # every row once
    assert np.array_equal(np.concatenate([c["y"] for c in out]), labels[x[:, 0]])  # columns stay together
    # once the pool holds three classes' rows, every chunk out mixes at least three classes
    assert all(len(np.unique(c["y"])) >= 3 for c in out[6:])
    # a chunk many times the pool, and a pool of one row: still every row once, nothing stalls
    big = {"y": labels, "x": np.arange(10_000)[:, None]}
    for capacity in (1, 64):
        mixed = np.concatenate([c["x"][:, 0] for c in ShufflePool(capacity, np.random.default_rng(1)).mix([big])])
        assert sorted(mixed.tolist()) == list(range(10_000))
    # cut into exact batches whatever the chunk sizes; a stream that runs short repeats its first rows
    batches = list(exact_batches(iter(chunks), [777] * 12 + [676]))
    assert [len(b["y"]) for b in batches] == [777] * 12 + [676]
    assert np.array_equal(np.concatenate([b["x"][:, 0] for b in batches]), np.arange(10_000))
    short = list(exact_batches(iter(chunks[:2]), [600, 600]))
    assert np.array_equal(short[1]["x"][:, 0], np.r_[600:1000, 0:200])


@pytest.mark.timeout(600)
def test_a_class_sorted_store_streams_as_well_as_a_shuffled_one(ray_cluster, digits_teacher, tmp_path):
    accuracy = {}
    for order in ("sorted", "shuffled"):
        data = _digits_parquet(tmp_path / f"{order}.parquet", sort_by_label=order == "sorted")
        store = run_infer(load_config(InferConfig, None, [
            f"data.source={data}", f"teacher.uri={digits_teacher}", f"store.root={tmp_path / 'stores'}",
            "store.mode=topk", "store.k=5", "infer.shard_rows=150", "tracking.enabled=false"]))["store"]
        out = train_job(_cfg(tmp_path / order, f"store.uri={store}", "scaling.num_workers=0", "train.ingest=stream",
                             "train.seed=3"), run_name=f"stream-{order}", options=JobOptions(quiet=True))
        assert out["ingest"] == "stream" and out["epochs"] == 4
        accuracy[order] = out["student_test_accuracy"]
    # ten shards of about one class each: read in order, a batch would see one or two classes
    assert accuracy["shuffled"] > 0.85 and accuracy["sorted"] > accuracy["shuffled"] - 0.04, accuracy


@pytest.mark.timeout(300)
def test_two_workers_stream_a_store(ray_cluster, digits_store, tmp_path):
    out = train_job(_cfg(tmp_path, f"store.uri={digits_store}", "scaling.num_workers=2", "train.ingest=stream",
                         "scaling.cpus_per_worker=1"), run_name="stream-2", options=JobOptions(quiet=True))
    assert out["ingest"] == "stream" and out["history"][-1]["world_size"] == 2
    assert out["student_test_accuracy"] > 0.85 and out["test_agreement"] > 0.85


def _truncate_after_first_epoch(checkpoint: Path, shard: Path, stop: threading.Event) -> None:
    while not stop.is_set():
        if checkpoint.exists():
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            return
        time.sleep(0.02)


@pytest.mark.timeout(300)
def test_a_shard_truncated_mid_training_fails_naming_it_and_the_run_keeps_its_epochs(
        ray_cluster, digits_store, mlflow_sqlite, tmp_path):
    import shutil

    import mlflow

    copy = tmp_path / "store"
    shutil.copytree(digits_store, copy)
    shard = sorted(copy.glob("part-*.parquet"))[0]
    cfg = _cfg(tmp_path, f"store.uri={copy}", "scaling.num_workers=0", "train.ingest=stream", "train.epochs=30",
               "tracking.enabled=true", "tracking.experiment=truncated", "train.name=truncated")
    stop = threading.Event()
    watcher = threading.Thread(target=_truncate_after_first_epoch,
                               args=(tmp_path / "out" / "ray" / "truncated" / "state.pt", shard, stop), daemon=True)
    watcher.start()
    try:
        with pytest.raises(StillError, match=rf"shard {shard.name} cannot be read .*run still store verify"):
            train_job(cfg, run_name="truncated", options=JobOptions(quiet=True))
    finally:
        stop.set()
        watcher.join(timeout=5)
    client = mlflow.MlflowClient(tracking_uri=mlflow_sqlite)
    [run] = client.search_runs([client.get_experiment_by_name("truncated").experiment_id])
    assert run.info.status == "FAILED"
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert epochs and epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 30


def test_streaming_a_batch_larger_than_the_split_is_refused(digits_store, tmp_path):
    cfg = _cfg(tmp_path, f"store.uri={digits_store}", "scaling.num_workers=0", "train.ingest=stream",
               "train.batch_size=5000")
    with pytest.raises(StillError, match=r"train.batch_size=5000 is larger than the training split .* \(1\d\d\d rows\)"):
        train_job(cfg, run_name="big-batch", options=JobOptions(quiet=True))
    assert not (tmp_path / "out").exists()


EPOCHS = 15


def _epochs_seen(client, experiment: str) -> list[tuple[str, int]]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    seen = []
    for run in client.search_runs([exp.experiment_id]):
        history = client.get_metric_history(run.info.run_id, "epoch")
        seen.append((run.info.status, max((int(m.value) for m in history), default=0)))
    return seen


@pytest.mark.timeout(400)
def test_epochs_reach_mlflow_while_running_and_a_lost_server_is_not_fatal(digits_store, mlflow_server, tmp_path):
    """Also what the terminal shows: each epoch once, the table, none of Ray's chatter."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    command = [sys.executable, "-m", "still_cli", "train", f"store.uri={digits_store}", "scaling.num_workers=1",
               "student.width=64", f"train.epochs={EPOCHS}", "train.batch_size=32", f"tracking.uri={mlflow_server}",
               "tracking.experiment=live", f"train.output_dir={tmp_path / 'out'}", "--json"]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        samples: list[tuple[float, int]] = []
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            running = [epoch for status, epoch in _epochs_seen(client, "live") if status == "RUNNING"]
            if running and running[0] > 0:
                samples.append((time.time(), running[0]))
            if len(samples) >= 2 and samples[-1][1] >= samples[0][1] + 2:
                break
            time.sleep(0.5)
        assert len(samples) >= 2 and samples[-1][1] > samples[0][1], f"no live epochs: {samples}"
        assert samples[-1][1] < EPOCHS  # seen growing while the run was RUNNING, before it ended
        mlflow_server.stop()  # the tracking server goes away mid-run
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["epochs"] == EPOCHS and summary["student_test_accuracy"] > 0.85
    assert summary["tracking_lost"] and f"MLflow tracking at {mlflow_server.uri} lost" in err
    lines = console_lines(out, err)
    shown = "\n".join(lines)
    for epoch in range(1, EPOCHS + 1):
        assert len(re.findall(rf"\bepoch {epoch}/{EPOCHS}\b", shown)) == 1, shown
    assert "test accuracy" in shown and not [c for c in CHATTER if c in shown], shown
    assert len(lines) <= EPOCHS + 20, f"{len(lines)} lines:\n{shown}"  # epochs, table, JSON, the two warnings
