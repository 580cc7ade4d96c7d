"""Shared fixtures: one real local Ray cluster per test session, isolated MLflow.

Ray starts once (2-5 s) and every test that needs it takes ``ray_cluster``. It gets
4 logical CPUs on this 2-core machine: Ray Train with 2 workers streaming a dataset
needs CPUs left over for Ray Data's read tasks, or it waits forever
(RAY-NOTES.md). Every Ray test also carries a timeout, since mistakes hang.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the session (dashboard on 127.0.0.1)."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster, never another process's (ray.init() with no
        # address joins the newest Ray instance it finds on the machine).
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_sqlite(tmp_path, monkeypatch):
    """Points MLflow at a fresh sqlite database in the test's directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def pytest_sessionfinish(session, exitstatus):
    """Treats 'no tests collected' (exit 5, e.g. a marker selecting nothing) as success."""
    if exitstatus == 5:
        session.exitstatus = 0


def pytest_configure(config):
    # Keep Ray's per-test workers from inheriting a user's cluster address.
    os.environ.pop("RAY_ADDRESS", None)
