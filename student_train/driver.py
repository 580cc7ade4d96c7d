"""``still train``: distil a student from a soft-label store (or train one supervised).

Reads top to bottom: validate everything that can be checked (store, classes,
family, init, tracking) → open the MLflow run → train (Ray Train V2 ``TorchTrainer``
on N workers, or in this process) → export the student → log and summarise.

    still train store.uri=stores/<key> student.family=mlp student.width=800 \\
        kd.temperature=20 kd.weight=0.9 train.epochs=8 scaling.num_workers=2 --json
    still train data.source=builtin:digits student.width=1200 kd.weight=0   # a teacher / baseline

Tune trials call :func:`train_job` (see docs/internals.md, "Training").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from still.config import flatten, to_dict
from still.errors import StillError
from still.models import build_model, count_parameters
from still.tracking import check_reachable, open_run, tracking_uri
from student_train.config import TrainConfig
from student_train.data import Source, load_split_arrays, ray_datasets, resolve_source
from student_train.export import (latency_ms, load_init_state, log_mlflow_model, model_bytes, save_student,
                                  student_from_state)
from student_train.loop import STATE_FILE, LocalSession, LoopSpec, run_loop, train_loop_per_worker

DEFAULT_EXPERIMENT = "still-train"
MEMORY_INGEST_LIMIT = 1 << 30  # bytes per worker below which `ingest: auto` reads shards into memory
_NAME_EXCLUDES = ("train.resume", "train.output_dir", "train.name", "tracking.", "ray.", "register.",
                  "scaling.", "train.max_failures", "train.ingest")


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """``still train``: one job, one MLflow run; returns the summary (CLI prints it)."""
    result = train_job(cfg, run_name=cfg.train.name or default_run_name(cfg))
    print(format_table(result), flush=True)
    return result


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


def train_job(
    cfg: TrainConfig,
    *,
    run_name: str,
    parent_run_id: str = "",
    tune_report: bool = False,
    on_report: Callable[[dict[str, Any]], None] | None = None,
    in_process: bool | None = None,
    quiet: bool = False,
    load_teacher: bool = True,
    log_model: bool = True,
) -> dict[str, Any]:
    """Trains one student end to end; what ``still train`` and Tune trials run.

    Args:
        cfg: The resolved config.
        run_name: Deterministic name: the MLflow run name, the Ray Train run name and
            the default output directory ``runs/<run_name>``.
        parent_run_id: Makes the MLflow run a child (Tune sweeps).
        tune_report: Report every epoch's metrics to Ray Tune (``ray.tune.report``
            in process; ``TuneReportCallback`` with a TorchTrainer), so schedulers
            such as ASHA can stop the trial.
        on_report: Called with every epoch's metrics (in-process path only).
        in_process: Train in this process without a TorchTrainer (one worker, same
            loop); None: when ``scaling.num_workers`` is 0.
        quiet: No per-epoch lines.
        load_teacher: False: never load the store's teacher (for its size and latency
            figures); sweeps pass False, so no trial ever touches the teacher.
        log_model: False: skip the MLflow model (``mlflow.pytorch.log_model`` infers pip
            requirements, ~10 s); sweep trials keep only the still checkpoint.

    Returns:
        The summary: ``run_id``, ``checkpoint``, ``student_test_accuracy``,
        ``teacher_test_accuracy``, ``student_params``, ``teacher_params``, ``test_errors``,
        ``seconds``, ``val_accuracy``, ``history`` (per-epoch metrics) and more.

    Raises:
        StillError: Bad input, found before training starts.
    """
    started = time.perf_counter()
    in_process = cfg.scaling.in_process if in_process is None else in_process
    # 1. Validate everything that can be checked up front.
    if cfg.tracking.enabled:
        check_reachable(tracking_uri(cfg.tracking))
    source = resolve_source(cfg.store.uri, cfg.data)
    if cfg.kd.hint_weight > 0 and not source.feature_dim:
        raise StillError("kd.hint_weight > 0 needs a store with a features column "
                         "(write one with still infer teacher.feature_layer=<layer>)")
    _warn_far_from_sample_temperature(cfg, source)
    if cfg.student.num_classes and cfg.student.num_classes != source.num_classes:
        raise StillError(f"student.num_classes={cfg.student.num_classes} but the "
                         f"{'store' if source.has_teacher else 'data'} {source.name!r} has {source.num_classes} classes")
    model_args = student_model_args(cfg, source)
    probe = build_model(cfg.student.family, **dict(model_args))
    init_state, init_report = None, None
    if cfg.student.init:
        init_state, init_report = load_init_state(cfg.student.init, cfg.student.family, model_args,
                                                  tracking_uri(cfg.tracking))
    teacher_payload = None
    if cfg.kd.online_teacher:
        teacher_payload = _online_teacher(cfg, source)
    output_dir = Path(cfg.train.output_dir or Path("runs") / run_name).resolve()
    storage_path = output_dir / "ray"
    if not cfg.train.resume and (storage_path / run_name).exists():
        shutil.rmtree(storage_path / run_name)  # a fresh run of the same name: drop the old run's checkpoints

    # 2. One MLflow run for the job.
    tags = _tags(source, cfg)
    with open_run(cfg, cfg.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=run_name,
                  parent_run_id=parent_run_id, tags=tags) as tracker:
        # 3. Train.
        spec = LoopSpec(cfg=cfg, source=source, model_args=model_args, init_state=init_state,
                        teacher=teacher_payload, quiet=quiet, pid_dir=os.environ.get("STILL_TRAIN_PID_DIR", ""))
        if in_process:
            final, state = _fit_in_process(spec, storage_path / run_name, tune_report, on_report)
        else:
            final, state = _fit_ray(spec, run_name, storage_path, tune_report)
        history = list(state["history"])
        # 4. Export.
        student = student_from_state(state["net"], cfg.student.family, model_args)
        meta = {"input_scale": source.input_scale, "class_names": list(source.class_names),
                "task": source.task, "run_name": run_name, "config": to_dict(cfg),
                "teacher_fingerprints": [m["teacher"]["fingerprint"] for m in source.manifests]}
        paths = save_student(student, cfg.student.family, model_args, meta, output_dir)
        # 5. Log and summarise.
        for entry in history:
            tracker.log_metrics({k: v for k, v in entry.items() if _is_number(v) and not k.startswith("test_")},
                                step=int(entry["epoch"]))
        summary = _summary(cfg, source, student, final, history, paths, run_name, output_dir, teacher_payload,
                           load_teacher=load_teacher)
        summary["init"] = init_report
        tracker.log_metrics({k: summary[k] for k in _FINAL_METRICS if _is_number(summary.get(k))},
                            step=int(final.get("epoch", cfg.train.epochs)))
        tracker.log_dict({k: v for k, v in summary.items() if k != "history"}, "summary.json")
        logged = {"model_uri": None, "registered_version": None}
        if log_model:
            logged = log_mlflow_model(tracker, student, source.input_shape, cfg.register.name, cfg.register.alias)
        summary["run_id"] = tracker.run_id or None
        summary["model_uri"] = logged["model_uri"]
        summary["registered_version"] = logged["registered_version"]
        summary["tracking_uri"] = tracker.tracking_uri or None
    del probe
    summary["seconds"] = round(time.perf_counter() - started, 2)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


_FINAL_METRICS = ("student_test_accuracy", "teacher_test_accuracy", "test_errors", "test_nll", "student_params",
                  "teacher_params", "compression_ratio", "student_latency_ms", "teacher_latency_ms",
                  "test_f1_micro", "test_f1_macro", "test_mean_ap")


def _is_number(value: Any) -> bool:
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


def _fit_in_process(spec: LoopSpec, checkpoint_dir: Path, tune_report: bool,
                    on_report: Callable[[dict[str, Any]], None] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    callbacks = [c for c in (on_report,) if c is not None]
    if tune_report:
        import ray.tune

        callbacks.append(lambda metrics: ray.tune.report(metrics))
    if spec.cfg.scaling.cpus_per_worker:
        torch.set_num_threads(max(1, int(spec.cfg.scaling.cpus_per_worker)))
    arrays = load_split_arrays(spec.source, include_val=spec.cfg.train.include_val)
    session = LocalSession(arrays, str(checkpoint_dir),
                           on_report=(lambda m: [c(m) for c in callbacks]) if callbacks else None)
    final = run_loop(spec, session)
    state = session.restore()
    if state is None:
        raise StillError("training produced no checkpoint")
    return final, state


def _fit_ray(spec: LoopSpec, run_name: str, storage_path: Path, tune_report: bool
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from still.ray_setup import connected_to_embedded_cluster, init_ray
    from student_train.capacity import check_workers_fit, worker_demand

    cfg = spec.cfg
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    init_ray(cfg.ray)
    workers = cfg.scaling.max_workers
    rows_per_worker = spec.source.num_rows / workers
    ingest = cfg.train.ingest
    if ingest == "auto":
        ingest = "memory" if rows_per_worker * spec.source.row_bytes() < MEMORY_INGEST_LIMIT else "stream"
    cpus = cfg.scaling.cpus_per_worker or _auto_cpus(workers, streaming=ingest == "stream")
    check_workers_fit(worker_demand(cpus, cfg.scaling.use_gpu, cfg.scaling.resources_per_worker),
                      cfg.scaling.placement_strategy, cfg.scaling.num_workers[0], workers,
                      streaming=ingest == "stream", embedded=connected_to_embedded_cluster())
    spec.ingest = ingest
    spec.threads = max(1, int(cpus))
    datasets = ray_datasets(spec.source, materialize=ingest == "memory",
                            include_val=cfg.train.include_val)
    if ingest == "memory":
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    callbacks = []
    if tune_report:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.ray_num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cpus, **cfg.scaling.resources_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise StillError(f"training failed after {cfg.train.max_failures} restart(s): {str(exc).splitlines()[0]}") from exc
    if result.checkpoint is None:
        raise StillError("training produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)
    final = dict(result.metrics or {})
    if "test_accuracy" not in final and state["history"]:
        final = dict(state["history"][-1])
    return final, state


def _auto_cpus(workers: int, *, streaming: bool) -> float:
    """1 CPU per worker when the cluster has them (and one spare for Ray Data when
    streaming); else an equal fraction, so the job never waits for CPUs (RAY-NOTES.md)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    spare = 1.0 if streaming else 0.0
    if total - spare >= workers:
        return 1.0
    return max(0.1, math.floor((max(total - spare, 0.5) / workers) * 10) / 10)


# --------------------------------------------------------------------------- summary


def _summary(cfg: TrainConfig, source: Source, student: torch.nn.Module, final: Mapping[str, Any],
             history: list[dict[str, Any]], paths: Mapping[str, str], run_name: str, output_dir: Path,
             teacher_payload: Any, *, load_teacher: bool = True) -> dict[str, Any]:
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
