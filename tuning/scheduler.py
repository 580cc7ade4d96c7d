"""ASHA that lets a trial which has reached the last epoch finish.

Ray's ``ASHAScheduler`` puts a rung at every ``grace_period · reduction_factor^k`` up
to ``max_t``, ``max_t`` included, and ``stop_last_trials=False`` only spares trials
that already passed a rung. A trial whose last epoch lands on a rung can therefore be
stopped after all its training is done, before it evaluates on the test split, saves
its model and ends its MLflow run: nothing saved, a row without a run. With
``train.epochs == tune.grace_period`` (one rung, at the end) whichever of two trials
reported second was stopped when it scored lower: a race. Here a result at ``max_t``
always continues, so the trial ends on its own; the earlier rungs cut as before.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler


class FinishingASHA(ASHAScheduler):
    """``ASHAScheduler`` that never stops a trial at (or past) ``max_t``.

    Args:
        time_attr: The result key that counts progress (``training_iteration``).
        max_t: The last value of ``time_attr`` (``train.epochs``).
        **kwargs: The rest of ``ASHAScheduler``'s arguments.
    """

    def __init__(self, *, time_attr: str, max_t: int, **kwargs: Any) -> None:
        super().__init__(time_attr=time_attr, max_t=max_t, **kwargs)
        self.last_step = (time_attr, max_t)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        attr, max_t = self.last_step
        if result.get(attr, 0) >= max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
