"""What ``still train`` prints: its own lines, not Ray's chatter (``ray.verbose=false``).

The end-to-end test runs the real command in a subprocess (its own embedded cluster, as
a user gets it) with stdout and stderr captured, so nothing is a terminal, and checks
that ``ray.verbose=true`` brings Ray's lines back; the quiet default is checked on a real
run in tests/test_train_scale.py. The unit tests check the settings of
``still.ray_setup`` one by one, without a cluster.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from _console import console_lines
from _teacher_fixtures import still_cli

@pytest.mark.timeout(600)
def test_ray_verbose_brings_rays_output_back(digits_store, tmp_path):
    """The quiet default is checked on a real run by test_train_scale.py (live MLflow)."""
    run = still_cli(["train", f"store.uri={digits_store}", "train.epochs=2", "scaling.num_workers=1",
                     "student.width=64", "student.depth=1", "tracking.enabled=false", "ray.verbose=true",
                     f"train.output_dir={tmp_path / 'student'}", "--json"], cwd=tmp_path, timeout=480)
    assert run.returncode == 0, run.stderr[-3000:]
    shown = "\n".join(console_lines(run.stdout, run.stderr))
    assert "Reporting training result" in shown
    assert "Checkpoint successfully created" in shown


# --------------------------------------------------------------------------- the settings, one by one


@pytest.fixture
def restore_ray_console():
    """Puts back what apply_console_settings changes in this (shared pytest) process."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.use_ray_tqdm, ctx.print_on_execution_start,
             logging.getLogger("ray.data").level)
    yield
    from still.ray_setup import _NOTICES

    ctx.enable_progress_bars, ctx.use_ray_tqdm, ctx.print_on_execution_start, level = saved
    logging.getLogger("ray.data").setLevel(level)
    for name, notice in _NOTICES.items():
        logging.getLogger(name).removeFilter(notice)


def test_quiet_console_settings_and_verbose_restores_rays_defaults(restore_ray_console):
    import ray.data

    from still.ray_setup import apply_console_settings

    ctx = ray.data.DataContext.get_current()
    apply_console_settings(verbose=False)
    assert (ctx.enable_progress_bars, ctx.print_on_execution_start) == (False, False)
    assert logging.getLogger("ray.data").getEffectiveLevel() == logging.WARNING
    apply_console_settings(verbose=True)
    defaults = ray.data.DataContext()
    assert ctx.enable_progress_bars == defaults.enable_progress_bars
    assert ctx.use_ray_tqdm == defaults.use_ray_tqdm
    assert ctx.print_on_execution_start == defaults.print_on_execution_start
    assert logging.getLogger("ray.data").getEffectiveLevel() < logging.INFO


def test_only_the_auth_on_notice_is_dropped(restore_ray_console):
    from still.ray_setup import apply_console_settings

    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    auth.addHandler(handler)
    enabled = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    try:
        apply_console_settings(verbose=False)
        auth.warning(enabled)
        auth.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
        apply_console_settings(verbose=True)
        auth.warning(enabled)
    finally:
        auth.removeHandler(handler)
    assert [m.split(".")[0] for m in seen] == ["Token authentication is disabled for this Ray cluster",
                                              "Token authentication is enabled for this Ray cluster"]


def test_console_env_leaves_the_users_variables_alone(monkeypatch):
    from still.ray_setup import console_env

    monkeypatch.delenv("RAY_DATA_LOG_LEVEL", raising=False)
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PRINT_PATCH", raising=False)
    quiet = {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    assert console_env(verbose=False) == quiet
    assert console_env(verbose=True) == {}
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "INFO")
    assert "RAY_DATA_LOG_LEVEL" not in console_env(verbose=False)


@pytest.mark.timeout(120)
def test_an_embedded_clusters_workers_inherit_the_quiet_environment_without_a_runtime_env(tmp_path):
    """A job runtime_env would make Ray start new workers for the first tasks instead of
    using the prestarted ones; the variables reach the workers through the environment
    the cluster's processes start with, and leave this process's environment as it was."""
    script = textwrap.dedent("""
        import json, os
        import ray
        from still.ray_setup import init_ray

        for key in ("RAY_DATA_LOG_LEVEL", "RAY_TRAIN_ENABLE_PRINT_PATCH", "STILL_EMBEDDED_RAY_CLUSTER"):
            os.environ.pop(key, None)
        init_ray(dashboard=False)

        @ray.remote(num_cpus=1)
        def worker_env():
            return {key: os.environ.get(key) for key in ("RAY_DATA_LOG_LEVEL", "RAY_TRAIN_ENABLE_PRINT_PATCH",
                                                         "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
                                                         "STILL_EMBEDDED_RAY_CLUSTER")}

        print(json.dumps({"worker": ray.get(worker_env.remote()),
                          "driver": sorted(k for k in os.environ if k.startswith(("RAY_DATA", "RAY_TRAIN", "STILL_"))),
                          "runtime_env": dict(ray.get_runtime_context().runtime_env)}))
    """)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100, cwd=tmp_path,
                         env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["worker"] == {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "STILL_EMBEDDED_RAY_CLUSTER": "1"}
    assert seen["driver"] == [] and seen["runtime_env"] == {}


def test_train_logging_config_level():
    from still.ray_setup import train_logging_config

    assert train_logging_config(verbose=False).log_level == "WARNING"
    assert train_logging_config(verbose=True).log_level == "INFO"


def test_quiet_termination_drops_only_the_exit_a_finalizer_swallowed():
    # Ray's SIGTERM handler raises SystemExit; raised inside a finalizer, Python prints
    # it as "Exception ignored in ..." instead. Other unraisable errors must still show.
    script = textwrap.dedent("""
        import sys
        from still.ray_setup import quiet_termination

        class Finalized:
            def __init__(self, error):
                self.error = error

            def __del__(self):
                raise self.error

        quiet_termination(sys.argv[1] == "verbose")
        quiet_termination(sys.argv[1] == "verbose")  # a reused actor calls it again
        Finalized(SystemExit(1))
        Finalized(ValueError("a real error"))
        print("still running")
    """)
    for mode, exits_shown in (("quiet", 0), ("verbose", 1)):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and done.stdout == "still running\n", done
        assert done.stderr.count("Exception ignored in") == 1 + exits_shown, done.stderr
        assert "ValueError: a real error" in done.stderr
        assert done.stderr.count("SystemExit") == exits_shown, done.stderr
