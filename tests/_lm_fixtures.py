"""Real text and a real (tiny) tokenizer for language-model tests.

The text is the World English Bible (Debian's ``sword-text-web``, installed by
``setup.sh``), a few books written as a folder of ``.txt`` files; the tokenizer is a
byte-level BPE of 512 tokens trained on it with ``tokenizers`` and saved as a
``save_pretrained`` directory, so no test depends on downloading anything.
"""

from __future__ import annotations

from pathlib import Path

BOOKS = ("Ruth", "Jonah", "Philemon", "Jude", "Titus", "Obadiah", "Haggai", "3 John", "2 John", "Joel")


def write_text_folder(directory: Path, books: tuple[str, ...] = BOOKS, chars: int = 6000, piece: int = 1000) -> Path:
    """Writes the first ``chars`` characters of each of ``books`` under ``directory``, as documents of
    ``piece`` characters (``<book>-<n>.txt``: enough documents that every split gets some)."""
    from still.text.bible import read_web_bible

    directory.mkdir(parents=True, exist_ok=True)
    wanted = {b.lower() for b in books}
    written = 0
    for book in read_web_bible():
        if book.name.lower() in wanted:
            text = book.text[:chars]
            for n, start in enumerate(range(0, len(text), piece)):
                (directory / f"{book.name.replace(' ', '_')}-{n}.txt").write_text(text[start:start + piece],
                                                                                 encoding="utf-8")
            written += 1
    assert written == len(books), f"found {written} of {len(books)} books"
    return directory


def write_tokenizer(directory: Path, texts: list[str], vocab_size: int = 512) -> Path:
    """Trains a byte-level BPE on ``texts`` and saves it as a transformers tokenizer directory
    (``<|endoftext|>`` is its end-of-text token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return directory
