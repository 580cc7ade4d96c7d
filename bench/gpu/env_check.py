"""What a node offers still once the carried wheels are installed: versions, requirements met, CUDA, Ray.

    PYTHONPATH=SITE:. python bench/gpu/env_check.py --site SITE --requirements .whl/node-requirements.json

Checks, in order: that ``ray`` is imported from ``--site`` (the carried wheel, not some
other copy); that Ray's Data/Train/Tune modules, ``ray.train.torch`` (where torch is)
and ``still_cli`` import; that Ray starts as still starts it (``still.ray_setup.init_ray``:
an embedded cluster with its dashboard), sees the GPU where torch does, answers on the
dashboard's HTTP port and runs a small Ray Data pipeline. The node's own packages are
held against what the carried wheels and still require (``node-requirements.json``,
written by prepare.py); a mismatch is a warning, since pip's ``--no-deps`` install
ignores it and the checks that follow show whether it matters.

The last stdout line is one JSON object; exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

MODULES = ("ray", "ray.data", "ray.train", "ray.tune", "still_cli")


def log(message: str) -> None:
    print(f"[gpu-env] {message}", file=sys.stderr, flush=True)


def node_versions(path: Path) -> dict[str, str | None]:
    """The installed version of each package ``path`` names (None: missing)."""
    versions: dict[str, str | None] = {}
    for entry in json.loads(path.read_text()):
        name = Requirement(entry["requirement"]).name
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return dict(sorted(versions.items()))


def requirement_warnings(path: Path) -> list[str]:
    """One line per requirement of ``path`` that the installed packages do not meet."""
    warnings = []
    for entry in json.loads(path.read_text()):
        requirement = Requirement(entry["requirement"])
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            warnings.append(f"{requirement.name} is missing ({entry['needed_by']} needs {requirement})")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            warnings.append(f"{requirement.name} {version}: {entry['needed_by']} needs {requirement}")
    return warnings


def torch_facts() -> dict[str, Any]:
    """torch's version and what it sees: CUDA, the device's name and memory."""
    try:
        import torch
    except ImportError:
        return {"torch": None}
    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if facts["cuda"]:
        properties = torch.cuda.get_device_properties(0)
        facts.update(device=properties.name, gpu_memory_gib=round(properties.total_memory / 2**30, 1),
                     cuda_version=torch.version.cuda)
    return facts


def ray_facts(cuda: bool) -> dict[str, Any]:
    """Starts Ray as still does, then: its resources, the dashboard's answer, a small Ray Data pipeline."""
    import ray
    import ray.data

    from still.config import RayConfig
    from still.ray_setup import init_ray

    started = time.perf_counter()
    init_ray(RayConfig())
    facts: dict[str, Any] = {"start_s": round(time.perf_counter() - started, 2),
                             "resources": {key: value for key, value in ray.cluster_resources().items()
                                           if key in ("CPU", "GPU", "memory", "object_store_memory")}}
    try:
        url = ray._private.worker._global_node.webui_url  # noqa: SLF001 - init_ray keeps no RayContext
        with urllib.request.urlopen(f"http://{url}/api/version", timeout=10) as answer:
            facts["dashboard"] = answer.status == 200
    except urllib.error.HTTPError as exc:  # 401 under Ray's token auth (on by default): it answered
        facts["dashboard"] = exc.code == 401
        facts["dashboard_error"] = f"HTTP {exc.code}"
    except Exception as exc:  # noqa: BLE001 - recorded; a dashboard that does not answer fails the check
        facts["dashboard"] = False
        facts["dashboard_error"] = f"{type(exc).__name__}: {exc}"[:300]
    total = ray.data.range(10_000).map_batches(lambda batch: {"twice": batch["id"] * 2}).sum("twice")
    facts["data_pipeline"] = total == 2 * sum(range(10_000))
    if cuda:
        facts["gpu_task"] = ray.get(ray.remote(num_gpus=1)(_device_name).remote())
    ray.shutdown()
    return facts


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="", help="the folder the wheels were installed into (pip --target)")
    parser.add_argument("--requirements", default="", help="node-requirements.json from prepare.py")
    parser.add_argument("--out", default="", help="also save the result here")
    args = parser.parse_args(argv)
    problems: list[str] = []
    result: dict[str, Any] = {"check": "env", "python": platform.python_version(), "executable": sys.executable,
                              "machine": platform.machine(), **torch_facts()}
    log(f"python {result['python']}, torch {result['torch']}, cuda {result.get('cuda')}")
    if args.requirements:
        result["node_versions"] = node_versions(Path(args.requirements))
    result["requirement_warnings"] = requirement_warnings(Path(args.requirements)) if args.requirements else []
    for warning in result["requirement_warnings"]:
        log(f"warning: {warning}")
    imported = {}
    for name in (*MODULES, *(("ray.train.torch",) if result["torch"] else ())):
        try:
            imported[name] = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - every failed import is recorded
            problems.append(f"import {name}: {type(exc).__name__}: {exc}"[:400])
    if "ray" in imported:
        result["ray"] = {"version": imported["ray"].__version__, "file": imported["ray"].__file__}
        if args.site and not Path(imported["ray"].__file__).resolve().is_relative_to(Path(args.site).resolve()):
            problems.append(f"ray was imported from {imported['ray'].__file__}, not from {args.site}")
        try:
            result["ray"].update(ray_facts(bool(result.get("cuda"))))
            if not result["ray"]["dashboard"]:
                problems.append(f"Ray's dashboard did not answer: {result['ray'].get('dashboard_error')}")
            if not result["ray"]["data_pipeline"]:
                problems.append("a Ray Data pipeline returned a wrong sum")
        except Exception as exc:  # noqa: BLE001 - recorded
            problems.append(f"starting Ray: {type(exc).__name__}: {exc}"[:400])
    result.update(ok=not problems, problems=problems)
    for problem in problems:
        log(f"FAILED: {problem}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
