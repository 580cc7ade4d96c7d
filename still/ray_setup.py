"""Connecting to Ray: an embedded local cluster by default, a real one when named.

Also what Ray prints on the console. By default (``ray.verbose=false``) a job's console
carries still's own lines (one per epoch, stage headers, the final table, still's
warnings) and Ray's warnings and errors (a failing worker's traceback included); Ray's
INFO chatter ("Reporting training result", "Checkpoint successfully created", Ray Data
progress bars and execution plans, the startup note on token auth) is off. Ray prints
from several processes, each set up apart:

- this process (the driver, or a Tune trial that builds a ``TorchTrainer``):
  :func:`apply_console_settings`, which :func:`init_ray` calls;
- every other Ray process of the job (Train controller and workers, Ray Data's tasks
  and actors in still infer): the environment of :func:`console_env`, which an
  embedded cluster's processes inherit from :func:`init_ray` and a joined cluster's get
  from ``ray.init(runtime_env={"env_vars": ...})``;
- Ray Train's ``ray.train`` loggers: :func:`train_logging_config` in the ``RunConfig``;
- a Train worker: :func:`quiet_worker_console`, first thing in the worker function;
- a Tune trial, a Train worker: :func:`quiet_termination` (Ray's SIGTERM at their end).

``ray.verbose=true`` leaves all of it at Ray's defaults. Either way Ray's session logs
(``/tmp/ray/session_*/logs``) keep Ray Train's system logs at every level; Ray Data's
``ray-data.log`` keeps warnings only while quiet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

from still.config import RayConfig

log = logging.getLogger(__name__)

# The GCS address of the embedded cluster init_ray started in this process, if any.
_embedded_gcs_address: str | None = None
# Set in the environment of an embedded cluster's processes (raylet, Tune trials, Train
# workers inherit it), so code running there knows the cluster cannot grow either.
EMBEDDED_ENV = "STILL_EMBEDDED_RAY_CLUSTER"

_QUIET_ENV = {
    # The level of Ray Data's ``ray.data`` loggers, read when a process imports ray.data:
    # drops "Starting execution", "Execution plan", "execution finished" and the non-tty
    # progress lines in processes still runs no code in (Ray Data's tasks); its
    # warnings (the pickled-objects fallback, say) still show.
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # Ray Train 2.60 patches print() in its workers to log through the root logger as
    # well, and since Ray wraps a worker's sys.stdout the patch also prints the line
    # itself: every epoch line came out twice. Off, a print is printed once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
_QUIET_LEVEL = logging.WARNING
# The unraisable-exception hook quiet_termination found, which gets every other report.
_previous_unraisablehook = sys.__unraisablehook__
# What every process of an embedded cluster gets, quiet or not. Its one node is this
# machine, which no cloud provider reclaims: Ray Train's PreemptionWatcher actor (one per
# training run) has nothing to watch, and creating it logged a core-worker error on the
# console ("... has constructor arguments in the object store and max_restarts > 0",
# ray-project/ray#53727).
_EMBEDDED_CLUSTER_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


class _DropNotice(logging.Filter):
    """Drops a logger's records whose message starts with one of a few known notices."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Notices that only say what a quiet console means; each filter sits on the one logger
# that writes it. Ray's note, on every new local cluster, that it turned token auth on by
# default (its warning that auth is *off* stays); Ray Data's note, once per process, that
# progress bars are disabled.
_NOTICES = {
    "ray._private.authentication.authentication_token_setup":
        _DropNotice("Token authentication is enabled for this Ray cluster"),
    "ray.data._internal.progress": _DropNotice("Progress bars disabled"),
}


def _unset(variables: Mapping[str, str]) -> dict[str, str]:
    """``variables`` less those already set in this process: they are the user's choice,
    and on a Ray Jobs driver the job's own ``runtime_env`` carries them (``ray.init``
    refuses a second value for a key the job sets)."""
    return {key: value for key, value in variables.items() if key not in os.environ}


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    """Sets ``variables`` in this process's environment for the block, then removes them.

    What an embedded cluster's processes are started with; this process itself checks
    its cluster's address instead (:func:`connected_to_embedded_cluster`), so that it
    does not claim the next cluster it may join.
    """
    os.environ.update(variables)
    try:
        yield
    finally:
        for key in variables:
            os.environ.pop(key, None)


def console_env(verbose: bool) -> dict[str, str]:
    """Environment variables that keep Ray's INFO chatter off the console in every Ray
    process of the job; empty when ``verbose``. Variables already set in this process
    are left out."""
    return {} if verbose else _unset(_QUIET_ENV)


def apply_console_settings(verbose: bool) -> None:
    """Sets what Ray prints from this process; Ray's defaults when ``verbose``.

    Quiet: no Ray Data progress bars and no "Starting execution" lines (the current
    ``DataContext``, which every dataset created afterwards copies), the ``ray.data``
    loggers at WARNING, and the notices of ``_NOTICES`` dropped. :func:`init_ray` calls
    it once Ray is up (and the notices part before it starts Ray, which logs one).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    defaults = ray.data.DataContext()
    ctx.enable_progress_bars = defaults.enable_progress_bars if verbose else False
    ctx.use_ray_tqdm = defaults.use_ray_tqdm
    ctx.print_on_execution_start = defaults.print_on_execution_start if verbose else False
    # Ray Data's own default level: $RAY_DATA_LOG_LEVEL, else DEBUG (its file handler
    # takes everything, its console handler INFO and above).
    level: int | str = (os.environ.get("RAY_DATA_LOG_LEVEL") or logging.DEBUG) if verbose else _QUIET_LEVEL
    logging.getLogger("ray.data").setLevel(level)
    _drop_notices(not verbose)


def _drop_notices(drop: bool) -> None:
    for name, notice in _NOTICES.items():
        logging.getLogger(name).removeFilter(notice)
        if drop:
            logging.getLogger(name).addFilter(notice)


def quiet_termination(verbose: bool) -> None:
    """Keeps a Ray worker's termination off the console; call it in the worker (a Tune
    trial, a Train worker). Nothing when ``verbose``.

    Ray stops a finished trial's actor with SIGTERM, and its handler raises ``SystemExit``
    wherever the worker's Python happens to be. Inside a finalizer (a weakref callback,
    a ``__del__``) Python cannot raise it and instead prints "Exception ignored in ..."
    with Ray's traceback, about a worker meant to exit. Those reports are dropped here;
    every other unraisable exception still reaches the previous hook.
    """
    global _previous_unraisablehook
    if verbose or sys.unraisablehook is _drop_exit_reports:
        return
    _previous_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _drop_exit_reports


def _drop_exit_reports(unraisable: Any) -> None:
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, SystemExit):
        return
    _previous_unraisablehook(unraisable)


def quiet_worker_console(verbose: bool) -> None:
    """What Ray prints from a Ray Train worker process; call it first thing in the worker
    function (``train_loop_per_worker``), before the first ``ray.train.report``.

    :func:`apply_console_settings` (for a cluster set up elsewhere, whose workers lack
    :func:`console_env`), and quiet: Ray Train's "Reporting training result ..." line,
    logged on every report by a logger outside ``ray.train`` (named after its file), so
    that :func:`train_logging_config` does not reach it.
    """
    apply_console_settings(verbose)
    quiet_termination(verbose)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # a Ray without that module: nothing to quiet there
        return
    logging.getLogger(train_context.__file__).setLevel(logging.NOTSET if verbose else _QUIET_LEVEL)


def train_logging_config(verbose: bool) -> Any:
    """Ray Train's ``LoggingConfig`` for ``ray.train.RunConfig(logging_config=...)``.

    Quiet: ``ray.train`` logs WARNING and above on the console of the Train controller
    and workers: no "Checkpoint successfully created", "Started training worker group",
    "Setting up process group" or "Moving model to device" lines. Ray Train's system log
    files keep every level.
    """
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose else logging.getLevelName(_QUIET_LEVEL))


def init_ray(config: RayConfig | None = None, *, address: str = "", dashboard: bool = True) -> str:
    """Starts or joins Ray once per process and returns how it was reached.

    Order of precedence: ``address`` (the CLI's ``--address``), ``ray.address`` in the
    config, ``$RAY_ADDRESS``, else an embedded local cluster. A process already
    connected (a Ray Jobs driver, a test's session fixture) is left as it is; it still
    gets this config's console settings (:func:`apply_console_settings`).

    Args:
        config: The verb's ``ray`` section.
        address: An explicit address that wins over everything else.
        dashboard: Whether an embedded cluster runs Ray's dashboard (on 127.0.0.1).
            Ray Train's ``PlacementGroupCleaner`` (every ``TorchTrainer``) asks it,
            through Ray's State API, whether the Train controller is still alive, and
            fails or warns when it cannot; Ray Data alone needs none, and an embedded
            cluster without it starts with fewer processes.

    Returns:
        The address in use, or ``"local"`` for an embedded cluster.
    """
    import ray

    config = config or RayConfig()
    target = address or config.address or os.environ.get("RAY_ADDRESS", "")
    if ray.is_initialized():
        apply_console_settings(config.verbose)
        return target or "local"
    # Before ray.init, which logs one of them; the rest (importing Ray Data, 1-2 s) after,
    # so that Ray's processes start first (the CLI imports the stage meanwhile).
    _drop_notices(not config.verbose)
    # Ray's own loggers in this process: warnings and errors. Worker output still reaches
    # this console (log_to_driver): the epoch lines and workers' errors are printed there.
    kwargs: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
    env = console_env(config.verbose)
    if target:
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        ray.init(address=target, **kwargs)
        apply_console_settings(config.verbose)
        return target
    if config.num_cpus:
        kwargs["num_cpus"] = config.num_cpus
    # The embedded cluster's processes inherit this process's environment: every worker of
    # the job gets these variables without a job runtime_env. With one, Ray starts new
    # workers for the job's first tasks instead of using the ones it prestarts (2 CPUs,
    # 2026-12-07: two first tasks took 2.0 s after ray.init instead of 0.6).
    # address="local": start our own; a bare ray.init() would join the newest Ray instance
    # it finds on this machine (another user's or another test run's).
    with _environment({**env, **_unset(_EMBEDDED_CLUSTER_ENV), EMBEDDED_ENV: "1"}):
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", **kwargs)
    global _embedded_gcs_address
    _embedded_gcs_address = ray.get_runtime_context().gcs_address
    apply_console_settings(config.verbose)
    return "local"


def connected_to_embedded_cluster() -> bool:
    """True when this process runs on a local cluster :func:`init_ray` started: as the
    process that started it, or as one of its workers (a Tune trial, say).

    Such a cluster never grows: a resource it lacks now never arrives, so waiting for
    one is a hang, not a wait for an autoscaler.
    """
    import ray

    if not ray.is_initialized():
        return False
    if _embedded_gcs_address is not None:
        return _embedded_gcs_address == ray.get_runtime_context().gcs_address
    return os.environ.get(EMBEDDED_ENV) == "1"
