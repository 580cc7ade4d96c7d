"""Shipped cluster YAML, runtime_env building, token resolution, process bookkeeping.

No Ray cluster here: the YAML is checked for the fields still relies on, and the process
helpers run against real (tiny) processes. Multi-node tests are in test_cluster_jobs.py.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster import auth, procs
from cluster.runtime_env import DEFAULT_EXCLUDES, build_runtime_env, describe, parse_env
from cluster.submit import entrypoint_of, job_server_url
from still.errors import StillError

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "cluster" / "specs"
RAY_IMAGE = "rayproject/ray:2.60.0-py311"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/**/*.yaml")) + sorted(ROOT.glob("cluster/**/*.yaml")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_parses_and_says_how_to_run_it(path):
    assert _docs(path), f"{path} is empty"
    if path.is_relative_to(SPECS):
        assert path.read_text().startswith("# Run:"), "shipped YAML starts with the command that runs it"


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _ray_groups(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, rayStartParams, container) for the head and each worker group."""
    head = cluster_spec["headGroupSpec"]
    groups = [("head", head.get("rayStartParams", {}), head["template"]["spec"]["containers"][0])]
    for group in cluster_spec["workerGroupSpecs"]:
        groups.append((group["groupName"], group.get("rayStartParams", {}), group["template"]["spec"]["containers"][0]))
    return groups


def _kuberay_clusters() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(SPECS.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "RayCluster":
                found.append((path.name, doc["spec"]))
            elif doc.get("kind") == "RayJob":
                found.append((path.name, doc["spec"]["rayClusterSpec"]))
    return found


def test_kuberay_manifests_exist():
    kinds = {doc.get("kind") for path in SPECS.glob("*.yaml") for doc in _docs(path)}
    assert {"RayCluster", "RayJob"} <= kinds


@pytest.mark.parametrize("name,spec", _kuberay_clusters(), ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_cluster_is_ray_260_with_token_auth_and_a_gpu_group(name, spec):
    assert spec["rayVersion"] == "2.60.0"
    groups = _ray_groups(spec)
    for group, params, container in groups:
        assert container["image"].startswith(RAY_IMAGE), (group, container["image"])
        env = _env(container)
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: group {group} lacks RAY_AUTH_MODE=token"
        assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}), f"{name}: {group}'s token must come from a Secret"
        if params.get("dashboard-host") == "0.0.0.0":
            assert env.get("RAY_AUTH_MODE") == "token", "dashboard on 0.0.0.0 only with token auth"
    gpu = [g for g, _, c in groups if c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") == 1]
    assert gpu == ["teacher-gpu"], gpu
    assert "train" in [g for g, _, _ in groups]
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


def test_rayjob_runs_still_with_mlflow_from_a_secret():
    (job,) = [d for d in _docs(SPECS / "rayjob.yaml") if d["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"].split()[0] == "still"
    submitter = _env(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    assert submitter["RAY_AUTH_MODE"] == "token" and "secretKeyRef" in submitter["RAY_AUTH_TOKEN"]
    for _, _, container in _ray_groups(job["spec"]["rayClusterSpec"]):
        assert "secretKeyRef" in _env(container)["MLFLOW_TRACKING_URI"]
    assert "still" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])["pip"][0]


def test_cluster_launcher_yaml_has_gpu_and_cpu_workers_and_token_auth():
    (spec,) = _docs(SPECS / "aws.yaml")
    assert spec["provider"]["type"] == "aws"
    types = spec["available_node_types"]
    assert types[spec["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["teacher-gpu"]["resources"]["GPU"] == 1
    assert "GPU" not in types["train"]["resources"]
    images = [spec["docker"]["image"], spec["docker"]["head_image"], spec["docker"]["worker_image"]]
    assert all(image.startswith(RAY_IMAGE) for image in images)
    assert any("still" in cmd and "pip install" in cmd for cmd in spec["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in spec[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    head_start = " ".join(spec["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "/home/ray/.ray/auth_token" in spec["file_mounts"]


# ----------------------------------------------------------------------------- runtime_env


def test_runtime_env_excludes_heavy_dirs_and_keeps_env_out_of_what_is_printed(tmp_path):
    env = parse_env(["MLFLOW_TRACKING_URI=http://u:pw-s3cret@mlflow:5000", "AWS_SECRET_ACCESS_KEY"],
                    environ={"AWS_SECRET_ACCESS_KEY": "aws-s3cret"})
    runtime_env = build_runtime_env(str(tmp_path), env, ["einops"], ["data/"])
    assert runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "aws-s3cret"
    assert runtime_env["working_dir"] == str(tmp_path)
    for heavy in (".git", "mlruns", "mlartifacts", "mlflow.db", "stores", "bench/results", "*.egg-info"):
        assert heavy in runtime_env["excludes"]
    assert runtime_env["excludes"][-1] == "data/" and runtime_env["pip"] == ["einops"]
    shown = describe(runtime_env)
    assert "s3cret" not in shown and "MLFLOW_TRACKING_URI=<redacted>" in shown
    assert set(DEFAULT_EXCLUDES) <= set(runtime_env["excludes"])


@pytest.mark.parametrize("item,message", [
    ("1BAD=x", "expected NAME=VALUE"),
    ("STILL_TEST_SURELY_UNSET", "is not set in this shell"),
    ("RAY_AUTH_TOKEN=x", "do not pass RAY_AUTH_TOKEN"),
])
def test_bad_env_items_are_refused(item, message):
    with pytest.raises(StillError, match=message):
        parse_env([item], environ={})


def test_working_dir_must_exist(tmp_path):
    with pytest.raises(StillError, match="not a directory"):
        build_runtime_env(str(tmp_path / "nope"))


def test_entrypoint_is_the_command_as_typed():
    assert entrypoint_of(["--", "still", "train", "--config", "a b.yaml"]) == "still train --config 'a b.yaml'"
    assert entrypoint_of(["python x.py && still --help"]) == "python x.py && still --help"
    with pytest.raises(StillError, match="no command"):
        entrypoint_of(["--"])


def test_submit_refuses_a_secret_in_the_command():
    from cluster.submit import submit

    with pytest.raises(StillError, match="--env TOKEN also appears in the command"):
        submit(["echo", "hunter2-secret"], address="http://127.0.0.1:1", env={"TOKEN": "hunter2-secret"})


def test_addresses(monkeypatch, tmp_path):
    monkeypatch.setenv("STILL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert job_server_url("http://head:8265/") == "http://head:8265"
    assert job_server_url("ray://head:10001") == "http://head:8265"
    assert job_server_url("head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://ray.example.com")
    assert job_server_url("") == "https://ray.example.com"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(StillError, match="no cluster address"):
        job_server_url("")
    with pytest.raises(StillError, match="names no job server"):
        job_server_url("auto")


# ----------------------------------------------------------------------------- token


def test_token_follows_rays_precedence(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth.auth_headers() == {}, "no token is sent unless RAY_AUTH_MODE=token (as in Ray)"
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert auth.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "tok").write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert auth.resolve_token() == ("from-file", f"RAY_AUTH_TOKEN_PATH={tmp_path / 'tok'}")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    with pytest.raises(StillError, match="no token was found"):
        auth.resolve_token()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default")
    assert auth.resolve_token()[0] == "from-default"
    monkeypatch.delenv("RAY_AUTH_MODE")
    message = str(auth.missing_token_error("http://h:8265"))
    assert message.startswith("the cluster at http://h:8265 requires a token: set RAY_AUTH_MODE=token and "
                              "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    assert "RAY_AUTH_MODE=token alone uses the token in" in message


# ----------------------------------------------------------------------------- processes


def _spawn_tree() -> subprocess.Popen:
    """A session leader with a child and a grandchild that starts a session of its own
    (like Ray's job drivers)."""
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "print('ready', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.timeout(60)
def test_terminate_stops_the_tree_and_nothing_else():
    ours, other = _spawn_tree(), _spawn_tree()
    try:
        mine = procs.tree({ours.pid: procs.start_ticks(ours.pid)})
        theirs = procs.tree({other.pid: procs.start_ticks(other.pid)})
        assert len(mine) == 3 and len(theirs) == 3 and not mine & theirs
        assert procs.tree({ours.pid: 12345}) == set(), "a reused pid is not ours"
        signalled = procs.terminate(mine, grace_s=1)
        assert signalled == mine
        ours.wait(5)
        assert not any(procs.read_proc(p) for p in mine)
        assert all(procs.read_proc(p) for p in theirs)
    finally:
        procs.terminate(procs.tree({other.pid: procs.start_ticks(other.pid)}), grace_s=1)
        other.wait(5)


def test_cluster_status_and_down_when_nothing_is_up(tmp_path):
    from still_cli.main import main

    t0 = time.monotonic()
    assert main(["cluster", "local", "status", "--state-dir", str(tmp_path)]) == 0
    assert main(["cluster", "local", "down", "--state-dir", str(tmp_path)]) == 0
    assert time.monotonic() - t0 < 5
