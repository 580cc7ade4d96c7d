"""Gets the wheels a GPU node lacks into ``.whl/``, checks that they suffice and that what travels fits.

    python bench/gpu/prepare.py                                   # cp312 wheels into .whl/ (what travels)
    python bench/gpu/prepare.py --python-version 3.11 --dest .whl-cp311   # the same set for run.sh --cpu here

A GPU node (``nvidia-h100-x1``/``nvidia-h200``) has Python 3.12, CUDA torch and most of
the scientific stack, but no Ray and no package index (node-packages.txt). This:

1. downloads each wheel of wheels.txt for the node's Python (``pip download --no-deps
   --only-binary=:all: --platform manylinux…``) into a cache outside the repository;
2. copies them into ``--dest``, Ray slimmed (``slim.RAY_DROP``: 79 → 43 MB), and removes
   any other wheel there (two versions of one package stop the whole install);
3. checks the closure (``closure.resolve``): still's own requirements (pyproject.toml,
   less mlflow, optuna and polars, which the GPU checks do not use) and Ray's data,
   train, tune and dashboard needs, through every carried wheel, are each met by a
   carried wheel or a node package; writes the ones the node is to meet to
   ``--dest/node-requirements.json`` for run.sh to check there;
4. adds up what travels: the repository's tracked and untracked-not-ignored files,
   ``shared/`` if the checkout has one, and ``--dest``; fails over ``--limit-mib`` (64).

Progress goes to stderr; the last stdout line is one JSON object. Exit status 1 when
the closure has problems or the total is over the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from closure import Wheel, read_package_list, resolve
from slim import RAY_DROP, slim_wheel

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# still's requirements the GPU checks never import, and why.
OMITTED = {"mlflow": "tracking.enabled=false in every check", "optuna": "only still tune's optuna searcher",
           "polars": "only ensembles of stores (Ray Data's Dataset.join)"}
# ray[default] is the dashboard's extra; still needs only what the dashboard process
# imports (ray/dashboard/optional_deps.py), not py-spy, virtualenv, smart_open or colorful.
DASHBOARD = ("aiohttp", "aiohttp-cors", "grpcio", "opencensus", "opentelemetry-sdk",
             "opentelemetry-exporter-prometheus", "opentelemetry-proto", "prometheus-client", "pydantic")
SLIM = {"ray": RAY_DROP}


def log(message: str) -> None:
    print(f"[gpu-prepare] {message}", file=sys.stderr, flush=True)


def roots() -> list[tuple[Requirement, str]]:
    """still's requirements as the GPU checks need them: pyproject.toml's, less :data:`OMITTED`,
    Ray's ``default`` extra narrowed to :data:`DASHBOARD`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found: list[tuple[Requirement, str]] = []
    for line in project["dependencies"]:
        requirement = Requirement(line)
        if canonicalize_name(requirement.name) in OMITTED:
            continue
        if "default" in requirement.extras:
            requirement.extras.discard("default")
            found += [(Requirement(name), f"{requirement.name}'s dashboard") for name in DASHBOARD]
        found.append((requirement, "still"))
    return found


def download(pins: dict, python_version: str, cache: Path) -> dict[str, Path]:
    """Each pinned wheel for ``python_version``, from ``cache`` or else downloaded into it; by name."""
    cache.mkdir(parents=True, exist_ok=True)

    def present() -> dict[str, Path]:
        have = {}
        for path in cache.glob("*.whl"):
            name, version, _, _ = parse_wheel_filename(path.name)
            if pins.get(canonicalize_name(name)) == version:
                have[canonicalize_name(name)] = path
        return have

    missing = [f"{name}=={version}" for name, version in pins.items() if name not in present()]
    if missing:
        log(f"downloading {len(missing)} wheel(s) for cp{python_version.replace('.', '')} into {cache}")
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--python-version", python_version, "--implementation", "cp", *platforms,
                               "-d", str(cache), *missing], stderr=subprocess.PIPE, text=True, check=False)
        # pip warns once per package about this machine's extra indexes lacking it: noise
        for line in done.stderr.splitlines():
            if "is ignored: it is neither a file nor a directory" not in line:
                print(line, file=sys.stderr)
        if done.returncode:
            raise SystemExit(f"pip download failed (exit {done.returncode})")
    have = present()
    if set(have) != set(pins):
        raise SystemExit(f"pip downloaded no wheel for {sorted(set(pins) - set(have))}")
    return have


def fill(dest: Path, wheels: dict[str, Path]) -> None:
    """Makes ``dest`` hold exactly ``wheels`` (the ones of :data:`SLIM` slimmed)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {path.name for path in wheels.values()}
    for stale in dest.glob("*.whl"):
        if stale.name not in wanted:
            log(f"removing {stale.name}")
            stale.unlink()
    for name, source in sorted(wheels.items()):
        target = dest / source.name
        if name in SLIM:  # slimmed afresh each time (seconds), so a changed drop list applies
            stats = slim_wheel(source, target, SLIM[name])
            log(f"{source.name}: {stats['bytes_before'] / 1e6:.1f} MB -> {stats['bytes_after'] / 1e6:.1f} MB "
                f"({stats['files_dropped']} files dropped)")
        else:
            shutil.copy2(source, target)


def travelling_bytes(dest: Path) -> dict[str, int]:
    """Bytes the device tool sends: the repository's files git does not ignore, ``shared/``, and ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    repo = sum(os.lstat(ROOT / os.fsdecode(name)).st_size for name in listed
               if name and os.path.lexists(ROOT / os.fsdecode(name)))
    shared = ROOT / "shared"
    shared_bytes = sum(p.lstat().st_size for p in shared.rglob("*") if not p.is_dir()) if shared.is_dir() else 0
    wheels = sum(p.stat().st_size for p in dest.glob("*.whl"))
    return {"repo": repo, "shared": shared_bytes, "wheels": wheels, "total": repo + shared_bytes + wheels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="the node's Python, X.Y (default 3.12)")
    parser.add_argument("--dest", default=str(ROOT / ".whl"), help="where the wheels go (default .whl/)")
    parser.add_argument("--cache", default="", help="downloaded wheels (default ~/.cache/still/gpu-wheels/cpXY)")
    parser.add_argument("--limit-mib", type=float, default=64.0, help="what may travel, MiB (default 64)")
    args = parser.parse_args(argv)
    tag = "cp" + args.python_version.replace(".", "")
    cache = Path(args.cache) if args.cache else Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "still" / "gpu-wheels" / tag
    dest = Path(args.dest).resolve()

    pins = read_package_list(HERE / "wheels.txt")
    fill(dest, download(pins, args.python_version, cache))
    wheels = [Wheel.read(path) for path in sorted(dest.glob("*.whl"))]
    closure = resolve(roots(), wheels, read_package_list(HERE / "node-packages.txt"), args.python_version)
    (dest / "node-requirements.json").write_text(json.dumps(
        [{"requirement": requirement, "needed_by": needed_by} for requirement, needed_by in closure.on_node],
        indent=1) + "\n")
    for problem in closure.problems:
        log(f"closure: {problem}")
    size = travelling_bytes(dest)
    total_mib = size["total"] / 2**20
    over = total_mib > args.limit_mib
    log(f"travels: repository {size['repo'] / 2**20:.1f} MiB + shared/ {size['shared'] / 2**20:.1f} MiB + "
        f"wheels {size['wheels'] / 2**20:.1f} MiB = {total_mib:.1f} MiB "
        f"({'OVER' if over else 'within'} the {args.limit_mib:g} MiB limit)")
    result = {"python": tag, "dest": str(dest), "wheels": sorted(p.name for p in dest.glob("*.whl")),
              "omitted": OMITTED, "closure_problems": closure.problems, "node_requirements": len(closure.on_node),
              "mib": {key: round(value / 2**20, 2) for key, value in size.items()}, "limit_mib": args.limit_mib,
              "ok": not closure.problems and not over}
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
