"""Causal language models loaded offline, what they are, and the checks that pair them.

``load_causal_lm`` loads a teacher or a still-trained student from any form
``still.lm_files`` resolves (``builtin:smollm2-135m``, a ``.gguf`` file, a
``save_pretrained`` directory), never from a hub: every file is checked first and
transformers gets ``local_files_only=True``, so a missing file is a StillError naming
it, not a download. It lives in ``still`` because both sides load these models:
``teacher_infer`` its teachers, ``student_train`` initial weights, the text pipeline
its tokenizer.

Measured here (2 cores, fp32, beside a test run): SmolLM2-135M from its Q4_1 GGUF loads
in 17-22 s (de-quantizing 272 tensors) and its tokenizer in 4-5 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

from still.errors import StillError
from still.llama import SPECIAL_IDS
from still.lm_files import LMFiles, resolve_lm_files

STILL_JSON = "still.json"
"""The file still writes beside an exported language model (``student_train.lm_export``)."""


@dataclasses.dataclass
class CausalLM:
    """A loaded causal language model.

    Attributes:
        model: A transformers ``…ForCausalLM`` in eval mode.
        tokenizer: Its tokenizer, or None when loaded without one.
        files: Where it came from.
        meta: The directory's ``still.json`` for a model still exported (empty otherwise).
        load_s: Seconds to load the model; ``tokenizer_s``: its tokenizer.
    """

    model: Any
    tokenizer: Any
    files: LMFiles
    meta: dict[str, Any]
    load_s: float
    tokenizer_s: float

    @property
    def params(self) -> int:
        """Number of parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def vocab_size(self) -> int:
        """Rows of the output layer: the size of every logit vector."""
        return int(self.model.config.vocab_size)

    @property
    def max_positions(self) -> int:
        """``config.max_position_embeddings``: the longest sequence the model was built for."""
        return int(self.model.config.max_position_embeddings)

    @property
    def form(self) -> str:
        """``builtin``, ``gguf``, ``still`` (a directory still exported) or ``pretrained``."""
        if self.files.uri.startswith("builtin:"):
            return "builtin"
        if self.files.is_gguf:
            return "gguf"
        return "still" if self.meta else "pretrained"

    def summary(self) -> dict[str, Any]:
        """What a report or manifest says about the model (JSON-serialisable)."""
        return {"uri": self.files.uri, "form": self.form, "params": self.params, "vocab_size": self.vocab_size,
                "max_positions": self.max_positions, "load_s": round(self.load_s, 2),
                "tokenizer_load_s": round(self.tokenizer_s, 2)}


def load_causal_lm(uri: str, *, dtype: Any = "float32", device: Any = "cpu", with_tokenizer: bool = True) -> CausalLM:
    """Loads a causal language model (and its tokenizer) from local files only.

    Args:
        uri: ``builtin:smollm2-135m``, a ``.gguf`` file, or a ``save_pretrained``
            directory (still's exported students are such directories).
        dtype: The weights' dtype (``torch.float32``, ``"bfloat16"``…); GGUF weights are
            de-quantized to it.
        device: Where the model goes (``"cpu"``, ``"cuda:0"``…).
        with_tokenizer: Load (and require) the tokenizer too.

    Raises:
        StillError: A missing file (named), an unknown builtin, or files transformers
            cannot load (the first line of its error).
    """
    files = resolve_lm_files(uri, need_tokenizer=with_tokenizer)
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    with _load_errors(uri, "model"):
        model = AutoModelForCausalLM.from_pretrained(str(files.directory), dtype=dtype, **files.load_kwargs())
    model.to(device).eval()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    tokenizer = _load_tokenizer(files) if with_tokenizer else None
    return CausalLM(model, tokenizer, files, _still_meta(files), load_s, time.perf_counter() - started)


def load_lm_tokenizer(uri: str) -> Any:
    """Loads only the tokenizer of a language model (any form :func:`load_causal_lm` takes).

    Raises:
        StillError: As :func:`load_causal_lm`, for the tokenizer's files.
    """
    return _load_tokenizer(resolve_lm_files(uri, need_weights=False))


def _load_tokenizer(files: LMFiles) -> Any:
    from transformers import AutoTokenizer

    with _load_errors(files.uri, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(files.directory), **files.load_kwargs())


@contextlib.contextmanager
def _load_errors(uri: str, what: str) -> Iterator[None]:
    """transformers' errors for files it cannot use (OSError, ValueError) as one-line StillErrors."""
    try:
        yield
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise StillError(f"language model {uri!r}: cannot load its {what} ({first})") from None


def _still_meta(files: LMFiles) -> dict[str, Any]:
    path = files.directory / STILL_JSON
    if files.is_gguf or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise StillError(f"language model {files.uri!r}: {STILL_JSON} is not JSON") from None


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """``pad_token_id``, ``bos_token_id``, ``eos_token_id`` of a tokenizer (None where it has none).

    These go into a student's config (``still.llama``) so that generation and padding
    use the teacher's tokens.
    """
    return {name: getattr(tokenizer, name, None) for name in SPECIAL_IDS}


def check_seq_len(model_config: Any, seq_len: int, what: str = "teacher") -> None:
    """Refuses blocks longer than a model's positions, before any work starts.

    Args:
        model_config: The model's transformers config (``max_position_embeddings``).
        seq_len: ``data.seq_len``: tokens per block.
        what: How the error names the model (``teacher``, ``student``).

    Raises:
        StillError: ``seq_len`` exceeds ``max_position_embeddings``.
    """
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise StillError(f"data.seq_len={seq_len} exceeds the {what}'s max_position_embeddings={limit}: "
                         f"use data.seq_len <= {limit}")


def check_vocab(student_vocab: int, tokenizer_vocab: int, teacher_vocab: int | None = None) -> None:
    """Checks that a student's vocabulary fits its tokenizer and matches its teacher's logits.

    Args:
        student_vocab: The student's ``config.vocab_size`` (rows of its embedding).
        tokenizer_vocab: ``len(tokenizer)``: every id it makes, added tokens included.
        teacher_vocab: The teacher's ``config.vocab_size`` (its logits' width), if any.

    Raises:
        StillError: The tokenizer makes ids beyond the student's embedding, or the
            student's logits and the teacher's differ in size; both sizes are named.
    """
    if tokenizer_vocab > student_vocab:
        raise StillError(f"the tokenizer has {tokenizer_vocab} tokens but the student's vocabulary is "
                         f"{student_vocab}: build the student with vocab_size={teacher_vocab or tokenizer_vocab}")
    if teacher_vocab is not None and student_vocab != teacher_vocab:
        raise StillError(f"the student's vocabulary ({student_vocab}) differs from the teacher's ({teacher_vocab}): "
                         "distillation compares logits over the same token ids; build the student with "
                         f"vocab_size={teacher_vocab}")
