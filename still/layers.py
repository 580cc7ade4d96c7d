"""Named intermediate layers of a model, and capturing their outputs in a forward pass.

Teachers (``teacher.feature_layers``: what a store keeps) and students (``kd.hints``:
what is matched to it) name layers the same way:

    names = layer_names(model)                       # ["conv1", "pool1", ..., "features", "body", "body.0", ...]
    with LayerTap(model, ["conv2", "features"], what="teacher.feature_layers") as tap:
        logits = model(x)
        maps = tap.outputs                           # {"conv2": (n, 64, 14, 14), "features": (n, 128)}

A name is one of the family's own layers (``still.models``: ``model.layers()``) or
any submodule name of ``named_modules()``; its output is captured by a forward hook,
so the one forward pass that gives the logits gives the layers too.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from still.errors import StillError


def named_layers(model: Any) -> dict[str, nn.Module]:
    """The layers of ``model`` by name: the family's named layers first, then every submodule."""
    layers: dict[str, nn.Module] = {}
    if callable(getattr(model, "layers", None)) and not isinstance(model, torch.jit.ScriptModule):
        layers.update(model.layers())
    if isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        layers.update({name: module for name, module in model.named_modules() if name and name not in layers})
    return layers


def layer_names(model: Any) -> list[str]:
    """The names :class:`LayerTap` accepts for ``model`` (the family's own layers first)."""
    return list(named_layers(model))


def resolve_layers(model: Any, names: Sequence[str], what: str) -> dict[str, nn.Module]:
    """The modules of ``names``.

    Args:
        model: The model.
        names: Layer names.
        what: The config key the names come from, for the error.

    Raises:
        StillError: A name is not a layer of the model; the message lists the layers it has.
    """
    layers = named_layers(model)
    missing = [name for name in names if name not in layers]
    if missing:
        family = [name for name in (model.layers() if callable(getattr(model, "layers", None)) else {})]
        has = ", ".join(family or list(layers)[:40]) or "none (TorchScript and exported models have no hooks)"
        more = " (or any submodule name)" if family else ""
        raise StillError(f"{what}: {type(model).__name__} has no layer {missing[0]!r}; its layers: {has}{more}")
    return {name: layers[name] for name in names}


class LayerTap:
    """Captures the outputs of named layers while a model runs (forward hooks).

    Args:
        model: The model.
        names: Layer names (:func:`layer_names`).
        what: The config key the names come from, for errors.

    Attributes:
        outputs: Layer name → its output in the latest forward pass.
    """

    def __init__(self, model: Any, names: Sequence[str], what: str) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, module in resolve_layers(model, names, what).items()]

    def _hook(self, name: str) -> Any:
        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
        return capture

    def close(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "LayerTap":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
