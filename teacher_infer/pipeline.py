"""The Ray part of ``still infer``: run the missing shards of a plan, on one of two plans.

**streaming** (GPU clusters; ``infer.plan=streaming``), three Ray Data stages that the
streaming executor runs concurrently, each shard one row flowing through them:

    from_items(shards) ─ map_batches(read_stage, num_cpus=1)            CPU tasks: read, decode
                       ─ map_batches(TeacherActor, num_gpus=…, batch_size=1,
                                     compute=ActorPoolStrategy(min_size, max_size))
                                                                         forward passes only
                       ─ map_batches(write_stage, num_cpus=1)           CPU tasks: compress, write

The actor gets uint8 (or whatever the source holds) rows, pins them, copies them to
the device and normalises there; reading and decoding the next shards and compressing
and writing the previous ones run meanwhile on CPUs. The pool starts at
``infer.min_actors`` and grows up to ``infer.max_actors`` (0: as many as the cluster
can place), so GPU nodes that join are used and idle ones can go.

**fused** (CPU clusters; ``infer.plan=fused``): one Ray task per shard runs the three
steps in one process with the model cached per worker process. Plain Ray tasks, spread
over the nodes as Ray Data spreads its tasks, not Ray Data itself: with one task per
shard and a few small records coming back there is nothing for its executor to
stream, and a cold ``still infer`` saved about 2.5 s on 2 CPUs without its driver-side
set-up, its two helper actors (each a worker process) and its import in every worker
(a 200k-row store in 21.4 s instead of 24.5, median of 3, 2026-12-05). Measured on 2 CPUs
(``bench/infer.py``, 2026-12-01: 1,000,000 rows × 784 uint8, MLP 784-1200-1200-10,
top-10 fp16, Ray warm): plain single-process loop 21,834 rows/s; fused 21,916 (1.00×);
streaming 15,709 (0.72×: the actor holds one of the two CPUs, so one read or write task
runs beside it, and every shard crosses the object store twice). On CPUs the fused
plan is the default.

Why not Ray Data's ``CheckpointConfig`` for resume
--------------------------------------------------
``DataContext.checkpoint_config = CheckpointConfig(id_column, path)`` (Ray 2.60) was
evaluated and not used:

- It applies only when the plan ends in a ``write_*`` and silently disables itself
  otherwise; both plans here end in our own atomic shard writes, which is what makes
  the shards deterministic (``part-NNNNN``, the same rows every run).
- On a rerun it inserts a per-row ``CheckpointFilter`` actor pool between read and map
  (1 GiB reservation, no fusion): it breaks the fused plan, and on 2-CPU machines actor
  pools beside read tasks are the pattern that hangs (RAY-NOTES.md).
- It filters rows, so a resumed run writes blocks of leftover rows under
  ``write_parquet``'s own names, and its data files are written in place: a half-written
  Parquet file is visible until the next run's cleanup.

Instead both plans run only the shards a killed run did not finish
(:mod:`teacher_infer.plan`): each shard file appears complete or not at all.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import sys
from typing import Any

import numpy as np

from still.datasets import Normalisation
from still.errors import StillError
from teacher_infer.shards import ShardRows, ViewSettings, WriteSettings, read_shard, write_shard

_PREDICTORS: dict[tuple, Any] = {}
_RECORD_OBJECTS = ("data", "stats", "name", "sha256")
FEATURE_PREFIX = "features:"  # the streaming plan's tensor column of each teacher layer


def cluster_cpus(ray_config: Any) -> int:
    """CPUs of the cluster the shards will run on, which sizes them (joins Ray if needed)."""
    if ray_config.num_cpus:
        return ray_config.num_cpus
    import ray

    from still.ray_setup import init_ray

    # Sized from the cluster, not this machine: a laptop submitting to 64 CPUs with
    # --address must plan for 64.
    init_ray(ray_config, dashboard=False)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def check_capacity(run: Any, ray_config: Any) -> None:
    """Joins the cluster and refuses resources no node of it has (Ray would wait forever).

    Checked against the nodes alive now: on an autoscaling cluster whose GPU nodes are
    all scaled down, start one first (or set ``infer.num_gpus`` once it is up).

    Args:
        run: The ``infer`` section.
        ray_config: The ``ray`` section.

    Raises:
        StillError: Naming ``infer.num_gpus`` or ``infer.num_cpus_per_task``.
    """
    import ray

    from still.ray_setup import init_ray

    init_ray(ray_config, dashboard=False)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    most_gpus = max((node["Resources"].get("GPU", 0.0) for node in nodes), default=0.0)
    most_cpus = max((node["Resources"].get("CPU", 0.0) for node in nodes), default=0.0)
    if run.num_gpus > 0 and most_gpus < run.num_gpus:
        raise StillError(
            f"infer.num_gpus={run.num_gpus:g}, but no node of the cluster has that many GPUs (the most on one of "
            f"its {len(nodes)} node(s): {most_gpus:g}); set infer.num_gpus=0 to run the teacher on CPUs, or add "
            "GPU nodes"
        )
    if run.num_cpus_per_task > most_cpus:
        raise StillError(f"infer.num_cpus_per_task={run.num_cpus_per_task:g}, but the largest node of the cluster "
                         f"has {most_cpus:g} CPUs")


def run_shards(todo: list[dict[str, Any]], *, spec: Any, payload: Any, run: Any, plan: str,
               predictor_kwargs: dict[str, Any], settings: WriteSettings, measure_rows: int,
               ray_config: Any, views: ViewSettings | None = None) -> dict[int, dict[str, Any]]:
    """Runs the shards ``todo`` on the chosen plan (Ray tasks or Ray Data); returns their records by index.

    Args:
        todo: Plan entries of the shards to write.
        spec: The ``DatasetSpec``.
        payload: The teacher's ``TeacherPayload`` (bytes; loaded once per worker or actor).
        run: The ``infer`` section (GPUs, actor counts, CPUs per task).
        plan: ``fused`` or ``streaming``.
        predictor_kwargs: ``TeacherPredictor`` settings (precision, batch size, feature layer…).
        settings: What the write step needs.
        measure_rows: Rows per shard whose fidelity is measured.
        ray_config: The ``ray`` section.
        views: The views of a multi-view store (None: one view).

    Raises:
        StillError: A task's StillError (an image that does not decode, a teacher
            failing at its precision). Resources are checked before, by :func:`check_capacity`.
    """
    import ray

    from still.ray_setup import init_ray

    init_ray(ray_config, dashboard=False)
    device = "cuda" if run.num_gpus > 0 else "cpu"
    common = {"payload": payload, "normalisation": Normalisation.of(spec),
              "predictor_kwargs": {**predictor_kwargs, "device": device}}
    if plan == "fused":
        task = ray.remote(num_cpus=run.num_cpus_per_task, num_gpus=run.num_gpus or None,
                          scheduling_strategy="SPREAD")(_fused_shard)
        kwargs = ray.put({**common, "spec": spec, "settings": settings, "measure_rows": measure_rows,
                          "views": views})
        return _gather([task.remote(shard, kwargs) for shard in todo], settings)
    return _collect(_streaming_plan(todo, common, spec=spec, run=run, device=device, settings=settings,
                                    measure_rows=measure_rows, views=views), settings)


def _streaming_plan(todo: list[dict[str, Any]], common: dict[str, Any], *, spec: Any, run: Any, device: str,
                    settings: WriteSettings, measure_rows: int, views: ViewSettings | None) -> Any:
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() or ctx.enable_progress_bars
    max_actors = run.max_actors or None
    if device == "cpu":
        free = max(1, int(ray.cluster_resources().get("CPU", 1) // run.num_cpus_per_task) - 1)
        max_actors = min(max_actors or free, free)
    ds = ray.data.from_items([{"shard": json.dumps(s)} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(_read_stage, batch_size=1, num_cpus=1,
                        fn_kwargs={"spec": spec, "measure_rows": measure_rows, "views": views})
    ds = ds.map_batches(
        TeacherActor, batch_size=1, num_gpus=run.num_gpus or None, num_cpus=run.num_cpus_per_task,
        compute=ray.data.ActorPoolStrategy(min_size=min(run.min_actors, max_actors or run.min_actors),
                                           max_size=max_actors),
        fn_constructor_kwargs={**common, "include_inputs": settings.include_inputs},
    )
    return ds.map_batches(_write_stage, batch_size=1, num_cpus=1, fn_kwargs={"settings": settings})


def _gather(refs: list[Any], settings: WriteSettings) -> dict[int, dict[str, Any]]:
    """The fused plan's records as its tasks end; on a failure the tasks not yet run are cancelled."""
    import ray

    written: dict[int, dict[str, Any]] = {}
    pending = list(refs)
    progress = _Progress(len(refs))
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            _keep(ray.get(done[0]), settings, written)
            progress.step()
    except Exception as exc:  # a task failure: Ray wraps the worker's exception
        for ref in pending:
            ray.cancel(ref)
        message = _still_error(exc)
        if message is None:
            raise
        raise StillError(message) from None
    finally:
        progress.close()
    return written


def _collect(ds: Any, settings: WriteSettings) -> dict[int, dict[str, Any]]:
    """The streaming plan's records."""
    written: dict[int, dict[str, Any]] = {}
    try:
        for row in ds.iter_rows():
            _keep(dict(row), settings, written)
    except Exception as exc:  # a task failure: Ray wraps the worker's exception
        message = _still_error(exc)
        if message is None:
            raise
        raise StillError(message) from None
    return written


def _keep(record: dict[str, Any], settings: WriteSettings, written: dict[int, dict[str, Any]]) -> None:
    """Files one shard's record (writing its bytes here for stores the tasks cannot write)."""
    from still.storage import resolve

    if not settings.write:
        resolve(settings.store_uri).join(record["name"]).write_atomic(record["data"])
    record.pop("data", None)
    record["stats"] = json.loads(record["stats"])
    written[int(record["index"])] = record


class _Progress:
    """``still infer: N/M shards`` on a terminal, rewritten in place; nothing on a pipe or log."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.shown = sys.stderr.isatty()

    def step(self) -> None:
        self.done += 1
        if self.shown:
            print(f"\rstill infer: {self.done}/{self.total} shards", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown and self.done:
            print(file=sys.stderr, flush=True)


def _still_error(exc: BaseException) -> str | None:
    """The message of a StillError a Ray task raised, under Ray's wrappers.

    Ray Data re-raises a UDF's exception as ``RayTaskError(UserCodeException)`` whose
    cause chain ends before the original exception: only its traceback text survives.
    """
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, StillError):
            return str(current)
        current = getattr(current, "cause", None) or current.__cause__
    match = re.search(r"still\.errors\.StillError: (.+)", str(exc))
    return match.group(1).strip() if match else None


def _predictor(payload: Any, normalisation: Normalisation, predictor_kwargs: dict[str, Any]) -> Any:
    """One ``TeacherPredictor`` per worker process and teacher (the model loads once)."""
    key = (payload.fingerprint, normalisation, tuple(sorted(predictor_kwargs.items())))
    if key not in _PREDICTORS:
        from teacher_infer.predictor import TeacherPredictor

        _PREDICTORS.clear()
        _PREDICTORS[key] = TeacherPredictor(payload, normalisation, **predictor_kwargs)
    return _PREDICTORS[key]


def _records(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {name: np.array([r[name] for r in records], dtype=object if name in _RECORD_OBJECTS else None)
            for name in records[0]}


def _fused_shard(shard: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The fused plan's task: reads, infers, compresses and writes one shard; returns its record."""
    predictor = _predictor(kwargs["payload"], kwargs["normalisation"], kwargs["predictor_kwargs"])
    rows = read_shard(shard, kwargs["spec"], kwargs["measure_rows"], kwargs["views"])
    logits, features = predictor.forward(rows.inputs, rows.source_index, rows.params)
    return write_shard(rows, logits, features, kwargs["settings"])


def _read_stage(batch: dict[str, np.ndarray], *, spec: Any, measure_rows: int,
                views: ViewSettings | None) -> dict[str, np.ndarray]:
    rows = read_shard(json.loads(batch["shard"][0]), spec, measure_rows, views)
    inputs, rows.inputs = rows.inputs, None
    # the inputs (and a multi-view shard's view layout) travel as tensor columns, one row per
    # shard; the small rest pickled beside them
    out = {"inputs": inputs[None], "meta": np.array([pickle.dumps(rows)], dtype=object)}
    if rows.params is not None:
        out.update(source_index=rows.source_index[None], params=rows.params[None])
    return out


class TeacherActor:
    """The streaming plan's teacher: forward passes over one shard's rows per call."""

    def __init__(self, payload: Any, normalisation: Normalisation, predictor_kwargs: dict[str, Any],
                 include_inputs: bool) -> None:
        self.predictor = _predictor(payload, normalisation, predictor_kwargs)
        self.include_inputs = include_inputs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = batch["inputs"][0]
        views = "params" in batch
        logits, features = self.predictor.forward(inputs, batch["source_index"][0] if views else None,
                                                  batch["params"][0] if views else None)
        out = {"meta": batch["meta"], "logits": logits[None]}
        out.update({FEATURE_PREFIX + name: value[None] for name, value in features.items()})
        if self.include_inputs:
            out["inputs"] = batch["inputs"]
        return out


def _write_stage(batch: dict[str, np.ndarray], *, settings: WriteSettings) -> dict[str, np.ndarray]:
    rows: ShardRows = pickle.loads(batch["meta"][0])
    rows.inputs = batch["inputs"][0] if "inputs" in batch else np.zeros((len(rows.splits), 0), np.uint8)
    features = {name[len(FEATURE_PREFIX):]: value[0] for name, value in batch.items()
                if name.startswith(FEATURE_PREFIX)}
    return _records([write_shard(rows, batch["logits"][0], features, settings)])


def measure_rows_per_shard(fidelity_rows: int, shard_rows: int, num_rows: int) -> int:
    """Rows per shard whose fidelity is measured, for about ``fidelity_rows`` over the store."""
    return math.ceil(fidelity_rows * shard_rows / max(1, num_rows))
