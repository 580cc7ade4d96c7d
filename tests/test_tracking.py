"""MLflow tracking helpers against a real sqlite backend."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest

from still.config import TrackingConfig
from still.errors import StillError
from still.tracking import check_reachable, open_run, tracking_uri


@dataclasses.dataclass(frozen=True)
class Job:
    lr: float = 0.1
    tracking: TrackingConfig = TrackingConfig()


def test_tracking_uri_defaults_to_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking_uri() == "http://127.0.0.1:1"
    assert tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_open_run_records_config_tags_and_status(mlflow_sqlite):
    config = Job()
    with open_run(config, config.tracking, default_experiment="t", run_name="job-1", tags={"k": "v"}) as tracker:
        tracker.log_metrics({"acc": 0.5}, step=1)
        run_id = tracker.run_id
    run = mlflow.MlflowClient(mlflow_sqlite).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "job-1"
    assert run.data.params["lr"] == "0.1"
    assert run.data.metrics["acc"] == 0.5
    assert run.data.tags["k"] == "v" and "git_sha" in run.data.tags
    assert run.data.tags["version.torch"]


def test_failed_job_marks_run_failed(mlflow_sqlite):
    config = Job()
    with pytest.raises(RuntimeError):
        with open_run(config, config.tracking, default_experiment="t", run_name="job-2") as tracker:
            run_id = tracker.run_id
            raise RuntimeError("boom")
    assert mlflow.MlflowClient(mlflow_sqlite).get_run(run_id).info.status == "FAILED"


def test_unreachable_tracking_server_is_a_clear_error():
    with pytest.raises(StillError, match=r"MLflow tracking URI 'http://127.0.0.1:9' is unreachable"):
        check_reachable("http://127.0.0.1:9", timeout_s=2)
