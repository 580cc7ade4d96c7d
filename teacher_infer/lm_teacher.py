"""A language-model teacher: loaded offline, with the fingerprint that enters store keys.

``teacher.uri`` names a language model as ``builtin:smollm2-135m``, a ``.gguf`` file or a
``save_pretrained`` directory (still's own exported students included); see
``still.lm_models.load_causal_lm``.

The fingerprint follows the classifier teachers' rule (``teacher_infer.teachers``):
sha256 over what the model is, so retraining changes it and copying or renaming does
not. Here it is over files rather than tensors, which needs no 25-s load: a GGUF file's
bytes (its name left out), or a directory's ``config.json`` (parsed, without the
``transformers_version`` that a re-save changes) and its weight files, each by its name
in the directory. Files are hashed once per (path, size, mtime) in a process
(``still.file_digest``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from still.errors import StillError
from still.file_digest import file_sha256
from still.lm_files import resolve_lm_files
from still.lm_models import CausalLM, load_causal_lm

_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")


@dataclasses.dataclass
class LMTeacher:
    """A loaded language-model teacher.

    Attributes:
        lm: The model, its tokenizer and where they came from.
        fingerprint: sha256 hex of its files (:func:`lm_fingerprint`).
    """

    lm: CausalLM
    fingerprint: str

    def summary(self) -> dict[str, Any]:
        """The teacher as a manifest or report records it: URI, form, fingerprint, sizes, load times."""
        return {**self.lm.summary(), "fingerprint": self.fingerprint}


def load_lm_teacher(uri: str, *, dtype: Any = "float32", device: Any = "cpu") -> LMTeacher:
    """Loads a language-model teacher with its tokenizer, offline, and fingerprints it.

    Args:
        uri: ``builtin:smollm2-135m``, a ``.gguf`` file or a ``save_pretrained`` directory.
        dtype: The weights' dtype in memory.
        device: Where the model goes.

    Raises:
        StillError: A missing file (named) or files that do not load.
    """
    return LMTeacher(load_causal_lm(uri, dtype=dtype, device=device), lm_fingerprint(uri))


def lm_fingerprint(uri: str) -> str:
    """sha256 hex of a language model's identity files (see the module docstring).

    Raises:
        StillError: A missing file (named), or a ``config.json`` that is not JSON.
    """
    files = resolve_lm_files(uri, need_tokenizer=False)
    digest = hashlib.sha256(b"causal-lm/v1\n")
    for name, path in files.identity_files():
        if name == "config.json":
            try:
                config = json.loads(path.read_text())
            except ValueError:
                raise StillError(f"language model {uri!r}: config.json is not JSON") from None
            content = json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS},
                                 sort_keys=True).encode()
            part = hashlib.sha256(content).hexdigest()
        else:
            part = file_sha256(path)
        digest.update(f"\0{name}\0{part}\0".encode())
    return digest.hexdigest()
