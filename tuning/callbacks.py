"""Tune callbacks of a sweep: end each trial's MLflow child run when Tune is done with it.

A trial that ASHA stops is killed mid-epoch, so the child run it opened would stay
RUNNING forever; ``EndChildRuns`` ends it (FINISHED, tag ``still.stopped_early``)
as soon as Tune reports the trial complete, and marks errored trials FAILED. A
trial that ran to the end already closed its run, so nothing matches then.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

log = logging.getLogger(__name__)

STOPPED_TAG = "still.stopped_early"


def end_running_children(tracking_uri: str, experiment_id: str, parent_run_id: str, *,
                         run_name: str = "", status: str = "FINISHED", stopped: bool = True) -> int:
    """Ends the RUNNING child runs of ``parent_run_id`` (only the one named ``run_name`` if given).

    Returns:
        How many runs were ended.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"
    if run_name:
        query += f" and attributes.run_name = '{run_name}'"
    ended = 0
    for run in client.search_runs([experiment_id], filter_string=query, max_results=5000):
        client.set_tag(run.info.run_id, STOPPED_TAG, str(stopped).lower())
        client.set_terminated(run.info.run_id, status=status)
        ended += 1
    return ended


class EndChildRuns(Callback):
    """Ends a trial's child run when Tune finishes with the trial.

    Holds plain strings only: Tune pickles it with the experiment and a resumed sweep
    gets it back.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep = sweep

    def _end(self, trial: Any, status: str) -> None:
        try:
            end_running_children(self.tracking_uri, self.experiment_id, self.parent_run_id,
                                 run_name=f"{self.sweep}-{trial}", status=status)
        except Exception as exc:  # bookkeeping never fails the sweep; run_tune sweeps up at the end
            log.warning("could not end the MLflow run of %s: %s", trial, exc)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial ended normally or was stopped by the scheduler."""
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial raised."""
        self._end(trial, "FAILED")
