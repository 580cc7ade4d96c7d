"""``still cluster local``, ``still submit`` and ``still jobs`` against a real two-node cluster.

One cluster (a head and one worker node, 1 CPU each, free ports, its own token) is started
once for the module through the real CLI; every command runs as a subprocess with an
environment built from scratch, so nothing leaks in from the pytest process (which may hold
an embedded Ray of its own). Run alone: ``pytest -m multinode tests/test_cluster_jobs.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cluster import procs
from cluster.local import LocalCluster

pytestmark = pytest.mark.multinode

SECRET = "s3cret-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:16]
MLFLOW_URI = f"http://still:{SECRET}@mlflow.internal:5000"


def _base_env() -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    return {k: v for k, v in os.environ.items() if k not in drop}


def still(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "still_cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head + 1 worker node started by ``still cluster local up``; stopped at the end."""
    state_dir = tmp_path_factory.mktemp("cluster-state")
    t0 = time.monotonic()
    up = still("cluster", "local", "up", "--workers", "1", "--cpus-per-node", "1", "--state-dir", str(state_dir),
               "--port", "0", "--dashboard-port", "0", "--json", env=_base_env(), timeout=180)
    assert up.returncode == 0, up.stderr
    summary = last_json(up.stdout)
    handle = LocalCluster.attach(state_dir)
    assert handle is not None and handle.address == summary["address"] and handle.dashboard_url == summary["dashboard"]
    print(f"\ncluster up in {time.monotonic() - t0:.1f} s: {summary}")
    yield handle
    if LocalCluster.attach(state_dir) is not None:
        handle.stop()
    for proc in getattr(handle, "_popen", {}).values():  # nodes this process started: reap them
        proc.poll()


@pytest.fixture(scope="module")
def env(cluster):
    """A client environment that holds the cluster's token."""
    return {**_base_env(), **cluster.client_env(), "STILL_CLUSTER_SECRET": SECRET}


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory):
    """A working_dir with a job script that runs a task on every node and checks the secret
    without printing it."""
    root = tmp_path_factory.mktemp("job")
    (root / "check_cluster.py").write_text(textwrap.dedent("""
        import hashlib, os, socket
        import ray
        ray.init()
        print("nodes alive:", sum(n["Alive"] for n in ray.nodes()), flush=True)
        @ray.remote(num_cpus=0.1, resources={"still_worker": 0.1})
        def on_worker():
            return os.getpid()
        print("ran on the worker node:", ray.get(on_worker.remote()) > 0, flush=True)
        for name in ("MLFLOW_TRACKING_URI", "STILL_CLUSTER_SECRET"):
            print(name, "sha256", hashlib.sha256(os.environ[name].encode()).hexdigest()[:12], flush=True)
    """))
    (root / "mlruns").mkdir()
    (root / "mlruns" / "big.bin").write_bytes(b"\0" * 1024)  # excluded from the upload
    return root


def _sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


@pytest.mark.timeout(300)
def test_submit_streams_logs_succeeds_and_keeps_secrets_out(cluster, env, job_dir):
    t0 = time.monotonic()
    run = still("submit", "--address", cluster.dashboard_url, "--working-dir", str(job_dir),
                "--env", f"MLFLOW_TRACKING_URI={MLFLOW_URI}", "--env", "STILL_CLUSTER_SECRET", "--json",
                "--", "echo FILES: $(ls) && python check_cluster.py && still --help", env=env, timeout=240)
    print(f"submit → SUCCEEDED in {time.monotonic() - t0:.1f} s")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = last_json(run.stdout)
    assert summary["status"] == "SUCCEEDED" and summary["job_id"].startswith("raysubmit_")
    assert f"job {summary['job_id']} submitted" in run.stderr
    logs = run.stdout
    assert "nodes alive: 2" in logs and "ran on the worker node: True" in logs, logs
    assert f"MLFLOW_TRACKING_URI sha256 {_sha(MLFLOW_URI)}" in logs
    assert f"STILL_CLUSTER_SECRET sha256 {_sha(SECRET)}" in logs
    (files,) = [line for line in logs.splitlines() if line.startswith("FILES:")]
    assert files.split()[1:] == ["check_cluster.py"], logs
    assert "usage: still" in logs, "still is runnable inside the job"
    assert SECRET not in run.stdout + run.stderr
    assert "MLFLOW_TRACKING_URI=<redacted>" in run.stderr

    # What the job API keeps: the secret is in runtime_env.env_vars only (readable with the
    # token, as documented), never in the entrypoint or the metadata.
    from ray.job_submission import JobSubmissionClient

    token = Path(cluster.token_path).read_text().strip()
    info = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {token}"}).get_job_info(
        summary["job_id"])
    assert SECRET not in info.entrypoint and SECRET not in json.dumps(info.metadata or {})
    assert info.runtime_env["env_vars"]["STILL_CLUSTER_SECRET"] == SECRET

    status = still("jobs", "status", summary["job_id"], "--address", cluster.dashboard_url, "--json", env=env)
    assert status.returncode == 0 and last_json(status.stdout)["status"] == "SUCCEEDED"
    logs = still("jobs", "logs", summary["job_id"], "--address", cluster.dashboard_url, env=env)
    assert logs.returncode == 0 and "nodes alive: 2" in logs.stdout
    listing = still("jobs", "list", "--address", cluster.dashboard_url, "--json", env=env)
    assert summary["job_id"] in {job["job_id"] for job in last_json(listing.stdout)["jobs"]}
    assert SECRET not in listing.stdout


@pytest.mark.timeout(120)
def test_failing_job_exits_non_zero_with_one_line(cluster, env):
    run = still("submit", "--address", cluster.dashboard_url, "--json", "--",
                "python", "-c", "import sys; print('about to fail'); sys.exit(3)", env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert last_json(run.stdout)["status"] == "FAILED" and "about to fail" in run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("still: error:")]
    assert len(errors) == 1 and "FAILED" in errors[0] and "exit code 3" in errors[0]


@pytest.mark.timeout(120)
def test_stop_a_running_job_and_follow_its_logs(cluster, env):
    run = still("submit", "--address", cluster.dashboard_url, "--no-wait", "--json", "--",
                "python -c \"import time; print('started', flush=True); time.sleep(120)\"", env=env)
    assert run.returncode == 0, run.stderr
    job_id = last_json(run.stdout)["job_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = last_json(still("jobs", "status", job_id, "--address", cluster.dashboard_url, "--json",
                                 env=env).stdout)["status"]
        if status == "RUNNING":
            break
        time.sleep(1)
    follow = subprocess.Popen([sys.executable, "-m", "still_cli", "jobs", "logs", job_id, "--follow", "--address",
                               cluster.dashboard_url, "--json"], env=env, stdout=subprocess.PIPE, text=True)
    stop = still("jobs", "stop", job_id, "--address", cluster.dashboard_url, "--json", env=env)
    assert stop.returncode == 0, stop.stderr
    assert last_json(stop.stdout) == {"job_id": job_id, "status": "STOPPED", "stopped": True}
    out, _ = follow.communicate(timeout=60)
    assert "started" in out and last_json(out)["status"] == "STOPPED"
    missing = still("jobs", "status", "raysubmit_nope", "--address", cluster.dashboard_url, env=env)
    assert missing.returncode == 2 and "no job raysubmit_nope" in missing.stderr


@pytest.mark.timeout(120)
def test_without_the_token_submission_is_refused_clearly(cluster, env):
    no_token = _base_env()
    run = still("submit", "--address", cluster.dashboard_url, "--", "echo", "hi", env=no_token)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"still: error: the cluster at {cluster.dashboard_url} requires a token: set RAY_AUTH_MODE=token and "
        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH" + (
            f" (RAY_AUTH_MODE=token alone uses the token in {os.path.expanduser('~/.ray/auth_token')})"
            if os.path.exists(os.path.expanduser("~/.ray/auth_token")) else ""))
    wrong = still("jobs", "list", "--address", cluster.dashboard_url,
                  env={**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"})
    assert wrong.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in wrong.stderr
    # The GCS address works too: still asks the GCS (with the token) for the job server.
    via_gcs = still("jobs", "list", "--address", cluster.address, "--json", env=env)
    assert via_gcs.returncode == 0, via_gcs.stderr
    assert last_json(via_gcs.stdout)["address"] == cluster.dashboard_url


@pytest.mark.timeout(120)
def test_second_up_in_the_same_state_dir_is_refused(cluster, env):
    run = still("cluster", "local", "up", "--state-dir", str(cluster.state_dir), env=env)
    assert run.returncode == 2 and "already up" in run.stderr and cluster.address in run.stderr
    status = still("cluster", "local", "status", "--state-dir", str(cluster.state_dir), "--json", env=env)
    assert last_json(status.stdout)["up"] is True and last_json(status.stdout)["alive_nodes"] == 2


@pytest.mark.timeout(180)
def test_kill_worker_node_then_a_replacement_joins(cluster):
    t0 = time.monotonic()
    raylet = cluster.raylet_pid(0)
    assert raylet and procs.read_proc(raylet).name == "raylet"
    assert cluster.kill_worker_node(0) == raylet
    deadline = time.monotonic() + 60
    while cluster.alive_nodes() != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.alive_nodes() == 1
    assert cluster.add_worker() == 1
    assert cluster.alive_nodes() == 2 and cluster.raylet_pid(1)
    print(f"kill + replacement join: {time.monotonic() - t0:.1f} s")


@pytest.mark.timeout(180)
def test_down_stops_exactly_the_cluster(cluster, env, tmp_path):
    # Another Ray on the same machine (default ports, its own session) must survive.
    other = subprocess.Popen(
        [sys.executable, "-c", ("import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=False); "
                                "print('up', flush=True); time.sleep(300)")],
        env=_base_env(), stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up"
        other_pids = procs.tree({other.pid: procs.start_ticks(other.pid)})
        assert any(procs.read_proc(p).name == "raylet" for p in other_pids)
        ours = cluster.all_pids()
        assert ours and not ours & other_pids
        t0 = time.monotonic()
        down = still("cluster", "local", "down", "--state-dir", str(cluster.state_dir), "--json", env=env)
        print(f"down in {time.monotonic() - t0:.1f} s")
        assert down.returncode == 0, down.stderr
        assert last_json(down.stdout)["stopped"] > 0
        assert not [p for p in ours if procs.read_proc(p)], "a process of the cluster is still alive"
        assert all(procs.read_proc(p) for p in other_pids), "down touched a process it did not start"
        assert not (cluster.state_dir / "cluster.json").exists()
        status = still("cluster", "local", "status", "--state-dir", str(cluster.state_dir), "--json", env=env)
        assert last_json(status.stdout)["up"] is False
    finally:
        procs.terminate(procs.tree({other.pid: procs.start_ticks(other.pid)}), grace_s=2)
        other.wait(10)
