"""The GPU-node kit (bench/gpu): wheel slimming, the closure check, the carried Ray started from its
install folder, the whole ``run.sh --cpu`` on request, and the GPU benches where CUDA is.

    python -m pytest -q tests/test_gpu_kit.py                        # CUDA tests skip without a GPU
    STILL_GPU_KIT_CPU=1 python -m pytest -q tests/test_gpu_kit.py    # also run.sh --cpu (about 10 minutes)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "bench" / "gpu"
sys.path.insert(0, str(KIT))

from checks import install_command, kill_tree, process_tree  # noqa: E402 - bench/gpu is not a package
from closure import Wheel, resolve  # noqa: E402
from slim import record_hash, slim_wheel  # noqa: E402

CUDA = torch.cuda.is_available()


def _wheel(path: Path, files: dict[str, tuple[bytes, int]], requires: tuple[str, ...] = ()) -> Path:
    """A minimal wheel holding ``files`` (name → (bytes, mode)), its METADATA and a RECORD."""
    name, version = path.name.split("-")[:2]
    info = f"{name}-{version}.dist-info"
    metadata = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)).encode()
    members = {**files, f"{info}/METADATA": (metadata, 0o644),
               f"{info}/WHEEL": (b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n", 0o644)}
    record = "".join(f"{n},{record_hash(data)},{len(data)}\n" for n, (data, _) in members.items())
    members[f"{info}/RECORD"] = ((record + f"{info}/RECORD,,\n").encode(), 0o644)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for member, (data, mode) in members.items():
            entry = zipfile.ZipInfo(member)
            entry.external_attr = (0o100000 | mode) << 16
            archive.writestr(entry, data)
    return path


def test_slim_wheel_drops_files_keeps_modes_and_installs(tmp_path):
    source = _wheel(tmp_path / "src" / "toy-1.0-py3-none-any.whl", {
        "toy/__init__.py": (b"VALUE = 1\n", 0o644), "toy/bin/tool": (b"#!/bin/sh\necho hi\n", 0o755),
        "toy/jars/big.jar": (b"x" * 10_000, 0o644)})
    slim = tmp_path / "slim" / source.name
    stats = slim_wheel(source, slim, ("toy/jars/*",))
    assert (stats["files_dropped"], stats["files_kept"]) == (1, 4)  # 2 toy files, METADATA, WHEEL
    with zipfile.ZipFile(slim) as archive:
        record = archive.read("toy-1.0.dist-info/RECORD").decode().splitlines()
    assert not any("jars" in line for line in record) and "toy-1.0.dist-info/RECORD,," in record
    site = tmp_path / "site"
    subprocess.run(install_command(sys.executable, slim.parent, site), check=True, capture_output=True)
    assert os.access(site / "toy" / "bin" / "tool", os.X_OK) and not (site / "toy" / "jars").exists()
    with pytest.raises(ValueError, match=r"no member matches \['toy/gone/\*'\]"):
        slim_wheel(source, tmp_path / "again" / source.name, ("toy/gone/*",))


def test_closure_names_what_is_missing_unused_or_excluded(tmp_path):
    def wheel(name: str, version: str, *requires: str) -> Wheel:
        return Wheel.read(_wheel(tmp_path / f"{name}-{version}-py3-none-any.whl", {}, requires))

    wheels = [wheel("top", "1.0", "dep>=2", "numpy>=1.20", "gone", 'extra-only; extra == "x"',
                    'old-python; python_version < "3.8"'),
              wheel("dep", "1.5"), wheel("stray", "0.1")]
    node = {"numpy": Version("2.5.2")}
    closure = resolve([(Requirement("top"), "still")], wheels, node, "3.12")
    assert sorted(closure.problems) == sorted([
        "dep 1.5 is carried, but top needs dep>=2",
        "gone (needed by top) is neither carried nor on the node",
        "stray is carried but nothing needs it"])
    assert closure.on_node == [("numpy>=1.20", "top")]
    with_extra = resolve([(Requirement("top[x]"), "still"), (Requirement("stray"), "still")], wheels, node, "3.12")
    assert "extra-only (needed by top[x]) is neither carried nor on the node" in with_extra.problems
    too_new = resolve([(Requirement("numpy>=3"), "still")], [], node, "3.12")
    assert too_new.problems == ["the node has numpy 2.5.2, but still needs numpy>=3"]


@pytest.mark.timeout(60)
def test_kill_tree_reaches_a_grandchild_in_a_session_of_its_own():
    """As a bench starts ``still`` (and so Ray) in a new session: a timed-out check must end that too."""
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "start_new_session=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        for _ in range(100):
            tree = process_tree(parent.pid)
            if len(tree) == 2:
                break
            time.sleep(0.05)
        assert len(tree) == 2 and os.getpgid(tree[1]) != os.getpgid(parent.pid)
        kill_tree(parent.pid)
        parent.wait(timeout=10)
        time.sleep(0.2)
        assert not Path(f"/proc/{tree[1]}").exists() or "Z" in Path(f"/proc/{tree[1]}/stat").read_text().split()[2]
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.network
@pytest.mark.timeout(600)
def test_carried_ray_installs_and_starts_from_its_folder(tmp_path):
    """prepare.py for this Python (the closure and the size check pass), the device README's install into a
    fresh folder, and env_check.py: Ray imported from that folder, started with its dashboard, a pipeline run."""
    version = "%d.%d" % sys.version_info[:2]
    wheels = tmp_path / "wheels"
    prepared = subprocess.run([sys.executable, str(KIT / "prepare.py"), "--python-version", version,
                               "--dest", str(wheels)], capture_output=True, text=True, timeout=400)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    summary = json.loads(prepared.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["mib"]["total"] < 64 and summary["closure_problems"] == []
    assert any(name.startswith("ray-2.60.0-") for name in summary["wheels"])
    with zipfile.ZipFile(next(wheels.glob("ray-*.whl"))) as archive:
        assert not any(name.startswith(("ray/jars/", "ray/rllib/")) for name in archive.namelist())
    site = tmp_path / "site"
    subprocess.run(install_command(sys.executable, wheels, site), check=True, capture_output=True, timeout=120)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    checked = subprocess.run([sys.executable, str(KIT / "env_check.py"), "--site", str(site), "--requirements",
                              str(wheels / "node-requirements.json")], env=env, capture_output=True, text=True,
                             timeout=180)
    assert checked.returncode == 0, checked.stderr[-2000:]
    facts = json.loads(checked.stdout.strip().splitlines()[-1])
    assert facts["ray"]["file"].startswith(str(site)) and facts["ray"]["dashboard"] and facts["ray"]["data_pipeline"]


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not os.environ.get("STILL_GPU_KIT_CPU"), reason="about 10 minutes: set STILL_GPU_KIT_CPU=1")
def test_run_sh_cpu_mode(tmp_path):
    """The whole kit on the CPU: both wheel sets, the node-like environment, every check."""
    done = subprocess.run(["bash", str(KIT / "run.sh"), "--cpu", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=1750)
    summary = json.loads((tmp_path / "out" / "gpu_checks.json").read_text())
    assert done.returncode == 0 and summary["ok"], (summary["failed"], done.stderr[-2000:])
    assert set(summary["steps"]) >= {"install", "env", "infer", "train"}
    train = json.loads((tmp_path / "out" / "gpu_train.json").read_text())
    assert train["steps"]["stream"]["ingest"] == "stream" and train["resumed_ok"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.timeout(900)
@pytest.mark.parametrize("bench, args", [
    ("gpu_infer.py", ["--rows", "1024"]),
    ("gpu_train.py", ["--rows", "100000", "--budget", "600", "--step-timeout", "150"]),
])
def test_gpu_bench_on_cuda(tmp_path, bench, args):
    """Each GPU bench at a small size on the GPU: every step ok (the train bench: on the GPU, resumed)."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / bench), *args, "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=880)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and result["ok"], (result, done.stderr[-2000:])
