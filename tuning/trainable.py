"""The Tune function every trial runs, and the deterministic trial names.

A trial is one ``still train`` job over the sweep's store with the sampled keys set
(``kd.temperature``, ``kd.weight``, ``student.width``, ``train.lr``). It calls
:func:`student_train.driver.train_job` with a ``report`` hook that forwards each
epoch's metrics to Tune, which is what ASHA acts on. Two ways to run it
(``tune.trial_mode``):

- ``trainer`` — the Ray Train V2 idiom: the Tune function builds a TorchTrainer
  (``scaling.*`` workers) whose ``TuneReportCallback`` forwards ``ray.train.report``
  to Tune. The function itself holds ``{"CPU": 0.01}``; the workers hold the CPUs.
- ``in_process`` — the Tune function trains on one worker in its own process (no
  TorchTrainer, no worker group, no placement group of its own), data read with
  plain pyarrow.

Measured on this 2-core machine (ray 2.60, torch 2.13 CPU, digits store, mlp
width 64, 3 epochs, one trial at a time; ``bench/sweep.py``):

| trial_mode | per trial (wall) | of which training |
|---|---|---|
| in_process | {IN_PROCESS} | |
| trainer | {TRAINER} | |

so ``in_process`` is the default and ``trainer`` is for trials that need several
workers or GPUs per trial.

Trial names are ``trial-0000``, ``trial-0001``, … in creation order (never
timestamps or random ids); a resumed sweep continues the count.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any, Callable

from still.config import build_dataclass, replace

from tuning.space import CONFIG_KEYS

TRIAL_PREFIX = "trial-"
_TRIAL_RE = re.compile(r"trial-(\d{4,})")


class TrialNamer:
    """``trial_name_creator`` / ``trial_dirname_creator``: ``trial-NNNN`` in creation order.

    The counter starts after the highest number already used in the experiment folder
    (its trial folders and its saved state), so a resumed sweep never reuses a name.
    Picklable (Tune saves it with the Tuner state); the counter is recomputed after
    unpickling.
    """

    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir
        self._next: int | None = None
        self._names: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_dir": self.experiment_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["experiment_dir"])

    def _first_free(self) -> int:
        used = [-1]
        folder = Path(self.experiment_dir)
        if folder.is_dir():
            for child in folder.iterdir():
                match = _TRIAL_RE.fullmatch(child.name)
                if match:
                    used.append(int(match.group(1)))
                elif child.name.startswith("experiment_state") and child.is_file():
                    used += [int(m) for m in _TRIAL_RE.findall(child.read_text(errors="replace"))]
        return max(used) + 1

    def __call__(self, trial: Any) -> str:
        trial_id = trial.trial_id
        if trial_id not in self._names:
            if self._next is None:
                self._next = self._first_free()
            self._names[trial_id] = f"{TRIAL_PREFIX}{self._next:04d}"
            self._next += 1
        return self._names[trial_id]


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """What every trial of a sweep shares; plain data so it pickles to the workers.

    Attributes:
        base: ``to_dict`` of the base TrainConfig.
        sweep_name: The sweep name (prefix of every child run name).
        parent_run_id: The MLflow parent run ("" without tracking).
        trial_mode: ``in_process`` or ``trainer``.
        models_dir: Absolute folder under which each trial writes its student.
    """

    base: dict
    sweep_name: str
    parent_run_id: str
    trial_mode: str
    models_dir: str


def trial_train_config(spec: TrialSpec, params: dict[str, Any], trial_name: str) -> Any:
    """Returns the TrainConfig of one trial: the base with the sampled keys set."""
    from student_train.config import TrainConfig

    changes: dict[str, Any] = {CONFIG_KEYS[key]: value for key, value in params.items() if key in CONFIG_KEYS}
    changes["train.name"] = f"{spec.sweep_name}-{trial_name}"
    changes["train.output_dir"] = str(Path(spec.models_dir) / trial_name)
    changes["train.resume"] = False
    if spec.trial_mode == "in_process":
        changes["scaling.num_workers"] = [0]
    base = build_dataclass(TrainConfig, spec.base, prefix="")
    return replace(base, changes)


def _teacher_loader_imported() -> bool:
    return "teacher_infer.teachers" in sys.modules


def run_trial(params: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune function: trains one student and reports every epoch to Tune.

    Each per-epoch report carries ``epoch``, ``val_accuracy``, ``val_loss`` (and
    whatever else the loop reports). A trial that runs to the end reports once more
    with the job's final figures (``test_accuracy``, ``student_params``, ``run_id``)
    and ``finished=1``; a trial ASHA stops never gets there.
    """
    from ray import tune

    from student_train.driver import train_job

    trial_name = tune.get_context().get_trial_name()
    cfg = trial_train_config(spec, params, trial_name)
    report: Callable[[dict[str, Any]], None] | None = None
    if spec.trial_mode == "in_process":

        def report(metrics: dict[str, Any]) -> None:
            tune.report(dict(metrics))

    summary = train_job(
        cfg,
        run_name=cfg.train.name,
        parent_run_id=spec.parent_run_id,
        report=report,
        tune_report=spec.trial_mode == "trainer",
    )
    final = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update({k: summary[k] for k in ("run_id", "checkpoint") if k in summary})
    final["finished"] = 1
    final["teacher_loader_imported"] = int(_teacher_loader_imported())
    tune.report(final)
