"""The runtime_env of a submitted job, and how it is shown without its secrets.

Secrets (``MLFLOW_TRACKING_URI`` with credentials, ``AWS_*``, ``GOOGLE_*``, …) reach a job
only as ``runtime_env.env_vars`` built from ``--env``. They are never put in the job's
entrypoint or metadata, and still prints env vars as ``NAME=<redacted>``. Anyone holding the
cluster token can still read ``env_vars`` back through the job API (``ray job list`` shows
runtime_env): the token is what guards them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from still.errors import StillError

# Never uploaded with --working-dir: version control, caches, local stores and tracking data,
# benchmark output. Patterns are gitignore-style, relative to the working dir (Ray's `excludes`).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    "**/__pycache__",
    "**/*.pyc",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".benchmarks",
    ".venv",
    "build",
    "stores",
    "runs",
    "mlruns",
    "mlartifacts",
    "mlflow.db",
    "bench/results",
)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Ray's own variables that must come from the cluster, not from a job.
_FORBIDDEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS")


def parse_env(items: Iterable[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """Parses ``--env`` items: ``K=V``, or a bare ``K`` to pass this shell's value of K
    (keeps the secret off the command line and out of shell history).

    Raises:
        StillError: a malformed item, an unset bare name, or one of Ray's auth variables.
    """
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not _ENV_NAME.match(name):
            raise StillError(f"--env {name!r}: expected NAME=VALUE or NAME (a shell variable name)")
        if name in _FORBIDDEN_ENV:
            raise StillError(f"--env {name}: the cluster's own Ray auth settings apply to its jobs; do not pass {name}")
        if not sep:
            if name not in environ:
                raise StillError(f"--env {name}: {name} is not set in this shell (or pass {name}=VALUE)")
            value = environ[name]
        env[name] = value
    return env


def build_runtime_env(
    working_dir: str = "",
    env: dict[str, str] | None = None,
    pip: Iterable[str] = (),
    excludes: Iterable[str] = (),
) -> dict[str, Any]:
    """The job's runtime_env.

    Args:
        working_dir: A local directory uploaded to the cluster and used as the job's current
            directory (``""``: none; the job runs in the cluster's own working directory).
        env: Environment variables of the job (secrets included: see the module docstring).
        pip: Extra pip packages installed for the job.
        excludes: Extra gitignore-style patterns left out of the upload, on top of
            :data:`DEFAULT_EXCLUDES`.

    Raises:
        StillError: ``working_dir`` is not a directory.
    """
    runtime_env: dict[str, Any] = {}
    if working_dir:
        path = Path(working_dir).expanduser()
        if not path.is_dir():
            raise StillError(f"--working-dir {working_dir}: not a directory")
        runtime_env["working_dir"] = str(path.resolve())
        runtime_env["excludes"] = [*DEFAULT_EXCLUDES, *excludes]
    if env:
        runtime_env["env_vars"] = dict(env)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def describe(runtime_env: dict[str, Any]) -> str:
    """One line saying what the job gets, values of env vars left out."""
    parts = []
    if "working_dir" in runtime_env:
        parts.append(f"working_dir {runtime_env['working_dir']}")
    if runtime_env.get("env_vars"):
        parts.append("env " + " ".join(f"{k}=<redacted>" for k in runtime_env["env_vars"]))
    if runtime_env.get("pip"):
        parts.append("pip " + " ".join(runtime_env["pip"]))
    return ", ".join(parts) or "no runtime_env"


def leaked_secrets(text: str, env: dict[str, str], min_len: int = 6) -> list[str]:
    """Names of ``env`` whose (non-trivial) values appear in ``text``."""
    return [k for k, v in env.items() if len(v) >= min_len and v in text]
