"""``still infer``: run a teacher once over a dataset and write a soft-label store.

    still infer data.source=builtin:digits teacher.uri=teacher.pt store.mode=topk store.k=5
    still infer --config infer.yaml --address ray://head:10001 --json
    python -c "from teacher_infer.infer import run_infer; ..."   # what tests call

Reads top to bottom: resolve the data → check the storage settings against it (mode
vs task, k vs classes) → fingerprint the teacher → cache key → return the existing
store if complete (no Ray, no teacher forward pass) → load the teacher and probe one
batch (output size, feature layer) → plan shards → Ray Data runs one fused read →
infer → compress (``teacher_infer.soft_labels``) → write task per missing shard, which
also measures the fidelity of a sample of its rows → finalize (checksums, teacher
metrics, fidelity, manifest written last, atomically) → MLflow run.

Plan and resume (why not Ray Data's own checkpointing)
------------------------------------------------------
Ray 2.60's ``DataContext.checkpoint_config = CheckpointConfig(id_column, path)``
was evaluated against the requirements here and not used:

- On a rerun it inserts a ``CheckpointFilter`` operator between read and map that
  runs as an actor pool (``ActorPoolStrategy(min_size=1)``, 1 GiB memory
  reservation, ``supports_fusion=False``). That breaks the fused read → infer →
  write task that measured fastest on CPUs, and on 2-CPU machines actor pools
  beside read tasks are the pattern that hangs (RAY-NOTES.md).
- It filters per row, so a resumed run writes blocks of leftover rows with
  ``write_parquet``'s own file names: shards are not deterministic and a finalize
  step would have to re-read and rewrite them to get ``part-NNNNN`` names.
- Its data files are written in place; its 2-phase commit cleans orphans on the
  next run, but until then a half-written Parquet file sits in the output directory.
- ``write_parquet`` returns nothing to the driver, so the teacher metrics (computed
  from the full logits) would have to ride along as extra columns in the store.

Instead the plan is deterministic shards: the input rows (files in sorted order) are
cut into fixed ranges of ``shard_rows``; shard i is always the same rows and is
named ``part-{i:05d}.parquet``. The plan is saved as ``_plan.json`` in the store
directory on the first run and reused by reruns. One Ray Data task per missing shard
reads its row range, runs the teacher (model cached per worker process), writes
the shard to a temporary name and renames it into place (``Location.write_atomic``),
and returns the shard's row count, sha256, metric and fidelity sums (also kept in the
shard's Parquet footer, so shards from a killed run still contribute them). After
``kill -9`` only complete ``part-*`` files exist; a rerun skips the complete ones and
writes only the rest, so every id is in the store exactly once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import posixpath
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from still.config import to_dict
from still.errors import StillError
from still.storage import Location, resolve
from teacher_infer import fidelity as fid
from teacher_infer import metrics as tm
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.soft_labels import Ragged, SoftLabelSpec

DEFAULT_EXPERIMENT = "still-infer"
_SHARD_INPUT_BYTES = 32 << 20
_PREDICTORS: dict[tuple, Any] = {}


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
    spec = resolve_dataset(config.data)
    soft_labels = storage_spec(config, spec)
    from teacher_infer.teachers import teacher_fingerprint

    fingerprint = teacher_fingerprint(config.teacher.uri)
    key, key_doc = cache_key(config, spec, fingerprint, soft_labels)
    store_dir = resolve(config.store.root).join(key)
    if store_dir.join(st.MANIFEST_NAME).exists():
        return _cache_hit(config, store_dir, key, started)

    from teacher_infer.teachers import load_teacher

    teacher = load_teacher(config.teacher.uri)
    input_dtype = _probe(config, spec, teacher, soft_labels)
    plan = _load_or_make_plan(config, spec, store_dir, key)
    done = _complete_shards(store_dir, plan)
    todo = [s for s in plan["shards"] if s["index"] not in done]
    print(f"still infer: store {store_dir.uri}: {len(plan['shards'])} shards of <= {plan['shard_rows']} rows, "
          f"{len(done)} already complete, {len(todo)} to write", file=sys.stderr, flush=True)

    from still.tracking import open_run

    with open_run(config, config.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=f"infer-{key}",
                  tags={"cache_hit": "false", "store_key": key, "teacher_fingerprint": fingerprint}) as tracker:
        tracker.set_tags({"store_uri": store_dir.uri})
        infer_start = time.perf_counter()
        written = _run_shards(config, spec, soft_labels, teacher, store_dir, key, todo) if todo else {}
        infer_seconds = time.perf_counter() - infer_start
        manifest = _finalize(config, spec, soft_labels, teacher, store_dir, key, key_doc, plan, done, written,
                             input_dtype, infer_seconds)
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


# --------------------------------------------------------------------------- key and plan


def storage_spec(config: InferConfig, spec: Any) -> SoftLabelSpec:
    """The storage settings for this dataset, checked against it (mode vs task, k vs classes)."""
    store = config.store
    try:
        return SoftLabelSpec.create(store.mode, spec.num_classes, dtype=store.dtype, k=store.k,
                                    samples=store.samples, sample_temperature=store.sample_temperature,
                                    temperatures=store.temperatures, task=spec.task)
    except StillError as exc:
        raise StillError(f"dataset {spec.name!r} ({spec.num_classes} classes, {spec.task}): {exc}") from None


def cache_key(config: InferConfig, spec: Any, teacher_fp: str, soft_labels: SoftLabelSpec) -> tuple[str, dict[str, Any]]:
    """The store's content address: sha256 of teacher, data, preprocessing and storage.

    Returns:
        (16-hex-digit key, the document it hashes).
    """
    doc = {
        "format_version": st.FORMAT_VERSION,
        "teacher": teacher_fp,
        "dataset": spec.fingerprint,
        "columns": [spec.id_column, spec.feature_column, spec.label_column, spec.split_column],
        "task": spec.task,
        "preprocessing": {"input_shape": list(spec.input_shape), "input_scale": float(spec.input_scale)},
        "split_rule": dict(spec.split_rule),
        "storage": _storage_fields(config, soft_labels),
    }
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16], doc


def _storage_fields(config: InferConfig, soft_labels: SoftLabelSpec) -> dict[str, Any]:
    """What the store keeps, as the cache key and the manifest's ``storage`` section record it."""
    return {**soft_labels.manifest_fields(), "include_inputs": config.store.include_inputs,
            "feature_layer": config.teacher.feature_layer}


def fidelity_metrics(fidelity: dict[str, dict[str, float]]) -> dict[str, float]:
    """The fidelity as flat MLflow metrics: ``fidelity_kl_mean_T4`` and so on."""
    return {f"fidelity_{name}_T{temperature}": value for temperature, values in fidelity.items()
            for name, value in values.items() if value is not None and math.isfinite(value)}


def _file_rows(spec: Any) -> list[int]:
    fs, paths = spec.arrow_files()
    rows = []
    for path in paths:
        with fs.open_input_file(path) as handle:
            rows.append(pq.ParquetFile(handle).metadata.num_rows)
    return rows


def make_plan(spec: Any, shard_rows: int, input_itemsize: int, num_cpus: int) -> dict[str, Any]:
    """Cuts the dataset (files in order) into shards of consecutive rows.

    Returns:
        ``{"shard_rows", "num_rows", "files": [...], "shards": [{"index", "rows",
        "pieces": [[file_index, start, stop], ...]}]}``.
    """
    file_rows = _file_rows(spec)
    total = sum(file_rows)
    if shard_rows <= 0:
        per_row = max(1, math.prod(spec.input_shape) * input_itemsize)
        shard_rows = max(256, _SHARD_INPUT_BYTES // per_row)
        shard_rows = min(shard_rows, max(1, math.ceil(total / (2 * max(1, num_cpus)))))
    shards, start = [], 0
    while start < total:
        stop = min(start + shard_rows, total)
        pieces, offset = [], 0
        for file_index, n in enumerate(file_rows):
            lo, hi = max(start, offset), min(stop, offset + n)
            if lo < hi:
                pieces.append([file_index, lo - offset, hi - offset])
            offset += n
        shards.append({"index": len(shards), "rows": stop - start, "pieces": pieces})
        start = stop
    return {"shard_rows": shard_rows, "num_rows": total, "files": list(spec.files), "shards": shards}


def _load_or_make_plan(config: InferConfig, spec: Any, store_dir: Location, key: str) -> dict[str, Any]:
    plan_loc = store_dir.join(st.PLAN_NAME)
    if plan_loc.exists():
        try:
            plan = plan_loc.read_json()
            if plan.get("key") == key and plan.get("num_rows") == spec.num_rows:
                return plan
        except (ValueError, OSError):
            pass
    itemsize = _input_itemsize(spec)
    plan = make_plan(spec, config.infer.shard_rows, itemsize, _cluster_cpus(config))
    plan["key"] = key
    plan_loc.write_atomic(json.dumps(plan).encode())
    return plan


def _cluster_cpus(config: InferConfig) -> int:
    """CPUs of the cluster the shards will run on, which sizes them (joins Ray if needed)."""
    if config.ray.num_cpus:
        return config.ray.num_cpus
    import ray

    from still.ray_setup import init_ray

    # Sized from the cluster, not this machine: a laptop submitting to 64 CPUs with
    # --address must plan for 64.
    init_ray(config.ray)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _input_itemsize(spec: Any) -> int:
    fs, paths = spec.arrow_files()
    with fs.open_input_file(paths[0]) as handle:
        field = pq.ParquetFile(handle).schema_arrow.field(spec.feature_column)
    tp = field.type
    if isinstance(tp, pa.BaseExtensionType):
        tp = tp.storage_type
    while pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        tp = tp.value_type
    return max(1, tp.bit_width // 8) if pa.types.is_primitive(tp) else 4


def _complete_shards(store_dir: Location, plan: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards already in place (from a killed run): readable, right row count, stats in footer."""
    done: dict[int, dict[str, Any]] = {}
    if not store_dir.exists():
        return done
    expected = {st.shard_name(s["index"]): s for s in plan["shards"]}
    for path in store_dir.fs.glob(posixpath.join(store_dir.path, "part-*.parquet")):
        name = posixpath.basename(path)
        shard = expected.get(name)
        loc = store_dir.join(name)
        try:
            stats, rows = st.read_shard_stats(loc)
            ok = shard is not None and rows == shard["rows"]
        except Exception:  # an unreadable file cannot be trusted: write it again
            ok = False
        if ok:
            done[shard["index"]] = {"stats": stats}
        else:
            store_dir.fs.rm(loc.path)
    return done


# --------------------------------------------------------------------------- probing


def _read_rows(spec: Any, pieces: list[list[int]], columns: list[str]) -> pa.Table:
    """Reads the rows ``pieces`` names (``[file_index, start, stop]``) from the dataset."""
    fs, paths = spec.arrow_files() if hasattr(spec, "arrow_files") else (spec["fs"], spec["paths"])
    tables = []
    for file_index, start, stop in pieces:
        with fs.open_input_file(paths[file_index]) as handle:
            pfile = pq.ParquetFile(handle)
            meta = pfile.metadata
            groups, offset, first = [], 0, None
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if offset < stop and offset + n > start:
                    groups.append(g)
                    first = offset if first is None else first
                offset += n
            table = pfile.read_row_groups(groups, columns=columns)
        tables.append(table.slice(start - first, stop - start))
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _columns(spec: Any) -> list[str]:
    columns = [spec.id_column, spec.feature_column, spec.label_column]
    if spec.split_column:
        columns.append(spec.split_column)
    return columns


def _probe(config: InferConfig, spec: Any, teacher: Any, soft_labels: SoftLabelSpec) -> str:
    """Runs the teacher on a few rows on the driver; checks its output size first.

    Returns:
        The raw input value type (recorded in the manifest).
    """
    from teacher_infer.predictor import TeacherPredictor

    table = _read_rows(spec, [[0, 0, min(8, _file_rows_first(spec))]], _columns(spec))
    raw = _input_matrix(table[spec.feature_column], math.prod(spec.input_shape))
    predictor = TeacherPredictor(teacher, spec.input_shape, spec.input_scale,
                                 feature_layer=config.teacher.feature_layer)
    try:
        logits, _ = predictor.logits(raw)
    except StillError:
        raise
    except Exception as exc:  # shape errors surface as RuntimeError from torch
        raise StillError(
            f"teacher {config.teacher.uri!r} fails on inputs of shape {tuple(spec.input_shape)} from "
            f"{spec.name!r}: {str(exc).splitlines()[0][:150]}"
        ) from None
    finally:
        predictor.close()
    if logits.shape[1] != soft_labels.num_classes:
        what = (f"multi-label rows {soft_labels.num_classes} labels wide" if soft_labels.task == "multilabel"
                else f"{soft_labels.num_classes} classes")
        raise StillError(
            f"teacher {config.teacher.uri!r} outputs {logits.shape[1]} classes but dataset {spec.name!r} has {what}"
        )
    return str(raw.dtype)


def _file_rows_first(spec: Any) -> int:
    return _file_rows(spec)[0] if spec.files else 0


def _input_matrix(column: Any, width: int) -> np.ndarray:
    """Raw input values (n, width) from an Arrow list/tensor column, zero-copy when possible."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    n = len(array)
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or pa.types.is_fixed_size_list(array.type):
        array = array.flatten()
    values = array.to_numpy(zero_copy_only=False)
    if values.size != n * width:
        raise StillError(f"input rows hold {values.size // max(n, 1)} values, expected {width}")
    return values.reshape(n, width)


def _input_column(column: Any, raw: np.ndarray) -> pa.Array:
    """The ``input`` column: the source column itself when already fixed_size_list<primitive>[d]."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    if (pa.types.is_fixed_size_list(array.type) and array.type.list_size == raw.shape[1]
            and pa.types.is_primitive(array.type.value_type) and array.null_count == 0):
        return array
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(raw).reshape(-1)), raw.shape[1])


# --------------------------------------------------------------------------- the Ray part


def infer_shard(
    shard: dict[str, Any],
    *,
    predictor: Any,
    spec: Any,
    store_uri: str,
    include_inputs: bool,
    batch_size: int,
    write: bool,
    seed: int,
    measure_rows: int,
) -> dict[str, Any]:
    """The fused task body: read one shard's rows → infer → compress → write it atomically.

    Args:
        shard: A plan entry (``index``, ``rows``, ``pieces``).
        predictor: A ``TeacherPredictor``.
        spec: The ``DatasetSpec``.
        store_uri: The store directory.
        include_inputs: Pass the raw inputs through as ``input``.
        batch_size: Rows per forward pass.
        write: Write the shard here (shared storage); False returns its bytes instead
            (``memory://`` stores, which only the driver's process can see).
        seed: With the shard index, seeds the draws of ``sampled`` storage, so that a
            shard rewritten after a kill holds the same draws.
        measure_rows: About how many of the shard's rows get their fidelity measured.

    Returns:
        ``index``, ``name``, ``rows``, ``bytes``, ``sha256``, ``stats`` (JSON: teacher
        metric sums, fidelity sums, the widest sampled row) and ``data`` (the
        Parquet bytes when ``write`` is False, else empty).
    """
    from still.datasets import assign_splits, labels_to_numpy

    table = _read_rows(spec, shard["pieces"], _columns(spec))
    width = math.prod(spec.input_shape)
    raw = _input_matrix(table[spec.feature_column], width)
    ids = table[spec.id_column]
    id_values = ids.to_numpy()
    labels = labels_to_numpy(table[spec.label_column], spec.task, spec.num_classes)
    source_split = table[spec.split_column].to_numpy() if spec.split_column else None
    splits = assign_splits(id_values, source_split, spec.split_rule)
    measure = fid.measured_rows(len(raw), measure_rows)
    rng = np.random.default_rng([seed, shard["index"]])
    stats = tm.empty_stats(spec.task, spec.num_classes)
    fidelity = fid.empty_stats()
    chunks: dict[str, list[Any]] = {}
    for lo in range(0, len(raw), batch_size):
        hi = min(lo + batch_size, len(raw))
        out = predictor.label({"input": raw[lo:hi], "label": labels[lo:hi], "_measure": measure[lo:hi]}, rng)
        tm.accumulate_stats(stats, out, splits[lo:hi])
        if "_fidelity" in out:
            fid.accumulate_stats(fidelity, out["_fidelity"])
        for name, value in out.items():
            if name not in ("input", "label") and not name.startswith("_"):
                chunks.setdefault(name, []).append(value)
    outputs = {name: Ragged.concat(parts) if isinstance(parts[0], Ragged) else np.concatenate(parts)
               for name, parts in chunks.items()}
    features = outputs.pop("features", None)
    result = st.build_table(
        ids, labels, splits, outputs,
        inputs=_input_column(table[spec.feature_column], raw) if include_inputs else None,
        features=features, task=spec.task,
    )
    support = outputs.get("sample_idx")
    shard_stats = {"metrics": stats, "fidelity": fidelity,
                   "max_support": int(np.diff(support.offsets).max(initial=0)) if support is not None else None}
    data = st.shard_bytes(result, shard_stats)
    name = st.shard_name(shard["index"])
    if write:
        resolve(store_uri).join(name).write_atomic(data)
    record = st.shard_record(name, data, result.num_rows)
    return {**record, "index": shard["index"], "stats": json.dumps(shard_stats), "data": b"" if write else data}


def _cached_predictor(payload: Any, spec: Any, config_items: tuple) -> Any:
    """One ``TeacherPredictor`` per worker process and teacher (the model loads once)."""
    key = (payload.fingerprint, config_items)
    if key not in _PREDICTORS:
        from teacher_infer.predictor import TeacherPredictor

        kwargs = dict(config_items)
        _PREDICTORS.clear()
        _PREDICTORS[key] = TeacherPredictor(payload, spec.input_shape, spec.input_scale, **kwargs)
    return _PREDICTORS[key]


def _shard_task(batch: dict[str, np.ndarray], *, payload: Any, spec: Any, predictor_items: tuple,
                task_kwargs: dict[str, Any]) -> dict[str, Any]:
    predictor = _cached_predictor(payload, spec, predictor_items)
    rows = [infer_shard(json.loads(item), predictor=predictor, spec=spec, **task_kwargs) for item in batch["shard"]]
    return {name: np.array([r[name] for r in rows], dtype=object if name in ("data", "stats", "name", "sha256") else None)
            for name in rows[0]}


class _ShardActor:
    """GPU plan: one actor per GPU holds the model; each call infers one shard."""

    def __init__(self, payload: Any, spec: Any, predictor_items: tuple, task_kwargs: dict[str, Any]) -> None:
        self.payload, self.spec, self.items, self.task_kwargs = payload, spec, predictor_items, task_kwargs
        _cached_predictor(payload, spec, predictor_items)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return _shard_task(batch, payload=self.payload, spec=self.spec, predictor_items=self.items,
                           task_kwargs=self.task_kwargs)


def _run_shards(config: InferConfig, spec: Any, soft_labels: SoftLabelSpec, teacher: Any, store_dir: Location,
                key: str, todo: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Runs the missing shards on Ray Data; returns their records by index."""
    import ray
    import ray.data

    from still.ray_setup import init_ray

    init_ray(config.ray)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty() or ctx.enable_progress_bars
    write_in_task = not store_dir.uri.startswith("memory://")
    store_dir.fs.makedirs(store_dir.path, exist_ok=True)
    gpu = config.infer.num_gpus > 0
    predictor_items = (
        ("soft_labels", soft_labels), ("feature_layer", config.teacher.feature_layer),
        ("device", "cuda" if gpu else "cpu"), ("torch_threads", config.infer.torch_threads),
    )
    shard_rows = max(s["rows"] for s in todo)
    task_kwargs = {"store_uri": store_dir.uri, "include_inputs": config.store.include_inputs,
                   "batch_size": config.infer.batch_size, "write": write_in_task, "seed": int(key, 16),
                   "measure_rows": math.ceil(config.infer.fidelity_rows * shard_rows / max(1, spec.num_rows))}
    payload_ref = teacher.payload()
    items = [{"shard": json.dumps(s)} for s in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if gpu:
        count = max(1, int(ray.cluster_resources().get("GPU", 0) // config.infer.num_gpus))
        ds = ds.map_batches(
            _ShardActor, batch_size=1, num_gpus=config.infer.num_gpus,
            compute=ray.data.ActorPoolStrategy(size=min(count, len(items))),
            fn_constructor_kwargs={"payload": payload_ref, "spec": spec, "predictor_items": predictor_items,
                                   "task_kwargs": task_kwargs},
        )
    else:
        ds = ds.map_batches(
            _shard_task, batch_size=1, num_cpus=config.infer.num_cpus_per_task,
            fn_kwargs={"payload": payload_ref, "spec": spec, "predictor_items": predictor_items,
                       "task_kwargs": task_kwargs},
        )
    written: dict[int, dict[str, Any]] = {}
    try:
        for row in ds.iter_rows():
            record = dict(row)
            if not write_in_task:
                store_dir.join(record["name"]).write_atomic(record["data"])
            record.pop("data", None)
            record["stats"] = json.loads(record["stats"])
            written[int(record["index"])] = record
    except StillError:
        raise
    except Exception as exc:  # a task failure: Ray wraps the worker's exception
        cause = exc
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        if isinstance(cause, StillError):
            raise StillError(str(cause)) from None
        raise
    return written


# --------------------------------------------------------------------------- finalize


def _finalize(config: InferConfig, spec: Any, soft_labels: SoftLabelSpec, teacher: Any, store_dir: Location, key: str,
              key_doc: dict[str, Any], plan: dict[str, Any], done: dict[int, dict[str, Any]],
              written: dict[int, dict[str, Any]], input_dtype: str, infer_seconds: float) -> dict[str, Any]:
    """Checks every planned shard is present, then writes the manifest (last, atomically)."""
    from still.tracking import package_versions

    shards, stats_parts = [], []
    for planned in plan["shards"]:
        index = planned["index"]
        name = st.shard_name(index)
        if index in written:
            record = written[index]
            shards.append({"name": name, "rows": int(record["rows"]), "bytes": int(record["bytes"]),
                           "sha256": record["sha256"]})
            stats_parts.append(record["stats"])
        elif index in done:
            digest, size = st.file_sha256(store_dir.join(name))
            shards.append({"name": name, "rows": planned["rows"], "bytes": size, "sha256": digest})
            stats_parts.append(done[index]["stats"])
        else:
            raise StillError(f"store {store_dir.uri!r}: shard {name} was not written; rerun to finish the store")
    rows = sum(s["rows"] for s in shards)
    if rows != spec.num_rows:
        raise StillError(f"store {store_dir.uri!r} has {rows} rows, dataset {spec.name!r} has {spec.num_rows}")
    total_bytes = sum(s["bytes"] for s in shards)
    metrics = tm.finish_metrics(tm.merge_stats([p["metrics"] for p in stats_parts]), spec.task)
    fidelity_stats = fid.merge_stats([p["fidelity"] for p in stats_parts])
    fidelity = fid.summarize(fidelity_stats)
    storage = _storage_fields(config, soft_labels)
    if soft_labels.mode == "sampled":
        storage["max_support"] = max(p["max_support"] for p in stats_parts)
    columns = st.expected_schema_columns({"storage": storage})
    manifest = {
        "format": st.FORMAT_NAME,
        "format_version": st.FORMAT_VERSION,
        "key": key,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": {"uri": config.teacher.uri, "form": teacher.form, "fingerprint": teacher.fingerprint},
        "dataset": {"name": spec.name, "source": config.data.source, "fingerprint": spec.fingerprint,
                    "num_rows": spec.num_rows, "id_column": spec.id_column, "feature_column": spec.feature_column,
                    "label_column": spec.label_column, "split_column": spec.split_column},
        "preprocessing": {"input_shape": list(spec.input_shape), "input_scale": float(spec.input_scale),
                          "input_dtype": input_dtype, "rule": "model input = input * input_scale, reshaped to input_shape"},
        "storage": storage,
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "task": spec.task,
        "split_rule": dict(spec.split_rule),
        "split_codes": {name: i for i, name in enumerate(tm.SPLIT_NAMES)},
        "columns": columns,
        "rows": rows,
        "shards": shards,
        "teacher_metrics": metrics,
        "fidelity": fidelity,
        "fidelity_rows": fidelity_stats["n"],
        "bytes_per_row": round(total_bytes / rows, 2) if rows else 0.0,
        "total_bytes": total_bytes,
        "package_versions": package_versions(),
        "cache_key_inputs": key_doc,
        "inference": {"shard_rows": plan["shard_rows"], "shards_written": len(written), "shards_resumed": len(done),
                      "seconds": round(infer_seconds, 3),
                      "rows_per_s": round(sum(r["rows"] for r in written.values()) / infer_seconds, 1)
                      if written and infer_seconds > 0 else None},
    }
    st.write_manifest(store_dir, manifest)
    for leftover in store_dir.fs.glob(posixpath.join(store_dir.path, ".tmp-*")) + [store_dir.join(st.PLAN_NAME).path]:
        try:
            store_dir.fs.rm(leftover)
        except (FileNotFoundError, OSError):
            pass
    return manifest
