"""The soft-label store, format v1: its one owner (writer helpers AND reader).

A store is a directory ``<store.root>/<key>/`` on any storage URI::

    part-00000.parquet ... part-NNNNN.parquet   shards, each renamed into place complete
    manifest.json                               written last, atomically

Columns (docs/internals.md): ``id``, ``view`` (int16, 0), ``label`` (int64, nullable),
``split`` (int8: 0 train, 1 val, 2 test), ``input`` (fixed_size_list of the raw input
dtype; model input = input × ``input_scale`` reshaped to ``input_shape``), then by mode
``logits`` (dense) or ``topk_idx``/``topk_logit``/``logsumexp`` (topk), and optionally
``features``. A directory without ``manifest.json`` is incomplete: no reader accepts it.

Reader API used by training and tuning::

    store = open_store("stores/3f2a…")        # StillError unless complete
    ds = store.read_dataset(columns=["input", "label", "topk_idx", "topk_logit", "logsumexp"])
    t = dense_teacher_logits(batch, store.num_classes)   # (n, C) float32 logits
    verify_store(uri) -> {"ok": bool, "problems": [...]}
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from still.errors import StillError
from still.storage import Location, resolve

FORMAT_VERSION = 1
FORMAT_NAME = "still-soft-label-store"
MANIFEST_NAME = "manifest.json"
PLAN_NAME = "_plan.json"
SPLIT_NAMES = ("train", "val", "test")
ECE_BINS = 15
STATS_METADATA_KEY = b"still.shard_stats"

MODE_COLUMNS = {"dense": ("logits",), "topk": ("topk_idx", "topk_logit", "logsumexp")}
BASE_COLUMNS = ("id", "view", "label", "split")


def shard_name(index: int) -> str:
    """Returns the file name of shard ``index`` (``part-00003.parquet``)."""
    return f"part-{index:05d}.parquet"


# --------------------------------------------------------------------------- reading


class Store:
    """A complete soft-label store (its manifest was found and parsed).

    Attributes:
        location: Where the store directory lives.
        manifest: The parsed ``manifest.json``.
    """

    def __init__(self, location: Location, manifest: dict[str, Any]) -> None:
        self.location = location
        self.manifest = manifest

    @property
    def uri(self) -> str:
        """The store directory's URI."""
        return self.location.uri

    @property
    def key(self) -> str:
        """The content-addressed cache key."""
        return self.manifest["key"]

    @property
    def num_classes(self) -> int:
        """C, the teacher's number of outputs."""
        return int(self.manifest["num_classes"])

    @property
    def mode(self) -> str:
        """``dense`` or ``topk``."""
        return self.manifest["storage"]["mode"]

    @property
    def k(self) -> int | None:
        """Classes kept per row in ``topk`` mode; None for ``dense``."""
        return self.manifest["storage"].get("k")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input (``input`` holds its flattened raw values)."""
        return tuple(self.manifest["preprocessing"]["input_shape"])

    @property
    def input_scale(self) -> float:
        """Model input = raw ``input`` × this."""
        return float(self.manifest["preprocessing"]["input_scale"])

    @property
    def teacher_fingerprint(self) -> str:
        """sha256 of the teacher's weights and architecture."""
        return self.manifest["teacher"]["fingerprint"]

    @property
    def num_rows(self) -> int:
        """Rows in the store."""
        return int(self.manifest["rows"])

    @property
    def class_names(self) -> list[str]:
        """Class names, index = class id."""
        return list(self.manifest.get("class_names", []))

    def shard_uris(self) -> list[str]:
        """URIs of the shards, in order."""
        return [self.location.join(shard["name"]).uri for shard in self.manifest["shards"]]

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Reads the whole store into one Arrow table (small stores, tests, tools)."""
        tables = [
            pq.read_table(self.location.join(s["name"]).path, columns=columns, filesystem=self.location.arrow_fs())
            for s in self.manifest["shards"]
        ]
        return pa.concat_tables(tables) if tables else pa.table({})

    def read_dataset(self, columns: Sequence[str] | None = None, **read_kwargs: Any):
        """Returns a ``ray.data.Dataset`` over the shards.

        Args:
            columns: Columns to read (None: all).
            **read_kwargs: Passed to ``ray.data.read_parquet`` (e.g. ``override_num_blocks``).
        """
        import ray.data

        paths = [self.location.join(s["name"]).path for s in self.manifest["shards"]]
        return ray.data.read_parquet(
            paths, filesystem=self.location.arrow_fs(), columns=list(columns) if columns else None, **read_kwargs
        )

    def __repr__(self) -> str:
        return f"Store({self.uri!r}, key={self.key}, rows={self.num_rows}, mode={self.mode})"


def open_store(uri: str) -> Store:
    """Opens a complete store.

    Raises:
        StillError: ``uri`` does not exist, is not a store, is incomplete (no
            manifest: still being written, or its writer was killed), or its manifest
            is unreadable or of another format version.
    """
    location = resolve(uri)
    if not location.exists():
        raise StillError(f"store {uri!r} does not exist (expected a directory written by still infer)")
    if not location.fs.isdir(location.path):
        raise StillError(f"{uri!r} is not a store (expected a directory with {MANIFEST_NAME} and part-*.parquet)")
    manifest_loc = location.join(MANIFEST_NAME)
    if not manifest_loc.exists():
        shards = location.fs.glob(posixpath.join(location.path, "part-*.parquet"))
        if shards or location.join(PLAN_NAME).exists():
            raise StillError(
                f"store {uri!r} is incomplete: {len(shards)} shard(s) but no {MANIFEST_NAME} "
                "(rerun the same still infer to finish it)"
            )
        raise StillError(f"{uri!r} is not a store (no {MANIFEST_NAME}; expected a directory written by still infer)")
    try:
        manifest = manifest_loc.read_json()
    except (ValueError, OSError) as exc:
        raise StillError(f"store {uri!r} has an unreadable {MANIFEST_NAME} ({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise StillError(f"{uri!r} is not a still store ({MANIFEST_NAME} lacks format {FORMAT_NAME!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StillError(
            f"store {uri!r} has format version {manifest.get('format_version')!r}; "
            f"this still reads version {FORMAT_VERSION}"
        )
    return Store(location, manifest)


def _column_matrix(values: Any, dtype: Any = None) -> np.ndarray:
    """Turns a list-like column (2-D array, object array of arrays, Arrow list) into 2-D numpy."""
    if isinstance(values, (pa.ChunkedArray, pa.Array)):
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if pa.types.is_fixed_size_list(values.type):
            width = values.type.list_size
            flat = values.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(len(values), width).astype(dtype or flat.dtype, copy=False)
        values = values.to_numpy(zero_copy_only=False)
    array = np.asarray(values)
    if array.dtype == object:
        array = np.stack([np.asarray(row) for row in array]) if len(array) else array.reshape(0, 0)
    return array.astype(dtype, copy=False) if dtype is not None else array


def dense_teacher_logits(batch: Mapping[str, Any], num_classes: int) -> np.ndarray:
    """Returns full-length teacher logits (n, C) float32 from a store batch.

    ``dense`` batches (a ``logits`` column) come back as stored. ``topk`` batches
    (``topk_idx``, ``topk_logit``, ``logsumexp``) are rebuilt exactly on the top-k
    support; every tail class gets one shared logit ``log(tail_mass / (C - k)) + lse``
    with ``tail_mass = 1 - sum_i exp(topk_logit_i - lse)``, so softmax at T = 1
    reproduces the stored top-k probabilities and the tail mass. (A tail mass that
    rounds to <= 0 is floored at 1e-30 of the total.)

    Args:
        batch: A mapping of column name to values (numpy arrays, object arrays of
            arrays as Ray Data hands list columns over, or Arrow arrays).
        num_classes: C, ``Store.num_classes``.
    """
    if "logits" in batch:
        logits = _column_matrix(batch["logits"], np.float32)
        if logits.shape[1] != num_classes:
            raise StillError(f"stored logits have {logits.shape[1]} classes, expected {num_classes}")
        return np.ascontiguousarray(logits)
    missing = [c for c in MODE_COLUMNS["topk"] if c not in batch]
    if missing:
        raise StillError(f"batch has neither 'logits' nor the top-k columns (missing {', '.join(missing)})")
    idx = _column_matrix(batch["topk_idx"], np.int64)
    vals = _column_matrix(batch["topk_logit"], np.float64)
    lse = np.asarray(batch["logsumexp"], dtype=np.float64).reshape(-1, 1)
    n, k = idx.shape
    if k > num_classes:
        raise StillError(f"top-k batch has k={k} > num_classes={num_classes}")
    out = np.empty((n, num_classes), dtype=np.float64)
    if k < num_classes:
        top_mass = np.exp(vals - lse).sum(axis=1, keepdims=True)
        tail_mass = np.maximum(1.0 - top_mass, 1e-30)
        out[:] = np.log(tail_mass / (num_classes - k)) + lse
    np.put_along_axis(out, idx, vals, axis=1)
    return out.astype(np.float32)


# --------------------------------------------------------------------------- writing


def compress(logits: np.ndarray, mode: str, k: int, dtype: str) -> dict[str, np.ndarray]:
    """Turns full float32 logits (n, C) into the stored teacher-output columns.

    Returns:
        ``{"logits": (n, C) dtype}`` for dense; for topk ``topk_idx`` (n, k) int32 sorted
        by decreasing logit, ``topk_logit`` (n, k) dtype, ``logsumexp`` (n,) float32
        (over all C classes, from the float32 logits).
    """
    if mode == "dense":
        return {"logits": logits.astype(dtype, copy=False)}
    n, num_classes = logits.shape
    if k >= num_classes:
        idx = np.argsort(-logits, axis=1, kind="stable")
    else:
        part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
    top = np.take_along_axis(logits, idx, axis=1)
    peak = logits.max(axis=1, keepdims=True)
    lse = (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))[:, 0]
    return {
        "topk_idx": idx.astype(np.int32),
        "topk_logit": top.astype(dtype),
        "logsumexp": lse.astype(np.float32),
    }


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix)
    width = matrix.shape[1] if matrix.ndim > 1 else 1
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), width)


def _label_array(labels: Any, n: int) -> pa.Array:
    if labels is None:
        return pa.nulls(n, pa.int64())
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    if isinstance(labels, pa.Array):
        return labels.cast(pa.int64())
    return pa.array(np.asarray(labels, dtype=np.int64))


def build_table(
    ids: Any,
    labels: np.ndarray | None,
    splits: np.ndarray,
    outputs: Mapping[str, np.ndarray],
    inputs: pa.Array | np.ndarray | None = None,
    features: np.ndarray | None = None,
) -> pa.Table:
    """Builds one shard's Arrow table in the format-v1 column order.

    Args:
        ids: int64 or string ids (numpy or Arrow).
        labels: int64 labels (numpy, or Arrow with nulls kept), or None (a null column).
        splits: int8 split codes.
        outputs: :func:`compress` output.
        inputs: Raw inputs: an Arrow fixed_size_list column (passed through as is)
            or a 2-D numpy array; None to leave them out.
        features: (n, d) hidden-layer features, or None.
    """
    n = len(splits)
    id_array = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids)
    if pa.types.is_integer(id_array.type):
        id_array = id_array.cast(pa.int64())
    columns: dict[str, Any] = {
        "id": id_array,
        "view": pa.array(np.zeros(n, dtype=np.int16)),
        "label": _label_array(labels, n),
        "split": pa.array(np.asarray(splits, dtype=np.int8)),
    }
    if inputs is not None:
        columns["input"] = inputs if isinstance(inputs, (pa.Array, pa.ChunkedArray)) else _fixed_list(inputs)
    if "logits" in outputs:
        columns["logits"] = _fixed_list(outputs["logits"])
    else:
        # list<> (not fixed-size) per the format table: readers index them row-wise.
        k = outputs["topk_idx"].shape[1]
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        columns["topk_idx"] = pa.ListArray.from_arrays(offsets, pa.array(outputs["topk_idx"].reshape(-1)))
        columns["topk_logit"] = pa.ListArray.from_arrays(offsets, pa.array(outputs["topk_logit"].reshape(-1)))
        columns["logsumexp"] = pa.array(outputs["logsumexp"])
    if features is not None:
        columns["features"] = _fixed_list(features)
    return pa.table(columns)


def shard_bytes(table: pa.Table, stats: Mapping[str, Any]) -> bytes:
    """Serialises a shard to Parquet bytes, its metric sums in the file's metadata.

    Keeping the per-shard metric sums inside the shard makes a shard self-describing:
    a resumed run aggregates teacher metrics over shards written by an earlier run
    without recomputing anything.
    """
    metadata = dict(table.schema.metadata or {})
    metadata[STATS_METADATA_KEY] = json.dumps(stats).encode()
    table = table.replace_schema_metadata(metadata)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=1, row_group_size=max(1, table.num_rows))
    return sink.getvalue()


def write_manifest(store_dir: Location, manifest: Mapping[str, Any]) -> None:
    """Writes ``manifest.json`` atomically: the step that makes a store complete."""
    data = json.dumps(manifest, indent=1, sort_keys=False, default=str).encode()
    store_dir.join(MANIFEST_NAME).write_atomic(data)


def shard_record(name: str, data: bytes, rows: int) -> dict[str, Any]:
    """The manifest entry of a shard: name, rows, bytes, sha256 of the file."""
    return {"name": name, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_shard_stats(location: Location) -> tuple[dict[str, Any], int]:
    """Reads a shard's metric sums and row count from its Parquet footer."""
    with location.fs.open(location.path, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    raw = (meta.metadata or {}).get(STATS_METADATA_KEY)
    if raw is None:
        raise StillError(f"shard {location.uri!r} has no still stats in its footer")
    return json.loads(raw), meta.num_rows


def file_sha256(location: Location) -> tuple[str, int]:
    """Returns (sha256 hex, size in bytes) of a file."""
    digest = hashlib.sha256()
    size = 0
    with location.fs.open(location.path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# --------------------------------------------------------------------------- metrics


def empty_stats() -> dict[str, Any]:
    """Metric sums of zero rows, per split key ``all``/``train``/``val``/``test``."""
    one = {"n": 0, "n_labeled": 0, "correct": 0, "nll": 0.0, "entropy": 0.0,
           "bin_count": [0] * ECE_BINS, "bin_conf": [0.0] * ECE_BINS, "bin_acc": [0.0] * ECE_BINS}
    return {name: json.loads(json.dumps(one)) for name in ("all", *SPLIT_NAMES)}


def row_stats(logits: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-row teacher statistics from FULL float32 logits (before any compression).

    Returns:
        ``_conf`` max probability, ``_correct`` (argmax == label; 0 when unlabeled),
        ``_nll`` (−log p[label]; 0 when unlabeled), ``_entropy`` (nats), all float32.
    """
    logits = logits.astype(np.float64, copy=False)
    peak = logits.max(axis=1, keepdims=True)
    shifted = logits - peak
    lse = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    logp = shifted - lse
    p = np.exp(logp)
    entropy = -(p * logp).sum(axis=1)
    conf = p.max(axis=1)
    if labels is None:
        zeros = np.zeros(len(logits), dtype=np.float32)
        return {"_conf": conf.astype(np.float32), "_correct": zeros, "_nll": zeros, "_entropy": entropy.astype(np.float32)}
    labels = np.asarray(labels, dtype=np.int64)
    safe = np.clip(labels, 0, logits.shape[1] - 1)
    nll = -np.take_along_axis(logp, safe[:, None], axis=1)[:, 0]
    correct = (logits.argmax(axis=1) == labels).astype(np.float32)
    return {"_conf": conf.astype(np.float32), "_correct": correct, "_nll": nll.astype(np.float32),
            "_entropy": entropy.astype(np.float32)}


def accumulate_stats(stats: dict[str, Any], rows: Mapping[str, np.ndarray], splits: np.ndarray, labeled: bool) -> None:
    """Adds per-row statistics (:func:`row_stats`) to per-split metric sums in place."""
    bins = np.minimum((rows["_conf"] * ECE_BINS).astype(np.int64), ECE_BINS - 1)
    for name, mask in (("all", None), *[(SPLIT_NAMES[i], splits == i) for i in range(3)]):
        sel = slice(None) if mask is None else mask
        target = stats[name]
        n = int(len(splits) if mask is None else mask.sum())
        if n == 0:
            continue
        target["n"] += n
        target["entropy"] += float(rows["_entropy"][sel].sum(dtype=np.float64))
        if not labeled:
            continue
        target["n_labeled"] += n
        target["correct"] += int(rows["_correct"][sel].sum())
        target["nll"] += float(rows["_nll"][sel].sum(dtype=np.float64))
        b = bins[sel]
        target["bin_count"] = (np.asarray(target["bin_count"]) + np.bincount(b, minlength=ECE_BINS)).tolist()
        target["bin_conf"] = (np.asarray(target["bin_conf"]) + np.bincount(b, rows["_conf"][sel], ECE_BINS)).tolist()
        target["bin_acc"] = (np.asarray(target["bin_acc"]) + np.bincount(b, rows["_correct"][sel], ECE_BINS)).tolist()


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sums per-shard metric sums."""
    total = empty_stats()
    for part in parts:
        for name, values in part.items():
            target = total[name]
            for key, value in values.items():
                if isinstance(value, list):
                    target[key] = [a + b for a, b in zip(target[key], value)]
                else:
                    target[key] += value
    return total


def finish_metrics(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Turns metric sums into accuracy, NLL, ECE (15 equal-width bins), mean entropy."""

    def one(values: Mapping[str, Any]) -> dict[str, Any]:
        n, labeled = values["n"], values["n_labeled"]
        out: dict[str, Any] = {"rows": n, "mean_entropy": values["entropy"] / n if n else None}
        if labeled:
            gaps = np.abs(np.asarray(values["bin_acc"]) - np.asarray(values["bin_conf"]))
            out.update(
                accuracy=values["correct"] / labeled,
                nll=values["nll"] / labeled,
                ece=float(gaps.sum() / labeled),
            )
        else:
            out.update(accuracy=None, nll=None, ece=None)
        return out

    overall = one(stats["all"])
    overall["per_split"] = {name: one(stats[name]) for name in SPLIT_NAMES if stats[name]["n"]}
    return overall


# --------------------------------------------------------------------------- verify / inspect


def expected_schema_columns(manifest: Mapping[str, Any]) -> list[str]:
    """The columns every shard of a store with this manifest must have, in order."""
    columns = list(BASE_COLUMNS)
    if manifest["storage"].get("include_inputs", True):
        columns.append("input")
    columns += list(MODE_COLUMNS[manifest["storage"]["mode"]])
    if manifest["storage"].get("feature_layer"):
        columns.append("features")
    return columns


def verify_store(uri: str) -> dict[str, Any]:
    """Re-reads every shard of a store and checks it against its manifest.

    Checks: the manifest opens; every listed shard exists, its sha256 and row count
    match, its columns are the format's, the float columns hold no NaN/inf, ids are
    unique across the store, the total matches ``rows``, and no unlisted shard lies
    in the directory.

    Returns:
        ``{"ok": bool, "problems": [str, ...], "rows": int, "shards": int}``.
    """
    try:
        store = open_store(uri)
    except StillError as exc:
        return {"ok": False, "problems": [str(exc)], "rows": 0, "shards": 0}
    problems: list[str] = []
    expected = expected_schema_columns(store.manifest)
    ids: list[np.ndarray] = []
    total = 0
    listed = {s["name"] for s in store.manifest["shards"]}
    on_disk = {posixpath.basename(p) for p in store.location.fs.glob(posixpath.join(store.location.path, "part-*.parquet"))}
    for extra in sorted(on_disk - listed):
        problems.append(f"{extra}: shard not listed in the manifest")
    for shard in store.manifest["shards"]:
        loc = store.location.join(shard["name"])
        if not loc.exists():
            problems.append(f"{shard['name']}: missing")
            continue
        with loc.fs.open(loc.path, "rb") as handle:
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard["sha256"]:
            problems.append(f"{shard['name']}: checksum mismatch (sha256 {digest[:12]}…, manifest {shard['sha256'][:12]}…)")
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # corrupt bytes raise several Arrow error types
            problems.append(f"{shard['name']}: unreadable Parquet ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if table.num_rows != shard["rows"]:
            problems.append(f"{shard['name']}: {table.num_rows} rows, manifest says {shard['rows']}")
        if table.column_names != expected:
            problems.append(f"{shard['name']}: columns {table.column_names}, expected {expected}")
        for name in ("logits", "topk_logit", "logsumexp", "features"):
            if name not in table.column_names:
                continue
            column = table[name].combine_chunks()
            values = column.flatten() if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) else column
            array = values.to_numpy(zero_copy_only=False).astype(np.float32)
            bad = int((~np.isfinite(array)).sum())
            if bad:
                problems.append(f"{shard['name']}: {bad} NaN/inf values in {name}")
        if "topk_idx" in table.column_names:
            idx = table["topk_idx"].combine_chunks().flatten().to_numpy()
            if idx.size and (idx.min() < 0 or idx.max() >= store.num_classes):
                problems.append(f"{shard['name']}: topk_idx outside [0, {store.num_classes})")
        if "id" in table.column_names:
            ids.append(table["id"].to_numpy(zero_copy_only=False))
        total += table.num_rows
    if total != store.num_rows and not any("unreadable" in p or "missing" in p for p in problems):
        problems.append(f"store has {total} rows, manifest says {store.num_rows}")
    if ids:
        all_ids = np.concatenate(ids)
        uniq, counts = np.unique(all_ids, return_counts=True)
        dup = uniq[counts > 1]
        if len(dup):
            problems.append(f"{len(dup)} duplicate ids (e.g. {dup[:3].tolist()})")
    return {"ok": not problems, "problems": problems, "rows": total, "shards": len(store.manifest["shards"])}


def inspect_store(uri: str) -> dict[str, Any]:
    """Returns a flat summary of a store's manifest (what ``still store inspect`` prints)."""
    store = open_store(uri)
    m = store.manifest
    metrics = m.get("teacher_metrics", {})
    summary: dict[str, Any] = {
        "store": store.uri,
        "key": store.key,
        "format_version": m["format_version"],
        "created": m.get("created"),
        "rows": store.num_rows,
        "shards": len(m["shards"]),
        "mode": store.mode,
        "k": store.k,
        "dtype": m["storage"]["dtype"],
        "num_classes": store.num_classes,
        "task": m.get("task"),
        "input_shape": "x".join(map(str, store.input_shape)),
        "input_scale": store.input_scale,
        "bytes_per_row": m.get("bytes_per_row"),
        "teacher_uri": m["teacher"].get("uri"),
        "teacher_fingerprint": store.teacher_fingerprint,
        "dataset": m["dataset"].get("name"),
        "dataset_fingerprint": m["dataset"].get("fingerprint"),
    }
    for name in ("accuracy", "nll", "ece", "mean_entropy"):
        summary[f"teacher_{name}"] = metrics.get(name)
    for split, values in metrics.get("per_split", {}).items():
        summary[f"rows_{split}"] = values.get("rows")
        summary[f"teacher_accuracy_{split}"] = values.get("accuracy")
    summary["manifest"] = m
    return summary


def cli_store(action: str, uri: str) -> dict[str, Any]:
    """``still store inspect|verify URI``.

    Returns:
        inspect: the manifest summary (raises StillError for a non-store);
        verify: ``{ok, problems, rows, shards}`` plus ``_exit_code: 1`` when not ok.
    """
    if action == "inspect":
        return inspect_store(uri)
    if action == "verify":
        result = verify_store(uri)
        if not result["ok"]:
            import sys

            for problem in result["problems"]:
                print(f"still: problem: {uri}: {problem}", file=sys.stderr)
            result["_exit_code"] = 1
        result["store"] = uri
        return result
    raise StillError(f"unknown store action {action!r}; expected inspect or verify")


def safe_float(value: float | None) -> float | None:
    """Float or None, with NaN turned into None (JSON-safe)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)
