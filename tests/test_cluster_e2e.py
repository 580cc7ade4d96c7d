"""Issue 5 end to end on a real two-node Ray cluster: a submitted infer → train pipeline,
a driver killed mid-inference, a worker node killed mid-training (last: it leaves one node;
a test that finds one starts a replacement first).

One ``LocalCluster`` (a head and one worker node, 1 CPU each, free ports, its own token and
Ray temp dir) serves the module. Every still command runs as a subprocess with an
environment built from scratch (the cluster's token, nothing of the pytest process's own
Ray or MLflow), so these tests can share a pytest session with tests that hold an embedded
``ray.init()``. Both nodes are on this machine, so the test's ``tmp_path`` is storage that
both of them (and the driver) see, as a shared filesystem or bucket would be on a real
cluster. Run alone: ``pytest -m multinode tests/test_cluster_e2e.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _ray_workers import train_worker_pids
from _teacher_fixtures import (
    assert_killed_store,
    kill_infer_mid_run,
    synthetic_parquet,
    train_digits_teacher,
    wide_mlp_teacher,
)

from cluster import procs
from cluster.local import LocalCluster
from still.errors import StillError
from teacher_infer import store as st

pytestmark = pytest.mark.multinode


def _base_env() -> dict[str, str]:
    """This process's environment without anything that points at a Ray or MLflow."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
    return {k: v for k, v in os.environ.items() if k not in drop}


def still(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120
          ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "still_cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, check=False)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def json_lines(out: str) -> list[dict]:
    found = []
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head + 1 worker node (1 CPU each); stopped, with every process of it, at the end."""
    state_dir = tmp_path_factory.mktemp("e2e-cluster")
    t0 = time.monotonic()
    handle = LocalCluster.start(workers=1, cpus_per_node=1, state_dir=state_dir, timeout_s=120)
    print(f"\ncluster up in {time.monotonic() - t0:.1f} s: {handle.summary()}")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def env(cluster):
    """A client environment: the cluster's token, and no address or tracking URI."""
    return {**_base_env(), **cluster.client_env()}


def _worker_nodes(cluster: LocalCluster) -> int:
    return len(cluster.node_pids()) - 1


def _ensure_two_nodes(cluster: LocalCluster) -> None:
    """Two live nodes: a replacement joins when an earlier test killed the worker node."""
    try:
        cluster.wait_for_nodes(2, timeout_s=10)
    except StillError:
        cluster.add_worker(timeout_s=120)
    assert cluster.alive_nodes() == 2


STATE_SCRIPT = textwrap.dedent("""
    import json, sys
    from ray.util.state import list_actors, list_nodes, list_tasks
    address, job_id = sys.argv[1], sys.argv[2]
    nodes = {n.node_id: {"head": bool(n.is_head_node), "state": n.state} for n in list_nodes(address=address)}
    actors = [{"class": a.class_name, "node": a.node_id, "state": a.state}
              for a in list_actors(address=address, filters=[("job_id", "=", job_id)], limit=10000, detail=True)]
    tasks = [{"name": t.name, "node": t.node_id, "state": t.state, "type": t.type}
             for t in list_tasks(address=address, filters=[("job_id", "=", job_id)], limit=10000, detail=True)]
    print(json.dumps({"nodes": nodes, "actors": actors, "tasks": tasks}))
""")


def ray_state(cluster: LocalCluster, env: dict[str, str], job_id: str) -> dict:
    """Nodes, and the actors and tasks of one Ray job, from Ray's state API (a subprocess:
    this pytest process may hold an embedded Ray of its own)."""
    run = subprocess.run([sys.executable, "-c", STATE_SCRIPT, cluster.dashboard_url, job_id], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return last_json(run.stdout)


# --------------------------------------------------------------------------- 1. a submitted pipeline


@pytest.mark.timeout(420)
def test_submitted_infer_then_train_pipeline_uses_both_nodes(cluster, env, tmp_path):
    _ensure_two_nodes(cluster)
    teacher = train_digits_teacher(tmp_path / "teacher.pt")
    stores, out, db = tmp_path / "stores", tmp_path / "student", tmp_path / "mlflow.db"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "pipeline.yaml").write_text(textwrap.dedent(f"""
        name: e2e
        defaults: {{data: {{source: "builtin:digits"}}}}
        stages:
          - name: store
            verb: infer
            config:
              teacher: {{uri: "{teacher}"}}
              store: {{root: "{stores}", mode: topk, k: 5}}
          - name: student
            verb: train
            config:
              store: {{uri: "${{store.store}}"}}
              student: {{width: 64, depth: 1}}
              kd: {{temperature: 4, weight: 0.7}}
              train: {{epochs: 2, batch_size: 64, lr: 0.01, name: e2e-student, output_dir: "{out}"}}
              # one Ray Train worker on each node: the placement group spreads its bundles
              scaling: {{num_workers: 2, placement_strategy: STRICT_SPREAD}}
    """))
    tracking = f"sqlite:///{db}"
    t0 = time.monotonic()
    run = still("submit", "--address", cluster.dashboard_url, "--working-dir", str(job_dir),
                "--env", f"MLFLOW_TRACKING_URI={tracking}", "--json", "--", "still run pipeline.yaml --json",
                env=env, timeout=380)
    seconds = time.monotonic() - t0
    (tmp_path / "job.log").write_text(run.stdout + run.stderr)
    print(f"submit → {run.returncode} in {seconds:.1f} s (log: {tmp_path / 'job.log'})")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    submitted = last_json(run.stdout)
    assert submitted["status"] == "SUCCEEDED"
    print("\n".join(line for line in run.stdout.splitlines() if line.startswith(("==", "    ", "  total"))))

    # The job's own --json line: one object per stage.
    (outcome,) = [o for o in json_lines(run.stdout) if "store" in o and "student" in o]
    store_uri, student = outcome["store"]["store"], outcome["student"]
    assert outcome["store"]["rows"] == 1797 and outcome["store"]["cache_hit"] is False
    assert Path(store_uri).parent == stores
    assert student["store_key"] == outcome["store"]["key"] and student["epochs"] == 2
    assert student["student_test_accuracy"] > 0.5
    assert [h["world_size"] for h in student["history"]] == [2, 2]
    assert Path(student["checkpoint"]).is_file() and Path(student["checkpoint"]).is_relative_to(out)

    verify = still("store", "verify", store_uri, "--json", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert last_json(verify.stdout)["ok"] is True

    # The train stage's MLflow run, in the sqlite database the job was pointed at (--env only).
    from mlflow.tracking import MlflowClient

    mlflow_run = MlflowClient(tracking_uri=tracking).get_run(student["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "e2e-student"
    assert mlflow_run.data.tags["store.key"] == outcome["store"]["key"]
    assert "val_accuracy" in mlflow_run.data.metrics

    # Ray's record of the job: a training worker on each node, inference tasks on both.
    from ray.job_submission import JobSubmissionClient

    token = Path(cluster.token_path).read_text().strip()
    info = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {token}"}).get_job_info(
        submitted["job_id"])
    state = ray_state(cluster, env, info.job_id)
    alive = {node for node, n in state["nodes"].items() if n["state"] == "ALIVE"}
    head = {node for node, n in state["nodes"].items() if n["head"]}
    assert len(alive) == 2 and head <= alive
    train_workers = [a for a in state["actors"] if a["class"] == "RayTrainWorker"]
    assert len(train_workers) == 2, state["actors"]
    assert {a["node"] for a in train_workers} == alive  # one on the head, one on the worker node
    infer_tasks = [t for t in state["tasks"] if "_fused_shard" in t["name"] and t["state"] == "FINISHED"]
    print("infer tasks:", [(t["name"], t["node"][:8]) for t in infer_tasks])
    print("all tasks:", sorted({(t["name"], t["node"][:8] if t["node"] else None) for t in state["tasks"]}))
    assert infer_tasks, state["tasks"]


# --------------------------------------------------------------------------- 2. a driver killed mid-inference


@pytest.mark.timeout(300)
def test_infer_driver_killed_mid_run_then_rerun_resumes(cluster, env, tmp_path):
    """kill -9 of a ``still infer`` driver connected to the cluster while shards are being
    written on both nodes; a rerun writes only the missing shards and the store verifies."""
    _ensure_two_nodes(cluster)
    rows, shard_rows = 20_000, 500
    planned = rows // shard_rows
    data = synthetic_parquet(tmp_path / "data", rows=rows, features=784)
    teacher = wide_mlp_teacher(tmp_path / "teacher.pt")
    root = tmp_path / "stores"
    command = [sys.executable, "-m", "still_cli", "infer", "--address", cluster.address,
               f"data.source={data}", f"teacher.uri={teacher}", f"store.root={root}", "store.mode=topk", "store.k=5",
               f"infer.shard_rows={shard_rows}", f"infer.batch_size={shard_rows}", "tracking.enabled=false"]
    t0 = time.monotonic()
    parts = kill_infer_mid_run(command, tmp_path, env, root, timeout=240)
    print(f"driver killed after {time.monotonic() - t0:.1f} s with {len(parts)} shards written")
    store_dir, killed_parts = assert_killed_store(root, shard_rows=shard_rows, planned=planned)

    t1 = time.monotonic()
    rerun = subprocess.run([*command, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    print(f"rerun in {time.monotonic() - t1:.1f} s")
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = last_json(rerun.stdout)
    assert summary["rows"] == rows and summary["store"] == str(store_dir) and summary["cache_hit"] is False
    assert summary["shards_resumed"] >= len(killed_parts)
    assert summary["shards_written"] + summary["shards_resumed"] == planned
    assert 0 < summary["shards_written"] < planned  # the rerun wrote only the missing shards
    verify = still("store", "verify", str(store_dir), "--json", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert last_json(verify.stdout)["ok"] is True
    ids = st.open_store(str(store_dir)).read_table(["id"])["id"].to_numpy()
    assert np.array_equal(np.sort(ids), np.arange(rows))  # every id exactly once
    assert not list(store_dir.glob(".tmp-*")) and not (store_dir / st.PLAN_NAME).exists()


# --------------------------------------------------------------------------- 3. a worker node killed mid-training


def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


@pytest.mark.timeout(420)
def test_worker_node_killed_mid_training_finishes_elastically(cluster, env, tmp_path):
    """Two Ray Train workers, one per node (elastic [1, 2]); the worker node's raylet is
    SIGKILLed after two checkpoints: training restarts from the last checkpoint on the
    surviving node with one worker and finishes, without a replacement node."""
    _ensure_two_nodes(cluster)
    out, epochs = tmp_path / "student", 20
    run_dir = out / "ray" / "elastic"
    # After the kill, Ray Train's elastic policy first restarts at the old size: its view of the
    # cluster (refreshed every 20 s) still counts the dead node's CPU. Each try waits
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) for its placement group before the
    # next decision; a placement group that fits is ready in well under a second, so 15 s is ample.
    driver_env = {**env, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    command = [sys.executable, "-m", "still_cli", "train", "--address", cluster.address,
               "data.source=builtin:digits", "kd.weight=0", "student.width=64", "student.depth=1",
               f"train.epochs={epochs}", "train.batch_size=16", "train.name=elastic", f"train.output_dir={out}",
               "train.max_failures=3", "scaling.num_workers=[1,2]", "scaling.placement_strategy=STRICT_SPREAD",
               "tracking.enabled=false", "--json"]
    t0 = time.monotonic()
    with open(tmp_path / "stderr.log", "w") as err:  # Ray's and the controller's log lines, for a failure
        proc = subprocess.Popen(command, cwd=tmp_path, env=driver_env, stdout=subprocess.PIPE, stderr=err,
                                text=True, start_new_session=True)
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)  # a full pipe never blocks
    reader.start()
    killed_at = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_checkpoints(run_dir)) >= 2:  # the first is then surely registered
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before the node could be killed"
        assert len(_checkpoints(run_dir)) >= 2, "no checkpoints in time"
        # One worker on each node: rank pids under the head's and the worker node's processes.
        worker = _worker_nodes(cluster) - 1
        ranks = train_worker_pids()
        head_pid, worker_pid = cluster.node_pids()[0], cluster.node_pids()[worker + 1]
        head_tree = procs.tree({head_pid: procs.start_ticks(head_pid)})
        worker_tree = procs.tree({worker_pid: procs.start_ticks(worker_pid)})
        assert len(ranks) == 2 and len(ranks & head_tree) == 1 and len(ranks & worker_tree) == 1, ranks
        cluster.kill_worker_node(worker)
        killed_at = time.monotonic() - t0
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(timeout=10)
    seconds = time.monotonic() - t0
    print(f"worker node killed at {killed_at:.1f} s; training finished at {seconds:.1f} s")
    output = "".join(chunks)
    assert proc.returncode == 0, output[-3000:] + (tmp_path / "stderr.log").read_text()[-5000:]
    summary = last_json(output)  # --json: the last line of stdout, after Ray's own output
    history = summary["history"]
    assert summary["epochs"] == epochs and [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert summary["resumed_from"] >= 1  # restarted from a checkpoint, not from epoch 0
    resumed = summary["resumed_from"]
    assert resumed < epochs  # the kill landed before the end
    sizes = [h["world_size"] for h in history]
    assert set(sizes[:resumed]) == {2} and set(sizes[resumed:]) == {1}, sizes  # 2 workers, then 1 on the head
    assert all(h["resumed_from"] == resumed for h in history[resumed:])
    assert Path(summary["checkpoint"]).is_file() and Path(summary["torchscript"]).is_file()
    assert summary["student_test_accuracy"] > 0.8
    assert cluster.alive_nodes() == 1  # no replacement joined: the surviving node finished it
