"""``still train``: distil a student from a soft-label store (or train one supervised).

Reads top to bottom: :func:`prepare_job` checks everything that can be checked
(tracking, store, classes, family, init, batch size, devices) → the MLflow run opens →
:func:`fit` trains (Ray Train V2 ``TorchTrainer`` on N workers, or in this process),
rank 0 logging every epoch to the run as it ends → the student is exported → the
summary is logged and returned.

    still train store.uri=stores/<key> student.family=mlp student.width=800 \\
        kd.temperature=20 kd.weight=0.9 train.epochs=8 scaling.num_workers=2 --json
    still train data.source=builtin:digits student.width=1200 kd.weight=0   # a teacher / baseline

Tune trials call :func:`train_job` with :class:`JobOptions` (see docs/internals.md, "Training").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from still.config import flatten, to_dict
from still.errors import StillError, carried_still_error
from still.models import build_model, count_parameters
from still.tracking import check_reachable, open_run, tracking_uri
from student_train.config import TrainConfig
from student_train.data import Source, resolve_source
from student_train.export import latency_ms, log_mlflow_model, model_bytes, save_student, student_from_state
from student_train.feed import pool_rows
from student_train.hints import HintPair, keep_hinted_layers, plan_hints
from student_train.lm_loop import run_lm_loop, train_lm_per_worker
from student_train.loop import (
    STATE_FILE,
    LocalSession,
    LoopSpec,
    local_device,
    run_loop,
    train_loop_per_worker,
)
from student_train.rundir import claim_run_directory
from student_train.transfer import check_patterns, load_init_state

DEFAULT_EXPERIMENT = "still-train"
MEMORY_INGEST_LIMIT = 1 << 30  # bytes per worker below which `ingest: auto` reads its share into memory
_NAME_EXCLUDES = ("train.resume", "train.output_dir", "train.name", "tracking.", "ray.", "register.",
                  "scaling.", "train.max_failures", "train.ingest", "train.verify_store", "train.shuffle_buffer",
                  "train.val_rows")


@dataclasses.dataclass(frozen=True)
class SharedData:
    """A source resolved once and its split arrays put in Ray's object store once, for many jobs.

    A sweep builds one (``tuning.driver``); every in-process trial reads the arrays
    zero-copy from the object store instead of opening and loading the store again.

    Attributes:
        source: The resolved :class:`~student_train.data.Source`.
        arrays: ``ray.put`` of ``load_split_arrays(source)``; None: the store is too
            large for memory and each trial streams it.
    """

    source: Source
    arrays: Any = None


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """How a job runs and what it keeps, beyond its config (``still train`` takes the defaults).

    Attributes:
        parent_run_id: Makes the MLflow run a child (Tune sweeps).
        report_to_tune: Report every epoch's metrics to Ray Tune (``ray.tune.report``
            in process; ``TuneReportCallback`` with a TorchTrainer), so schedulers such
            as ASHA can stop the trial.
        in_process: Train in this process without a TorchTrainer (one worker, same
            loop); None: when ``scaling.num_workers`` is 0.
        quiet: No per-epoch lines.
        load_teacher: False: never load the store's teacher (for its size and latency
            figures); sweeps pass False, so no trial ever touches the teacher.
        log_model: False: skip the MLflow model (``mlflow.pytorch.log_model`` infers pip
            requirements, ~10 s); sweep trials keep only the still checkpoint.
        shared: Data resolved once for many jobs (:class:`SharedData`), or None.
    """

    parent_run_id: str = ""
    report_to_tune: bool = False
    in_process: bool | None = None
    quiet: bool = False
    load_teacher: bool = True
    log_model: bool = True
    shared: SharedData | None = None


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked job: its config and everything derived from it before training starts."""

    cfg: TrainConfig
    run_name: str
    options: JobOptions
    source: Source
    model_args: dict[str, Any]
    init_state: dict[str, torch.Tensor] | None
    init_report: dict[str, Any] | None
    hints: tuple[HintPair, ...]
    frozen: dict[str, int]
    teacher_payload: Any
    output_dir: Path
    in_process: bool
    ingest: str

    @property
    def checkpoint_root(self) -> Path:
        """Where Ray Train (or the in-process loop) keeps this run's checkpoints."""
        return self.output_dir / "ray"


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """``still train``: one job, one MLflow run; returns the summary (the CLI prints it and
    :func:`format_table`)."""
    return train_job(cfg, run_name=cfg.train.name or default_run_name(cfg))


def default_run_name(cfg: TrainConfig) -> str:
    """A deterministic run name: the student, the loss knobs, and a hash of the config.

    Same config → same name (so ``train.resume=true`` finds the run); scaling,
    tracking and output settings do not enter it.
    """
    flat = {k: v for k, v in flatten(cfg).items() if not k.startswith(_NAME_EXCLUDES)}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:8]
    s, kd = cfg.student, cfg.kd
    kind = "kd" if cfg.distills and kd.weight > 0 else "ce"
    width = f"{s.width:g}"
    return f"{s.family}-w{width}-d{s.depth}-{kind}-T{kd.temperature:g}-l{kd.weight:g}-s{cfg.train.seed}-{digest}"


def train_job(cfg: TrainConfig, *, run_name: str, options: JobOptions = JobOptions()) -> dict[str, Any]:
    """Trains one student end to end; what ``still train`` and Tune trials run.

    Args:
        cfg: The resolved config.
        run_name: Deterministic name: the MLflow run name, the Ray Train run name and
            the default output directory ``runs/<run_name>``.
        options: How to run it (:class:`JobOptions`).

    Returns:
        The summary: ``run_id``, ``checkpoint``, ``student_test_accuracy``,
        ``teacher_test_accuracy``, ``student_params``, ``teacher_params``, ``test_errors``,
        ``seconds``, ``val_accuracy``, ``history`` (per-epoch metrics) and more;
        ``tracking_lost`` says why MLflow stopped recording, when it did.

    Raises:
        StillError: Bad input, found before training starts; a store shard that cannot
            be read while training (named).
    """
    started = time.perf_counter()
    if cfg.language_model:
        from student_train.lm_driver import prepare_lm_job, run_lm_job

        job, run = prepare_lm_job(cfg, run_name, options), run_lm_job
    else:
        job, run = prepare_job(cfg, run_name, options), _run_job
    with claim_run_directory(job.output_dir, job.checkpoint_root / run_name, resume=cfg.train.resume, name=run_name):
        return run(job, started)


def _run_job(job: Job, started: float) -> dict[str, Any]:
    cfg, run_name, options = job.cfg, job.run_name, job.options
    with open_run(cfg, cfg.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=run_name,
                  parent_run_id=options.parent_run_id, tags=_tags(job.source, cfg)) as tracker:
        tracker.log_params(transfer_params(job))
        final, state = fit(job, tracker.address)
        student = student_from_state(state["net"], cfg.student.family, job.model_args)
        summary = summarise(job, student, final, list(state["history"]), export_student(job, student))
        tracker.log_metrics({k: summary[k] for k in _FINAL_METRICS if is_number(summary.get(k))},
                            step=int(final.get("epoch", cfg.train.epochs)))
        tracker.log_dict({k: v for k, v in summary.items() if k != "history"}, "summary.json")
        logged = {"model_uri": None, "registered_version": None}
        if options.log_model:
            logged = tracker.attempt("log_model", log_mlflow_model, tracker, student, job.source.input_shape,
                                     cfg.register.name, cfg.register.alias) or logged
        summary.update(run_id=tracker.run_id or None, model_uri=logged["model_uri"],
                       registered_version=logged["registered_version"], tracking_uri=tracker.tracking_uri or None,
                       tracking_lost=tracker.lost or None, ingest=_ingest_name(job))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (job.output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _ingest_name(job: Job) -> str:
    """How the job read its data: ``memory``, ``stream``, or ``shared`` (a sweep's arrays in the object store)."""
    shared = job.options.shared
    return "shared" if job.in_process and shared is not None and shared.arrays is not None else job.ingest


def prepare_job(cfg: TrainConfig, run_name: str, options: JobOptions) -> Job:
    """Checks everything that can be checked before a run opens, and derives the job from the config.

    Raises:
        StillError: Unreachable tracking, a bad store or dataset, classes the student
            does not match, hints the student or store cannot pair (``student_train.hints``),
            an init of another family or shape, a freeze or lr-group pattern that matches nothing,
            a batch larger than the training split, a GPU this process cannot see.
    """
    in_process = cfg.scaling.in_process if options.in_process is None else options.in_process
    if cfg.tracking.enabled:
        check_reachable(tracking_uri(cfg.tracking))
    if options.shared is not None and not cfg.train.verify_store:
        source = options.shared.source
    else:
        source = resolve_source(cfg.store.uri, cfg.data, verify=cfg.train.verify_store)
    check_temperature_on_grid(cfg.kd.temperature, cfg.kd.weight, source)
    check_divergence(cfg.kd.divergence, cfg.kd.weight, source)
    _warn_far_from_sample_temperature(cfg, source)
    check_augment(cfg, source)
    if cfg.student.num_classes and cfg.student.num_classes != source.num_classes:
        raise StillError(f"student.num_classes={cfg.student.num_classes} but the "
                         f"{'store' if source.has_teacher else 'data'} {source.name!r} has {source.num_classes} classes")
    model_args = student_model_args(cfg, source)
    student = build_model(cfg.student.family, **dict(model_args))  # a family that cannot take these arguments fails
    hints = plan_hints(cfg.kd.hints, cfg.kd.hint_weight, student, source.input_shape, source.features, source.name)
    source = keep_hinted_layers(source, cfg.kd.hints if hints else ())  # before sizing: unread layers cost nothing
    frozen = check_patterns(student, cfg.train.freeze, cfg.train.lr_groups)
    workers = 1 if in_process else cfg.scaling.max_workers
    shared_arrays = in_process and options.shared is not None and options.shared.arrays is not None
    ingest = "memory" if shared_arrays else choose_ingest(cfg, source, workers)
    if ingest == "stream":
        _check_batch_fits(cfg, source, workers)
    if in_process and cfg.scaling.gpus and not torch.cuda.is_available():
        raise StillError("scaling.use_gpu: training in process (scaling.num_workers=0), and this process sees no "
                         "CUDA device")
    init_state, init_report = None, None
    if cfg.student.init:
        init_state, init_report = load_init_state(cfg.student.init, cfg.student.family, model_args,
                                                  source.class_names, cfg.student.init_head,
                                                  tracking_uri(cfg.tracking))
        if init_report["reinitialized"] and not options.quiet:
            print(f"still train: student.init: head re-initialised ({init_report['reason']}); "
                  f"{len(init_report['loaded'])} tensors loaded", file=sys.stderr, flush=True)
    teacher_payload = _online_teacher(cfg, source) if cfg.kd.online_teacher else None
    output_dir = Path(cfg.train.output_dir or Path("runs") / run_name).resolve()
    return Job(cfg, run_name, options, source, model_args, init_state, init_report, hints, frozen, teacher_payload,
               output_dir, in_process, ingest)


def transfer_params(job: Job) -> dict[str, Any]:
    """What the run's MLflow params record of transfer learning and hints, beyond the config."""
    params: dict[str, Any] = {"frozen_params": len(job.frozen), "frozen_values": sum(job.frozen.values())}
    report = job.init_report
    if report:
        params.update({"init.source": report["source"], "init.family": report["family"],
                       "init.loaded_tensors": len(report["loaded"]),
                       "init.reinitialized": ",".join(report["reinitialized"]) or "none",
                       "init.reason": report["reason"] or "none"})
    for pair in job.hints:
        params["hint." + pair.metric[len("train_hint_"):]] = f"{pair.student_shape} -> {pair.teacher_shape}"
    return params


def check_augment(cfg: TrainConfig, source: Source) -> None:
    """Checks ``train.augment`` against the inputs, and against a multi-view store's own views.

    Raises:
        StillError: The augmentation does not fit the input shape, or differs from the
            one a multi-view store's views were made with (the student's inputs would
            then not be the ones its targets were computed on).
    """
    if source.views > 1:
        wanted = cfg.train.augment
        if wanted.enabled and wanted != source.augment:
            raise StillError(
                f"train.augment={wanted.to_dict()} differs from the augmentation the views of store "
                f"{source.name!r} were made with, store.augment={source.augment.to_dict()}: its teacher targets "
                "are of those views. Leave train.augment unset (the store's views are replayed exactly), or write "
                "a store with the augmentation you want"
            )
        return
    cfg.train.augment.check(source.input_shape, "train.augment")


def _check_batch_fits(cfg: TrainConfig, source: Source, workers: int) -> None:
    """Refuses to stream batches larger than a worker's share of the training rows.

    Every epoch would be one partial batch, shuffled within itself only: no training
    a user means. (In memory such a batch is a full-batch step, which is a choice.)
    """
    if not source.split_rows:
        return
    rows = source.split_rows["train"] + (source.split_rows["val"] if cfg.train.include_val else 0)
    if cfg.train.batch_size > rows // max(1, workers):
        share = f", {rows // workers} per worker of {workers}" if workers > 1 else ""
        raise StillError(f"train.batch_size={cfg.train.batch_size} is larger than the training split of "
                         f"{source.name!r} ({rows} rows{share}) that train.ingest=stream would stream: every epoch "
                         "would be one partial batch; lower train.batch_size, or use train.ingest=memory")


def export_student(job: Job, student: torch.nn.Module) -> dict[str, str]:
    """Saves the student (still checkpoint + TorchScript) under the job's output directory."""
    source = job.source
    meta = {"input_scale": source.normalisation.scale, "class_names": list(source.class_names),
            "task": source.task, "run_name": job.run_name, "config": to_dict(job.cfg),
            "teacher_fingerprints": [m["teacher"]["fingerprint"] for m in source.manifests]}
    return save_student(student, job.cfg.student.family, job.model_args, meta, job.output_dir)


_FINAL_METRICS = ("student_test_accuracy", "teacher_test_accuracy", "test_errors", "test_nll", "student_params",
                  "teacher_params", "compression_ratio", "student_latency_ms", "teacher_latency_ms",
                  "test_f1_micro", "test_f1_macro", "test_mean_ap")


def is_number(value: Any) -> bool:
    """True for a finite int or float (not a bool): what MLflow metrics take."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def student_model_args(cfg: TrainConfig, source: Source) -> dict[str, Any]:
    """The student's constructor arguments: ``cfg.student`` fitted to the data's shape and classes.

    Raises:
        StillError: A key that the chosen family does not take.
    """
    s = cfg.student
    args: dict[str, Any] = {"input_shape": list(source.input_shape), "num_classes": source.num_classes,
                            "width": s.width, "depth": s.depth, "dropout": s.dropout}
    if s.family == "mlp":
        args["input_dropout"] = s.input_dropout
    elif s.input_dropout:
        raise StillError(f"student.input_dropout applies to the mlp family only, not {s.family!r}")
    return args


def _online_teacher(cfg: TrainConfig, source: Source) -> Any:
    from teacher_infer.teachers import load_teacher

    teacher = load_teacher(cfg.kd.online_teacher)
    with torch.no_grad():
        out = teacher.model(torch.zeros(1, *source.input_shape))
    if out.shape[-1] != source.num_classes:
        raise StillError(f"kd.online_teacher {cfg.kd.online_teacher!r} has {out.shape[-1]} outputs, "
                         f"the data has {source.num_classes} classes")
    return teacher.payload()


def check_temperature_on_grid(temperature: float, kd_weight: float, source: Source, key: str = "kd.temperature") -> None:
    """Refuses a distillation temperature below a top-k or sampled store's grid (extrapolated there).

    Raises:
        StillError: Naming ``key``, the store and its grid (``teacher_infer.targets.check_temperature``).
    """
    from teacher_infer.targets import check_temperature

    if kd_weight == 0:
        return
    for store, spec in zip(source.stores, source.teachers):
        if spec.mode != "dense":
            try:
                check_temperature(temperature, spec.temperatures, key)
            except StillError as exc:
                raise StillError(f"{exc} (store {store.uri!r})") from None


def check_divergence(divergence: str, kd_weight: float, source: Source, key: str = "kd.divergence") -> None:
    """Refuses ``reverse`` and ``jsd`` on a store that has no exact bins for them (student_train.losses).

    Raises:
        StillError: Naming ``key`` and the sampled or multi-label store.
    """
    if divergence == "forward" or kd_weight == 0:
        return
    if source.task == "multilabel":
        raise StillError(f"{key}={divergence}: multi-label stores take the forward (binary) KL only "
                         f"(store {source.name!r})")
    for store, spec in zip(source.stores, source.teachers):
        if spec.mode == "sampled":
            raise StillError(f"{key}={divergence} needs a top-k or dense store: the sampled store {store.uri!r} "
                             "estimates the forward KL's gradient only")


def _warn_far_from_sample_temperature(cfg: TrainConfig, source: Source) -> None:
    """Warns when a sampled store is used at a temperature far from the one it was drawn at.

    The target stays unbiased, but its variance grows with the gap: bench/tail.py measured
    a student at T = 4 from draws at T_s = 1 worse than one trained on labels alone.
    """
    if cfg.kd.weight == 0:
        return
    for spec in source.teachers:
        gap = max(cfg.kd.temperature / spec.sample_temperature, spec.sample_temperature / cfg.kd.temperature)
        if spec.mode == "sampled" and gap >= 2:
            print(f"still train: warning: kd.temperature={cfg.kd.temperature:g} is {gap:g}x away from the sampled "
                  f"store's sample_temperature={spec.sample_temperature:g}: its target is unbiased but noisy there "
                  "(bench/tail.py); write the store with store.sample_temperature near the training temperature",
                  file=sys.stderr, flush=True)


def _tags(source: Source, cfg: TrainConfig) -> dict[str, str]:
    tags = {"still.verb": "train", "still.source": source.name, "still.mode": "kd" if cfg.distills else "supervised"}
    if source.manifests:
        tags["store.key"] = ",".join(m["key"] for m in source.manifests)
        tags["teacher.fingerprint"] = ",".join(m["teacher"]["fingerprint"] for m in source.manifests)
        tags["dataset.fingerprint"] = str(source.manifests[0].get("dataset", {}).get("fingerprint", ""))
    return tags


# --------------------------------------------------------------------------- fitting


def fit(job: Job, tracking: tuple[str, str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains the job's student; returns the last reported metrics and the final checkpoint state.

    Args:
        job: The checked job.
        tracking: The MLflow run's ``Tracker.address`` (rank 0 logs each epoch), or None.
    """
    spec = LoopSpec(cfg=job.cfg, source=job.source, model_args=job.model_args, init_state=job.init_state,
                    hints=job.hints, teacher=job.teacher_payload, quiet=job.options.quiet,
                    tracking=tracking if tracking else None)
    if job.in_process:
        return _fit_in_process(job, spec, run_lm_loop if job.cfg.language_model else run_loop)
    return _fit_ray(job, spec, train_lm_per_worker if job.cfg.language_model else train_loop_per_worker)


def choose_ingest(cfg: TrainConfig, source: Source, workers: int) -> str:
    """``train.ingest``, with ``auto`` resolved: memory while a worker's share stays under ``MEMORY_INGEST_LIMIT``."""
    if cfg.train.ingest != "auto":
        return cfg.train.ingest
    return "memory" if source.num_rows / max(1, workers) * source.row_bytes() < MEMORY_INGEST_LIMIT else "stream"


def _fit_in_process(job: Job, spec: LoopSpec, loop: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = job.cfg
    if cfg.scaling.cpus_per_worker:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    shared = job.options.shared
    spec.ingest = job.ingest
    spec.pool_rows = pool_rows(cfg.train.shuffle_buffer, spec.source, cfg.train.batch_size)
    arrays = None
    if spec.ingest == "memory" and shared is not None and shared.arrays is not None:
        import ray

        arrays = ray.get(shared.arrays)
    on_report = None
    if job.options.report_to_tune:
        import ray.tune

        on_report = ray.tune.report
    session = LocalSession(str(job.checkpoint_root / job.run_name), local_device(cfg.scaling.gpus > 0),
                           on_report=on_report, arrays=arrays)
    final = loop(spec, session)
    state = session.restore()
    if state is None:
        raise StillError("training produced no checkpoint")
    return final, state


def _fit_ray(job: Job, spec: LoopSpec, worker_loop: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    import ray.train
    from ray.train.torch import TorchTrainer

    from still.ray_setup import connected_to_embedded_cluster, init_ray, train_logging_config
    from student_train.capacity import check_workers_fit, worker_demand

    cfg = job.cfg
    # The Train controller registers reported checkpoints when it polls the workers: poll often, so a
    # worker lost right after a report restarts from that report's checkpoint, not the one before.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    init_ray(cfg.ray)
    workers = cfg.scaling.max_workers
    spec.ingest = job.ingest
    cpus = cfg.scaling.cpus_per_worker or _auto_cpus(workers)
    demand = worker_demand(cpus, cfg.scaling.gpus, cfg.scaling.resources_per_worker)
    check_workers_fit(demand, cfg.scaling.placement_strategy, cfg.scaling.num_workers[0],
                      embedded=connected_to_embedded_cluster())
    spec.threads = max(1, int(cpus))
    spec.pool_rows = pool_rows(cfg.train.shuffle_buffer, spec.source, max(1, cfg.train.batch_size // workers))
    callbacks = []
    if job.options.report_to_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.ray_num_workers, use_gpu=cfg.scaling.gpus > 0,
            resources_per_worker={k: v for k, v in demand.items()},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=job.run_name, storage_path=str(job.checkpoint_root),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            logging_config=train_logging_config(cfg.ray.verbose),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise StillError(f"training failed after {cfg.train.max_failures} restart(s): {_failure_reason(exc)}") from None
    if result.checkpoint is None:
        raise StillError("training produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    final = dict(result.metrics or {})
    if "test_accuracy" not in final and state["history"]:
        final = dict(state["history"][-1])
    return final, state


def _failure_reason(exc: BaseException) -> str:
    """The line that says why a Train run failed: a still error raised in a worker, else the first line."""
    carried = carried_still_error(exc)
    if carried is not None:
        return str(carried)
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _auto_cpus(workers: int) -> float:
    """1 CPU per worker when the cluster has them, else an equal fraction, so the job never
    waits for CPUs (RAY-NOTES.md). Workers read their data themselves: no CPU is kept aside."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    if total >= workers:
        return 1.0
    return max(0.1, math.floor((max(total, 0.5) / workers) * 10) / 10)


# --------------------------------------------------------------------------- summary


def summarise(job: Job, student: torch.nn.Module, final: Mapping[str, Any], history: list[dict[str, Any]],
              paths: Mapping[str, str]) -> dict[str, Any]:
    """The job's summary: student against teacher (accuracy, size, latency), test metrics, where things are."""
    cfg, source, run_name, output_dir = job.cfg, job.source, job.run_name, job.output_dir
    teacher_payload, load_teacher = job.teacher_payload, job.options.load_teacher
    teacher_acc, teacher_params, teacher_bytes, teacher_latency = None, None, None, None
    teacher_model = None
    if source.manifests:
        m = source.manifests[0]
        info = m.get("teacher", {})
        if len(source.manifests) == 1:
            per_split = m.get("teacher_metrics", {}).get("per_split", {})
            teacher_acc = per_split.get("test", {}).get("accuracy")
            teacher_params = info.get("params")
            teacher_bytes = info.get("bytes")
        if load_teacher and len(source.manifests) == 1:
            teacher_model = _load_teacher_if_present(info.get("uri"))
    elif teacher_payload is not None:
        teacher_model = teacher_payload.load()
    if teacher_acc is None:
        teacher_acc = final.get("teacher_test_accuracy_computed")
    if teacher_model is not None:
        if teacher_params is None and isinstance(teacher_model, torch.nn.Module):
            teacher_params = count_parameters(teacher_model)
            teacher_bytes = model_bytes(teacher_model)
        try:
            teacher_latency = latency_ms(teacher_model, source.input_shape, cfg.train.batch_size)
        except Exception:  # an exotic teacher form that cannot run on random input
            teacher_latency = None
    student_params = count_parameters(student)
    student_bytes = model_bytes(student)
    last = history[-1] if history else {}
    return {
        "run_id": None,
        "checkpoint": paths["checkpoint"],
        "student_test_accuracy": final.get("test_accuracy"),
        "teacher_test_accuracy": teacher_acc,
        "student_params": student_params,
        "teacher_params": teacher_params,
        "student_bytes": student_bytes,
        "teacher_bytes": teacher_bytes,
        "compression_ratio": (teacher_params / student_params) if teacher_params else None,
        "student_latency_ms": latency_ms(student, source.input_shape, cfg.train.batch_size),
        "teacher_latency_ms": teacher_latency,
        "latency_batch_size": cfg.train.batch_size,
        "test_errors": final.get("test_errors"),
        "test_count": final.get("test_count"),
        "test_nll": final.get("test_nll"),
        "test_agreement": final.get("test_agreement"),
        **({f"test_{name}": final.get(f"test_{name}") for name in ("f1_micro", "f1_macro", "mean_ap")}
           if source.task == "multilabel" else {}),
        "val_accuracy": last.get("val_accuracy"),
        "val_nll": last.get("val_nll"),
        "agreement": last.get("agreement"),
        "epochs": last.get("epoch"),
        "resumed_from": final.get("resumed_from", 0),
        "torchscript": paths["torchscript"],
        "output_dir": str(output_dir),
        "run_name": run_name,
        "store_key": ",".join(m["key"] for m in source.manifests) or None,
        "history": history,
        "init": job.init_report,
    }


def _load_teacher_if_present(uri: str | None) -> Any:
    """The teacher model, only when its file is known and exists here (after training)."""
    if not uri:
        return None
    from still.storage import resolve

    try:
        if "://" in uri and not uri.startswith("file://"):
            return None
        if not resolve(uri).exists():
            return None
        from teacher_infer.teachers import load_teacher

        return load_teacher(uri).model
    except Exception:  # a teacher that no longer loads only costs its latency figure
        return None


def format_table(summary: Mapping[str, Any]) -> str:
    """The student-vs-teacher table printed at the end of ``still train``."""

    def f(value: Any, spec: str = "") -> str:
        if value is None:
            return "n/a"
        return format(value, spec) if spec else str(value)

    rows = [
        ("test accuracy", f(summary["student_test_accuracy"], ".4f"), f(summary["teacher_test_accuracy"], ".4f")),
        ("parameters", f(summary["student_params"], ","), f(summary["teacher_params"], ",")),
        ("bytes", f(summary["student_bytes"], ","), f(summary["teacher_bytes"], ",")),
        (f"latency ms/batch of {summary['latency_batch_size']}", f(summary["student_latency_ms"], ".3f"),
         f(summary["teacher_latency_ms"], ".3f")),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'student':>14}  {'teacher':>14}"]
    lines += [f"{name:<{width}}  {s:>14}  {t:>14}" for name, s, t in rows]
    ratio = summary.get("compression_ratio")
    lines.append(f"compression ratio (teacher/student params): {f(ratio, '.2f')}; "
                 f"test errors {summary.get('test_errors')}/{summary.get('test_count')}")
    return "\n".join(lines)
