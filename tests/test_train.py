"""``still train`` end to end on builtin:digits: real local Ray, tiny models.

Shared fixtures (tests/conftest.py): ``digits_teacher`` (a supervised teacher trained
once by this package) and ``digits_store`` (its top-k store from ``still infer``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from still.checkpoints import load_checkpoint
from still.config import load_config
from still.errors import StillError
from still.models import build_model
from student_train.config import TrainConfig
from student_train.driver import JobOptions, run_train, train_job
from student_train.losses import soft_kl, teacher_top1
from teacher_infer.targets import DenseTarget


def _cfg(tmp_path, *overrides):
    return load_config(TrainConfig, None, [
        "student.width=32", "student.depth=1", "train.epochs=2", "train.batch_size=64", "train.lr=0.003",
        "scaling.cpus_per_worker=1", "tracking.enabled=false", f"train.output_dir={tmp_path / 'out'}",
        *overrides,
    ])


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("family,shape", [("mlp", (64,)), ("cnn", (1, 8, 8))])
def test_hint_features_are_taken_before_dropout(family, shape):
    # one hidden layer for the mlp: its only dropout is the one after the features
    model = build_model(family, input_shape=shape, num_classes=10, width=1 if family == "cnn" else 32,
                        depth=2 if family == "cnn" else 1, dropout=0.5).train()
    x = torch.randn(16, *shape)
    assert torch.equal(model.features(x), model.features(x))  # no dropout inside the features
    assert not torch.equal(model(x), model(x))  # while training, dropout still acts before the head
    model.eval()
    torch.testing.assert_close(model(x), model.head(model.features(x)))


def test_ensemble_teacher_is_the_mean_probability_at_temperature():
    rng = np.random.default_rng(0)
    a, b, s = (torch.tensor(rng.normal(0, 2, (4, 5))) for _ in range(3))
    T = 3.0
    mean = (torch.softmax(a / T, 1) + torch.softmax(b / T, 1)) / 2
    expected = (mean * (mean.log() - torch.log_softmax(s / T, 1))).sum(1).mean()
    assert float(soft_kl(s, [DenseTarget(a), DenseTarget(b)], T)) == pytest.approx(float(expected), rel=1e-10)
    assert teacher_top1([DenseTarget(a), DenseTarget(b)]).tolist() == mean.argmax(1).tolist()


# --------------------------------------------------------------------------- in process


def test_distilled_student_beats_ce_only(digits_store, tmp_path):
    """Same student, seed and epochs: distilled from the stored teacher at T=2 vs labels only."""
    common = [f"store.uri={digits_store}", "student.width=32", "train.epochs=30", "kd.temperature=2",
              "train.seed=0", "scaling.num_workers=0"]
    ce = train_job(_cfg(tmp_path / "ce", *common, "kd.weight=0"), run_name="ce", options=JobOptions(quiet=True))
    kd = train_job(_cfg(tmp_path / "kd", *common, "kd.weight=0.5"), run_name="kd", options=JobOptions(quiet=True))
    assert kd["student_test_accuracy"] > ce["student_test_accuracy"]
    assert kd["test_nll"] < ce["test_nll"]
    assert kd["history"][-1]["agreement"] > 0.9 and kd["history"][-1]["train_kl"] > 0
    assert kd["teacher_test_accuracy"] > 0.95
    assert kd["teacher_params"] > kd["student_params"] and kd["compression_ratio"] > 1


def test_resume_continues_a_stopped_run(digits_store, tmp_path):
    base = [f"store.uri={digits_store}", "scaling.num_workers=0", "train.name=resumable"]
    first = train_job(_cfg(tmp_path, *base, "train.epochs=2"), run_name="resumable", options=JobOptions(quiet=True))
    assert first["epochs"] == 2 and first["resumed_from"] == 0
    second = train_job(_cfg(tmp_path, *base, "train.epochs=4", "train.resume=true"), run_name="resumable", options=JobOptions(quiet=True))
    assert second["resumed_from"] == 2
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4]


def _still_train(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "still_cli", "train", *args, "--json"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def _summary(proc: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ingest", ["memory", "stream"])
def test_the_same_seed_gives_the_same_losses_again_and_after_a_kill_and_resume(digits_store, tmp_path, ingest):
    """Losses, not accuracy: two runs of one config and seed agree to the last bit, and so does a run
    killed with SIGKILL after an epoch and resumed (data order, view draws, dropout all from the seed).
    Each run is a ``still train`` process of its own, as a user's are."""
    common = [f"store.uri={digits_store}", "scaling.num_workers=0", f"train.ingest={ingest}", "train.epochs=12",
              "train.batch_size=8", "student.width=32", "student.depth=1", "student.dropout=0.3", "train.lr=0.003",
              "kd.temperature=3", "kd.weight=0.6", "train.seed=4", "train.shuffle_buffer=300",
              "train.lr_schedule=cosine", "scaling.cpus_per_worker=1", "tracking.enabled=false"]
    # the three processes at once (one torch thread each): two to compare, one to kill after its first epoch
    started = [_still_train([*common, f"train.output_dir={tmp_path / name}", f"train.name={name}"], tmp_path)
               for name in ("a", "b")]
    cut = [*common, f"train.output_dir={tmp_path / 'cut'}", "train.name=cut"]
    proc = _still_train(cut, tmp_path)
    state = tmp_path / "cut" / "ray" / "cut" / "state.pt"
    deadline = time.time() + 240
    try:
        while not state.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    runs = [_summary(run) for run in started]
    resumed = _summary(_still_train([*cut, "train.resume=true"], tmp_path))
    assert 1 <= resumed["resumed_from"] < 12, resumed["resumed_from"]  # killed mid-run, resumed from its checkpoint

    def losses(run):
        return [(h["train_loss"], h["train_ce"], h["train_kl"], h["val_nll"]) for h in run["history"]]

    assert losses(runs[0]) == losses(runs[1]), "two runs of one seed differ"
    assert losses(runs[1]) == losses(resumed), "a resumed run differs from an uninterrupted one"
    assert runs[0]["test_nll"] == runs[1]["test_nll"] == resumed["test_nll"]


@pytest.mark.timeout(300)
def test_a_second_run_of_the_same_name_is_refused_and_the_first_keeps_its_files(digits_store, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "still_cli", "train", f"store.uri={digits_store}", "scaling.num_workers=0",
         "train.epochs=15", "train.batch_size=8", "tracking.enabled=false", f"train.output_dir={out}",
         "train.name=same", "--json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        state = out / "ray" / "same" / "state.pt"
        deadline = time.time() + 120
        while not state.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert state.exists(), "the first run wrote no checkpoint"
        with pytest.raises(StillError, match=rf"run 'same' is already running in {out} \(pid {first.pid}\).*"
                                             r"give this run its own train.name"):
            train_job(_cfg(tmp_path, f"store.uri={digits_store}", "scaling.num_workers=0", "train.name=same"),
                      run_name="same", options=JobOptions(quiet=True))
        assert state.exists()  # nothing of the first run was removed
        stdout, stderr = first.communicate(timeout=400)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["epochs"] == 15 and Path(summary["checkpoint"]).exists()


def test_ensemble_of_two_stores(digits_store, digits_teacher, ray_cluster, tmp_path):
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    sampled = run_infer(load_config(InferConfig, None, [
        "data.source=builtin:digits", f"teacher.uri={digits_teacher}", f"store.root={tmp_path / 'stores'}",
        "store.mode=sampled", "store.samples=32", "store.sample_temperature=4", "tracking.enabled=false",
    ]))["store"]
    # a top-k and a sampled store, mixed on the device: in process, and joined by Ray Data for 2 workers
    for workers in (0, 2):
        out = train_job(_cfg(tmp_path / str(workers), f"store.uri=[{digits_store}, {sampled}]",
                             f"scaling.num_workers={workers}", "train.epochs=6"), run_name=f"ensemble-{workers}",
                        options=JobOptions(quiet=True))
        assert out["student_test_accuracy"] > 0.5 and out["test_agreement"] > 0.5
        assert "," in out["store_key"]


def test_init_from_checkpoint_loads_every_layer(digits_teacher, tmp_path):
    same = _cfg(tmp_path, "student.width=512", "student.depth=2", "student.dropout=0.3", f"student.init={digits_teacher}",
                "scaling.num_workers=0", "train.epochs=1", "train.lr=0.0001")
    out = train_job(same, run_name="init-same", options=JobOptions(quiet=True))
    assert out["init"]["reinitialized"] == [] and len(out["init"]["loaded"]) == 6
    assert out["student_test_accuracy"] > 0.9
    other = _cfg(tmp_path, "student.width=32", "student.depth=2", f"student.init={digits_teacher}",
                 "scaling.num_workers=0", "train.epochs=1")
    with pytest.raises(StillError, match=r"does not fit the mlp student: body.1.weight is \(512, 64\) there, "
                                         r"\(32, 64\) here"):
        train_job(other, run_name="init-other", options=JobOptions(quiet=True))


# --------------------------------------------------------------------------- bad input


def _incomplete_store(tmp_path, digits_store):
    import shutil

    broken = tmp_path / "incomplete"
    shutil.copytree(digits_store, broken)
    (broken / "manifest.json").unlink()
    return broken


@pytest.mark.parametrize("case", ["incomplete", "corrupt", "flipped", "classes", "hints", "below-grid",
                                  "unreachable"])
def test_bad_input_fails_before_training(case, digits_store, tmp_path):
    import shutil

    overrides = [f"store.uri={digits_store}", "scaling.num_workers=0"]
    match = ""
    if case == "incomplete":
        overrides[0] = f"store.uri={_incomplete_store(tmp_path, digits_store)}"
        match = "incomplete"
    elif case == "corrupt":
        copy = tmp_path / "corrupt"
        shutil.copytree(digits_store, copy)
        shard = sorted(copy.glob("part-*.parquet"))[0]
        shard.write_bytes(shard.read_bytes()[:-20] + b"x" * 20)
        overrides[0] = f"store.uri={copy}"
        match = "shard part-00000.parquet is unreadable .*run still store verify"  # the cheap check on open
    elif case == "flipped":  # same size, footer intact: only the full verification sees it
        copy = tmp_path / "flipped"
        shutil.copytree(digits_store, copy)
        shard = sorted(copy.glob("part-*.parquet"))[0]
        data = bytearray(shard.read_bytes())
        data[100:110] = bytes(10)
        shard.write_bytes(bytes(data))
        overrides[0] = f"store.uri={copy}"
        overrides.append("train.verify_store=true")
        match = "fails verification: part-00000.parquet: checksum mismatch"
    elif case == "classes":
        overrides.append("student.num_classes=3")
        match = "student.num_classes=3 but the store"
    elif case == "hints":
        overrides.append("kd.hint_weight=0.5")
        match = r"kd.hint_weight > 0 needs kd.hints"
    elif case == "below-grid":  # a top-k store knows its tail on the grid 1, 2, 4, 8: T = 0.5 would be extrapolated
        overrides += ["kd.temperature=0.5", "kd.weight=0.5"]
        match = (r"kd.temperature=0.5 is below the store's temperature grid \[1.0, 2.0, 4.0, 8.0\].*"
                 r"store.temperatures=\[0.5, 1, 2, 4, 8\]")
    else:
        overrides += ["tracking.enabled=true", "tracking.uri=http://127.0.0.1:9"]
        match = "unreachable"
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(StillError, match=match):
        train_job(cfg, run_name=f"bad-{case}", options=JobOptions(quiet=True))
    assert not (tmp_path / "out" / "student.pt").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [("kd.temperature=0", "kd.temperature must be > 0, got 0"), ("kd.weight=2", "kd.weight must be in [0, 1]"),
     ("student.family=resnet", "student.family must be one of")],
)
def test_cli_rejects_bad_config(override, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "still_cli", "train", override, "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and proc.stderr.startswith("still: error:")


# --------------------------------------------------------------------------- Ray Train, 2 workers


@pytest.mark.timeout(240)
def test_two_workers_supervised_exports_student(ray_cluster, tmp_path):
    from ray.util import placement_group_table

    before = set(placement_group_table())
    out = run_train(_cfg(tmp_path, "data.source=builtin:digits", "kd.weight=0", "scaling.num_workers=2",
                         "train.epochs=3", "scaling.resources_per_worker={still_worker: 1}"))
    assert out["epochs"] == 3 and out["history"][-1]["world_size"] == 2
    # the workers' placement group reserved the custom resource beside the CPU, for each worker
    bundles = [list(pg["bundles"].values()) for key, pg in placement_group_table().items() if key not in before]
    assert [{"CPU": 1.0, "still_worker": 1.0}] * 2 in bundles, bundles
    assert out["student_test_accuracy"] > 0.6 and out["teacher_test_accuracy"] is None
    model, info = load_checkpoint(out["checkpoint"])
    assert info["family"] == "mlp" and info["model_args"]["num_classes"] == 10
    scripted = torch.jit.load(out["torchscript"])
    x = torch.randn(3, 64)
    torch.testing.assert_close(scripted(x), model(x))


def _alive_train_workers() -> list[int]:
    """Pids of this cluster's live Ray Train worker actors (finished runs' workers are dead actors)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(int(a.pid) for a in actors if a.pid)


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list, stop: threading.Event):
    while not stop.is_set():
        # two checkpoint folders: the first is then surely registered (the newest may be mid-upload)
        if len(list(run_dir.glob("checkpoint_*"))) >= 2:
            workers = _alive_train_workers()
            if len(workers) == 2:
                os.kill(workers[-1], signal.SIGKILL)
                killed.append(workers[-1])
                return
        time.sleep(0.05)


@pytest.mark.timeout(420)
def test_killed_worker_resumes_from_checkpoint(ray_cluster, digits_store, tmp_path):
    cfg = _cfg(tmp_path, f"store.uri={digits_store}", "scaling.num_workers=2", "train.epochs=8",
               "train.batch_size=16", "train.name=killed", "train.max_failures=2")
    run_dir = tmp_path / "out" / "ray" / "killed"
    killed: list[int] = []
    stop = threading.Event()
    thread = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(run_dir, killed, stop), daemon=True)
    thread.start()
    try:
        out = train_job(cfg, run_name="killed", options=JobOptions(quiet=True))
    finally:
        stop.set()
        thread.join(timeout=5)
    assert killed, "no worker was killed"
    assert out["epochs"] == 8
    assert out["resumed_from"] >= 1  # the restarted group started from a checkpoint, not epoch 0
    assert [h["epoch"] for h in out["history"]] == list(range(1, 9))


# --------------------------------------------------------------------------- MLflow server


@pytest.mark.timeout(300)
def test_tracking_on_a_real_mlflow_server(ray_cluster, digits_store, mlflow_server, tmp_path):
    import mlflow

    cfg = _cfg(tmp_path, f"store.uri={digits_store}", "scaling.num_workers=2", "train.epochs=3",
               "tracking.enabled=true", f"tracking.uri={mlflow_server}", "tracking.experiment=still-train-test",
               "register.name=digits-student", "register.alias=champion", "kd.temperature=3", "kd.weight=0.7")
    out = run_train(cfg)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["kd.temperature"] == "3.0" and run.data.params["student.width"] == "32.0"
    assert run.data.tags["store.key"] == Path(digits_store).name
    assert run.data.tags["teacher.fingerprint"] and run.data.tags["git_sha"]
    history = client.get_metric_history(out["run_id"], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert {m.step for m in client.get_metric_history(out["run_id"], "train_kl")} == {1, 2, 3}
    assert run.data.metrics["student_test_accuracy"] == pytest.approx(out["student_test_accuracy"])
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pytorch.load_model(out["model_uri"])
    assert model(torch.zeros(2, 64)).shape == (2, 10)
    version = client.get_model_version_by_alias("digits-student", "champion")
    assert version.run_id == out["run_id"]
    json.dumps(out, default=str)


def test_a_sampled_store_far_from_its_sample_temperature_warns(tmp_path, capsys):
    from _teacher_fixtures import write_small_store

    store, _ = write_small_store(tmp_path / "sampled", mode="sampled", rows=30)  # drawn at T_s = 1
    for temperature, warned in ((1.5, False), (4, True)):
        train_job(_cfg(tmp_path / str(temperature), f"store.uri={store}", "scaling.num_workers=0", "train.epochs=1",
                       f"kd.temperature={temperature}"), run_name="sampled", options=JobOptions(quiet=True, log_model=False))
        err = capsys.readouterr().err
        assert ("kd.temperature=4 is 4x away from the sampled store's sample_temperature=1" in err) is warned
