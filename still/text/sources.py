"""Text sources: every one becomes a list of documents (id, text, split).

``data.source`` names one of:

- ``builtin:web-bible``: the World English Bible, one document per book (id = the book's
  name), split by :data:`still.text.bible.WEB_BIBLE_SPLITS`;
- a local folder of ``.txt`` files (searched recursively): one document per file, id =
  its path relative to the folder with ``/`` separators;
- a local Parquet or JSONL (``.jsonl``/``.ndjson``) file, or a folder of them: one document
  per row of ``data.text_column``; id = ``data.id_column`` when the data has it (as a
  string), else ``<file>:<row>`` (file relative to the folder, row from 0).

Splits, except for the Bible's fixed books: a ``data.split_column`` the data has
(train/val/validation/test) is used, its train rows less ``data.val_fraction`` held out
for val; otherwise the id's hash decides (``still.datasets.assign_splits``, seeded by
``data.split_seed``), so a document keeps its split when others are added or removed.

Documents whose text is empty or only whitespace (or null) are skipped and counted.
Text must be UTF-8: a ``.txt`` file or binary cell that is not is refused with an error
naming the file (or row id) and the first bad byte's offset, rather than guessed at or
patched with replacement characters, which would train on bytes nobody wrote. A UTF-8
byte-order mark at the start of a ``.txt`` file is dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from still.config import DataConfig
from still.datasets.splits import SPLIT_CODES, assign_splits
from still.errors import StillError
from still.text.bible import WEB_BIBLE_SPLITS, read_web_bible

TEXT_BUILTINS = ("web-bible",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a text source.

    Attributes:
        id: Unique within the source.
        text: Its text (never empty).
        split: 0 train, 1 val, 2 test (``still.datasets.SPLIT_CODES``).
    """

    id: str
    text: str
    split: int


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A text source read into memory.

    Attributes:
        source: ``data.source`` as given.
        documents: Non-empty documents in source order.
        empty_skipped: Documents left out because their text was empty or whitespace.
        fingerprint: sha256 (hex) over every document's split, id and text, in order.
    """

    source: str
    documents: tuple[Document, ...]
    empty_skipped: int
    fingerprint: str


def read_documents(data_cfg: DataConfig) -> list[Document]:
    """Reads ``data.source``'s non-empty documents in source order (see the module docstring).

    Raises:
        StillError: The source is missing or unreadable, lacks the text column, holds
            non-text or non-UTF-8 data, or has no non-empty document.
    """
    return list(read_corpus(data_cfg).documents)


def read_corpus(data_cfg: DataConfig) -> Corpus:
    """Reads ``data.source`` as :func:`read_documents` does, with counts and a fingerprint.

    Raises:
        StillError: As :func:`read_documents`.
    """
    source = data_cfg.source
    if source.startswith("builtin:"):
        ids, texts, splits = _builtin(source.removeprefix("builtin:"))
    else:
        ids, texts, splits = _local(data_cfg)
    keep = [i for i, text in enumerate(texts) if text is not None and text.strip()]
    if not keep:
        raise StillError(f"text source {source!r}: all {len(texts)} documents are empty")
    documents = tuple(Document(ids[i], texts[i], int(splits[i])) for i in keep)
    return Corpus(source, documents, len(texts) - len(keep), documents_fingerprint(documents))


def documents_fingerprint(documents: tuple[Document, ...] | list[Document]) -> str:
    """sha256 (hex) over each document's split byte and length-prefixed UTF-8 id and text."""
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(bytes([doc.split]))
        for part in (doc.id.encode(), doc.text.encode()):
            digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


def _builtin(name: str) -> tuple[list[str], list[str], list[int]]:
    if name not in TEXT_BUILTINS:
        raise StillError(f"unknown builtin text source 'builtin:{name}'; choose from "
                         f"{', '.join('builtin:' + n for n in TEXT_BUILTINS)}")
    books = read_web_bible()
    split_of = {book: SPLIT_CODES[split] for split, names in WEB_BIBLE_SPLITS.items() for book in names}
    return ([b.name for b in books], [b.text for b in books], [split_of.get(b.name, 0) for b in books])


def _local(data_cfg: DataConfig) -> tuple[list[str], list[str], np.ndarray]:
    source = data_cfg.source
    path = Path(source.removeprefix("file://")).expanduser()
    if "://" in source and not source.startswith("file://"):
        raise StillError(f"text source {source!r}: only local paths are supported for text")
    if not path.exists():
        raise StillError(f"text source {source!r} does not exist")
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    txt = [f for f in files if f.is_file() and f.suffix == ".txt"]
    tables = [f for f in files if f.is_file() and (f.suffix == ".parquet" or f.suffix in JSONL_SUFFIXES)]
    if path.is_dir() and txt and not tables:
        ids = [f.relative_to(path).as_posix() for f in txt]
        texts = [_read_utf8(f) for f in txt]
        return ids, texts, assign_splits(np.array(ids), None, _split_rule(data_cfg))
    if not tables:
        raise StillError(f"text source {source!r} holds no .txt, .parquet or .jsonl files")
    root = path if path.is_dir() else path.parent
    ids, texts, named_splits = [], [], []
    for file in tables:
        table = _read_table(file)
        file_ids, file_texts = _table_documents(table, file, file.relative_to(root).as_posix(), data_cfg)
        ids += file_ids
        texts += file_texts
        split = data_cfg.split_column
        named_splits += (table[split].to_pylist() if split and split in table.column_names
                         else [None] * table.num_rows)
    if len(set(ids)) != len(ids):
        raise StillError(f"text source {source!r}: column {data_cfg.id_column!r} holds duplicate ids")
    has_names = any(name is not None for name in named_splits)
    names = np.array([name or "train" for name in named_splits]) if has_names else None
    return ids, texts, assign_splits(np.array(ids), names, _split_rule(data_cfg))


def _split_rule(data_cfg: DataConfig) -> dict:
    return {"seed": data_cfg.split_seed, "val_fraction": data_cfg.val_fraction,
            "test_fraction": data_cfg.test_fraction}


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise StillError(f"text file {file} is not UTF-8: invalid byte 0x{data[error.start]:02x} "
                         f"at byte offset {error.start}") from None


def _read_table(file: Path) -> pa.Table:
    try:
        if file.suffix == ".parquet":
            return pq.read_table(file)
        return pajson.read_json(file)
    except (pa.ArrowException, OSError) as error:
        raise StillError(f"text source file {file}: cannot read it: {error}") from None


def _table_documents(table: pa.Table, file: Path, name: str,
                     data_cfg: DataConfig) -> tuple[list[str], list[str | None]]:
    """(ids, texts) of one file's rows (``name``: the file in ids); texts may be None or empty."""
    column = data_cfg.text_column
    if not column:
        raise StillError(f"text source file {file}: data.text_column is required for Parquet and JSONL "
                         f"sources; its columns are {', '.join(table.column_names)}")
    if column not in table.column_names:
        raise StillError(f"text source file {file} has no column {column!r} (data.text_column); "
                         f"its columns are {', '.join(table.column_names)}")
    kind = table.schema.field(column).type
    id_column = data_cfg.id_column
    if id_column and id_column in table.column_names:
        ids = [str(value) for value in table[id_column].to_pylist()]
    else:
        ids = [f"{name}:{row}" for row in range(table.num_rows)]
    values = table[column].to_pylist()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return ids, values
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return ids, [None if value is None else _decode_cell(value, doc_id, file)
                     for value, doc_id in zip(values, ids)]
    raise StillError(f"text source file {file}: column {column!r} (data.text_column) holds {kind}, "
                     "not text (string or UTF-8 binary)")


def _decode_cell(value: bytes, doc_id: str, file: Path) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise StillError(f"text source file {file}: row {doc_id!r} is not UTF-8: invalid byte "
                         f"0x{value[error.start]:02x} at byte offset {error.start}") from None
