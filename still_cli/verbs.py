"""The config-driven verbs, ``infer``, ``train``, ``tune`` and ``eval``: each one's config class and runner.

``still VERB`` and a ``still run`` stage of that verb both go through :data:`VERBS`.
The config classes are small dataclass modules imported here; the stage that runs a
verb (torch, Ray, MLflow) is imported by :attr:`Verb.load`, when the verb runs, so
``still --help`` and ``--print-config`` stay fast and never import Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from student_train.config import EvalConfig, TrainConfig
from teacher_infer.config import InferConfig
from tuning.config import TuneConfig

Runner = Callable[[Any], dict[str, Any]]


def _load_infer() -> Runner:
    from teacher_infer.infer import run_infer

    return run_infer


def _load_train() -> Runner:
    from student_train.driver import run_train

    return run_train


def _load_eval() -> Runner:
    from student_train.lm_eval import run_eval

    return run_eval


def eval_table(summary: dict[str, Any]) -> str:
    """What ``still eval`` prints: per split, nats/token, perplexity, accuracy (``student_train.lm_eval``)."""
    from student_train.lm_eval import format_eval_table

    return format_eval_table(summary)


def _load_tune() -> Runner:
    from tuning.driver import run_tune

    return run_tune


def train_table(summary: dict[str, Any]) -> str:
    """The table of a ``still train`` summary: student against teacher (``student_train.driver.format_table``),
    or a language model's held-out cross-entropy (``student_train.lm_driver.format_lm_table``)."""
    if summary.get("task") == "causal_lm":
        from student_train.lm_driver import format_lm_table

        return format_lm_table(summary)
    from student_train.driver import format_table

    return format_table(summary)


def _never(config: Any) -> bool:
    return False


def _train_uses_ray_train(config: TrainConfig) -> bool:
    # A TorchTrainer's workers; a student trained in this process (num_workers=0) has none.
    return not config.scaling.in_process


def _tune_trains_with_ray_train(config: TuneConfig) -> bool:
    # Measured (Ray 2.60, 2 CPUs): in-process trials run one after another without the
    # dashboard; trials that each build a TorchTrainer want it (its placement-group cleaner).
    return config.tune.trial_mode == "trainer"


@dataclasses.dataclass(frozen=True)
class Verb:
    """A verb driven by a config: what it is built from and what runs it."""

    name: str
    """``infer``, ``train``, ``tune`` or ``eval``."""
    config_class: type
    """The frozen root config dataclass of the verb."""
    load: Callable[[], Runner]
    """Imports the stage and returns the function that runs the verb on a resolved config
    and returns its summary."""
    dashboard: Callable[[Any], bool]
    """Whether a run with this config wants Ray's dashboard on the embedded cluster a
    ``still run`` pipeline starts for its stages (see :func:`still.ray_setup.init_ray`):
    Ray Train's ``TorchTrainer`` asks it about its controller; Ray Data and in-process
    Tune trials need none."""
    report: Callable[[dict[str, Any]], str] | None = None
    """What ``still VERB`` prints of the summary before the summary itself (a ``still run``
    stage prints none: the pipeline's closing table has its figures)."""

    def run(self, config: Any) -> dict[str, Any]:
        """Runs the verb on a resolved config and returns its summary."""
        return self.load()(config)


VERBS: dict[str, Verb] = {
    verb.name: verb
    for verb in (Verb("infer", InferConfig, _load_infer, dashboard=_never),
                 Verb("train", TrainConfig, _load_train, dashboard=_train_uses_ray_train, report=train_table),
                 Verb("tune", TuneConfig, _load_tune, dashboard=_tune_trains_with_ray_train),
                 Verb("eval", EvalConfig, _load_eval, dashboard=_never, report=eval_table))
}
