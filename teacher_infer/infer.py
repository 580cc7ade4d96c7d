"""``still infer``: run a teacher once over a dataset and write a soft-label store.

    still infer data.source=builtin:digits teacher.uri=teacher.pt store.mode=topk store.k=5
    still infer --config infer.yaml --address ray://head:10001 --json
    python -c "from teacher_infer.infer import run_infer; ..."   # what tests call

Reads top to bottom: resolve the data → resolve the ``auto`` settings and check the
storage settings against the data (:mod:`teacher_infer.key`) → fingerprint the teacher
→ cache key → return the existing store if complete (no Ray, no forward pass) → load
the teacher and probe a few rows on the driver (output size, feature layer, precision):
every bad input fails by here, before Ray starts → the deterministic shard plan and what
a killed run left (:mod:`teacher_infer.plan`) → run the missing shards on Ray
(:mod:`teacher_infer.pipeline`: the fused or the streaming plan; each shard read,
inferred, compressed and written by
:mod:`teacher_infer.shards`) → manifest, last and atomically
(:mod:`teacher_infer.finalize`) → MLflow run.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from still.config import to_dict
from still.errors import StillError
from still.storage import Location, resolve
from teacher_infer import plan as shard_plan
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.finalize import finalize
from teacher_infer.key import Settings, cache_key, resolve_settings, storage_fields, storage_spec
from teacher_infer.pipeline import check_capacity, cluster_cpus, measure_rows_per_shard, run_shards
from teacher_infer.shards import ViewSettings, WriteSettings, read_shard
from teacher_infer.soft_labels import SoftLabelSpec

DEFAULT_EXPERIMENT = "still-infer"


# --------------------------------------------------------------------------- the entry point


def run_infer(config: InferConfig) -> dict[str, Any]:
    """Runs ``still infer`` and returns its summary.

    Returns:
        ``store`` (URI), ``key``, ``rows``, ``cache_hit``, ``bytes_per_row``,
        ``teacher_accuracy``, ``fidelity``, plus ``rows_per_s``, ``seconds``,
        ``shards_written``, ``run_id``.

    Raises:
        StillError: Bad data, teacher, or storage settings; checked before writing.
    """
    started = time.perf_counter()
    from still.datasets import resolve_dataset

    if not config.teacher.uri:
        raise StillError("teacher.uri is required (a still checkpoint, TorchScript or .pt2 file, or an MLflow model URI)")
    from teacher_infer.lm_infer import is_lm_teacher, run_lm_infer

    if is_lm_teacher(config.teacher.uri):
        return run_lm_infer(config)
    spec = resolve_dataset(config.data)
    itemsize = shard_plan.input_itemsize(spec)
    settings = resolve_settings(config, spec, itemsize)
    soft_labels = storage_spec(config, spec)
    from teacher_infer.teachers import teacher_fingerprint

    fingerprint = teacher_fingerprint(config.teacher.uri)
    key, key_doc = cache_key(config, spec, fingerprint, soft_labels, settings)
    store_dir = resolve(config.store.root).join(key)
    if store_dir.join(st.MANIFEST_NAME).exists():
        return _cache_hit(config, store_dir, key, started)

    from teacher_infer.teachers import load_teacher

    teacher = load_teacher(config.teacher.uri)
    input_dtype, feature_shapes = _probe(config, spec, teacher, soft_labels, settings)
    check_capacity(config.infer, config.ray)
    plan = shard_plan.load_or_make_plan(spec, store_dir, key, config.infer.shard_rows, itemsize,
                                        lambda: cluster_cpus(config.ray))
    done = shard_plan.complete_shards(store_dir, plan, views=config.store.views)
    todo = [s for s in plan["shards"] if s["index"] not in done]
    print(f"still infer: store {store_dir.uri}: {len(plan['shards'])} shards of <= {plan['shard_rows']} rows, "
          f"{len(done)} already complete, {len(todo)} to write ({settings.plan} plan, {settings.precision}, "
          f"{'self-contained' if settings.include_inputs else 'labels-only'}"
          f"{f', {config.store.views} views per sample' if config.store.views > 1 else ''})",
          file=sys.stderr, flush=True)

    from still.tracking import open_run

    with open_run(config, config.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=f"infer-{key}",
                  tags={"cache_hit": "false", "store_key": key, "teacher_fingerprint": fingerprint}) as tracker:
        tracker.set_tags({"store_uri": store_dir.uri, "plan": settings.plan, "precision": settings.precision,
                          "include_inputs": str(settings.include_inputs).lower()})
        infer_start = time.perf_counter()
        written = _run(config, spec, soft_labels, settings, teacher, store_dir, key, todo, plan) if todo else {}
        infer_seconds = time.perf_counter() - infer_start
        manifest = finalize(config=config, spec=spec, teacher=teacher, store_dir=store_dir, key=key,
                            key_doc=key_doc, storage={**storage_fields(config, soft_labels, settings),
                                                      "feature_shapes": feature_shapes},
                            settings=settings, plan=plan, done=done, written=written, input_dtype=input_dtype,
                            infer_seconds=infer_seconds)
        rows_written = sum(r["rows"] for r in written.values())
        metrics = manifest["teacher_metrics"]
        summary = {
            "store": store_dir.uri,
            "key": key,
            "rows": manifest["rows"],
            "cache_hit": False,
            "bytes_per_row": manifest["bytes_per_row"],
            "teacher_accuracy": metrics["accuracy"],
            "fidelity": manifest["fidelity"],
            "shards_written": len(written),
            "shards_resumed": len(done),
            "seconds": round(time.perf_counter() - started, 3),
            "rows_per_s": round(rows_written / infer_seconds, 1) if infer_seconds > 0 and rows_written else None,
            "run_id": tracker.run_id,
        }
        flat_metrics = {f"teacher_{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        for split, values in metrics["per_split"].items():
            flat_metrics.update({f"teacher_{k}_{split}": v for k, v in values.items() if v is not None})
        tracker.log_metrics({**flat_metrics, **fidelity_metrics(manifest["fidelity"]),
                             "rows": manifest["rows"], "bytes_per_row": manifest["bytes_per_row"],
                             "rows_per_s": summary["rows_per_s"] or 0.0, "infer_seconds": infer_seconds,
                             "shards_written": len(written), "shards_resumed": len(done)})
        tracker.log_dict(manifest, "store_manifest.json")
        tracker.log_dict(to_dict(config), "config.json")
    return summary


def _cache_hit(config: InferConfig, store_dir: Location, key: str, started: float) -> dict[str, Any]:
    store = st.open_store(store_dir.uri)
    from still.tracking import open_run

    summary = {
        "store": store.uri,
        "key": key,
        "rows": store.num_rows,
        "cache_hit": True,
        "bytes_per_row": store.manifest["bytes_per_row"],
        "teacher_accuracy": store.manifest["teacher_metrics"]["accuracy"],
        "fidelity": store.fidelity,
        "shards_written": 0,
        "shards_resumed": 0,
    }
    with open_run(config, config.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=f"infer-{key}",
                  tags={"cache_hit": "true", "store_key": key, "store_uri": store.uri,
                        "teacher_fingerprint": store.teacher_fingerprint}) as tracker:
        tracker.log_metrics({"rows": store.num_rows, "bytes_per_row": summary["bytes_per_row"],
                             **({"teacher_accuracy": summary["teacher_accuracy"]}
                                if summary["teacher_accuracy"] is not None else {})})
        summary["run_id"] = tracker.run_id
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def fidelity_metrics(fidelity: dict[str, dict[str, float]]) -> dict[str, float]:
    """The fidelity as flat MLflow metrics: ``fidelity_kl_mean_T4`` and so on."""
    return {f"fidelity_{name}_T{temperature}": value for temperature, values in fidelity.items()
            for name, value in values.items() if value is not None and math.isfinite(value)}


# --------------------------------------------------------------------------- probing and running


def _probe(config: InferConfig, spec: Any, teacher: Any, soft_labels: SoftLabelSpec,
           settings: Settings) -> tuple[str, dict[str, list[int]]]:
    """Runs the teacher on a few rows on the driver: output size, feature layers, precision.

    The precision is probed here only when the run is on CPUs (a driver without a GPU
    cannot try a GPU's kernels); on GPUs the first shard's forward pass checks it.

    Returns:
        The raw input value type, and the shape of one row of each feature layer
        (both recorded in the manifest).

    Raises:
        StillError: The teacher fails on the inputs, outputs another class count, or
            lacks a ``teacher.feature_layers`` layer (the message lists its layers).
    """
    from still.datasets import Normalisation
    from teacher_infer.predictor import TeacherPredictor

    first = {"index": 0, "rows": 8, "pieces": [[0, 0, min(8, shard_plan.file_rows(spec, files=1)[0])]]}
    raw = read_shard(first, spec, 0).inputs
    on_cpu = config.infer.num_gpus == 0
    precision = settings.precision if on_cpu else "fp32"
    predictor = TeacherPredictor(teacher, Normalisation.of(spec), feature_layers=config.teacher.feature_layers,
                                 precision=precision)
    try:
        logits, features = predictor.forward(raw)
    except StillError:
        raise
    except Exception as exc:  # shape and dtype errors surface as RuntimeError from torch
        at = f" at infer.precision={precision}" if precision != "fp32" else ""
        hint = "; infer.precision=fp32 runs it without autocast" if precision != "fp32" else ""
        raise StillError(
            f"teacher {config.teacher.uri!r} fails on inputs of shape {tuple(spec.input_shape)} from "
            f"{spec.name!r}{at}: {_torch_error(exc)}{hint}"
        ) from None
    finally:
        predictor.close()
    if logits.shape[1] != soft_labels.num_classes:
        what = (f"multi-label rows {soft_labels.num_classes} labels wide" if soft_labels.task == "multilabel"
                else f"{soft_labels.num_classes} classes")
        raise StillError(
            f"teacher {config.teacher.uri!r} outputs {logits.shape[1]} classes but dataset {spec.name!r} has {what}"
        )
    return str(raw.dtype), {name: list(value.shape[1:]) for name, value in features.items()}


def _torch_error(exc: Exception) -> str:
    """The line of a torch error that says what went wrong (TorchScript puts it last)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0])[:200]


def _run(config: InferConfig, spec: Any, soft_labels: SoftLabelSpec, settings: Settings, teacher: Any,
         store_dir: Location, key: str, todo: list[dict[str, Any]], plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    store_dir.fs.makedirs(store_dir.path, exist_ok=True)
    write = WriteSettings(soft_labels=soft_labels, store_uri=store_dir.uri, include_inputs=settings.include_inputs,
                          write=not store_dir.uri.startswith("memory://"), seed=int(key, 16),
                          feature_dtype=soft_labels.dtype)
    predictor_kwargs = {"feature_layers": config.teacher.feature_layers, "precision": settings.precision,
                        "batch_size": config.infer.batch_size, "torch_threads": config.infer.torch_threads,
                        "augment": config.store.augment}
    views = config.store.views
    measure = measure_rows_per_shard(config.infer.fidelity_rows, max(s["rows"] for s in todo), spec.num_rows)
    return run_shards(todo, spec=spec, payload=teacher.payload(), run=config.infer, plan=settings.plan,
                      predictor_kwargs=predictor_kwargs, settings=write, measure_rows=measure,
                      ray_config=config.ray,
                      views=ViewSettings(views, config.store.augment, seed=int(key, 16)) if views > 1 else None)
