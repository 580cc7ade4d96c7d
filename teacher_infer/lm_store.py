"""Per-token soft-label stores of a language-model teacher: layout, compression, opening.

A store lives in ``<store.root>/<key>/``: shards ``part-NNNNN.parquet`` and
``manifest.json``, written last (its presence marks a complete store). It is labels-only:
one Parquet row per block of the token-block cache (``still.text.packing``), holding the
block's ``id``, its ``split`` and the teacher's outputs at each of its ``P = seq_len − 1``
positions, flattened position-major into fixed-size list columns (position t predicts
token t + 1 of the block; the last token predicts nothing inside the block). Training
joins the tokens back from the block cache by id and refuses a cache whose tokenizer,
corpus or ``seq_len`` differ from the store's (``teacher_infer.lm_infer``).

Columns per block (``k``: ``store.k``; ``S``: ``store.samples``; ``G``: the temperature grid)::

    topk     topk_idx      P·k  uint16 (uint32 beyond 65,536 ids)  the k likeliest tokens, by decreasing p
             topk_logit    P·k  float16 | float32                   their log-probabilities at T = 1
             tail_lognorm  P·G  float32   log Σ_{j ∉ top-k} p_j^(1/T_g): the tail's exact weight at each T_g
    sampled  sample_idx    P·S  uint16 | uint32   the distinct tokens of S draws from softmax(t/T_s),
                                                  ascending, padded with 0
             sample_count  P·S  uint8 (int16 beyond 255 draws)    draws of each (0: padding)
             sample_logit  P·S  float16 | float32   their log-probabilities at T = 1
             lognorm       P·G  float32   log Σ_j p_j^(1/T_g) (0 at T = 1)

These are the classifier columns of ``teacher_infer.soft_labels`` per position, with the
values already log-probabilities: the classifier's ``logsumexp`` column is then 0 and is
not stored, and ``teacher_infer.targets.prepare`` reads the rest unchanged. All of it
is computed from the teacher's float32 logits on its own device (:func:`token_columns`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from still.errors import StillError
from still.storage import Location, resolve
from teacher_infer.encodings import column_encodings
from teacher_infer.soft_labels import SoftLabelSpec

FORMAT = "still-lm-store/1"
MANIFEST_NAME = "manifest.json"
POSITIONS = "position t of a block predicts token t + 1; seq_len - 1 positions per block"
STORED_COLUMNS = {"topk": ("topk_idx", "topk_logit", "tail_lognorm"),
                  "sampled": ("sample_idx", "sample_count", "sample_logit", "lognorm")}


def token_dtype(vocab_size: int) -> np.dtype:
    """The id type of a vocabulary: uint16 when it fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def count_dtype(samples: int) -> np.dtype:
    """The draw-count type: uint8 up to 255 draws, else int16."""
    return np.dtype(np.uint8 if samples <= 255 else np.int16)


def width(spec: SoftLabelSpec) -> int:
    """Values per position of the list columns: k, or S for sampled stores."""
    return spec.k if spec.mode == "topk" else spec.samples


@dataclasses.dataclass
class Compressed:
    """A chunk of positions compressed (:func:`token_columns`).

    Attributes:
        columns: The stored columns, numpy, one row per position.
        logsumexp: The logits' log-normaliser per position (on the logits' device).
        argmax: The teacher's likeliest token per position (on the logits' device).
    """

    columns: dict[str, np.ndarray]
    logsumexp: torch.Tensor
    argmax: torch.Tensor


class Scratch:
    """Reusable ``(P, V)`` float32 buffers: a fresh 50-MB tensor per operation costs more in page
    faults than the operation itself, so the passes over a chunk's logits write into these."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, device: torch.device) -> torch.Tensor:
        """A float32 ``(rows, cols)`` buffer on ``device`` (its contents are garbage)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != cols or buffer.device != device:
            buffer = self._buffers[name] = torch.empty((max(rows, 1), cols), dtype=torch.float32, device=device)
        return buffer[:rows]


def token_columns(logits: torch.Tensor, spec: SoftLabelSpec, generator: torch.Generator | None = None,
                  scratch: Scratch | None = None) -> Compressed:
    """A chunk of positions' float32 logits ``(P, V)`` → the stored columns, per position (module docstring).

    Computed where the logits are (the teacher's device); only the ``(P, k)``/``(P, S)``
    results come to the host. No log-softmax of the chunk is made: the top-k are taken
    on the logits and shifted by the log-normaliser, and each grid temperature's weight
    is summed relative to the largest logit it covers, so every term is at most 1 and the
    largest is exactly 1 (no cancellation, however confident the teacher).

    Args:
        logits: Finite logits of P positions (the caller drops non-finite positions first).
        spec: The storage settings (``num_classes`` = V).
        generator: Draws the samples of a ``sampled`` store (on the logits' device).
        scratch: Buffers reused across chunks (callers keep chunks to a few hundred positions).
    """
    scratch = scratch or Scratch()
    z = logits.float()
    ids = token_dtype(spec.num_classes)
    if spec.mode == "topk":
        k = spec.k
        top_z, idx = torch.topk(z, min(k + 1, z.shape[1]), dim=1)
        peak = top_z[:, :1]
        if top_z.shape[1] > k:
            tail_peak = top_z[:, k:k + 1]  # the largest logit outside the top-k
            grid = len(spec.temperatures)
            tail_sums = _log_sums(z, tail_peak, [1.0 / t for t in spec.temperatures] + [1.0], scratch,
                                  exclude=idx[:, :k])
            # the log-normaliser from the top-k and the tail's sum at β = 1: no pass over the vocabulary of its own
            lse = peak + torch.logsumexp(torch.cat([top_z[:, :k] - peak, tail_peak - peak + tail_sums[:, grid:]], 1),
                                         dim=1, keepdim=True)
            tail_lognorm = tail_sums[:, :grid] + (tail_peak - lse) * _betas(spec, z)
        else:  # k = V: nothing outside the top-k
            lse = peak + _log_sums(z, peak, [1.0], scratch)[:, :1]
            tail_lognorm = torch.full((len(z), len(spec.temperatures)), -torch.inf, device=z.device)
        columns = {"topk_idx": idx[:, :k].cpu().numpy().astype(ids),
                   "topk_logit": (top_z[:, :k] - lse).cpu().numpy().astype(spec.dtype),
                   "tail_lognorm": tail_lognorm.cpu().numpy().astype(np.float32)}
        return Compressed(columns, lse[:, 0], idx[:, 0])
    if spec.mode != "sampled":
        raise StillError(f"store.mode={spec.mode} is not a language-model store mode (topk or sampled)")
    peak, argmax = z.max(dim=1, keepdim=True)
    lse = peak + _log_sums(z, peak, [1.0], scratch)[:, :1]
    weights = torch.sub(z, peak, out=scratch.get("weights", *z.shape, z.device)).mul_(1.0 / spec.sample_temperature).exp_()
    drawn = torch.multinomial(weights, spec.samples, replacement=True, generator=generator)
    drawn = torch.sort(drawn, dim=1).values
    new = torch.ones_like(drawn, dtype=torch.bool)
    new[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = torch.cumsum(new, dim=1) - 1  # each draw's slot: the rank of its token among the row's distinct ones
    rows = torch.arange(len(drawn), device=drawn.device)[:, None].expand_as(drawn)
    idx = torch.zeros_like(drawn)
    idx[rows[new], slot[new]] = drawn[new]
    count = torch.zeros_like(drawn).index_put_((rows.reshape(-1), slot.reshape(-1)),
                                               torch.ones_like(drawn).reshape(-1), accumulate=True)
    values = torch.where(count > 0, z.gather(1, idx) - lse, torch.zeros((), device=z.device))
    lognorm = _log_sums(z, peak, [1.0 / t for t in spec.temperatures], scratch) + (peak - lse) * _betas(spec, z)
    columns = {"sample_idx": idx.cpu().numpy().astype(ids),
               "sample_count": count.cpu().numpy().astype(count_dtype(spec.samples)),
               "sample_logit": values.cpu().numpy().astype(spec.dtype),
               "lognorm": lognorm.cpu().numpy().astype(np.float32)}
    return Compressed(columns, lse[:, 0], argmax[:, 0])


def _betas(spec: SoftLabelSpec, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([1.0 / t for t in spec.temperatures], dtype=torch.float32, device=like.device)


def _log_sums(z: torch.Tensor, shift: torch.Tensor, betas: list[float], scratch: Scratch,
              exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``log Σ_j exp(β·(z_j − shift))`` per row for each β (columns in ``betas``' order), over the
    ids not in ``exclude``. ``shift`` is the largest logit summed, so each sum is ≥ 1.

    Where a β is twice the previous one (the default grid 1, 2, 4, 8), its terms are the
    previous terms squared in place: one exp for the whole grid (relative error ≤ 8 ulp).
    """
    shifted = torch.sub(z, shift, out=scratch.get("shifted", *z.shape, z.device))
    if exclude is not None:
        shifted.scatter_(1, exclude, -torch.inf)
    terms = scratch.get("terms", *z.shape, z.device)
    sums: dict[float, torch.Tensor] = {}
    previous = None
    for beta in sorted(set(betas)):
        if previous is not None and beta == 2 * previous:
            terms.mul_(terms)
        else:
            torch.mul(shifted, beta, out=terms).exp_()
        sums[beta] = terms.sum(dim=1)
        previous = beta
    return torch.log(torch.stack([sums[b] for b in betas], dim=1))


def classifier_columns(columns: dict[str, np.ndarray], spec: SoftLabelSpec) -> dict[str, np.ndarray]:
    """Per-position columns ``(n, …)`` as ``teacher_infer.soft_labels.compress`` would give them for
    the same rows (``logsumexp`` = 0: the values are log-probabilities), for ``targets.prepare``."""
    out = {name: np.asarray(values) for name, values in columns.items()}
    rows = len(next(iter(out.values())))
    out["logsumexp"] = np.zeros(rows, dtype=np.float32)
    return out


def schema(spec: SoftLabelSpec, positions: int) -> pa.Schema:
    """The Arrow schema of a store's shards."""
    ids = pa.from_numpy_dtype(token_dtype(spec.num_classes))
    value = pa.float16() if spec.dtype == "float16" else pa.float32()
    per, grid = positions * width(spec), positions * len(spec.temperatures)
    fields = [pa.field("id", pa.int64()), pa.field("split", pa.int8())]
    if spec.mode == "topk":
        fields += [pa.field("topk_idx", pa.list_(ids, per)), pa.field("topk_logit", pa.list_(value, per)),
                   pa.field("tail_lognorm", pa.list_(pa.float32(), grid))]
    else:
        count = pa.from_numpy_dtype(count_dtype(spec.samples))
        fields += [pa.field("sample_idx", pa.list_(ids, per)), pa.field("sample_count", pa.list_(count, per)),
                   pa.field("sample_logit", pa.list_(value, per)), pa.field("lognorm", pa.list_(pa.float32(), grid))]
    return pa.schema(fields)


def block_table(ids: np.ndarray, split: np.ndarray, columns: dict[str, np.ndarray], spec: SoftLabelSpec,
                positions: int) -> pa.Table:
    """Blocks' stored columns ``(n·P, …)`` (position-major per block) as one Parquet row per block."""
    target = schema(spec, positions)
    arrays = [pa.array(np.asarray(ids, dtype=np.int64)), pa.array(np.asarray(split, dtype=np.int8))]
    for field in list(target)[2:]:
        flat = np.ascontiguousarray(columns[field.name]).reshape(-1)
        arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat, type=field.type.value_type),
                                                        field.type.list_size))
    return pa.Table.from_arrays(arrays, schema=target)


def write_shard(table: pa.Table, location: Location) -> int:
    """Writes a shard atomically (a temporary name, then renamed); returns its bytes.

    zstd with byte-stream-split float columns: the fp16 log-probabilities of neighbouring
    positions share their high bytes, which then compress.
    """
    partial = location.path + ".partial"
    with location.fs.open(partial, "wb") as handle:
        pq.write_table(table, handle, compression="zstd", row_group_size=64, **column_encodings(table.schema),
                       write_statistics=["id", "split"])
    location.fs.mv(partial, location.path)
    return int(location.fs.size(location.path))


@dataclasses.dataclass(frozen=True)
class LMStore:
    """An opened, complete language-model store.

    Attributes:
        uri: The store folder.
        manifest: ``manifest.json``.
    """

    uri: str
    manifest: dict[str, Any]

    @property
    def location(self) -> Location:
        """Where the store is."""
        return resolve(self.uri)

    @property
    def soft_labels(self) -> SoftLabelSpec:
        """How the teacher outputs are stored (``num_classes`` is the vocabulary)."""
        return SoftLabelSpec.from_manifest(self.manifest["storage"], self.manifest["vocab_size"], "multiclass")

    @property
    def max_support(self) -> int:
        """Values per position of the list columns."""
        return width(self.soft_labels)

    @property
    def seq_len(self) -> int:
        """Tokens per block."""
        return int(self.manifest["seq_len"])

    @property
    def positions(self) -> int:
        """Positions per block with a teacher output: ``seq_len − 1``."""
        return int(self.manifest["positions"])

    @property
    def num_rows(self) -> int:
        """Blocks stored."""
        return int(self.manifest["rows"])

    @property
    def shard_paths(self) -> list[Location]:
        """The shards, in order."""
        return [self.location.join(s["name"]) for s in self.manifest["shards"]]

    @property
    def stored_columns(self) -> tuple[str, ...]:
        """The teacher-output columns of the store's mode."""
        return STORED_COLUMNS[self.soft_labels.mode]


def is_lm_manifest(manifest: dict[str, Any]) -> bool:
    """True for a language-model store's manifest."""
    return manifest.get("format") == FORMAT


def read_manifest(uri: str) -> dict[str, Any] | None:
    """A store folder's manifest, or None when it has none (missing or incomplete)."""
    location = resolve(uri).join(MANIFEST_NAME)
    if not location.exists():
        return None
    with location.fs.open(location.path, "rb") as handle:
        return json.loads(handle.read())


def open_lm_store(uri: str) -> LMStore:
    """Opens a complete language-model store and checks its shards are there, at their recorded sizes.

    Raises:
        StillError: No manifest (missing or incomplete), not a language-model store, or
            a shard missing or resized (named).
    """
    manifest = read_manifest(uri)
    if manifest is None:
        raise StillError(f"store {uri!r} has no {MANIFEST_NAME}: it does not exist or its still infer did not finish")
    if not is_lm_manifest(manifest):
        raise StillError(f"store {uri!r} is a classifier store, not a language-model store (format "
                         f"{manifest.get('format_version', manifest.get('format'))!r})")
    store = LMStore(uri=resolve(uri).uri, manifest=manifest)
    for shard, location in zip(manifest["shards"], store.shard_paths):
        if not location.exists():
            raise StillError(f"store {uri!r}: shard {shard['name']} is missing")
        if int(location.fs.size(location.path)) != int(shard["bytes"]):
            raise StillError(f"store {uri!r}: shard {shard['name']} has {location.fs.size(location.path)} bytes, "
                             f"the manifest says {shard['bytes']} (changed since it was written)")
    return store


def inspect_lm_store(uri: str) -> dict[str, Any]:
    """A flat summary of a language-model store's manifest, with its fidelity and the manifest itself."""
    store = open_lm_store(uri)
    m = store.manifest
    spec = store.soft_labels
    summary: dict[str, Any] = {
        "store": store.uri, "key": m["key"], "format": m["format"], "task": "causal_lm", "mode": spec.mode,
        "k": spec.k if spec.mode == "topk" else None, "samples": spec.samples if spec.mode == "sampled" else None,
        "temperatures": list(spec.temperatures), "dtype": spec.dtype,
        "rows": store.num_rows, "split_rows": m["split_rows"], "seq_len": store.seq_len,
        "positions": store.positions, "position_convention": m["position_convention"],
        "vocab_size": m["vocab_size"], "bytes_per_token": m["bytes_per_token"], "bytes": m["bytes"],
        "teacher_uri": m["teacher"]["uri"], "teacher_fingerprint": m["teacher"]["fingerprint"],
        "tokenizer_uri": m["tokenizer"]["uri"], "tokenizer_fingerprint": m["tokenizer"]["fingerprint"],
        "blocks_key": m["blocks"]["key"], "text_source": m["blocks"]["source"], "precision": m["precision"],
        "skipped_blocks": m["skipped_blocks"], "tokens_per_s": m["tokens_per_s"],
    }
    for split, values in m["teacher_metrics"].items():
        summary.update({f"teacher_{name}_{split}": value for name, value in values.items()})
    summary["fidelity"] = m["fidelity"]
    summary["fidelity_positions"] = m["fidelity_positions"]
    summary["manifest"] = m
    return summary


def verify_lm_store(uri: str) -> dict[str, Any]:
    """Reads every shard of a language-model store against its manifest: schema, rows, unique
    block ids, ids within the vocabulary, finite values, draws adding up to ``store.samples``.

    Returns:
        ``{"ok", "problems", "rows", "shards"}``.
    """
    problems: list[str] = []
    try:
        store = open_lm_store(uri)
    except StillError as exc:
        return {"ok": False, "problems": [str(exc)], "rows": 0, "shards": 0}
    spec, positions = store.soft_labels, store.positions
    expected = schema(spec, positions)
    ids, rows = [], 0
    for shard, location in zip(store.manifest["shards"], store.shard_paths):
        with location.fs.open(location.path, "rb") as handle:
            table = pq.read_table(handle)
        name = shard["name"]
        if not table.schema.equals(expected):
            problems.append(f"{name}: schema differs from the store's ({table.schema.names})")
            continue
        if table.num_rows != shard["rows"]:
            problems.append(f"{name}: {table.num_rows} blocks, the manifest says {shard['rows']}")
        rows += table.num_rows
        ids.append(table["id"].to_numpy())
        for column in STORED_COLUMNS[spec.mode]:
            values = table[column].combine_chunks().flatten().to_numpy()
            if column.endswith("_idx") and values.size and values.max() >= spec.num_classes:
                problems.append(f"{name}: {column} holds ids beyond the vocabulary of {spec.num_classes}")
            if column.endswith("_logit") and not np.isfinite(values.astype(np.float32)).all():
                problems.append(f"{name}: {column} holds non-finite values")
        if spec.mode == "sampled":
            counts = table["sample_count"].combine_chunks().flatten().to_numpy().reshape(-1, spec.samples)
            if not (counts.sum(axis=1) == spec.samples).all():
                problems.append(f"{name}: sample_count rows do not add up to store.samples={spec.samples}")
    every = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(np.unique(every)) != len(every):
        problems.append(f"{len(every) - len(np.unique(every))} block ids occur more than once")
    if rows != store.num_rows:
        problems.append(f"{rows} blocks in the shards, the manifest says {store.num_rows}")
    return {"ok": not problems, "problems": problems, "rows": rows, "shards": len(store.manifest["shards"])}
