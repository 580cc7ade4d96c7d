"""Tokenizers of language models, loaded offline through :mod:`still.lm_files`."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from still.errors import StillError

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    """A transformers fast tokenizer with what token blocks need to know about it.

    Attributes:
        uri: What it was loaded from (``builtin:smollm2-135m``, a ``.gguf`` file, a directory).
        vocab_size: Number of token ids, added tokens included (``len(tokenizer)``).
        eos_id: The id put between documents: ``<|endoftext|>`` where the vocabulary has it (the
            document separator of GPT-2-style pretraining; SmolLM2-Instruct's ``eos_token`` is
            ``<|im_end|>``, which ends a chat turn, not a document), else ``eos_token``.
        fingerprint: sha256 (hex) of the serialised tokenizer (``backend_tokenizer.to_str()``):
            the same tokenizer gives the same fingerprint wherever and however often it loads.
        serialized: That serialised form (JSON), which :func:`tokenizer_from_json` loads
            with the ``tokenizers`` library alone, in a fraction of a second.
        hf: The transformers tokenizer itself (what exports save beside a model).
    """

    def __init__(self, uri: str, hf_tokenizer: Any) -> None:
        """Wraps a loaded ``PreTrainedTokenizerFast``.

        Raises:
            StillError: It is not a fast tokenizer, or has no end-of-sequence token.
        """
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise StillError(f"tokenizer {uri!r} is not a fast (tokenizers) tokenizer")
        end_of_text = hf_tokenizer.get_vocab().get(END_OF_TEXT)
        if end_of_text is None and hf_tokenizer.eos_token_id is None:
            raise StillError(f"tokenizer {uri!r} has no end-of-sequence token (eos_token), "
                             "which token blocks put between documents")
        self.uri = uri
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = int(end_of_text if end_of_text is not None else hf_tokenizer.eos_token_id)
        self.serialized = backend.to_str()
        self.fingerprint = hashlib.sha256(self.serialized.encode()).hexdigest()
        self.hf = hf_tokenizer
        self._backend = backend

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, with no special tokens added."""
        return encode_batch(self._backend, texts)

    def save(self, directory: str | Path) -> None:
        """Writes the tokenizer's files (``save_pretrained``) into ``directory``."""
        self.hf.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"Tokenizer({self.uri!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


@functools.lru_cache(maxsize=8)
def load_tokenizer(uri: str) -> Tokenizer:
    """Loads a language model's tokenizer, offline, once per process and URI.

    Args:
        uri: ``builtin:<name>``, a ``.gguf`` file or a ``save_pretrained`` directory
            (see :func:`still.lm_files.resolve_lm_files`).

    Raises:
        StillError: The files are missing, or the tokenizer lacks an end-of-sequence token.
    """
    if not uri:
        raise StillError("no tokenizer given: set data.tokenizer to a language model "
                         "(builtin:smollm2-135m, a .gguf file or a save_pretrained directory)")
    from still.lm_models import load_lm_tokenizer

    hf_tokenizer = load_lm_tokenizer(uri)
    return Tokenizer(uri, hf_tokenizer)


@functools.lru_cache(maxsize=2)
def tokenizer_from_json(serialized: str) -> Any:
    """A ``tokenizers.Tokenizer`` from :attr:`Tokenizer.serialized`, built once per process.

    What Ray tasks tokenize with: no transformers import and no file access, and the
    same ids as :meth:`Tokenizer.encode_batch`.
    """
    from tokenizers import Tokenizer as BackendTokenizer

    return BackendTokenizer.from_str(serialized)


def encode_batch(backend: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text from a ``tokenizers.Tokenizer``, with no special tokens added."""
    return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]
