"""``still tune``: a Ray Tune sweep of students over one soft-label store.

Reads top to bottom: check the config, the space and the store (every bad input
fails here, before any trial) → start or join Ray → open the MLflow parent run →
run (or restore) the Tuner → collect one row per trial → table, Pareto plot,
results JSON, logged to the parent → optionally retrain the best config on
train+val.

Launch::

    still tune store.uri=stores/<key> tune.num_samples=8 tune.searcher=optuna
    still tune --config sweep.yaml tune.resume=true          # continue an interrupted sweep
    still tune --config sweep.yaml --retrain-best --json

Outputs in ``tune.output_dir`` (default ``runs/tune-<name>/``): ``trials/`` (Tune's
experiment folder, one ``trial-NNNN`` folder per trial: what resume reads),
``models/trial-NNNN/`` (each trial's student), ``trials.txt`` (the table),
``results.json`` (rows, best, figures), ``pareto.png``, ``config.yaml`` and
``sweep_state.json`` (the parent run id, so a resumed sweep logs to the same run).

MLflow: one parent run per sweep (tags ``still.sweep``, ``store.key``; the resolved
config as params; the table, plot and results as artifacts) and one child run per
trial (tag ``mlflow.parentRunId``, per-epoch metrics, opened by the trial). Trials
that ASHA stops are cut off mid-run, so their child runs would stay RUNNING without
their epoch history; :func:`finish_child_runs` logs the history from Tune's records
and ends them (FINISHED, tag ``still.stopped_early``) once Tune has stopped every
trial actor, so no trial process can still write to them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

from still.config import to_dict
from still.errors import StillError
from tuning.config import TuneConfig
from tuning.space import CONFIG_KEYS, Dimension, build_search_alg, num_trials, param_space, resolve_space

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "still-tune"
STATE_FILE = "sweep_state.json"
TRIALS_DIR = "trials"
SWEEP_TAG = "still.sweep"
STORE_KEY_TAG = "store.key"
STOPPED_TAG = "still.stopped_early"
SUPERSEDED_TAG = "still.superseded"


@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """Everything checked before any trial starts.

    Attributes:
        name: The sweep name.
        output_dir: Absolute output folder.
        dims: The resolved search space.
        num_trials: Trials the searcher will create.
        metric: Tune metric; mode: ``max``/``min``.
        store_uri: The store ("" for an online-teacher sweep); store_key: its cache key.
        input_shape / num_classes: What the student models are built for.
        source: The store (or dataset) resolved once for every trial.
    """

    name: str
    output_dir: Path
    dims: dict[str, Dimension]
    num_trials: int
    metric: str
    mode: str
    store_uri: str
    store_key: str
    input_shape: tuple[int, ...]
    num_classes: int
    source: Any = None

    @property
    def experiment_dir(self) -> Path:
        """Tune's experiment folder (``<output_dir>/trials``)."""
        return self.output_dir / TRIALS_DIR


def plan_sweep(config: TuneConfig) -> SweepPlan:
    """Checks the space and the store; raises one-line StillErrors before any work.

    Raises:
        StillError: A bad space (empty or inverted range, bad values, a range under
            the grid searcher), an output folder that is not local, a store that does
            not open (or fails verification, with ``train.verify_store=true``), or a
            finished sweep in the output folder without ``tune.resume=true``.
    """
    dims = resolve_space(config.space, config.tune.searcher, config.student.family)
    if "://" in config.output_dir:
        raise StillError(f"tune.output_dir must be a local folder, got {config.output_dir!r}")
    output_dir = Path(config.output_dir).expanduser().resolve()
    store_uri, store_key = "", ""
    from student_train.data import resolve_lm_store_source, resolve_source
    from student_train.hints import keep_hinted_layers

    if config.base_train_config().language_model:
        if len(config.store.uri) != 1:
            raise StillError("a language-model sweep (student.family=llama) runs over one store: set store.uri to "
                             "the store of still infer with a language-model teacher")
        source = resolve_lm_store_source(config.store.uri[0], config.data)
    else:
        source = resolve_source(config.store.uri, config.data, verify=config.train.verify_store)
        source = keep_hinted_layers(source, config.kd.hints)  # the trials share what they read
    _check_temperatures(config, dims, source)
    _check_divergences(config, dims, source)
    input_shape, num_classes = tuple(source.input_shape), source.num_classes
    if config.store.uri:
        store_uri, store_key = config.store.uri[0], ",".join(m["key"] for m in source.manifests)
    if config.student.num_classes and config.student.num_classes != num_classes:
        raise StillError(
            f"student.num_classes={config.student.num_classes} but the store has {num_classes} classes"
        )
    experiment_dir = output_dir / TRIALS_DIR
    if experiment_dir.exists() and any(experiment_dir.iterdir()) and not config.tune.resume:
        raise StillError(
            f"{experiment_dir} already holds a sweep; pass tune.resume=true to continue it, "
            "or pick another tune.name or tune.output_dir"
        )
    return SweepPlan(
        name=config.sweep_name,
        output_dir=output_dir,
        dims=dims,
        num_trials=num_trials(dims, config.tune.searcher, config.tune.num_samples),
        metric=config.tune.metric,
        mode=config.tune.resolved_mode,
        store_uri=store_uri,
        store_key=store_key,
        input_shape=input_shape,
        num_classes=num_classes,
        source=source,
    )


# ------------------------------------------------------------------ MLflow parent run


class ParentRun:
    """The sweep's MLflow parent run: created once, reopened by a resumed sweep."""

    def __init__(self, config: TuneConfig, plan: SweepPlan) -> None:
        self.enabled = config.tracking.enabled
        self.run_id = ""
        self.client: Any = None
        self.experiment_id = ""
        if not self.enabled:
            return
        import mlflow

        from still.tracking import (
            check_reachable,
            ensure_experiment,
            experiment_name,
            git_sha,
            package_versions,
            tracking_uri,
        )
        from still.config import flatten

        uri = tracking_uri(config.tracking)
        check_reachable(uri)
        self.uri = uri
        self.experiment_name = experiment_name(config.tracking, DEFAULT_EXPERIMENT)
        self.experiment_id = ensure_experiment(uri, self.experiment_name)
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        state_file = plan.output_dir / STATE_FILE
        previous = _read_json(state_file).get("parent_run_id", "") if config.tune.resume else ""
        if previous:
            try:
                self.client.get_run(previous)
                self.run_id = previous
                self.client.update_run(previous, status="RUNNING")
            except Exception:  # the run was deleted or lives in another tracking store
                self.run_id = ""
        if not self.run_id:
            tags = {
                SWEEP_TAG: plan.name,
                STORE_KEY_TAG: plan.store_key,
                "still.searcher": config.tune.searcher,
                "git_sha": git_sha(),
                **{f"version.{k}": v for k, v in package_versions().items()},
            }
            run = self.client.create_run(self.experiment_id, run_name=plan.name, tags={k: str(v) for k, v in tags.items()})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()
                      if k not in ("tune.resume", "tune.retrain_best")]
            for start in range(0, len(params), 100):
                self.client.log_batch(self.run_id, params=params[start:start + 100])
        plan.output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(state_file, {"parent_run_id": self.run_id, "sweep": plan.name, "tracking_uri": uri})

    def children(self, status: str = "") -> list[Any]:
        """The child runs of this sweep (optionally only those with ``status``)."""
        if not self.enabled:
            return []
        query = f"tags.`mlflow.parentRunId` = '{self.run_id}'"
        if status:
            query += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=5000)

    def end_running_children(self, status: str) -> int:
        """Ends every RUNNING child run with ``status``; returns how many."""
        runs = self.children("RUNNING")
        for run in runs:
            self.client.set_terminated(run.info.run_id, status=status)
        return len(runs)

    def supersede_children(self, trial_prefix: str, ended_run_names: set[str]) -> int:
        """Ends the child runs that a resumed sweep runs again; returns how many.

        Every RUNNING child run, and every FINISHED trial run (name starting with
        ``trial_prefix``) not in ``ended_run_names`` (trials Tune recorded as ended), ends
        KILLED with tag ``still.superseded=true``. Such a FINISHED run is a trial whose
        run closed while an interrupt kept its last report from reaching Tune: Tune runs
        it again, and only the new run counts.
        """
        from mlflow.entities import RunTag

        stale = [run for run in self.children()
                 if run.info.status == "RUNNING"
                 or (run.info.status == "FINISHED" and run.info.run_name.startswith(trial_prefix)
                     and run.info.run_name not in ended_run_names)]
        for run in stale:
            self.client.log_batch(run.info.run_id, tags=[RunTag(SUPERSEDED_TAG, "true")])
            self.client.set_terminated(run.info.run_id, status="KILLED")
        return len(stale)

    def end(self, status: str) -> None:
        """Ends the parent run with ``status`` (FINISHED, FAILED, KILLED)."""
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)


# ------------------------------------------------------------------ Tuner


def _check_temperatures(config: TuneConfig, swept: Mapping[str, Dimension], source: Any) -> None:
    """Refuses a sweep whose lowest temperature lies below the store's grid (before any trial)."""
    from student_train.driver import check_temperature_on_grid

    temperature = swept.get("temperature")
    lowest = (min(temperature.values) if temperature.values is not None else temperature.low) if temperature \
        else config.kd.temperature
    check_temperature_on_grid(lowest, _heaviest_weight(config, swept), source,
                              "space.temperature" if temperature else "kd.temperature")


def _heaviest_weight(config: TuneConfig, swept: Mapping[str, Dimension]) -> float:
    """The largest λ any trial takes (0 means no trial reads the teacher)."""
    weight = swept.get("weight")
    return (max(weight.values) if weight.values is not None else weight.high) if weight else config.kd.weight


def _check_divergences(config: TuneConfig, swept: Mapping[str, Dimension], source: Any) -> None:
    """Refuses swept divergences the store or ``kd.tail`` cannot take (before any trial)."""
    from student_train.driver import check_divergence

    divergence = swept.get("divergence")
    if divergence is None:
        return
    heaviest = _heaviest_weight(config, swept)
    for name in divergence.values:
        if name != "forward" and config.kd.tail != "bucket":
            raise StillError(f"space.divergence={name} is computed over a top-k store's k classes and one tail bin: "
                             "it takes kd.tail=bucket, not uniform")
        check_divergence(name, heaviest, source, "space.divergence")


def trial_base(config: TuneConfig, plan: SweepPlan, parent: "ParentRun") -> dict[str, Any]:
    """The base TrainConfig of every trial, as a dict, made independent of the driver's
    process: absolute store/teacher paths (trials run in their own folders), and the
    parent run's tracking URI and experiment (workers may not share the driver's env)."""
    from still.config import replace
    from still.storage import resolve

    changes: dict[str, Any] = {}
    if plan.store_uri:
        changes["store.uri"] = [resolve(plan.store_uri).uri]
    if config.kd.online_teacher and "://" not in config.kd.online_teacher:
        changes["kd.online_teacher"] = resolve(config.kd.online_teacher).uri
    if parent.enabled:
        changes["tracking.uri"] = parent.uri
        changes["tracking.experiment"] = parent.experiment_name
    return to_dict(replace(config.base_train_config(), changes))


def shared_data(config: TuneConfig, plan: SweepPlan) -> Any:
    """The data every trial shares: the resolved source and, for in-process trials on a store
    small enough for memory, its split arrays put once in Ray's object store (each trial
    reads them zero-copy instead of loading the store again); a larger store is streamed."""
    import ray

    from student_train.driver import SharedData, choose_ingest
    from student_train.feed import load_split_arrays

    base = config.base_train_config()
    if (base.language_model or config.tune.trial_mode != "in_process"
            or choose_ingest(base, plan.source, 1) != "memory"):
        return SharedData(plan.source)
    return SharedData(plan.source, ray.put(load_split_arrays(plan.source)))


def _trainable(config: TuneConfig, plan: SweepPlan, parent: "ParentRun", shared: Any) -> Any:
    from ray import tune

    from tuning.trainable import TrialSpec, run_trial

    spec = TrialSpec(
        base=trial_base(config, plan, parent),
        sweep_name=plan.name,
        parent_run_id=parent.run_id,
        trial_mode=config.tune.trial_mode,
        models_dir=str(plan.output_dir / "models"),
        shared=shared,
    )
    fn = tune.with_parameters(run_trial, spec=spec)
    if config.tune.trial_mode == "in_process":
        resources = {"CPU": config.tune.cpus_per_trial}
        if config.tune.gpus_per_trial:
            resources["GPU"] = config.tune.gpus_per_trial
    else:  # the TorchTrainer's workers reserve the real resources
        resources = {"CPU": 0.01}
    return tune.with_resources(fn, resources)


def build_tuner(config: TuneConfig, plan: SweepPlan, parent: ParentRun, callbacks: Sequence[Any] = (),
                shared: Any = None) -> Any:
    """Returns a fresh Tuner, or the restored one when ``tune.resume`` finds a saved sweep.

    ``callbacks`` (Ray Tune ``Callback``s) go to a fresh Tuner's ``RunConfig``, after
    :class:`tuning.console.TrialLines` unless ``ray.verbose``; a restored one gets back
    those it was first given (Tune saves them with the experiment), and its verbosity.
    ``shared``: :func:`shared_data` (built here when not given).
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from tuning.console import TrialLines, run_config_verbosity
    from tuning.scheduler import FinishingASHA
    from tuning.trainable import TrialNamer

    trainable = _trainable(config, plan, parent, shared if shared is not None else shared_data(config, plan))
    experiment_dir = plan.experiment_dir
    TrialNamer.forget(str(experiment_dir))  # recount from what is on disk
    if config.tune.resume and tune.Tuner.can_restore(str(experiment_dir)):
        print(f"still tune: resuming {experiment_dir} (finished trials are kept)", flush=True)
        return tune.Tuner.restore(str(experiment_dir), trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    if config.tune.scheduler == "asha":
        scheduler: Any = FinishingASHA(
            time_attr="training_iteration",
            max_t=config.train.epochs,
            grace_period=config.tune.grace_period,
            reduction_factor=config.tune.reduction_factor,
            stop_last_trials=False,
        )
    else:
        scheduler = FIFOScheduler()
    namer = TrialNamer(str(experiment_dir))
    return tune.Tuner(
        trainable,
        param_space=param_space(plan.dims, config.tune.searcher),
        tune_config=tune.TuneConfig(
            metric=plan.metric,
            mode=plan.mode,
            search_alg=build_search_alg(config.tune.searcher, seed=config.tune.seed,
                                        max_concurrent=config.tune.max_concurrent_trials),
            scheduler=scheduler,
            num_samples=config.tune.num_samples,
            trial_name_creator=namer,
            trial_dirname_creator=namer,
            # One actor process runs trial after trial: imports (torch, mlflow) are paid
            # once per actor, not per trial (ASHA-stopped trials exit at their next report).
            reuse_actors=config.tune.trial_mode == "in_process",
        ),
        run_config=tune.RunConfig(
            name=TRIALS_DIR,
            storage_path=str(plan.output_dir),
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[*([] if config.ray.verbose else [TrialLines()]), *callbacks],
            verbose=run_config_verbosity(config.ray.verbose),
        ),
    )


# ------------------------------------------------------------------ results


def _student_params(config: TuneConfig, plan: SweepPlan, params: Mapping[str, Any], cache: dict) -> int:
    """Parameters of a trial's student (one whose trial stopped before reporting them)."""
    from still.models import build_model, count_parameters

    width, depth = params.get("width", config.student.width), int(params.get("depth", config.student.depth))
    if (width, depth) not in cache:
        if config.base_train_config().language_model:
            args: dict[str, Any] = {"vocab_size": plan.num_classes, "max_positions": config.student.max_positions}
        else:
            args = {"input_shape": plan.input_shape, "num_classes": plan.num_classes}
            if config.student.family == "mlp":
                args["dropout"] = config.student.dropout
        cache[(width, depth)] = count_parameters(build_model(config.student.family, width=width, depth=depth, **args))
    return cache[(width, depth)]


def collect_rows(config: TuneConfig, plan: SweepPlan) -> tuple[list[dict[str, Any]], int]:
    """Reads every trial of the experiment folder into a table row.

    Returns:
        The rows sorted by trial name, and how many trials did not end (interrupted).
    """
    from ray.tune import ExperimentAnalysis

    from tuning.console import error_line

    analysis = ExperimentAnalysis(str(plan.experiment_dir), default_metric=plan.metric, default_mode=plan.mode)
    base = config.base_train_config()
    size_cache: dict = {}
    rows = []
    unfinished = 0
    for trial in analysis.trials:
        last = dict(trial.last_result or {})
        params = {key: trial.config.get(key) for key in CONFIG_KEYS if key in trial.config}
        width = params.get("width", base.student.width)
        if trial.status == "ERROR":
            status = "error"
        elif last.get("finished"):
            status = "completed"
        elif trial.status == "TERMINATED":
            status = "stopped"
        else:
            status = "unfinished"
            unfinished += 1
        epochs = last.get("epochs") or last.get("epoch") or last.get("training_iteration")
        row = {
            "trial": str(trial),
            "temperature": params.get("temperature", base.kd.temperature),
            "weight": params.get("weight", base.kd.weight),
            "width": width,
            "lr": params.get("lr"),
            "hint_weight": params.get("hint_weight"),
            "depth": params.get("depth"),
            "divergence": params.get("divergence"),
            "params": int(last.get("student_params") or _student_params(config, plan, params, size_cache)),
            "val_ce": _num(last.get("val_ce")),
            "val_agreement": _num(last.get("val_agreement")),
            "val_accuracy": _num(last.get("val_accuracy")),
            "val_nll": _num(last.get("val_nll")),
            "test_accuracy": _num(last.get("test_accuracy", last.get("student_test_accuracy"))),
            "test_errors": last.get("test_errors"),
            "epochs": int(epochs) if epochs is not None else None,
            "status": status,
            "run_id": last.get("run_id", ""),
            "error": error_line(Path(trial.path)) if status == "error" else "",
        }
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    return rows, unfinished


def ended_trials(config: TuneConfig, plan: SweepPlan) -> list[dict[str, Any]]:
    """Rows of the trials a saved sweep recorded as ended (completed, stopped or errored)."""
    from ray import tune

    if not tune.Tuner.can_restore(str(plan.experiment_dir)):
        return []
    return [row for row in collect_rows(config, plan)[0] if row["status"] != "unfinished"]


# Per-epoch metrics of the training loop that a stopped trial's run gets.
EPOCH_METRICS = ("train_loss", "train_ce", "train_kl", "train_hint", "val_accuracy", "val_nll", "agreement",
                 "epoch_s", "samples_per_s")


def finish_child_runs(parent: ParentRun, plan: SweepPlan, rows: list[dict[str, Any]]) -> None:
    """Gives every trial's child run its final state, after Tune has stopped all trial actors.

    A completed trial closed its own run. A trial that ASHA stopped was cut off before
    its job logged the epoch history and ended the run (left RUNNING, or FAILED by the
    stop's exit): its history is logged here from Tune's records (step = epoch) and the
    run ends FINISHED with tag ``still.stopped_early=true``; errored trials end FAILED.
    Anything else still RUNNING (a trial interrupted and rerun) ends KILLED.
    """
    from mlflow.entities import Metric, RunTag
    from ray.tune import ExperimentAnalysis

    by_name: dict[str, list[Any]] = {}
    for run in parent.children():
        by_name.setdefault(run.info.run_name, []).append(run)
    frames: dict[str, Any] = {}
    analysis = None
    for row in rows:
        if row["status"] not in ("stopped", "error"):
            continue
        runs = sorted(by_name.get(f"{plan.name}-{row['trial']}", []), key=lambda r: r.info.start_time)
        if not runs:
            continue
        run = runs[-1]
        if row["status"] == "stopped":
            if analysis is None:
                analysis = ExperimentAnalysis(str(plan.experiment_dir))
                frames = {str(t): analysis.trial_dataframes.get(t.trial_id) for t in analysis.trials}
            frame = frames.get(row["trial"])
            if frame is not None and "val_accuracy" not in run.data.metrics and "epoch" in frame:
                now = int(time.time() * 1000)
                metrics = [Metric(key, float(value), now, int(epoch))
                           for epoch, record in zip(frame["epoch"], frame.to_dict("records"))
                           for key, value in record.items()
                           if (key in EPOCH_METRICS or key.startswith("train_hint_"))
                           and _num(value) is not None and value == value]
                for start in range(0, len(metrics), 500):
                    parent.client.log_batch(run.info.run_id, metrics=metrics[start:start + 500])
            parent.client.log_batch(run.info.run_id, tags=[RunTag(STOPPED_TAG, "true"),
                                                           RunTag("still.epochs_run", str(row["epochs"]))])
            parent.client.set_terminated(run.info.run_id, status="FINISHED")
        else:
            parent.client.set_terminated(run.info.run_id, status="FAILED")
    parent.end_running_children("KILLED")


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def pick_best(rows: list[dict[str, Any]], metric: str, mode: str) -> int | None:
    """Index of the best row by ``metric`` (completed trials first, then any with the metric)."""
    for pool_status in (("completed",), ("completed", "stopped")):
        pool = [i for i, r in enumerate(rows) if r["status"] in pool_status and r.get(metric) is not None]
        if pool:
            sign = 1 if mode == "max" else -1
            return max(pool, key=lambda i: sign * rows[i][metric])
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


# ------------------------------------------------------------------ retrain best


def retrain_best(config: TuneConfig, plan: SweepPlan, best_row: dict[str, Any], parent: ParentRun) -> dict[str, Any]:
    """Trains the best config on train+val (in this process) as the sweep's model."""
    from student_train.driver import JobOptions, SharedData, train_job

    from tuning.trainable import TrialSpec, trial_train_config

    spec = TrialSpec(base=trial_base(config, plan, parent), sweep_name=plan.name,
                     parent_run_id=parent.run_id, trial_mode=config.tune.trial_mode,
                     models_dir=str(plan.output_dir))
    from still.config import replace

    params = {k: best_row[k] for k in CONFIG_KEYS if best_row.get(k) is not None}
    cfg = replace(trial_train_config(spec, params, "best"), {"train.include_val": True})
    print(f"still tune: retraining the best config ({best_row['trial']}) on train+val", flush=True)
    summary = train_job(cfg, run_name=cfg.train.name, options=JobOptions(
        parent_run_id=parent.run_id, in_process=config.tune.trial_mode == "in_process", load_teacher=False,
        shared=SharedData(plan.source)))
    if parent.enabled:
        parent.client.set_tag(parent.run_id, "still.best_model_run_id", summary.get("run_id", ""))
        if summary.get("checkpoint") and Path(str(summary["checkpoint"])).is_file():
            parent.client.log_artifact(parent.run_id, str(summary["checkpoint"]), "model")
    return summary


# ------------------------------------------------------------------ entry point


def run_tune(config: TuneConfig, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Runs a sweep and returns its summary (what ``still tune --json`` prints).

    Args:
        config: The resolved ``still tune`` config.
        callbacks: Extra Ray Tune callbacks for the Tuner (see :func:`build_tuner`).

    Returns:
        ``parent_run_id``, ``trials`` (one row per trial), ``best`` (config and
        metrics), ``plot`` (PNG path), plus ``table``, ``results``, ``output_dir``,
        ``store_key``, ``num_trials``, ``wall_s`` and, when retrained, ``retrained``.

    Raises:
        StillError: Bad input (before any trial), or an interrupted sweep (resume it
            with ``tune.resume=true``).
    """
    from still.ray_setup import init_ray

    from tuning.console import tune_output
    from tuning.report import format_table, pareto_front, plot_pareto

    started = time.monotonic()
    plan = plan_sweep(config)
    init_ray(config.ray)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    import yaml

    (plan.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    print(f"still tune: {plan.name}: {plan.num_trials} trial(s), searcher {config.tune.searcher}, "
          f"space {', '.join(f'{k}={d.describe()}' for k, d in plan.dims.items())} -> {plan.output_dir}", flush=True)
    parent = ParentRun(config, plan)
    status = "FAILED"
    try:
        if parent.enabled and config.tune.resume:
            # Trials interrupted last time restart from scratch with a new child run.
            from tuning.trainable import TRIAL_PREFIX

            parent.supersede_children(f"{plan.name}-{TRIAL_PREFIX}",
                                      {f"{plan.name}-{row['trial']}" for row in ended_trials(config, plan)})
        tuner = build_tuner(config, plan, parent, callbacks)
        with tune_output(config.ray.verbose):
            tuner.fit()
        rows, unfinished = collect_rows(config, plan)
        if parent.enabled:
            finish_child_runs(parent, plan, rows)
        # An interrupt can land before the searcher has created every trial (one
        # trial at a time with optuna): those never-started trials are unfinished too.
        unfinished += max(0, plan.num_trials - len(rows))
        if unfinished:
            status = "KILLED"
            raise StillError(
                f"sweep {plan.name!r} was interrupted with {unfinished} of {plan.num_trials} trial(s) unfinished; "
                "rerun with tune.resume=true to finish it"
            )
        if rows and all(row["status"] == "error" for row in rows):
            raise StillError(f"sweep {plan.name!r}: all {len(rows)} trial(s) failed; "
                             f"{rows[0]['trial']}: {rows[0]['error']}")
        best = pick_best(rows, plan.metric, plan.mode)
        score, higher = _pareto_score(plan)
        front = pareto_front(rows, score_key=score, higher_is_better=higher)
        table = format_table(rows, front=front, best=best)
        print(table, flush=True)
        table_path = plan.output_dir / "trials.txt"
        table_path.write_text(table + "\n")
        plot_path = plot_pareto(rows, plan.output_dir / "pareto.png", title=f"{plan.name}: {score} vs size",
                                score_key=score, best=best, higher_is_better=higher)
        best_summary = _best_summary(rows, best, plan.metric)
        summary: dict[str, Any] = {
            "parent_run_id": parent.run_id,
            "trials": rows,
            "best": best_summary,
            "plot": str(plot_path),
            "table": str(table_path),
            "output_dir": str(plan.output_dir),
            "store_key": plan.store_key,
            "num_trials": len(rows),
            "pareto": [rows[i]["trial"] for i in front],
        }
        if config.tune.retrain_best:
            if best is None:
                raise StillError(f"sweep {plan.name!r}: no trial reported {plan.metric}; nothing to retrain")
            retrained = retrain_best(config, plan, rows[best], parent)
            summary["retrained"] = {k: v for k, v in retrained.items() if not isinstance(v, (dict, list))}
        summary["wall_s"] = round(time.monotonic() - started, 2)
        results_path = plan.output_dir / "results.json"
        _write_json(results_path, summary)
        summary["results"] = str(results_path)
        if parent.enabled:
            if best is not None:
                metrics = {f"best_{k}": v for k, v in best_summary["metrics"].items() if _num(v) is not None}
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                parent.client.log_batch(parent.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
                parent.client.set_tag(parent.run_id, "still.best_trial", best_summary["trial"])
            for path in (table_path, plot_path, results_path, plan.output_dir / "config.yaml"):
                parent.client.log_artifact(parent.run_id, str(path))
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.end(status)


def _pareto_score(plan: SweepPlan) -> tuple[str, bool]:
    """The score the Pareto front and plot use: held-out CE (lower is better) for language models."""
    if plan.source is not None and plan.source.task == "causal_lm":
        return "val_ce", False
    return "val_accuracy", True


def _best_summary(rows: list[dict[str, Any]], best: int | None, metric: str) -> dict[str, Any]:
    if best is None:
        return {}
    row = rows[best]
    config = {CONFIG_KEYS[k]: row[k] for k in CONFIG_KEYS if row.get(k) is not None}
    metrics = {k: row[k] for k in ("val_accuracy", "val_nll", "val_ce", "val_agreement", "test_accuracy", "params",
                                   "epochs")
               if row.get(k) is not None}
    result = {"trial": row["trial"], "config": config, "metrics": metrics, "metric": metric}
    if row.get("test_errors") is not None:
        result["test_errors"] = row["test_errors"]
    return result
