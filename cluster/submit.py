"""``still submit`` and ``still jobs``: run still commands as Ray jobs on a cluster.

    still cluster local up --workers 1                      # or any Ray cluster's dashboard
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.cache/still/cluster/auth_token
    still submit --address http://127.0.0.1:8275 --working-dir . \
        --env MLFLOW_TRACKING_URI -- still train --config configs/train.yaml
    still jobs list --address http://127.0.0.1:8275
    still jobs logs raysubmit_… --follow

The job's entrypoint is the command after ``--``, as typed (one argument is taken as a shell
string, several are quoted with ``shlex.join``). The cluster's Python must have still
installed, or ``--working-dir`` must point at a still checkout and ``--pip`` bring its
dependencies. Secrets go only through ``--env`` (see :mod:`cluster.runtime_env`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

from cluster import auth
from cluster.runtime_env import build_runtime_env, describe, leaked_secrets, parse_env
from still.errors import StillError

DEFAULT_DASHBOARD_PORT = 8265
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _note(message: str) -> None:
    print(f"still: {message}", file=sys.stderr, flush=True)


def job_server_url(address: str = "") -> str:
    """The job server (dashboard) URL for ``address``, default ``$RAY_ADDRESS``.

    - ``http(s)://HOST:PORT``: used as is.
    - ``HOST:PORT``, a GCS address: the dashboard of the ``still cluster local`` cluster
      with that GCS, else the dashboard URL the GCS itself records (what ``ray job submit``
      does; needs the token like every other call). ``HOST:8265`` and ``HOST:8275`` are
      taken as dashboards.
    - ``ray://HOST[:PORT]`` (Ray Client): ``http://HOST:8265``, Ray's default dashboard
      port, with a note.

    Raises:
        StillError: no address, or a GCS that cannot be asked.
    """
    address = (address or os.environ.get("RAY_ADDRESS", "")).strip().rstrip("/")
    if not address:
        raise StillError("no cluster address: pass --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS")
    if address in ("auto", "local"):
        raise StillError(f"address {address!r} names no job server: pass --address http://HEAD:8265")
    if address.startswith(("http://", "https://")):
        return address
    if address.startswith("ray://"):
        host = urlparse(address).hostname or ""
        url = f"http://{host}:{DEFAULT_DASHBOARD_PORT}"
        _note(f"{address} is a Ray Client address; using the job server at {url} (pass --address to change)")
        return url
    if "://" in address:
        raise StillError(f"address {address!r}: expected http://HEAD:8265, ray://HEAD:10001 or HEAD:PORT")
    from cluster.local import DEFAULT_DASHBOARD_PORT as LOCAL_DASHBOARD_PORT
    from cluster.local import dashboard_for_gcs

    known = dashboard_for_gcs(address)
    if known:
        return known
    port = address.rpartition(":")[2]
    if not port.isdigit() or int(port) in (DEFAULT_DASHBOARD_PORT, LOCAL_DASHBOARD_PORT):
        return f"http://{address}"
    url = _dashboard_from_gcs(address)
    _note(f"using the job server at {url} (recorded by the GCS at {address})")
    return url


def _dashboard_from_gcs(address: str) -> str:
    from ray.dashboard.utils import ray_address_to_api_server_url
    from ray.exceptions import AuthenticationError

    try:
        return ray_address_to_api_server_url(address)
    except AuthenticationError:
        raise auth.missing_token_error(address) from None
    except Exception as exc:  # noqa: BLE001 - Ray raises RpcError, ValueError, ConnectionError here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        raise StillError(
            f"could not get the job server address from the GCS at {address} ({first}): "
            "pass --address http://HEAD:8265"
        ) from None


def job_client(address: str = ""):
    """A ``JobSubmissionClient`` for ``address`` that sends the Ray token when
    ``RAY_AUTH_MODE=token``; connection and auth failures become one-line StillErrors."""
    url = job_server_url(address)
    headers = auth.auth_headers()
    from ray.job_submission import JobSubmissionClient

    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        # Set after the import (sdk.py sets INFO at import): their DEBUG/INFO lines echo
        # request bodies, runtime_env env_vars included.
        logging.getLogger(name).setLevel(logging.WARNING)
    # Packaging chatter about --working-dir (which files .gitignore drops, .git excluded).
    logging.getLogger("ray._private.runtime_env.packaging").setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)

    # Ray's client lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override the URL it is given;
    # the URL resolved above already accounts for them.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        with _ray_errors(url):
            return JobSubmissionClient(url, headers=headers)
    finally:
        os.environ.update(saved)


class _ray_errors:
    """Turns the job SDK's exceptions into one-line StillErrors naming the cluster."""

    def __init__(self, url: str, job_id: str = ""):
        self.url, self.job_id = url, job_id

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (StillError, KeyboardInterrupt)):
            return False
        from ray.exceptions import AuthenticationError

        text = str(exc)
        if isinstance(exc, AuthenticationError) or "status code 401" in text:
            if "Authentication failed" in text or "status code 403" in text:
                raise auth.rejected_token_error(self.url) from None
            raise auth.missing_token_error(self.url) from None
        if isinstance(exc, OSError):  # builtin ConnectionError, requests' and aiohttp's errors
            raise StillError(
                f"cannot reach the Ray job server at {self.url}: is the cluster up, and is this its dashboard "
                "address (http://HEAD:8265)?"
            ) from None
        if self.job_id and "404" in text:
            raise StillError(f"no job {self.job_id} on {self.url}") from None
        if isinstance(exc, (RuntimeError, ValueError)):
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise StillError(f"{self.url}: {first}") from None
        return False


def entrypoint_of(command: Iterable[str]) -> str:
    """The job's shell command from the words after ``--``."""
    words = list(command)
    if words and words[0] == "--":
        words = words[1:]
    if not words:
        raise StillError("no command to submit: still submit [options] -- still VERB ...")
    return words[0] if len(words) == 1 else shlex.join(words)


def submit(
    command: Iterable[str],
    *,
    address: str = "",
    working_dir: str = "",
    env: dict[str, str] | None = None,
    pip: Iterable[str] = (),
    excludes: Iterable[str] = (),
) -> tuple[Any, str]:
    """Submits ``command`` as a Ray job; returns ``(client, job_id)``.

    The job's metadata names only still as its submitter; ``env`` goes into
    ``runtime_env.env_vars`` and nowhere else.

    Raises:
        StillError: bad arguments, an unreachable cluster, a missing token, or an ``env``
            value that also appears in the command (secrets go through ``--env`` only).
    """
    env = dict(env or {})
    entrypoint = entrypoint_of(command)
    leaked = leaked_secrets(entrypoint, env)
    if leaked:
        raise StillError(
            f"the value of --env {leaked[0]} also appears in the command: pass secrets only through --env "
            "(the command is stored in the job's entrypoint, visible to everyone who can list jobs)"
        )
    runtime_env = build_runtime_env(working_dir, env, pip, excludes)
    client = job_client(address)
    _note(f"submitting to {client.get_address()}: {entrypoint}  [{describe(runtime_env)}]")
    with _ray_errors(client.get_address()):
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, metadata={"submitted_by": "still submit"}
        )
    return client, job_id


def follow_logs(client: Any, job_id: str, out=None) -> str:
    """Streams the job's logs to ``out`` (stdout) until it ends; returns its final status."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    with _ray_errors(client.get_address(), job_id):
        asyncio.run(_tail())
        return wait_for(client, job_id, timeout_s=60)


def wait_for(client: Any, job_id: str, timeout_s: float = 60) -> str:
    """Polls until the job reaches a terminal status (or ``timeout_s``); returns the status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def _interrupted(job_id: str) -> None:
    _note(f"stopped following; job {job_id} keeps running (still jobs stop {job_id} to stop it)")


def cli_submit(args: argparse.Namespace) -> dict[str, Any]:
    """``still submit``: submit, print the job id, stream the logs, exit 0 only on SUCCEEDED."""
    env = parse_env(args.env)
    client, job_id = submit(
        args.command,
        address=args.address,
        working_dir=args.working_dir,
        env=env,
        pip=args.pip,
        excludes=args.exclude or [],
    )
    url = client.get_address()
    _note(f"job {job_id} submitted to {url}")
    if args.no_wait:
        return {"job_id": job_id, "status": "PENDING", "address": url}
    try:
        status = follow_logs(client, job_id)
    except KeyboardInterrupt:
        _interrupted(job_id)
        raise
    summary: dict[str, Any] = {"job_id": job_id, "status": status, "address": url}
    if status != "SUCCEEDED":
        with _ray_errors(url, job_id):
            message = (client.get_job_info(job_id).message or "").strip().splitlines()
        reason = f": {message[0]}" if message else ""
        print(f"still: error: job {job_id} {status}{reason}", file=sys.stderr, flush=True)
        summary["_exit_code"] = 1
    return summary


def _job_row(info: Any) -> dict[str, Any]:
    return {
        "job_id": info.submission_id or info.job_id,
        "status": str(info.status.value),
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "message": info.message,
    }


def cli_jobs(args: argparse.Namespace) -> dict[str, Any]:
    """``still jobs list | status ID | logs ID [--follow] | stop ID``."""
    client = job_client(args.address)
    url = client.get_address()
    if args.action == "list":
        with _ray_errors(url):
            jobs = sorted((_job_row(j) for j in client.list_jobs()), key=lambda r: r["start_time"] or 0)
        if not args.json:
            for row in jobs:
                print(f"{row['job_id']}  {row['status']:<9}  {row['entrypoint']}")
        return {"address": url, "count": len(jobs), "jobs": jobs}
    if not args.job_id:
        raise StillError(f"still jobs {args.action} needs a job id (see still jobs list)")
    job_id = args.job_id
    with _ray_errors(url, job_id):
        if args.action == "status":
            row = _job_row(client.get_job_info(job_id))
            return {"job_id": job_id, "status": row["status"], "message": row["message"], "entrypoint": row["entrypoint"]}
        if args.action == "logs":
            client.get_job_info(job_id)  # a clear "no job" before streaming
            if args.follow:
                try:
                    status = follow_logs(client, job_id)
                except KeyboardInterrupt:
                    _interrupted(job_id)
                    raise
            else:
                sys.stdout.write(client.get_job_logs(job_id))
                sys.stdout.flush()
                status = str(client.get_job_status(job_id).value)
            return {"job_id": job_id, "status": status}
        # stop
        stopped = client.stop_job(job_id)
        status = wait_for(client, job_id, timeout_s=30)
        return {"job_id": job_id, "status": status, "stopped": bool(stopped)}
