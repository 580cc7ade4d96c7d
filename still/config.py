"""Typed, frozen configuration: YAML files plus dotted ``key=value`` overrides.

Every verb has a root config dataclass made of section dataclasses (``data``,
``store``, ``kd``, ...). :func:`load_config` reads a YAML file, applies overrides
such as ``kd.temperature=4`` and builds the dataclasses, converting values to the
declared field types. An unknown or misspelled key is an error that lists the valid
keys; ``__post_init__`` methods check values and name the offending key.

The sections shared by several verbs (data, tracking, ray) live here; each stage
package defines its own sections next to the code that reads them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from still.errors import StillError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How encoded images (PNG/JPEG bytes, image folders) become model inputs.

    Decoding, resizing and cropping run in CPU tasks and give uint8 ``(channels, H, W)``
    rows; scaling to [0, 1] and ``mean``/``std`` run on the teacher's device. Every key
    enters the store's cache key.
    """

    mode: str = "auto"
    """Pillow mode the images are converted to: ``L`` (1 channel), ``RGB`` (3); ``auto``:
    the first image's (``L`` for grey images, else ``RGB``)."""
    resize: int = 0
    """Resize so the shorter side has this many pixels (bilinear); 0: keep the size."""
    crop: int = 0
    """Centre crop to ``crop`` × ``crop`` after resizing; 0: no crop. Images whose final
    sizes differ are an error that asks for ``resize``/``crop``."""
    mean: tuple[float, ...] = ()
    """Per-channel mean subtracted from the [0, 1] pixels (e.g. ImageNet's 0.485, 0.456,
    0.406); empty: none."""
    std: tuple[float, ...] = ()
    """Per-channel standard deviation the pixels are divided by; empty: none."""

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "L", "RGB"):
            raise StillError(f"data.image.mode must be auto, L or RGB, got {self.mode!r}")
        if self.resize < 0 or self.crop < 0:
            raise StillError(f"data.image.resize and data.image.crop must be >= 0, got {self.resize}, {self.crop}")
        if len(self.mean) != len(self.std):
            raise StillError(f"data.image.mean and data.image.std need one value per channel each, got "
                             f"{len(self.mean)} and {len(self.std)}")
        if any(v <= 0 for v in self.std):
            raise StillError(f"data.image.std values must be > 0, got {list(self.std)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are split."""

    source: str = "builtin:digits"
    """A Parquet dataset URI (local path, file://, s3://, gs://, memory://), a directory
    of IDX files, or ``builtin:mnist`` / ``builtin:fashion-mnist`` / ``builtin:digits``."""
    id_column: str = "id"
    """Unique id per example; generated deterministically (row order) when absent."""
    feature_column: str = "features"
    """Input column: a fixed-size list or tensor column of numbers, or encoded images
    (a binary column of PNG/JPEG bytes, or a struct with a ``bytes`` field)."""
    label_column: str = "label"
    """Integer class label column."""
    split_column: str = "split"
    """Optional column naming each row's split (train/val/test); absent: split by id hash."""
    val_fraction: float = 0.1
    """Share of the training rows held out for validation (by a hash of the id)."""
    test_fraction: float = 0.1
    """Share held out for test when the data has no split column of its own."""
    split_seed: int = 0
    """Seed of the id hash that assigns splits; recorded in the store manifest."""
    image: ImageConfig = dataclasses.field(default_factory=ImageConfig)
    """Decoding and preprocessing of image sources (ignored for numeric features)."""
    text_column: str = ""
    """Text sources (language models): the string column of a Parquet or JSONL source that
    holds each document; empty for ``builtin:web-bible`` and folders of ``.txt`` files."""
    tokenizer: str = ""
    """Text sources: the tokenizer that cuts documents into token blocks, as a language
    model URI (``builtin:smollm2-135m``, a ``.gguf`` file, a ``save_pretrained`` directory)."""
    seq_len: int = 256
    """Text sources: tokens per block (one training sequence); at least 2."""

    def __post_init__(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise StillError(f"data.{key} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise StillError(
                "data.val_fraction + data.test_fraction must be < 1, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if self.seq_len < 2:
            raise StillError(f"data.seq_len must be >= 2, got {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    experiment: str = ""
    """MLflow experiment name; empty: $MLFLOW_EXPERIMENT_NAME, else the verb's default."""
    uri: str = ""
    """Tracking URI; empty: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    enabled: bool = True
    """Set false to run without MLflow (tests of other things, quick experiments)."""


@dataclasses.dataclass(frozen=True)
class RayConfig:
    """Which Ray cluster to run on."""

    address: str = ""
    """Cluster address; empty: $RAY_ADDRESS, else an embedded local cluster."""
    num_cpus: int = 0
    """CPUs of the embedded local cluster; 0: all of this machine's."""
    verbose: bool = False
    """Show Ray's internal console output (per-epoch Train reports, Ray Data progress bars)."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Builds a config dataclass from an optional YAML file and dotted overrides.

    Args:
        cls: The root config dataclass of a verb.
        path: A YAML file whose mapping mirrors ``cls``; None for defaults only.
        overrides: ``section.key=value`` strings; values are parsed as YAML scalars
            or flow collections (``space.width=[64,128]``).

    Returns:
        A frozen instance of ``cls``.

    Raises:
        StillError: The file is missing or not a mapping, a key is unknown, a value
            has the wrong type, or a ``__post_init__`` check fails.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise StillError(f"override {item!r} must look like section.key=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(text) if text.strip() else "")
    return build_dataclass(cls, raw, prefix="")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Reads a YAML file that must hold a mapping (or nothing)."""
    file = Path(path)
    if not file.is_file():
        raise StillError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise StillError(f"config file {str(path)!r} is not valid YAML: {exc}".splitlines()[0]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise StillError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    return loaded


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise StillError(f"override {dotted!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type[T], raw: Any, prefix: str, base: Any = None) -> T:
    """Recursively builds ``cls`` from a mapping, checking keys and converting types.

    Args:
        cls: A dataclass type.
        raw: The mapping for it (None means all defaults).
        prefix: The dotted path of ``cls`` within the root config, for messages.
        base: An instance whose values stand for the fields ``raw`` leaves out (instead
            of ``cls``'s own defaults).
    """
    where = prefix.rstrip(".") or "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise StillError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = ", ".join(prefix + name for name in fields)
        raise StillError(f"unknown config key {prefix + unknown[0]!r}; valid keys here: {valid}")
    kwargs = {}
    for name, value in raw.items():
        if dataclasses.is_dataclass(hints[name]):
            # Keys set under a section override that section's default as the parent
            # declares it (TuneConfig's scaling has num_workers=1, ScalingConfig's is 2).
            section = getattr(base, name) if base is not None else _field_default(fields[name])
            kwargs[name] = build_dataclass(hints[name], value, prefix + name + ".", section)
        else:
            kwargs[name] = _convert(hints[name], value, prefix + name)
    if base is not None:
        kwargs.update({name: getattr(base, name) for name in fields if name not in raw})
    return cls(**kwargs)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _convert(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except StillError as exc:
                errors.append(str(exc))
        raise StillError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise StillError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_type = args[0] if args else Any
        return tuple(_convert(item_type, item, key) for item in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise StillError(f"{key} must be a mapping, got {value!r}")
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise StillError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise StillError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise StillError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise StillError(f"{key} must be a string, got {value!r}")
    raise StillError(f"{key}: unsupported config type {tp!r}")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Returns a config dataclass as plain nested dicts and lists (YAML/JSON-safe)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, (dict, types.MappingProxyType)):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(config)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens a config (dataclass or dict) into ``{"section.key": value}``."""
    tree = to_dict(config) if dataclasses.is_dataclass(config) else config
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def replace(config: T, changes: dict[str, Any]) -> T:
    """Returns a copy of a frozen config with dotted keys changed, e.g. ``{"kd.weight": 0.5}``.

    Goes through the same conversion and validation as :func:`load_config`.
    """
    tree = to_dict(config)
    for dotted, value in changes.items():
        _set_dotted(tree, dotted, value)
    return build_dataclass(type(config), tree, prefix="")
