"""``still infer`` with a language-model teacher: one pass over token blocks → a per-token store.

    still infer data.source=builtin:web-bible teacher.uri=builtin:smollm2-135m store.mode=topk

Reads top to bottom: the token blocks of ``data.source``, made with the teacher's own
tokenizer (``data.tokenizer`` may name it, and must be the same) → the storage settings
checked against the vocabulary → the cache key (teacher, blocks, storage, which blocks)
→ the existing store if complete → a deterministic shard plan (``infer.shard_rows``
blocks a shard, in block-cache order, the first ``infer.max_blocks`` training and
``infer.max_eval_blocks`` held-out blocks) and the shards a killed run already wrote → the missing shards on Ray, in a pool
of teacher actors (one per GPU with ``infer.num_gpus``, else one using the cluster's
CPUs), each shard written atomically, exactly once → manifest, last → MLflow run.

In an actor (:class:`Capturer`) a shard's blocks go through the teacher in batches of
about ``infer.batch_size`` tokens; the decoder's hidden states are turned into logits
``infer.chunk_positions`` positions at a time, and each chunk is compressed on the
teacher's device (``teacher_infer.lm_store.token_columns``), so no ``(batch, seq, vocab)``
array ever exists. A block with a non-finite logit at any position is left out of the
store and named in the manifest; the rest of its shard is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from typing import Any

import numpy as np

from still.config import to_dict
from still.errors import StillError
from still.storage import Location, resolve
from teacher_infer import lm_store
from teacher_infer.config import InferConfig
from teacher_infer.soft_labels import SoftLabelSpec

DEFAULT_EXPERIMENT = "still-infer"
DEFAULT_K = 32
DEFAULT_SAMPLES = 24
SHARD_BLOCKS = 64
CHUNK_POSITIONS = 256
FIDELITY_POSITIONS = 32  # positions per shard compared with the teacher's full distribution


def is_lm_teacher(uri: str) -> bool:
    """True when ``teacher.uri`` names a language model (``still.lm_files.is_lm_uri``)."""
    from still.lm_files import is_lm_uri

    return is_lm_uri(uri)


def lm_storage_spec(config: InferConfig, vocab_size: int) -> SoftLabelSpec:
    """The storage settings of an LM store, checked against the vocabulary.

    Raises:
        StillError: ``store.k`` or ``store.samples`` out of range (named), a dense store.
    """
    store = config.store
    if store.mode not in lm_store.STORED_COLUMNS:
        raise StillError(f"store.mode={store.mode}: a language-model store is topk or sampled (a dense store "
                         f"would hold {vocab_size} values per token)")
    k = store.k or DEFAULT_K
    if store.mode == "topk" and k > vocab_size:
        raise StillError(f"store.k={k} is larger than the vocabulary of {vocab_size} tokens")
    samples = store.samples or DEFAULT_SAMPLES
    return SoftLabelSpec.create(store.mode, vocab_size, dtype=store.dtype, k=k, samples=samples,
                                sample_temperature=store.sample_temperature, temperatures=store.temperatures)


def run_lm_infer(config: InferConfig) -> dict[str, Any]:
    """Runs ``still infer`` for a language-model teacher and returns its summary.

    Returns:
        ``store``, ``key``, ``rows`` (blocks), ``tokens``, ``cache_hit``, ``bytes_per_token``,
        ``bytes_per_row``, ``teacher_val_ce``, ``teacher_accuracy`` (top-1 next token,
        val), ``fidelity``, ``tokens_per_s``, ``skipped_blocks``, ``seconds``, ``run_id``.

    Raises:
        StillError: A bad text source, tokenizer, teacher or storage setting; checked
            before anything is written.
    """
    started = time.perf_counter()
    from still.text.packing import token_blocks
    from still.text.tokenizer import load_tokenizer
    from teacher_infer.lm_teacher import lm_fingerprint

    teacher_uri = config.teacher.uri
    if config.data.tokenizer:
        ours, theirs = load_tokenizer(config.data.tokenizer), load_tokenizer(teacher_uri)
        if ours.fingerprint != theirs.fingerprint:
            raise StillError(f"data.tokenizer={config.data.tokenizer!r} is not the tokenizer of teacher.uri="
                             f"{teacher_uri!r}: a teacher reads only its own token ids (leave data.tokenizer unset)")
    blocks = token_blocks(config.data, teacher_uri, config.ray)
    spec = lm_storage_spec(config, blocks.vocab_size)
    fingerprint = lm_fingerprint(teacher_uri)
    splits = tuple(config.infer.splits)
    key_doc = {"format": lm_store.FORMAT, "teacher": fingerprint, "blocks": blocks.key,
               "storage": spec.manifest_fields(), "splits": list(splits), "max_blocks": config.infer.max_blocks,
               "max_eval_blocks": config.infer.max_eval_blocks, "precision": _precision(config)}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:16]
    store_dir = resolve(config.store.root).join(key)
    if lm_store.read_manifest(store_dir.uri) is not None:
        return _cache_hit(config, store_dir, key, started)
    limits = {"train": config.infer.max_blocks, "val": config.infer.max_eval_blocks,
              "test": config.infer.max_eval_blocks}
    plan = shard_plan(blocks, splits, limits, config.infer.shard_rows or SHARD_BLOCKS)
    if not plan:
        raise StillError(f"data.source={config.data.source!r} has no blocks in the splits {list(splits)}")
    done = _records(store_dir, plan)
    todo = [s for s in plan if s["index"] not in done]
    print(f"still infer: store {store_dir.uri}: {len(plan)} shards of <= {config.infer.shard_rows or SHARD_BLOCKS} "
          f"blocks of {blocks.seq_len} tokens ({', '.join(splits)}), {len(done)} already complete, {len(todo)} to "
          f"write ({spec.mode}, k={spec.k or spec.samples}, labels-only)", file=sys.stderr, flush=True)

    from still.tracking import open_run

    with open_run(config, config.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=f"infer-{key}",
                  tags={"cache_hit": "false", "store_key": key, "teacher_fingerprint": fingerprint,
                        "store_uri": store_dir.uri, "kind": "language-model"}) as tracker:
        capture_started = time.perf_counter()
        results = _capture(config, blocks, spec, store_dir, key, todo) if todo else []
        capture_s = time.perf_counter() - capture_started
        manifest = _manifest(config, blocks, spec, fingerprint, key, key_doc, plan, done, results, capture_s,
                             store_dir)
        store_dir.join(lm_store.MANIFEST_NAME).write_atomic(json.dumps(manifest, indent=1).encode())
        summary = _summary(manifest, store_dir, key, cache_hit=False, started=started)
        summary["run_id"] = tracker.run_id
        tracker.log_metrics(_flat_metrics(manifest))
        tracker.log_dict(manifest, "store_manifest.json")
        tracker.log_dict(to_dict(config), "config.json")
    return summary


def shard_plan(blocks: Any, splits: tuple[str, ...], limits: dict[str, int], shard_blocks: int
               ) -> list[dict[str, Any]]:
    """The shards of a capture: consecutive blocks of one split's cache file, in file order.

    Args:
        blocks: The token blocks (``still.text.packing.TokenBlocks``).
        splits: The splits captured.
        limits: At most this many blocks of each split (the first ones); 0: all.
        shard_blocks: Blocks per shard.
    """
    plan = []
    for split in splits:
        rows = min(limits[split], blocks.rows[split]) if limits[split] else blocks.rows[split]
        for start in range(0, rows, shard_blocks):
            index = len(plan)
            plan.append({"index": index, "name": f"part-{index:05d}.parquet", "split": split,
                         "file": str(blocks.path / f"{split}.parquet"), "start": start,
                         "rows": min(shard_blocks, rows - start)})
    return plan


def _precision(config: InferConfig) -> str:
    precision = config.infer.precision
    if precision == "auto":
        return "bf16" if config.infer.num_gpus > 0 else "fp32"
    return precision


def _capture(config: InferConfig, blocks: Any, spec: SoftLabelSpec, store_dir: Location, key: str,
             todo: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs the missing shards in a pool of teacher actors; returns each shard's record."""
    import ray
    from ray.util import ActorPool

    from still.ray_setup import init_ray

    init_ray(config.ray, dashboard=False)
    run = config.infer
    if run.num_gpus > 0:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        actors = max(1, min(len(todo), int(gpus // run.num_gpus) if gpus else 1))
        if run.max_actors:
            actors = min(actors, run.max_actors)
        options = {"num_gpus": run.num_gpus, "num_cpus": 1}
        threads = run.torch_threads or 1
    else:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        actors, options, threads = 1, {"num_cpus": cpus}, run.torch_threads or cpus
    store_dir.fs.makedirs(store_dir.path, exist_ok=True)
    # the GGUF loader's progress bars would print from every actor
    remote = ray.remote(**options, runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})(Capturer)
    settings = {"teacher_uri": config.teacher.uri, "spec": spec, "precision": _precision(config),
                "use_gpu": run.num_gpus > 0,
                "batch_tokens": run.batch_size, "chunk_positions": CHUNK_POSITIONS, "threads": threads,
                "seed": int(key, 16), "store_uri": store_dir.uri, "vocab_size": blocks.vocab_size}
    pool = ActorPool([remote.remote(**settings) for _ in range(actors)])
    results = []
    for record in pool.map_unordered(lambda actor, shard: actor.shard.remote(shard), todo):
        results.append(record)
        print(f"still infer: shard {record['index'] + 1}/{len(todo)} written: {record['rows']} blocks, "
              f"{record['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    return results


class Capturer:
    """A teacher on its device that captures shards (a Ray actor; loads the teacher once).

    Args:
        teacher_uri: The language model.
        spec: The storage settings.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast on GPUs; logits are float32 either way).
        use_gpu: Run on this actor's GPU.
        batch_tokens: Tokens per forward pass (whole blocks; at least one).
        chunk_positions: Positions turned into logits and compressed at once.
        threads: torch intra-op threads.
        seed: Seeds a sampled store's draws (with the shard's index).
        store_uri: Where the shards go.
        vocab_size: The tokenizer's vocabulary (the teacher must cover it).
    """

    def __init__(self, teacher_uri: str, spec: SoftLabelSpec, precision: str, use_gpu: bool, batch_tokens: int,
                 chunk_positions: int, threads: int, seed: int, store_uri: str, vocab_size: int) -> None:
        import torch

        from still.allocator import reuse_large_allocations
        from still.lm_models import load_causal_lm

        reuse_large_allocations()  # the forward's (batch, seq, hidden) arrays: see still.allocator
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.lm = load_causal_lm(teacher_uri, device=self.device, with_tokenizer=False)
        teacher_vocab = self.lm.vocab_size
        if teacher_vocab < vocab_size:
            raise StillError(f"teacher {teacher_uri!r} outputs {teacher_vocab} logits, fewer than its tokenizer's "
                             f"{vocab_size} ids")
        self.spec = SoftLabelSpec.create(spec.mode, teacher_vocab, dtype=spec.dtype, k=spec.k, samples=spec.samples,
                                         sample_temperature=spec.sample_temperature, temperatures=spec.temperatures)
        self.precision, self.batch_tokens, self.chunk = precision, batch_tokens, chunk_positions
        self.seed, self.store = seed, resolve(store_uri)
        self.scratch = lm_store.Scratch()

    def shard(self, shard: dict[str, Any]) -> dict[str, Any]:
        """Captures one shard, writes it, then its record (:func:`record_location`); returns the record."""
        import torch

        from teacher_infer import fidelity

        started = time.perf_counter()
        ids, tokens = read_blocks(shard)
        seq_len = tokens.shape[1]
        positions = seq_len - 1
        generator = torch.Generator(device=self.device).manual_seed((self.seed + shard["index"]) % 2**63)
        per_forward = max(1, self.batch_tokens // seq_len)
        parts: list[dict[str, np.ndarray]] = []
        finite, nll, correct = [], [], []
        stats = fidelity.empty_stats()
        measure_every = max(1, (len(ids) * positions) // FIDELITY_POSITIONS)
        for start in range(0, len(ids), per_forward):
            batch = torch.from_numpy(tokens[start:start + per_forward].astype(np.int64)).to(self.device)
            hidden = self._hidden(batch)[:, :-1].reshape(-1, hidden_size(self.lm.model))
            targets = batch[:, 1:].reshape(-1)
            for lo in range(0, len(hidden), self.chunk):
                logits = self._logits(hidden[lo:lo + self.chunk])
                packed = lm_store.token_columns(logits, self.spec, generator, self.scratch)
                target = targets[lo:lo + len(logits)]
                # NaN or +inf anywhere in a position's logits makes its log-normaliser non-finite
                ok = torch.isfinite(packed.logsumexp).cpu().numpy()
                nll.append((packed.logsumexp - logits.gather(1, target[:, None])[:, 0]).double().cpu().numpy())
                correct.append((packed.argmax == target).cpu().numpy())
                finite.append(ok)
                index = start * positions + lo + np.arange(len(ok))
                sample = np.flatnonzero((index % measure_every == 0) & ok)
                if len(sample):
                    fidelity.accumulate_stats(stats, fidelity.measure_rows(
                        logits[torch.from_numpy(sample).to(logits.device)].cpu().numpy(),
                        lm_store.classifier_columns({k: v[sample] for k, v in packed.columns.items()}, self.spec),
                        self.spec))
                parts.append(packed.columns)
        good = np.concatenate(finite).reshape(len(ids), positions).all(axis=1)
        columns = {k: np.concatenate([p[k] for p in parts]).reshape(len(ids), positions, -1)[good]
                   for k in parts[0]}
        nll_blocks = np.concatenate(nll).reshape(len(ids), positions)[good]
        correct_blocks = np.concatenate(correct).reshape(len(ids), positions)[good]
        skipped = [{"id": int(ids[row]), "position": int(np.flatnonzero(~np.concatenate(finite).reshape(
            len(ids), positions)[row])[0])} for row in np.flatnonzero(~good)]
        split_code = {"train": 0, "val": 1, "test": 2}[shard["split"]]
        table = lm_store.block_table(ids[good], np.full(int(good.sum()), split_code), columns, self.spec, positions)
        nbytes = lm_store.write_shard(table, self.store.join(shard["name"]))
        seconds = time.perf_counter() - started
        record = {"index": shard["index"], "name": shard["name"], "split": shard["split"], "rows": int(good.sum()),
                  "bytes": nbytes, "skipped": skipped, "nll_sum": float(nll_blocks.sum()),
                  "correct": int(correct_blocks.sum()), "tokens": int(nll_blocks.size), "fidelity": stats,
                  "seconds": seconds, "tokens_per_s": len(ids) * seq_len / seconds,
                  "vocab_size": self.spec.num_classes}
        record_location(self.store, shard).write_atomic(json.dumps(record).encode())
        return record

    def _hidden(self, batch: Any) -> Any:
        import torch

        with torch.inference_mode(), _autocast(self.device, self.precision):
            return decoder(self.lm.model)(input_ids=batch).last_hidden_state

    def _logits(self, hidden: Any) -> Any:
        import torch

        head = self.lm.model.get_output_embeddings()
        with torch.inference_mode():
            if hidden.dtype == torch.float32 and head.weight.dtype == torch.float32 and head.bias is None:
                # into a reused buffer: a fresh (chunk, vocab) array a chunk costs page faults
                logits = torch.matmul(hidden, head.weight.t(), out=self.scratch.get(
                    "logits", len(hidden), head.weight.shape[0], hidden.device))
            else:
                with _autocast(self.device, self.precision):
                    logits = head(hidden).float()
        cap = getattr(self.lm.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


def record_location(store_dir: Location, shard: dict[str, Any]) -> Location:
    """Where a written shard's record goes: written after the shard, so its presence marks the shard complete."""
    return store_dir.join("records", shard["name"].replace(".parquet", ".json"))


def read_blocks(shard: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """A shard's blocks from the block cache: ids ``(n,)`` and tokens ``(n, seq_len)``.

    Raises:
        StillError: The cache file cannot be read (named).
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(shard["file"], columns=["id", "input_ids"]).slice(shard["start"], shard["rows"])
    except Exception as exc:
        raise StillError(f"token blocks {shard['file']} cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
                         ) from None
    ids = table["id"].to_numpy()
    return ids, table["input_ids"].combine_chunks().flatten().to_numpy().reshape(len(ids), -1)


def decoder(model: Any) -> Any:
    """The transformer body of a ``…ForCausalLM`` (its hidden states, before the output layer)."""
    return model.get_decoder()


def hidden_size(model: Any) -> int:
    """Width of a causal LM's hidden states."""
    return int(model.get_output_embeddings().weight.shape[1])


def _autocast(device: Any, precision: str) -> Any:
    import contextlib

    import torch

    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _manifest(config: InferConfig, blocks: Any, spec: SoftLabelSpec, fingerprint: str, key: str,
              key_doc: dict[str, Any], plan: list[dict[str, Any]], done: dict[int, dict[str, Any]],
              results: list[dict[str, Any]], capture_s: float, store_dir: Location) -> dict[str, Any]:
    """The store's manifest: what it holds, how, from what, and how faithful it is."""
    from teacher_infer import fidelity

    records = _records(store_dir, plan)
    missing = [s["name"] for s in plan if s["index"] not in records]
    if missing:
        raise StillError(f"store {store_dir.uri}: shards {missing[:3]} have no record; rerun still infer")
    ordered = [records[s["index"]] for s in plan]
    vocab = ordered[0]["vocab_size"]
    positions = blocks.seq_len - 1
    rows = sum(r["rows"] for r in ordered)
    nbytes = sum(r["bytes"] for r in ordered)
    per_split: dict[str, dict[str, float]] = {}
    for split in config.infer.splits:
        part = [r for r in ordered if r["split"] == split]
        tokens = sum(r["tokens"] for r in part)
        if tokens:
            ce = sum(r["nll_sum"] for r in part) / tokens
            per_split[split] = {"ce": ce, "ppl": math.exp(ce), "accuracy": sum(r["correct"] for r in part) / tokens,
                                "tokens": tokens, "blocks": sum(r["rows"] for r in part)}
    stats = fidelity.merge_stats([r["fidelity"] for r in ordered])
    written = results
    tokens_written = sum(r["tokens_per_s"] * r["seconds"] for r in written)
    return {
        "format": lm_store.FORMAT, "key": key, "key_doc": key_doc, "task": "causal_lm",
        "teacher": {"uri": config.teacher.uri, "fingerprint": fingerprint},
        "tokenizer": {"uri": blocks.tokenizer_uri, "fingerprint": blocks.tokenizer_fingerprint,
                      "vocab_size": blocks.vocab_size, "eos_id": blocks.eos_id},
        "blocks": {"key": blocks.key, "path": str(blocks.path), "source": config.data.source,
                   "corpus_fingerprint": blocks.manifest.get("corpus", {}).get("fingerprint"),
                   "splits": {s: blocks.rows[s] for s in blocks.rows}},
        "seq_len": blocks.seq_len, "positions": positions, "position_convention": lm_store.POSITIONS,
        "vocab_size": vocab, "storage": spec.manifest_fields(),
        "rows": rows, "split_rows": {s: sum(r["rows"] for r in ordered if r["split"] == s) for s in config.infer.splits},
        "shards": [{"name": r["name"], "rows": r["rows"], "bytes": r["bytes"], "split": r["split"]} for r in ordered],
        "bytes": nbytes, "bytes_per_token": nbytes / max(1, rows * positions),
        "bytes_per_row": nbytes / max(1, rows),
        "teacher_metrics": per_split,
        "fidelity": fidelity.summarize(stats),
        "fidelity_positions": stats["n"],
        "skipped_blocks": [s for r in ordered for s in r["skipped"]],
        "capture_s": capture_s, "tokens_per_s": tokens_written / capture_s if capture_s > 0 and written else None,
        "shards_written": len(written), "shards_resumed": len(done),
        "precision": key_doc["precision"],
    }


def _records(store_dir: Location, plan: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The records of the plan's shards that are complete (this run's and a killed run's alike)."""
    out = {}
    for shard in plan:
        location = record_location(store_dir, shard)
        if location.exists() and store_dir.join(shard["name"]).exists():
            out[shard["index"]] = location.read_json()
    return out


def _summary(manifest: dict[str, Any], store_dir: Location, key: str, *, cache_hit: bool,
             started: float) -> dict[str, Any]:
    val = manifest["teacher_metrics"].get("val") or manifest["teacher_metrics"].get("train") or {}
    return {
        "store": store_dir.uri, "key": key, "rows": manifest["rows"],
        "tokens": manifest["rows"] * manifest["seq_len"], "cache_hit": cache_hit,
        "bytes_per_token": round(manifest["bytes_per_token"], 2), "bytes_per_row": round(manifest["bytes_per_row"], 1),
        "teacher_val_ce": val.get("ce"), "teacher_val_ppl": val.get("ppl"), "teacher_accuracy": val.get("accuracy"),
        "fidelity": manifest["fidelity"], "tokens_per_s": manifest["tokens_per_s"],
        "skipped_blocks": len(manifest["skipped_blocks"]), "shards_written": manifest["shards_written"],
        "shards_resumed": manifest["shards_resumed"], "seconds": round(time.perf_counter() - started, 3),
    }


def _cache_hit(config: InferConfig, store_dir: Location, key: str, started: float) -> dict[str, Any]:
    from still.tracking import open_run

    manifest = lm_store.open_lm_store(store_dir.uri).manifest
    summary = _summary(manifest, store_dir, key, cache_hit=True, started=started)
    summary.update(shards_written=0, shards_resumed=0)
    with open_run(config, config.tracking, default_experiment=DEFAULT_EXPERIMENT, run_name=f"infer-{key}",
                  tags={"cache_hit": "true", "store_key": key, "store_uri": store_dir.uri,
                        "kind": "language-model"}) as tracker:
        tracker.log_metrics({"rows": manifest["rows"], "bytes_per_token": manifest["bytes_per_token"]})
        summary["run_id"] = tracker.run_id
    return summary


def _flat_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    from teacher_infer.infer import fidelity_metrics

    out = {"rows": manifest["rows"], "bytes_per_token": manifest["bytes_per_token"],
           "capture_s": manifest["capture_s"], "skipped_blocks": len(manifest["skipped_blocks"])}
    if manifest["tokens_per_s"]:
        out["tokens_per_s"] = manifest["tokens_per_s"]
    for split, values in manifest["teacher_metrics"].items():
        out.update({f"teacher_{name}_{split}": value for name, value in values.items()})
    out.update(fidelity_metrics(manifest["fidelity"]))
    return out
