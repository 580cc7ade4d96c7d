"""A virtual environment shaped like a GPU node, for ``run.sh --cpu``: the node's packages still needs, nothing carried.

    python bench/gpu/node_venv.py --requirements .whl-cp311/node-requirements.json
    python bench/gpu/node_venv.py --python python3.12 --no-torch --requirements .whl/node-requirements.json

Installs (from the package index) torch 2.13.0, the CPU build these machines carry, and
each package that prepare.py found the node is to provide (``node-requirements.json``):
what a GPU node has beside the wheels that travel. So the wheels are tried where no
Ray, MLflow or jsonschema is installed, as on the node. A package that the index pulls
in but that travels in ``.whl/`` would hide a missing wheel: it fails the build.

Reused while its requirements stay the same. Progress goes to stderr; the last stdout
line is the environment's python.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from closure import read_package_list

HERE = Path(__file__).resolve().parent
STAMP = ".still-node-venv"
ALWAYS = ("packaging",)  # env_check.py reads requirements with it; the node has it


def log(message: str) -> None:
    print(f"[gpu-node-venv] {message}", file=sys.stderr, flush=True)


def requirements(path: Path, torch: bool) -> list[str]:
    """The node's packages as pip arguments: one per name, specifiers merged; torch pinned or left out."""
    merged: dict[str, set[str]] = {}
    for entry in json.loads(path.read_text()):
        requirement = Requirement(entry["requirement"])
        merged.setdefault(canonicalize_name(requirement.name), set()).update(str(s) for s in requirement.specifier)
    merged.pop("torch", None)
    for name in ALWAYS:
        merged.setdefault(name, set())
    found = [name + ",".join(sorted(specifiers)) for name, specifiers in sorted(merged.items())]
    return (["torch==2.13.0"] if torch else []) + found


def build(directory: Path, python: str, wanted: list[str]) -> Path:
    """Creates (or reuses) the environment at ``directory`` holding ``wanted``; returns its python."""
    venv_python = directory / "bin" / "python"
    stamp = hashlib.sha256(json.dumps([os.path.realpath(python), wanted]).encode()).hexdigest()
    if (directory / STAMP).exists() and (directory / STAMP).read_text() == stamp and venv_python.exists():
        log(f"reusing {directory}")
        return venv_python
    log(f"creating {directory} ({python})")
    subprocess.run([python, "-m", "venv", "--clear", str(directory)], check=True)
    log(f"installing {len(wanted)} packages")
    subprocess.run([str(venv_python), "-m", "pip", "install", "--quiet", *wanted], check=True)
    installed = json.loads(subprocess.run([str(venv_python), "-m", "pip", "list", "--format=json"],
                                          capture_output=True, text=True, check=True).stdout)
    names = {canonicalize_name(dist["name"]) for dist in installed}
    node = set(read_package_list(HERE / "node-packages.txt"))
    carried = names & (set(read_package_list(HERE / "wheels.txt")) - node)
    if carried:
        raise SystemExit(f"the node-like environment got {sorted(carried)}, which the node lacks and the wheels "
                         "bring: it would hide a missing wheel")
    unknown = sorted(names - node - {"pip", "setuptools"})
    if unknown:
        log(f"note: installed here but not listed on the node: {unknown}")
    (directory / STAMP).write_text(stamp)
    return venv_python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", required=True, help="node-requirements.json from prepare.py")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to base it on")
    parser.add_argument("--dir", default="", help="default /tmp/still-gpu-node-<python X.Y>[-notorch]")
    parser.add_argument("--no-torch", action="store_true", help="leave torch out (an interpreter it has no wheel for)")
    args = parser.parse_args(argv)
    version = subprocess.run([args.python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    directory = Path(args.dir or f"/tmp/still-gpu-node-{version}{'-notorch' if args.no_torch else ''}")
    print(build(directory, args.python, requirements(Path(args.requirements), not args.no_torch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
