"""MLflow tracking shared by every stage: one run per job, the same tags everywhere.

``open_run`` starts (or, for Tune trials, nests) an MLflow run and records what every
run must carry: the flattened resolved config as params, the git SHA and package
versions as tags. ``NullTracker`` has the same methods and does nothing; it stands in
on non-zero ranks and when tracking is disabled, so callers never branch on rank.

Once a run is open, tracking is best effort: a server that goes away mid-run is
reported once on stderr (``Tracker.lost`` says why) and the job goes on without it,
never failing a training run that was going well. :func:`attach` gives a training
worker the same tracker for the driver's run, so rank 0 logs each epoch as it ends.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from still.config import TrackingConfig, flatten
from still.errors import StillError

PARENT_RUN_TAG = "mlflow.parentRunId"
_PARAM_VALUE_LIMIT = 6000


def tracking_uri(config: TrackingConfig | None = None) -> str:
    """Returns the tracking URI: config, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    if config is not None and config.uri:
        return config.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def experiment_name(config: TrackingConfig | None, default: str) -> str:
    """Returns the experiment: config, else $MLFLOW_EXPERIMENT_NAME, else ``default``."""
    if config is not None and config.experiment:
        return config.experiment
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "") or default


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fails fast when an HTTP tracking server does not answer.

    Raises:
        StillError: ``uri`` is http(s) and its ``/health`` endpoint is unreachable.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StillError(f"MLflow tracking URI {uri!r} is unreachable ({reason})") from None


def ensure_experiment(uri: str, name: str) -> str:
    """Returns the id of experiment ``name`` on ``uri``, creating it when missing.

    Experiments are created here, on the driver, with an absolute artifact location
    for local backends: one first created inside a Ray worker would otherwise put its
    artifacts in Ray's temporary session folder.
    """
    import mlflow

    # The first client of a new sqlite file creates its tables and says so at INFO
    # ("Creating initial MLflow database tables...", "Updating database tables"): set-up
    # chatter, once per file. MLflow's warnings still show.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    client = mlflow.MlflowClient(tracking_uri=uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        location = (db_path.parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it between the lookup and now
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


@functools.cache
def git_sha() -> str:
    """Returns the git SHA of the still checkout, or ``unknown`` outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


@functools.cache
def package_versions() -> dict[str, str]:
    """Returns the versions of the packages a run's results depend on."""
    from importlib import metadata

    versions = {}
    for name in ("still", "torch", "ray", "pyarrow", "mlflow", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def bound_http_retries() -> None:
    """Caps MLflow's HTTP retries for this process, unless the user set them.

    MLflow's defaults (7 retries, backoff factor 2) make each call to a server that has
    gone away wait minutes; with 3 retries at factor 1 a lost server costs a run about
    10 s, once (a lost :class:`Tracker` makes no further calls).
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


class Tracker:
    """An active MLflow run; thin methods that callers use instead of ``mlflow.*``.

    Every method is best effort: the first failure (the server went away, say) is
    printed once to stderr and recorded in :attr:`lost`; later calls do nothing.

    Attributes:
        lost: Why tracking stopped (empty while it works).
    """

    def __init__(self, client: Any, run_id: str, experiment_id: str, uri: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = uri
        self.lost = ""

    def attempt(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn(*args, **kwargs)`` unless tracking is lost; a failure loses it (reported once).

        Returns:
            What ``fn`` returned, or None when it was not called or failed.
        """
        if self.lost:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # any transport or server error: tracking must not end the job
            self.lost = f"{what} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            print(f"still: warning: MLflow tracking at {self.tracking_uri} lost ({self.lost}); the job goes on "
                  f"without it, and run {self.run_id} keeps what was logged before", file=sys.stderr, flush=True)
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs params, stringified and truncated to MLflow's limit."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.attempt("log_params", self.client.log_batch, self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Logs numeric metrics at an optional step."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if items:
            self.attempt("log_metrics", self.client.log_batch, self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Sets string tags."""
        from mlflow.entities import RunTag

        self.attempt("set_tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Logs a JSON/YAML-serialisable object as an artifact."""
        self.attempt("log_dict", self.client.log_dict, self.run_id, data, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Logs a local file as an artifact."""
        self.attempt("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, status: str) -> None:
        """Ends the run with ``status`` (FINISHED, FAILED, KILLED)."""
        self.attempt("set_terminated", self.client.set_terminated, self.run_id, status=status)

    @property
    def address(self) -> tuple[str, str]:
        """``(tracking URI, run id)``: what :func:`attach` needs in another process."""
        return self.tracking_uri, self.run_id


def attach(address: tuple[str, str] | None) -> Tracker | NullTracker:
    """A tracker for a run another process opened (a training worker logging the driver's run).

    Args:
        address: :attr:`Tracker.address`, or None (tracking disabled): a NullTracker.
    """
    if not address or not address[1]:
        return NullTracker()
    import mlflow

    bound_http_retries()
    uri, run_id = address
    return Tracker(mlflow.MlflowClient(tracking_uri=uri), run_id, "", uri)


class NullTracker:
    """Same methods as :class:`Tracker`; records nothing."""

    run_id = ""
    experiment_id = ""
    tracking_uri = ""
    lost = ""
    address = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Does nothing."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Does nothing."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Does nothing."""

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Does nothing."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Does nothing."""

    def end(self, status: str) -> None:
        """Does nothing."""

    def attempt(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Calls nothing (there is no run); returns None."""
        return None


@contextlib.contextmanager
def open_run(
    config: Any,
    tracking: TrackingConfig,
    *,
    default_experiment: str,
    run_name: str,
    parent_run_id: str = "",
    tags: Mapping[str, Any] | None = None,
) -> Iterator[Tracker | NullTracker]:
    """Opens one MLflow run for a job and closes it with the job's outcome.

    The run gets the flattened resolved ``config`` as params and the git SHA and
    package versions as tags. It ends FINISHED when the block exits normally,
    FAILED on an exception, KILLED on Ctrl-C.

    Args:
        config: The verb's resolved config dataclass.
        tracking: Its tracking section (``enabled: false`` yields a NullTracker).
        default_experiment: Experiment when neither config nor env names one.
        run_name: A deterministic, human-readable run name.
        parent_run_id: Makes this a child run (tag ``mlflow.parentRunId``).
        tags: Extra tags.

    Yields:
        The tracker of the open run.
    """
    if not tracking.enabled:
        yield NullTracker()
        return
    import mlflow

    uri = tracking_uri(tracking)
    bound_http_retries()
    check_reachable(uri)
    experiment_id = ensure_experiment(uri, experiment_name(tracking, default_experiment))
    client = mlflow.MlflowClient(tracking_uri=uri)
    all_tags = {"git_sha": git_sha(), **{f"version.{k}": v for k, v in package_versions().items()}}
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    all_tags.update(tags or {})
    run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
    tracker = Tracker(client, run.info.run_id, experiment_id, uri)
    status = "FAILED"
    try:
        tracker.log_params(flatten(config))
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end(status)


def ui_command(uri: str) -> str:
    """Returns the shell command that opens the MLflow UI on ``uri``'s runs."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
