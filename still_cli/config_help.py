"""Self-documenting configs: every key of a verb with its type, default and doc.

The docs are the attribute docstrings of the config dataclasses, the string literal
placed right after each field in the class body::

    epochs: int = 10
    \"\"\"Passes over the training split.\"\"\"

:func:`field_docs` reads them from the class source with :mod:`ast`;
:func:`config_keys` walks a root config (nested sections included) into one
:class:`KeyDoc` per dotted key; :func:`format_keys` renders them for
``still VERB --help`` and :func:`format_config` renders a resolved config for
``still VERB --print-config``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import re
import shutil
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any

from still.config import to_dict

# Words ending in "." that do not end a sentence.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "al.", "cf.")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key of a verb, as ``still VERB --help`` lists it."""

    key: str
    """Dotted key, e.g. ``train.epochs`` or ``data.image.mean``."""
    section: str
    """Dotted path of the section holding the key, e.g. ``data.image``."""
    type: str
    """Readable type: ``int``, ``list[float]``, ``one of a|b``, ``dict[str, float]``."""
    default: str
    """The default as it would be written in YAML (``true``, ``[2]``, ``""``)."""
    doc: str
    """First sentence of the field's docstring; empty when it has none."""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Returns the attribute docstrings of a dataclass, ``{field name: docstring}``.

    Base classes are read too (a subclass's docstring wins). Fields without a
    docstring are absent; so is everything when the source cannot be read.

    Args:
        cls: A class whose body declares annotated fields.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
        if node is None:
            continue
        body = node.body
        for statement, following in zip(body, body[1:]):
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def first_sentence(doc: str) -> str:
    """Returns the first sentence of a docstring as one line, RST markup simplified.

    Wrapped lines are joined; the sentence ends at the first ``.``, ``!`` or ``?``
    followed by a space outside brackets (``e.g.`` and the like do not count), or at
    the end of the first paragraph.

    Args:
        doc: A docstring, possibly wrapped over several lines.
    """
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    text = " ".join(line.strip() for line in paragraph.splitlines() if line.strip())
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)  # :func:`x` -> `x`
    text = text.replace("``", "`")
    depth = 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif char in ".!?" and depth == 0 and text[index + 1:index + 2] == " ":
            if not text[:index + 1].endswith(_ABBREVIATIONS):
                return text[:index + 1]
    return text


def type_name(tp: Any) -> str:
    """Returns a readable name for a config field type.

    ``tuple[int, ...]`` reads ``list[int]`` (YAML lists), ``Literal["a", "b"]`` reads
    ``one of a|b``, ``dict[str, float]`` stays as it is, ``Any`` reads ``any``.

    Args:
        tp: A resolved type hint (``typing.get_type_hints``).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return "any"
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + "|".join(_literal(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [
            "|".join(_literal(a) for a in typing.get_args(arg)) if typing.get_origin(arg) is typing.Literal
            else type_name(arg)
            for arg in args
        ]
        return "|".join(parts)
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        names = sorted({type_name(a) for a in items})
        return f"list[{names[0]}]" if len(names) == 1 else "list"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]" if args else "dict"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _literal(value: Any) -> str:
    return '""' if value == "" else format_value(value)


def format_value(value: Any) -> str:
    """Returns a config value as it would be written in YAML or an override.

    Args:
        value: A default or resolved config value.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if value == "" else value
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def config_keys(cls: type) -> list[KeyDoc]:
    """Lists every dotted key of a root config dataclass, sections walked recursively.

    Defaults are the ones the root declares: a section's default instance supplies
    its keys' defaults (``TuneConfig``'s ``scaling.num_workers`` is ``[1]``, not
    ``ScalingConfig``'s ``[2]``).

    Args:
        cls: The root config dataclass of a verb (e.g. ``TrainConfig``).

    Returns:
        One :class:`KeyDoc` per leaf key, in declaration order.
    """
    rows: list[KeyDoc] = []
    _walk(cls, None, "", rows)
    return rows


def _walk(cls: type, instance: Any, prefix: str, rows: list[KeyDoc]) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        default = getattr(instance, field.name) if instance is not None else _field_default(field)
        if dataclasses.is_dataclass(tp):
            _walk(tp, default if default is not None else tp(), f"{prefix}{field.name}.", rows)
            continue
        rows.append(KeyDoc(
            key=prefix + field.name,
            section=prefix.rstrip("."),
            type=type_name(tp),
            default=format_value(default),
            doc=first_sentence(docs.get(field.name, "")),
        ))


def section_docs(cls: type) -> dict[str, str]:
    """Returns ``{dotted section: one-line doc}`` for every section of a root config.

    A section's doc is the docstring under its field in the parent (``InferConfig``
    documents its sections), else the first sentence of the section class's docstring.

    Args:
        cls: The root config dataclass of a verb.
    """
    found: dict[str, str] = {}

    def walk(klass: type, prefix: str) -> None:
        hints = typing.get_type_hints(klass)
        docs = field_docs(klass)
        for field in dataclasses.fields(klass):
            tp = hints[field.name]
            if field.init and dataclasses.is_dataclass(tp):
                doc = docs.get(field.name) or tp.__doc__ or ""
                found[prefix + field.name] = first_sentence(doc)
                walk(tp, f"{prefix}{field.name}.")

    walk(cls, "")
    return found


def format_keys(cls: type, width: int | None = None) -> str:
    """Renders every key of a root config for ``still VERB --help``.

    Keys are grouped by section under a header line with the section's doc; within
    a section the key, type and default columns are aligned, and docs that do not
    fit are wrapped under their own column.

    Args:
        cls: The root config dataclass of a verb.
        width: Line width; None: the terminal's (at least 100).
    """
    if width is None:
        width = max(100, shutil.get_terminal_size((100, 24)).columns - 2)
    headers = section_docs(cls)
    groups: dict[str, list[KeyDoc]] = {}
    for row in config_keys(cls):
        groups.setdefault(row.section, []).append(row)
    lines = ["config keys (key=value on the command line, or nested in --config FILE.yaml):"]
    for section, rows in groups.items():
        lines.append("")
        header = f"{section}:" if section else "(top level):"
        lines.append(f"{header} {headers.get(section, '')}".rstrip())
        key_w = max(len(r.key) for r in rows)
        type_w = max(len(r.type) for r in rows)
        default_w = max(len(r.default) for r in rows)
        indent = 2 + key_w + 2 + type_w + 2 + default_w + 2
        for row in rows:
            head = f"  {row.key:<{key_w}}  {row.type:<{type_w}}  {row.default:<{default_w}}  "
            if width - indent >= 40:
                wrapped = textwrap.wrap(row.doc, width - indent, break_on_hyphens=False) or [""]
                lines.append((head + wrapped[0]).rstrip())
                lines.extend(" " * indent + more for more in wrapped[1:])
            else:
                lines.append(head.rstrip())
                lines.extend(textwrap.wrap(row.doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6,
                                           break_on_hyphens=False))
    return "\n".join(lines) + "\n"


def format_config(config: Any, as_json: bool = False) -> str:
    """Renders a resolved config as YAML (loadable again with ``--config``) or one JSON line.

    Args:
        config: A config dataclass instance.
        as_json: One line of JSON instead of YAML.
    """
    tree = to_dict(config)
    if as_json:
        return json.dumps(tree, default=str)
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block mappings (one key a line), lists on one line: ``num_workers: [2]``."""

    def flow_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)

    Dumper.add_representer(list, flow_list)
    text = yaml.dump(tree, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=10_000)
    return text.rstrip("\n")
