"""Text for language models: documents from a source, token blocks in Parquet
(docs/internals.md, "Text and token blocks").

Typical use::

    blocks = token_blocks(DataConfig(source="builtin:web-bible", tokenizer="builtin:smollm2-135m"))
    ids, tokens = block_arrays(blocks, "val")                  # (n,), (n, seq_len)
"""

from __future__ import annotations

from still.text.bible import WEB_BIBLE_SPLITS, Book, read_web_bible
from still.text.packing import TokenBlocks, block_arrays, open_blocks, token_blocks
from still.text.sources import Corpus, Document, read_corpus, read_documents
from still.text.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "WEB_BIBLE_SPLITS",
    "Book",
    "Corpus",
    "Document",
    "TokenBlocks",
    "Tokenizer",
    "block_arrays",
    "load_tokenizer",
    "open_blocks",
    "read_corpus",
    "read_documents",
    "read_web_bible",
    "token_blocks",
]
