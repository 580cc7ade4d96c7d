"""What a sweep prints: one line per finished trial, not Tune's tables (unless ``ray.verbose``).

By default Tune 2.60 prints a box of the experiment's settings, where its results go, a
TensorBoard hint, every trial's config and full result as boxed tables, and a status
table of every trial every 30 s: a hundred lines for a four-trial sweep. Its new output
engine prints the settings box and the paths even at verbosity 0 (silent); its legacy
engine at verbosity 0 prints nothing. So a quiet sweep runs under the legacy engine at
verbosity 0 (:func:`tune_output`, :func:`run_config_verbosity`) and :class:`TrialLines`
prints one line per trial as it ends. Tune's warnings and a failed trial's error are
logged, not printed by its reporter, so they still show.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray import tune

from tuning.report import COLUMNS

# Ray's switch between Tune's output engines: "0" selects the legacy one.
_OUTPUT_ENGINE_ENV = "RAY_AIR_NEW_OUTPUT"
_LABELS = {key: (header, fmt) for key, header, fmt in COLUMNS}


def run_config_verbosity(verbose: bool) -> int | None:
    """``tune.RunConfig(verbose=...)``: Tune's default when ``verbose``, else silent (0)."""
    return None if verbose else 0


@contextlib.contextmanager
def tune_output(verbose: bool) -> Iterator[None]:
    """Runs the block (``Tuner.fit``) under the output engine :func:`run_config_verbosity`
    silences: the legacy one when quiet, whichever the environment chose when ``verbose``.

    Tune reads the switch from the environment when ``fit`` starts; it is put back after.
    """
    if verbose:
        yield
        return
    saved = os.environ.get(_OUTPUT_ENGINE_ENV)
    os.environ[_OUTPUT_ENGINE_ENV] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_OUTPUT_ENGINE_ENV, None)
        else:
            os.environ[_OUTPUT_ENGINE_ENV] = saved


def error_line(trial_dir: Path) -> str:
    """The exception line (last line) of a failed trial's ``error.txt``."""
    try:
        lines = [line for line in (trial_dir / "error.txt").read_text().splitlines() if line.strip()]
    except OSError:
        return "no error.txt"
    return lines[-1].strip() if lines else ""


def trial_line(name: str, config: dict[str, Any], result: dict[str, Any], status: str) -> str:
    """One line for a trial that ended: its sampled keys, how it ended, its validation score.

    Args:
        name: The trial's name (``trial-0003``).
        config: Its sampled keys (``temperature``, ``weight``, ``width``, ...).
        result: Its last reported result.
        status: ``completed``, ``stopped`` (by the scheduler) or the ``failed: …`` reason.
    """
    params = " ".join(f"{_LABELS[key][0]}={_LABELS[key][1].format(value)}"
                      for key, value in config.items() if key in _LABELS and value is not None)
    epochs = result.get("epochs") or result.get("epoch")
    after = f" after {epochs} epoch{'s' if epochs != 1 else ''}" if epochs else ""
    ce, accuracy = result.get("val_ce"), result.get("val_accuracy")
    if isinstance(ce, (int, float)):  # a language model: held-out cross-entropy, nats/token
        shown = f", val CE {ce:.4f}"
    else:
        shown = f", val acc {accuracy:.4f}" if isinstance(accuracy, (int, float)) else ""
    return f"still tune: {name} {status}{after}{f' ({params})' if params else ''}{shown}"


class TrialLines(tune.Callback):
    """Prints :func:`trial_line` for every trial as it completes, is stopped or fails."""

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A trial ran to its end (its last result says ``finished``) or the scheduler stopped it."""
        result = dict(trial.last_result or {})
        status = "completed" if result.get("finished") else "stopped early"
        print(trial_line(str(trial), trial.config, result, status), flush=True)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A trial raised: its line ends with the exception."""
        status = f"failed: {error_line(Path(trial.path))}"
        print(trial_line(str(trial), trial.config, dict(trial.last_result or {}), status), flush=True)
