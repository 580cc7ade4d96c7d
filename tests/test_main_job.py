"""The main job, end to end: `still run configs/mnist.yaml --fast` on real MNIST.

Runs the README's first command (fast variant) as a user would: a subprocess in a
fresh directory, embedded local Ray, MLflow on sqlite in that directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from _console import CHATTER, console_lines
from teacher_infer.store import open_store, verify_store

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mnist_fast_pipeline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, "-m", "still_cli", "run", str(REPO / "configs/mnist.yaml"), "--fast", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=580,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])

    # What a person reads: a line per stage start and end, per epoch, per finished trial, the
    # tables; none of Ray's, Tune's or MLflow's own output (`--verbose` brings Tune's back:
    # tests/test_tune_sweep.py). 47 lines here; the full-length job stays under 120.
    lines = console_lines(result.stdout, result.stderr)
    shown = "\n".join(lines)
    assert len(lines) <= 60, f"{len(lines)} lines:\n{shown}"
    assert not [c for c in (*CHATTER, "Trial status", "tensorboard", "INFO mlflow") if c in shown], shown
    trial_lines = re.findall(r"^still tune: trial-000[01] (completed|stopped early) after", shown, re.M)
    assert len(trial_lines) == 2, shown

    # The table: our figures beside the paper's, wall time per stage, the MLflow UI command.
    assert "Hinton et al. 2015" in result.stdout
    for paper in ("67", "146", "74"):
        assert f"  {paper}\n" in result.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in result.stdout

    # The --json contract of the main job.
    for key in ("teacher_errors", "baseline_errors", "distilled_errors", "distilled_single_view_errors",
                "best_sweep_errors"):
        assert isinstance(outcome[key], int) and 0 <= outcome[key] <= 10_000, (key, outcome[key])
    # One epoch of an MLP on MNIST is far above chance (9,000 errors): under 8% error.
    assert outcome["teacher_errors"] < 800
    assert outcome["baseline_errors"] < 800 and outcome["distilled_errors"] < 800
    assert set(outcome["seconds"]) == {"teacher", "store", "store_single_view", "baseline", "distilled",
                                       "distilled_single_view", "sweep"}
    # --fast says plainly that it is a smoke run whose numbers mean nothing.
    assert "smoke run" in result.stdout and "numbers mean nothing" in outcome["smoke_run"]
    assert all(seconds > 0 for seconds in outcome["seconds"].values())

    # The store: top-k, labels-only, two views of every MNIST row (--fast), verifies, its size as reported.
    store = open_store(outcome["store"]["store"])
    assert store.mode == "topk" and store.num_classes == 10 and not store.include_inputs
    assert store.views == 2 and store.num_rows == 2 * 70_000
    assert verify_store(store.uri)["ok"]
    assert outcome["bytes_per_row"] == pytest.approx(store.manifest["bytes_per_row"])
    # Students and sweep read the store; they recorded its key.
    assert outcome["baseline"]["store_key"] == outcome["distilled"]["store_key"] == store.key
    assert len(outcome["sweep"]["trials"]) == 2

    # MLflow: a run per stage (and per trial), all finished, in the sqlite file in cwd.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("still-mnist")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    names = {run.info.run_name for run in runs}
    assert {"mnist-teacher", "mnist-baseline", "mnist-distilled", "mnist-distilled-single-view",
            "pipeline-mnist-fast"} <= names
    assert all(run.info.status == "FINISHED" for run in runs)
    parent = client.get_run(outcome["sweep"]["parent_run_id"])
    assert parent.data.tags["store.key"] == store.key
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
