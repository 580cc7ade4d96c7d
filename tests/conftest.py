"""Shared fixtures: one real local Ray cluster per test session, isolated MLflow.

Ray starts once (2-5 s) and every test that needs it takes ``ray_cluster``. It gets
4 logical CPUs on this 2-core machine: Ray Train with 2 workers streaming a dataset
needs CPUs left over for Ray Data's read tasks, or it waits forever
(RAY-NOTES.md). Every Ray test also carries a timeout, since mistakes hang.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster shared by the session (dashboard on 127.0.0.1)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        # address="local": always a fresh cluster, never another process's (ray.init() with no
        # address joins the newest Ray instance it finds on the machine).
        # still_worker: a custom resource for scaling.resources_per_worker to reserve.
        ray.init(address="local", num_cpus=4, resources={"still_worker": 2}, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True)
    # A column Ray cannot make a tensor column of fails the test instead of being pickled silently.
    ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type = False
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


# --------------------------------------------------------------------------- student_train (shared teacher + store)


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A supervised digits teacher trained once by ``still train``'s own code path
    (in process, no MLflow): MLP 64-512-512-10 with dropout, ~97.8% test accuracy, ~15 s.
    Returns the still checkpoint path."""
    from still.config import load_config
    from student_train.config import TrainConfig
    from student_train.driver import JobOptions, train_job

    out = tmp_path_factory.mktemp("digits-teacher")
    cfg = load_config(TrainConfig, None, [
        "data.source=builtin:digits", "student.width=512", "student.depth=2", "student.dropout=0.3",
        "kd.weight=0", "train.epochs=40", "train.batch_size=64", "train.lr=0.001", "train.seed=0",
        "scaling.num_workers=0", "scaling.cpus_per_worker=1", "tracking.enabled=false", f"train.output_dir={out}",
    ])
    summary = train_job(cfg, run_name="digits-teacher", options=JobOptions(quiet=True))
    return summary["checkpoint"]


@pytest.fixture(scope="session")
def digits_store(ray_cluster, digits_teacher, tmp_path_factory):
    """A top-k (k=5) soft-label store of the digits teacher, written once by ``still infer``."""
    from still.config import load_config
    from teacher_infer.config import InferConfig
    from teacher_infer.infer import run_infer

    root = tmp_path_factory.mktemp("stores")
    cfg = load_config(InferConfig, None, [
        "data.source=builtin:digits", f"teacher.uri={digits_teacher}", f"store.root={root}",
        "store.mode=topk", "store.k=5", "store.dtype=float32", "tracking.enabled=false",
    ])
    return run_infer(cfg)["store"]


class MlflowServer(str):
    """A running ``mlflow server``: the string is its URI; :meth:`stop` takes it away (mid-run, say)."""

    def __new__(cls, uri: str, proc: subprocess.Popen) -> "MlflowServer":
        server = super().__new__(cls, uri)
        server.proc = proc
        return server

    @property
    def uri(self) -> str:
        """The server's http URI."""
        return str(self)

    def stop(self) -> None:
        """Terminates the server process (its whole process group: gunicorn/uvicorn workers too)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(timeout=15)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real MLflow tracking server on 127.0.0.1 (sqlite backend), stopped after the test."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    server = MlflowServer(f"http://127.0.0.1:{port}", proc)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(server.uri + "/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.stop()
        pytest.fail("mlflow server did not answer /health")
    yield server
    server.stop()
