"""The config-driven verbs, ``infer``, ``train`` and ``tune``: each one's config class and runner.

``still VERB`` and a ``still run`` stage of that verb both go through :data:`VERBS`.
The config classes are small dataclass modules imported here; the stage that runs a
verb (torch, Ray, MLflow) is imported only when the verb runs, so ``still --help`` and
``--print-config`` stay fast and never import Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from student_train.config import TrainConfig
from teacher_infer.config import InferConfig
from tuning.config import TuneConfig


def run_infer(config: InferConfig) -> dict[str, Any]:
    """Runs ``still infer`` (:func:`teacher_infer.infer.run_infer`)."""
    from teacher_infer.infer import run_infer as run

    return run(config)


def run_train(config: TrainConfig) -> dict[str, Any]:
    """Runs ``still train`` (:func:`student_train.driver.run_train`)."""
    from student_train.driver import run_train as run

    return run(config)


def run_tune(config: TuneConfig) -> dict[str, Any]:
    """Runs ``still tune`` (:func:`tuning.driver.run_tune`)."""
    from tuning.driver import run_tune as run

    return run(config)


@dataclasses.dataclass(frozen=True)
class Verb:
    """A verb driven by a config: what it is built from and what runs it."""

    name: str
    """``infer``, ``train`` or ``tune``."""
    config_class: type
    """The frozen root config dataclass of the verb."""
    run: Callable[[Any], dict[str, Any]]
    """Runs the verb on a resolved config and returns its summary."""


VERBS: dict[str, Verb] = {
    verb.name: verb
    for verb in (Verb("infer", InferConfig, run_infer), Verb("train", TrainConfig, run_train),
                 Verb("tune", TuneConfig, run_tune))
}
