"""still tune end to end on a real local Ray cluster and a real sqlite MLflow.

One digits store (the session fixture), sweeps of 4 trials × 2-3 epochs. Checks the
artifacts: parent + child runs (parentRunId tags, per-epoch metrics, none left
RUNNING), the table, a valid PNG, ASHA stopping a trial, resume after a real
interruption, and that no trial loads the teacher (its file is moved away first).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ray.tune import Callback

from _console import console_lines
from still.config import load_config
from still.errors import StillError
from tuning.config import TuneConfig
from tuning.driver import ended_trials, plan_sweep, run_tune

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(store, out, uri, *overrides):
    return load_config(TuneConfig, None, [
        f"store.uri={store}", f"tune.output_dir={out}", f"tracking.uri={uri}", "tracking.experiment=tune-test",
        "student.depth=1", "train.batch_size=64", "train.lr=0.003", *overrides,
    ])


def _runs(uri, parent_run_id):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tune-test")
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=1000)
    return client, client.get_run(parent_run_id), children


@pytest.mark.timeout(420)
def test_sweep_asha_mlflow_report_retrain_without_teacher(ray_cluster, digits_store, digits_teacher, tmp_path):
    from teacher_infer.store import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "sweep"
    # Widths in grid order, one at a time: the 2-unit student trails the others at
    # the first rung, so ASHA (grace 1, factor 2) must stop it. Its second rung is the last
    # epoch: a trial there has trained in full and must finish (test, model, its run),
    # however it compares (Ray's ASHA stopped it there when it scored below the cutoff).
    cfg = _config(digits_store, out, uri, "tune.name=digits", "tune.searcher=grid", "space.width=[64, 32, 16, 2]",
                  "tune.num_samples=1", "space.temperature=[4]", "space.weight=[0.7]", "train.epochs=2", "tune.grace_period=1",
                  "tune.reduction_factor=2", "tune.max_concurrent_trials=1", "tune.retrain_best=true")
    teacher = Path(digits_teacher)
    assert open_store(digits_store).manifest["teacher"].get("uri", str(teacher)).endswith(teacher.name)
    away = teacher.with_name(teacher.name + ".moved-away")
    teacher.rename(away)  # any teacher load in a trial or the driver would now fail
    try:
        summary = run_tune(cfg)
    finally:
        away.rename(teacher)

    rows = summary["trials"]
    assert [r["trial"] for r in rows] == ["trial-0000", "trial-0001", "trial-0002", "trial-0003"]
    assert [r["width"] for r in rows] == [64, 32, 16, 2]
    # every trial read the one copy of the store the sweep put in the object store
    assert {json.loads((out / "models" / r["trial"] / "summary.json").read_text())["ingest"]
            for r in rows if r["status"] == "completed"} == {"shared"}
    by_width = {r["width"]: r for r in rows}
    assert by_width[2]["status"] == "stopped" and by_width[2]["epochs"] == 1
    finished = [r for r in rows if r["epochs"] == 2]
    assert by_width[64] in finished and all(r["status"] == "completed" and r["run_id"] for r in finished), finished
    assert by_width[64]["test_accuracy"] > 0.7 and by_width[64]["params"] > by_width[2]["params"]
    # table, plot, results
    table = Path(summary["table"]).read_text().splitlines()
    assert len(table) == 2 + len(rows) + 1
    assert Path(summary["plot"]).read_bytes()[:8] == PNG_MAGIC
    results = json.loads(Path(summary["results"]).read_text())
    assert results["parent_run_id"] == summary["parent_run_id"] and len(results["trials"]) == 4
    best = summary["best"]
    assert best["trial"] in {r["trial"] for r in rows if r["status"] == "completed"}
    assert set(best["config"]) == {"kd.temperature", "kd.weight", "student.width"}
    assert 0 < best["metrics"]["val_accuracy"] <= 1 and "test_errors" in best
    assert summary["retrained"]["run_id"] and summary["retrained"]["student_test_accuracy"] > 0.7

    # MLflow: parent with the store key, one child per trial (+ the retrained best), all ended
    client, parent, children = _runs(uri, summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["store.key"] == open_store(digits_store).key
    assert parent.data.tags["still.best_model_run_id"] == summary["retrained"]["run_id"]
    assert "pareto.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["best_val_accuracy"] == best["metrics"]["val_accuracy"]
    names = sorted(c.info.run_name for c in children)
    assert names == ["digits-best", *[f"digits-trial-000{i}" for i in range(4)]]
    assert all(c.info.status == "FINISHED" for c in children), [(c.info.run_name, c.info.status) for c in children]
    for child in children:
        if child.info.run_name == "digits-best":
            continue
        trial = rows[int(child.info.run_name[-1])]
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(1, trial["epochs"] + 1)), child.info.run_name
        stopped = child.data.tags.get("still.stopped_early") == "true"
        assert stopped == (trial["status"] == "stopped")


class InterruptAfterFirstTrial(Callback):
    """Sends this process SIGUSR1 (Tune treats it like Ctrl+C) once Tune has recorded a
    finished trial, before the searcher makes the next one. Once per test: Tune saves the
    callback with the experiment, and the resumed sweep gets it back."""

    fired = False

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not InterruptAfterFirstTrial.fired:
            InterruptAfterFirstTrial.fired = True
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.timeout(300)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, digits_store, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "sweep"
    overrides = ["tune.name=resume", "tune.searcher=optuna", "tune.num_samples=4", "space.width=[8, 16, 32]",
                 "space.temperature={low: 1, high: 8, log: true}", "space.weight={low: 0.2, high: 0.9}",
                 "train.epochs=2", "tune.scheduler=none", "tune.max_concurrent_trials=1"]
    client = mlflow.MlflowClient(tracking_uri=uri)

    def children(status):
        exp = client.get_experiment_by_name("tune-test")
        return [r for r in client.search_runs([exp.experiment_id], f"attributes.status = '{status}'")
                if "mlflow.parentRunId" in r.data.tags]

    InterruptAfterFirstTrial.fired = False
    with pytest.raises(StillError, match="interrupted with 3 of 4 trial.* rerun with tune.resume=true"):
        run_tune(_config(digits_store, out, uri, *overrides), callbacks=[InterruptAfterFirstTrial()])
    assert InterruptAfterFirstTrial.fired
    config = _config(digits_store, out, uri, *overrides, "tune.resume=true")
    assert [row["trial"] for row in ended_trials(config, plan_sweep(config))] == ["trial-0000"]
    [kept] = children("FINISHED")
    assert kept.info.run_name == "resume-trial-0000"
    parent_id = kept.data.tags["mlflow.parentRunId"]
    assert not children("RUNNING")
    # A trial whose run closed but whose last report an interrupt kept from Tune: Tune
    # runs it again, so its old run must not count twice (made here, as that race would).
    orphan = client.create_run(client.get_experiment_by_name("tune-test").experiment_id,
                               run_name="resume-trial-0001", tags={"mlflow.parentRunId": parent_id})
    client.set_terminated(orphan.info.run_id, status="FINISHED")

    with pytest.raises(StillError, match="pass tune.resume=true"):
        run_tune(_config(digits_store, out, uri, *overrides))
    summary = run_tune(_config(digits_store, out, uri, *overrides, "tune.resume=true"))
    assert [r["trial"] for r in summary["trials"]] == [f"trial-000{i}" for i in range(4)]
    assert all(r["status"] == "completed" for r in summary["trials"])
    trial_dirs = sorted(p.name for p in (out / "trials").iterdir() if p.name.startswith("trial-"))
    assert trial_dirs == [f"trial-000{i}" for i in range(4)]
    _, parent, children_after = _runs(uri, summary["parent_run_id"])
    assert parent.info.run_id == parent_id
    finished = [c for c in children_after if c.info.status == "FINISHED"]
    # every trial finished exactly once, and the ones Tune recorded before the interruption are the same runs
    assert sorted(c.info.run_name for c in finished) == [f"resume-trial-000{i}" for i in range(4)]
    assert kept.info.run_id in {c.info.run_id for c in finished}
    superseded = client.get_run(orphan.info.run_id)
    assert superseded.info.status == "KILLED" and superseded.data.tags["still.superseded"] == "true"
    assert not [c for c in children_after if c.info.status == "RUNNING"]
    assert parent.info.status == "FINISHED"


@pytest.mark.timeout(240)
def test_cli_json_contract_and_what_the_sweep_prints(ray_cluster, digits_store, tmp_path, capsys):
    """Quiet: one line per trial and the table; --verbose brings Tune's own tables back."""
    from still_cli.main import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"store.uri={digits_store}", f"tracking.uri={uri}", "tune.searcher=random", "tune.num_samples=2",
              "train.epochs=1", "tune.scheduler=none", "space.width=[8, 16]", "student.depth=1", "--json"]
    code = main(["tune", f"tune.output_dir={tmp_path / 'cli'}", *common])
    assert code == 0
    quiet = capsys.readouterr()
    summary = json.loads(quiet.out.strip().splitlines()[-1])
    assert {"parent_run_id", "trials", "best", "plot"} <= set(summary)
    assert len(summary["trials"]) == 2 and summary["best"]["config"]["student.width"] in (8, 16)
    assert Path(summary["plot"]).read_bytes()[:8] == PNG_MAGIC
    quiet_lines = console_lines(quiet.out, quiet.err)
    shown = "\n".join(quiet_lines)
    for trial in ("trial-0000", "trial-0001"):
        line = rf"^still tune: {trial} completed after 1 epoch \(.*width=(8|16)\)"
        assert len(re.findall(line, shown, re.M)) == 1, shown
    assert "Trial status" not in shown and "╭" not in shown and "tensorboard" not in shown, shown
    assert len(quiet_lines) <= 12, shown  # the plan, a line per trial, the table (5), the JSON

    assert main(["tune", f"tune.output_dir={tmp_path / 'loud'}", *common, "--verbose"]) == 0
    loud = capsys.readouterr()
    loud_shown = "\n".join(console_lines(loud.out, loud.err))
    assert "Trial status" in loud_shown and "still tune: trial-0000" not in loud_shown
    assert len(loud_shown.splitlines()) > 2 * len(quiet_lines)


@pytest.mark.timeout(180)
def test_trainer_trials_that_cannot_be_scheduled_fail_the_sweep_fast(digits_store, tmp_path):
    # A TorchTrainer inside each trial asks for a GPU that the embedded cluster lacks: each
    # trial fails at once, naming the key (Ray Train would wait forever), and so does the sweep.
    proc = subprocess.run(
        [sys.executable, "-m", "still_cli", "tune", f"store.uri={digits_store}", f"tune.output_dir={tmp_path / 'sw'}",
         "tracking.enabled=false", "tune.trial_mode=trainer", "scaling.use_gpu=true", "ray.num_cpus=2",
         "tune.num_samples=2", "tune.scheduler=none", "train.epochs=1", "space.width=[8]", "tune.name=gpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("still: error: sweep 'gpu': all 2 trial(s) failed; trial-0000: still.errors.StillError: "
                           "scaling.use_gpu: 1 worker(s) × GPU=1 do not fit the Ray cluster (1 node(s), CPU=2, GPU=0)"), last
