"""Named intermediate layers of a model, and capturing their outputs in a forward pass.

Teachers (``teacher.feature_layers``: what a store keeps) and students (``kd.hints``:
what is matched to it) name layers the same way:

    layers = named_layers(model)                     # {"conv1": ReLU, "pool1": MaxPool2d, ..., "body.0": Conv2d, ...}
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


def _own_layers(model: Any) -> dict[str, nn.Module]:
    """A still family's named layers (``model.layers()``); none for other models."""
    if isinstance(model, torch.jit.ScriptModule) or not callable(getattr(model, "layers", None)):
        return {}
    return dict(model.layers())


def named_layers(model: Any) -> dict[str, nn.Module]:
    """The layers of ``model`` by name: the family's named layers first, then every submodule
    (none for TorchScript, which takes no Python hooks)."""
    layers = _own_layers(model)
    if isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        layers.update({name: module for name, module in model.named_modules() if name and name not in layers})
    return layers


def resolve_layers(model: Any, names: Sequence[str], what: str) -> dict[str, nn.Module]:
    """The modules of ``names``.

    Args:
        model: The model.
        names: Layer names.
        what: The config key the names come from, for the error.

    Raises:
        StillError: A name is not a layer of the model; the message lists the layers it
            has (a family's own, or its first 40 submodules).
    """
    layers = named_layers(model)
    missing = [name for name in names if name not in layers]
    if missing:
        own = list(_own_layers(model))
        has = ", ".join(own or list(layers)[:40]) or "none (a TorchScript model takes no hooks)"
        more = " (or any submodule name)" if own else ""
        raise StillError(f"{what}: {type(model).__name__} has no layer {missing[0]!r}; its layers: {has}{more}")
    return {name: layers[name] for name in names}


class LayerTap:
    """Captures the outputs of named layers while a model runs (forward hooks).

    Args:
        model: The model.
        names: Layer names (:func:`named_layers`).
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
