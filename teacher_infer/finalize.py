"""The last step of ``still infer``: check every planned shard is there, then write the manifest."""

from __future__ import annotations

import datetime as _dt
import posixpath
from typing import Any

from still.errors import StillError
from still.storage import Location
from teacher_infer import fidelity as fid
from teacher_infer import metrics as tm
from teacher_infer import store as st


def finalize(*, config: Any, spec: Any, teacher: Any, store_dir: Location, key: str, key_doc: dict[str, Any],
             storage: dict[str, Any], settings: Any, plan: dict[str, Any], done: dict[int, dict[str, Any]],
             written: dict[int, dict[str, Any]], input_dtype: str, infer_seconds: float) -> dict[str, Any]:
    """Writes ``manifest.json`` (last, atomically) once every shard of the plan is in place.

    Args:
        storage: The manifest's ``storage`` section (``teacher_infer.key.storage_fields``, plus
            ``feature_shapes``: each stored layer's row shape, from the probe).
        settings: The resolved ``teacher_infer.key.Settings``.
        done: Shards a killed run left complete, by index (their footer stats).
        written: Shards this run wrote, by index (their records).

    Returns:
        The manifest.

    Raises:
        StillError: A shard is missing, or the rows do not add up to the dataset's.
    """
    from still.tracking import package_versions

    views = config.store.views
    shards, stats_parts = [], []
    for planned in plan["shards"]:
        index = planned["index"]
        name = st.shard_name(index)
        if index in written:
            record = written[index]
            entry = {"name": name, "rows": int(record["rows"]), "bytes": int(record["bytes"]),
                     "sha256": record["sha256"]}
            stats_parts.append(record["stats"])
        elif index in done:
            digest, size = st.file_sha256(store_dir.join(name))
            entry = {"name": name, "rows": planned["rows"] * views, "bytes": size, "sha256": digest}
            stats_parts.append(done[index]["stats"])
        else:
            raise StillError(f"store {store_dir.uri!r}: shard {name} was not written; rerun to finish the store")
        shards.append({**entry, "source_rows": planned["pieces"]})
    rows = sum(s["rows"] for s in shards)
    if rows != spec.num_rows * views:
        raise StillError(f"store {store_dir.uri!r} has {rows} rows, dataset {spec.name!r} has {spec.num_rows}"
                         + (f" × {views} views" if views > 1 else ""))
    total_bytes = sum(s["bytes"] for s in shards)
    metrics = tm.finish_metrics(tm.merge_stats([p["metrics"] for p in stats_parts]), spec.task)
    fidelity_stats = fid.merge_stats([p["fidelity"] for p in stats_parts])
    storage = dict(storage)
    if storage["mode"] == "sampled":
        storage["max_support"] = max(p["max_support"] for p in stats_parts)
    data = config.data
    manifest = {
        "format": st.FORMAT_NAME,
        "format_version": st.FORMAT_VERSION,
        "key": key,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": {"uri": config.teacher.uri, "form": teacher.form, "fingerprint": teacher.fingerprint},
        "dataset": {"name": spec.name, "source": _source_uri(data.source), "fingerprint": spec.fingerprint,
                    "num_rows": spec.num_rows, "id_column": spec.id_column, "feature_column": spec.feature_column,
                    "label_column": spec.label_column, "split_column": spec.split_column,
                    "config": {"id_column": data.id_column, "feature_column": data.feature_column,
                               "label_column": data.label_column, "split_column": data.split_column,
                               "val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
                               "split_seed": data.split_seed,
                               "image": {"mode": data.image.mode, "resize": data.image.resize,
                                         "crop": data.image.crop, "mean": list(data.image.mean),
                                         "std": list(data.image.std)}}},
        "preprocessing": {**spec.preprocessing, "input_dtype": input_dtype,
                          "rule": "model input = (input * input_scale - mean[c]) / std[c], shaped input_shape"},
        "storage": storage,
        "precision": settings.precision,
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "task": spec.task,
        "split_rule": dict(spec.split_rule),
        "split_codes": {name: i for i, name in enumerate(tm.SPLIT_NAMES)},
        "columns": st.expected_schema_columns({"storage": storage}),
        "rows": rows,
        "shards": shards,
        "teacher_metrics": metrics,
        "fidelity": fid.summarize(fidelity_stats),
        "fidelity_rows": fidelity_stats["n"],
        "bytes_per_row": round(total_bytes / rows, 2) if rows else 0.0,
        "total_bytes": total_bytes,
        "package_versions": package_versions(),
        "cache_key_inputs": key_doc,
        "inference": {"plan": settings.plan, "shard_rows": plan["shard_rows"], "shards_written": len(written),
                      "shards_resumed": len(done), "seconds": round(infer_seconds, 3),
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


def _source_uri(source: str) -> str:
    """The source as a location that means the same from any working directory (local paths made absolute)."""
    from still.storage import resolve

    return source if source.startswith("builtin:") else resolve(source).uri
