"""Token blocks: a text source tokenized once and packed into fixed-length training sequences.

Layout, under ``$STILL_CACHE_DIR/blocks/<key>/`` (``key``: :func:`blocks_key`)::

    train.parquet  val.parquet  test.parquet   # one file per split, row groups of <= 4,096 blocks
    manifest.json                              # written last; its presence marks a complete build

Columns: ``id`` int64 (:func:`block_id`), ``input_ids`` fixed_size_list<uint16, seq_len>
(uint32 when the vocabulary exceeds 65,536), ``split`` int8 (0 train, 1 val, 2 test).

Packing, per split: the split's documents in source order, each one's tokens followed by
the tokenizer's end-of-sequence id, concatenated and cut into blocks of exactly
``seq_len`` tokens; the split's final partial block is dropped and counted
(``tokens_dropped``). Tokens never cross from one split into another.

Tokenization runs as Ray Data CPU tasks (one CPU each, the tokenizer loaded once per
worker process) and its results are put back in document order before packing, so the
blocks are the same however the tasks were scheduled. A build goes into a temporary
folder that is renamed into place when complete; a cache hit (the folder with its
manifest exists) reads neither tokenizer nor Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from still.config import DataConfig, RayConfig
from still.datasets.cache import cache_root
from still.datasets.splits import SPLIT_CODES
from still.errors import StillError
from still.lm_files import resolve_lm_files
from still.text.sources import Corpus, read_corpus
from still.text.tokenizer import Tokenizer, encode_batch, load_tokenizer, tokenizer_from_json

FORMAT_VERSION = 2
"""Bumped whenever the packing rule or the file layout changes (it is part of the key)."""
ROW_GROUP_BLOCKS = 4096
MANIFEST = "manifest.json"
SPLITS = tuple(SPLIT_CODES)  # ("train", "val", "test")
_DOCUMENTS_PER_BLOCK = 4  # documents per Ray Data block handed to one tokenizing task


@dataclasses.dataclass(frozen=True)
class TokenBlocks:
    """A complete build of token blocks on local disk.

    Attributes:
        path: The build's folder.
        files: Its Parquet files, sorted absolute paths.
        key: The cache key (the folder's name).
        seq_len: Tokens per block.
        vocab_size: The tokenizer's number of ids.
        eos_id: The id put after every document.
        token_dtype: ``"uint16"`` or ``"uint32"`` (``input_ids`` values).
        tokenizer_uri: The tokenizer as given.
        tokenizer_fingerprint: sha256 of the serialised tokenizer.
        rows: Blocks per split, ``{"train": n, "val": n, "test": n}``.
        manifest: ``manifest.json`` as a dict.
        cache_hit: True when it was found built rather than built now.
    """

    path: Path
    files: tuple[str, ...]
    key: str
    seq_len: int
    vocab_size: int
    eos_id: int
    token_dtype: str
    tokenizer_uri: str
    tokenizer_fingerprint: str
    rows: dict[str, int]
    manifest: dict[str, Any]
    cache_hit: bool


def token_blocks(data_cfg: DataConfig, tokenizer_uri: str | None = None,
                 ray_cfg: RayConfig | None = None) -> TokenBlocks:
    """Returns the token blocks of ``data.source``, building and caching them when needed.

    Args:
        data_cfg: The text source (``source``, ``text_column``, ``id_column``, the split
            settings) and ``seq_len``.
        tokenizer_uri: A language model URI (:func:`still.text.tokenizer.load_tokenizer`);
            None: ``data.tokenizer``.
        ray_cfg: The Ray cluster to tokenize on (:func:`still.ray_setup.init_ray`, no
            dashboard); an already connected process keeps its cluster.

    Raises:
        StillError: A bad source (:func:`still.text.sources.read_documents`) or tokenizer.
    """
    uri = data_cfg.tokenizer if tokenizer_uri is None else tokenizer_uri
    if not uri:
        raise StillError("no tokenizer given: set data.tokenizer (builtin:smollm2-135m, a .gguf file "
                         "or a save_pretrained directory)")
    corpus = read_corpus(data_cfg)
    root = cache_root() / "blocks"
    fingerprint = _known_fingerprint(root, uri)
    if fingerprint:
        directory = root / blocks_key(corpus.fingerprint, fingerprint, data_cfg.seq_len)
        if (directory / MANIFEST).is_file():
            # A build keeps the URI that made it, which may be gone since; the tokenizer with its
            # fingerprint is the one given here.
            return dataclasses.replace(open_blocks(directory), tokenizer_uri=uri)
    tokenizer = load_tokenizer(uri)
    _remember_fingerprint(root, uri, tokenizer.fingerprint)
    key = blocks_key(corpus.fingerprint, tokenizer.fingerprint, data_cfg.seq_len)
    if (root / key / MANIFEST).is_file():
        return dataclasses.replace(open_blocks(root / key), tokenizer_uri=uri)
    tokens = tokenize_documents([doc.text for doc in corpus.documents], tokenizer, ray_cfg)
    _write_build(root / key, _build(corpus, tokens, tokenizer, data_cfg.seq_len, key))
    return dataclasses.replace(open_blocks(root / key), cache_hit=False)


def blocks_key(source_fingerprint: str, tokenizer_fingerprint: str, seq_len: int) -> str:
    """The cache key: sha256 of (format version, source, tokenizer, seq_len), 16 hex digits."""
    text = f"still-token-blocks\n{FORMAT_VERSION}\n{source_fingerprint}\n{tokenizer_fingerprint}\n{seq_len}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def block_id(tokenizer_fingerprint: str, split: int, tokens: np.ndarray, occurrence: int) -> int:
    """A block's id: the first 8 bytes of a sha256, read as a little-endian int64.

    The hash covers the tokenizer fingerprint (hex, as ASCII), the split code (one byte),
    the block's tokens (uint32 little-endian, whatever the stored dtype) and the block's
    occurrence index among identical blocks of its split so far (uint64 little-endian;
    0 for the first), so ids are unique within a build and the same in every build of
    the same data.
    """
    digest = hashlib.sha256(tokenizer_fingerprint.encode())
    digest.update(bytes([split]))
    digest.update(np.ascontiguousarray(tokens, dtype="<u4").tobytes())
    digest.update(occurrence.to_bytes(8, "little"))
    return int.from_bytes(digest.digest()[:8], "little", signed=True)


def open_blocks(path: str | Path) -> TokenBlocks:
    """Opens a complete build (a folder with ``manifest.json``).

    Raises:
        StillError: The folder holds no complete build.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise StillError(f"{path} holds no token blocks (no {MANIFEST}: missing or an unfinished build)")
    manifest = json.loads((path / MANIFEST).read_text())
    tokenizer = manifest["tokenizer"]
    return TokenBlocks(
        path=path, files=tuple(str(path / name) for name in sorted(manifest["files"])), key=manifest["key"],
        seq_len=manifest["seq_len"], vocab_size=tokenizer["vocab_size"], eos_id=tokenizer["eos_id"],
        token_dtype=manifest["token_dtype"], tokenizer_uri=tokenizer["uri"],
        tokenizer_fingerprint=tokenizer["fingerprint"],
        rows={split: manifest["splits"][split]["blocks"] for split in SPLITS}, manifest=manifest, cache_hit=True,
    )


def block_arrays(blocks: TokenBlocks, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split's blocks into memory, in build order.

    Returns:
        ``(ids, tokens)``: int64 ids ``(n,)`` and tokens ``(n, seq_len)`` of ``token_dtype``.

    Raises:
        StillError: ``split`` is not train, val or test.
    """
    if split not in SPLITS:
        raise StillError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    table = pq.read_table(blocks.path / f"{split}.parquet")
    ids = table["id"].to_numpy()
    flat = table["input_ids"].combine_chunks().flatten().to_numpy()
    return ids, flat.astype(blocks.token_dtype, copy=False).reshape(len(ids), blocks.seq_len)


def tokenize_documents(texts: list[str], tokenizer: Tokenizer, ray_cfg: RayConfig | None = None) -> list[np.ndarray]:
    """Token ids of every text (no special tokens), in the order given, tokenized by Ray Data tasks.

    Each task takes a few documents; the tokenizer travels as its serialised JSON and is
    built once per worker process (:func:`still.text.tokenizer.tokenizer_from_json`), so
    workers import neither transformers nor the model's files. The results are sorted
    back into input order.
    """
    import ray.data

    from still.ray_setup import init_ray

    init_ray(ray_cfg, dashboard=False)
    items = [{"index": index, "text": text} for index, text in enumerate(texts)]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // _DOCUMENTS_PER_BLOCK)))
    tokenized = dataset.map_batches(
        tokenize_batch, fn_kwargs={"tokenizer_json": tokenizer.serialized}, batch_format="pyarrow", batch_size=None,
        num_cpus=1,
    )
    table = pa.concat_tables(ray.get(tokenized.to_arrow_refs()))
    if table.num_rows != len(texts):
        raise RuntimeError(f"Ray Data returned {table.num_rows} tokenized documents of {len(texts)}")
    order = np.argsort(table["index"].to_numpy(), kind="stable")
    tokens = table["input_ids"].combine_chunks().take(pa.array(order))
    values = tokens.flatten().to_numpy().astype(np.uint32, copy=False)
    return np.split(values, np.cumsum(tokens.value_lengths().to_numpy())[:-1])


def tokenize_batch(batch: pa.Table, tokenizer_json: str) -> pa.Table:
    """Ray Data batch function: ``{index, text}`` rows to ``{index, input_ids}`` (list<uint32>)."""
    ids = encode_batch(tokenizer_from_json(tokenizer_json), batch["text"].to_pylist())
    return pa.table({"index": batch["index"], "input_ids": pa.array(ids, type=pa.list_(pa.uint32()))})


def _build(corpus: Corpus, tokens: list[np.ndarray], tokenizer: Tokenizer, seq_len: int,
           key: str) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Packs every split: the tables to write and the manifest."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    value_type = pa.uint16() if dtype == np.uint16 else pa.uint32()
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)
    tables, splits = {}, {}
    for name, code in SPLIT_CODES.items():
        members = [i for i, doc in enumerate(corpus.documents) if doc.split == code]
        stream = np.concatenate([part for i in members for part in (tokens[i], eos)] or [eos[:0]])
        count = len(stream) // seq_len
        blocks = stream[:count * seq_len].reshape(count, seq_len)
        seen: dict[bytes, int] = {}
        ids = np.empty(count, dtype=np.int64)
        for row, block in enumerate(blocks):
            raw = block.tobytes()
            ids[row] = block_id(tokenizer.fingerprint, code, block, seen.get(raw, 0))
            seen[raw] = seen.get(raw, 0) + 1
        values = pa.array(blocks.astype(dtype).reshape(-1), type=value_type)
        tables[name] = pa.table({
            "id": pa.array(ids, type=pa.int64()),
            "input_ids": pa.FixedSizeListArray.from_arrays(values, seq_len),
            "split": pa.array(np.full(count, code, dtype=np.int8), type=pa.int8()),
        })
        splits[name] = {
            "documents": len(members), "document_tokens": len(stream), "blocks": count,
            "tokens": count * seq_len, "tokens_dropped": int(len(stream) - count * seq_len),
        }
        if corpus.source == "builtin:web-bible":
            splits[name]["books"] = [corpus.documents[i].id for i in members]
    manifest = {
        "format_version": FORMAT_VERSION, "key": key, "source": corpus.source,
        "source_fingerprint": corpus.fingerprint, "seq_len": seq_len, "token_dtype": np.dtype(dtype).name,
        "tokenizer": {"uri": tokenizer.uri, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "splits": splits, "documents": len(corpus.documents), "empty_documents_skipped": corpus.empty_skipped,
        "tokens_dropped": sum(s["tokens_dropped"] for s in splits.values()),
        "files": [f"{name}.parquet" for name in SPLITS], "row_group_blocks": ROW_GROUP_BLOCKS,
        "block_id": "first 8 bytes (little-endian int64) of sha256(tokenizer fingerprint hex, split byte, "
                    "block tokens as uint32 LE, occurrence index among identical blocks of the split as uint64 LE)",
    }
    return tables, manifest


def _write_build(directory: Path, build: tuple[dict[str, pa.Table], dict[str, Any]]) -> None:
    """Writes the split files, then the manifest, into a temporary sibling renamed into place.

    When another process finished the same build first, its copy is kept.
    """
    tables, manifest = build
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet", row_group_size=ROW_GROUP_BLOCKS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        tmp.chmod(0o755)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fingerprint_memo(root: Path, uri: str) -> Path:
    """Where the fingerprint of the tokenizer files ``uri`` names now is remembered.

    The memo's name hashes each file's path, size and modification time (of the GGUF
    file, or of every file of the directory), so changed files miss it.
    """
    files = resolve_lm_files(uri, need_weights=False)
    paths = [files.directory / files.gguf_file] if files.is_gguf else sorted(files.directory.iterdir())
    identity = hashlib.sha256()
    for path in paths:
        if path.is_file():
            stat = path.stat()
            identity.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return root / "tokenizers" / f"{identity.hexdigest()[:32]}.json"


def _known_fingerprint(root: Path, uri: str) -> str:
    """The remembered fingerprint of the tokenizer ``uri`` names, or "" when there is none."""
    memo = _fingerprint_memo(root, uri)
    return json.loads(memo.read_text())["fingerprint"] if memo.is_file() else ""


def _remember_fingerprint(root: Path, uri: str, fingerprint: str) -> None:
    memo = _fingerprint_memo(root, uri)
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"uri": uri, "fingerprint": fingerprint}))
    os.replace(tmp, memo)
