"""The config-driven verbs, ``infer``, ``train`` and ``tune``: each one's config class and runner.

``still VERB`` and a ``still run`` stage of that verb both go through :data:`VERBS`.
The config classes are small dataclass modules imported here; the stage that runs a
verb (torch, Ray, MLflow) is imported by :attr:`Verb.load`, when the verb runs, so
``still --help`` and ``--print-config`` stay fast and never import Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from student_train.config import TrainConfig
from teacher_infer.config import InferConfig
from tuning.config import TuneConfig

Runner = Callable[[Any], dict[str, Any]]


def _load_infer() -> Runner:
    from teacher_infer.infer import run_infer

    return run_infer


def _load_train() -> Runner:
    from student_train.driver import run_train

    return run_train


def _load_tune() -> Runner:
    from tuning.driver import run_tune

    return run_tune


def train_table(summary: dict[str, Any]) -> str:
    """The student-vs-teacher table of a ``still train`` summary (:func:`student_train.driver.format_table`)."""
    from student_train.driver import format_table

    return format_table(summary)


def _always(config: Any) -> bool:
    return True


def _train_uses_ray(config: TrainConfig) -> bool:
    # Ray Train workers; a student trained in this process (num_workers=0) from memory uses no Ray.
    return config.scaling.max_workers > 0


@dataclasses.dataclass(frozen=True)
class Verb:
    """A verb driven by a config: what it is built from and what runs it."""

    name: str
    """``infer``, ``train`` or ``tune``."""
    config_class: type
    """The frozen root config dataclass of the verb."""
    load: Callable[[], Runner]
    """Imports the stage and returns the function that runs the verb on a resolved config
    and returns its summary."""
    dashboard: bool
    """Whether the embedded Ray cluster it starts runs Ray's dashboard (see
    :func:`still.ray_setup.init_ray`): Ray Train and Tune ask it about their actors."""
    uses_ray: Callable[[Any], bool]
    """Whether a run with this config starts Ray (the CLI starts it while the stage imports)."""
    report: Callable[[dict[str, Any]], str] | None = None
    """What ``still VERB`` prints of the summary before the summary itself (a ``still run``
    stage prints none: the pipeline's closing table has its figures)."""

    def run(self, config: Any) -> dict[str, Any]:
        """Runs the verb on a resolved config and returns its summary."""
        return self.load()(config)


VERBS: dict[str, Verb] = {
    verb.name: verb
    for verb in (Verb("infer", InferConfig, _load_infer, dashboard=False, uses_ray=_always),
                 Verb("train", TrainConfig, _load_train, dashboard=True, uses_ray=_train_uses_ray, report=train_table),
                 Verb("tune", TuneConfig, _load_tune, dashboard=True, uses_ray=_always))
}
