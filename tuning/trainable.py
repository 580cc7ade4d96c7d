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
  TorchTrainer, no worker group, no placement group of its own). The sweep resolves
  the store once and puts its split arrays in Ray's object store once; every trial
  reads them from there, zero-copy (a store too large for memory is streamed).

Measured with ``bench/sweep.py`` on this 2-core machine (ray 2.60, torch 2.13 CPU,
digits store, mlp width 32/64/128 × 2, 3 epochs, a 3-trial sweep per mode, one trial
at a time, wall time of the whole ``run_tune`` call ÷ trials). The machine was
shared with other jobs (1-minute load average 14 at the end; ~29 during the quick
run), so absolute figures are inflated; the ratio is the point:

| trial_mode | per trial (full run) | per trial (``--quick``, 1 trial, 1 epoch) |
|---|---|---|
| in_process | 6.5 s | 40 s |
| trainer | 72 s | 131 s |

``trainer`` pays a Train controller, a worker group and Ray Data materialising the
splits for every trial (RAY-NOTES.md: 18–20 s unloaded, vs ~2.8 s in process).
In-process trials also reuse their actor (``reuse_actors``), so imports are paid
once per concurrent slot: the 16-trial sweep of the full run cost 4.5 s per trial
against 0.84 s for the bare loop (3.7 s of Tune + MLflow + export per trial).
Hence ``in_process`` is the default; ``trainer`` is for trials that need several
workers or GPUs each.

Trial names are ``trial-0000``, ``trial-0001``, … in creation order (never
timestamps or random ids); a resumed sweep continues the count.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from still.config import build_dataclass, replace
from still.ray_setup import quiet_termination

from tuning.space import CONFIG_KEYS

TRIAL_PREFIX = "trial-"
_TRIAL_RE = re.compile(r"trial-(\d{4,})")


# experiment folder -> (next number, {trial_id: name}); module-level because Tune copies
# the creator objects it is given (deepcopy, pickle), and every copy must share one count.
_COUNTERS: dict[str, tuple[list[int], dict[str, str]]] = {}


class TrialNamer:
    """``trial_name_creator`` / ``trial_dirname_creator``: ``trial-NNNN`` in creation order.

    The count lives in a process-wide registry keyed by the experiment folder, so the
    copies Tune makes of this object agree. It starts after the highest number already
    used in that folder (trial folders and saved experiment state), so a resumed sweep
    never reuses a name.
    """

    def __init__(self, experiment_dir: str) -> None:
        self.experiment_dir = experiment_dir

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
        if self.experiment_dir not in _COUNTERS:
            _COUNTERS[self.experiment_dir] = ([self._first_free()], {})
        counter, names = _COUNTERS[self.experiment_dir]
        if trial.trial_id not in names:
            names[trial.trial_id] = f"{TRIAL_PREFIX}{counter[0]:04d}"
            counter[0] += 1
        return names[trial.trial_id]

    @staticmethod
    def forget(experiment_dir: str) -> None:
        """Drops the count of a folder (a new sweep in this process recounts from disk)."""
        _COUNTERS.pop(experiment_dir, None)


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """What every trial of a sweep shares; plain data so it pickles to the workers.

    Attributes:
        base: ``to_dict`` of the base TrainConfig.
        sweep_name: The sweep name (prefix of every child run name).
        parent_run_id: The MLflow parent run ("" without tracking).
        trial_mode: ``in_process`` or ``trainer``.
        models_dir: Absolute folder under which each trial writes its student.
        shared: ``student_train.driver.SharedData``: the source resolved once, and its
            arrays in the object store when trials hold them in memory.
    """

    base: dict
    sweep_name: str
    parent_run_id: str
    trial_mode: str
    models_dir: str
    shared: Any = None


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


def run_trial(params: dict[str, Any], spec: TrialSpec) -> None:
    """The Tune function: trains one student and reports every epoch to Tune.

    Each per-epoch report (from the training loop, through ``ray.tune.report`` in
    process or ``TuneReportCallback`` from a TorchTrainer) carries ``epoch``,
    ``val_accuracy``, ``val_nll`` and the train losses; the last epoch's also the test
    metrics. A trial that runs to the end reports once more with the job's summary
    figures (``student_params``, ``run_id``, ...) and ``finished=1``; a trial that ASHA
    stops never gets there.
    """
    from ray import tune

    from student_train.driver import JobOptions, train_job

    trial_name = tune.get_context().get_trial_name()
    cfg = trial_train_config(spec, params, trial_name)
    quiet_termination(cfg.ray.verbose)
    summary = train_job(cfg, run_name=cfg.train.name, options=JobOptions(
        parent_run_id=spec.parent_run_id, report_to_tune=True, in_process=spec.trial_mode == "in_process",
        quiet=True, load_teacher=False, log_model=False, shared=spec.shared))
    final: dict[str, Any] = {k: v for k, v in summary.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    final.update({k: str(summary[k]) for k in ("run_id", "checkpoint") if summary.get(k)})
    final["finished"] = 1
    tune.report(final)
