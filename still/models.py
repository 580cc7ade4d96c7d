"""Model families shared by teachers and students, in one small registry.

A still checkpoint names its family and constructor arguments, so whoever loads it
(``still infer`` loading a teacher, ``still train`` loading a student or an init)
rebuilds the same module. That is why the registry lives in ``still`` and not in
``student_train``: ``teacher_infer`` must not import the training package.

Every family has ``features(x)`` (the penultimate activations, before the last
dropout), ``classify(features)`` (last dropout, then the head), ``forward(x) =
classify(features(x))`` (the logits) and ``layers()``: the named layers a hint can
match or a feature store can keep (``conv1``, ``pool1``, ``conv2``, ``pool2``,
``features`` for ``cnn``; ``hidden1``…, ``features`` for ``mlp``), each the output
of an activation or pooling module, before any dropout. ``width`` is the knob sweeps
turn: hidden units for ``mlp``, a channel multiplier for ``cnn``. The head is always
the ``head`` submodule (:data:`HEAD`): transfer learning re-initialises it.

Language-model families (:data:`LM_MODELS`: ``llama``, ``still.llama``) are transformers
causal LMs built from ``width`` (hidden size), ``depth`` (layers) and the tokenizer's
vocabulary; :func:`build_model` builds them too, so a still checkpoint of one rebuilds
like any other, and their family is their transformers ``model_type``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from still.errors import StillError
from still.llama import build_llama_student

HEAD = "head"
"""The submodule name of every family's classification head."""


class MLP(nn.Module):
    """A fully connected network: ``depth`` hidden layers of ``width`` ReLU units.

    Hinton et al. (2015) used 784-1200-1200-10 (teacher) and 784-800-800-10
    (student) on MNIST: ``MLP((1, 28, 28), 10, width=1200, depth=2, dropout=0.5)``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: float = 256,
        depth: int = 2,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_features = math.prod(input_shape)
        hidden = max(1, round(width))
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        self._layers = {}
        for index in range(depth):
            activation = nn.ReLU()
            layers += [nn.Linear(in_features, hidden), activation]
            self._layers[f"hidden{index + 1}"] = activation
            if dropout > 0 and index < depth - 1:
                layers.append(nn.Dropout(dropout))
            in_features = hidden
        self._layers["features"] = layers[-1]
        self.body = nn.Sequential(*layers)
        # the last hidden layer's dropout sits outside ``body``, so features are taken before it
        self.dropout = nn.Dropout(dropout) if dropout > 0 and depth > 0 else nn.Identity()
        self.head = nn.Linear(in_features, num_classes)

    def layers(self) -> dict[str, nn.Module]:
        """The named layers: ``hidden1``…``hidden{depth}`` and ``features`` (the last of them)."""
        return dict(self._layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the last hidden layer's activations (before its dropout)."""
        return self.body(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Returns logits from :meth:`features` (dropout, then the head)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns logits."""
        return self.classify(self.features(x))


class CNN(nn.Module):
    """A small conv net for images: two conv blocks whose channels scale with ``width``.

    ``width=1`` gives 32 and 64 channels and a 128-unit hidden layer; ``depth`` adds
    3x3 conv layers (without pooling) to the second block.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: float = 1.0,
        depth: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise StillError(
                f"student.family=cnn needs image inputs (channels, height, width), got input shape {input_shape}"
            )
        channels, height, width_px = input_shape
        c1, c2 = max(1, round(32 * width)), max(1, round(64 * width))
        named = {"conv1": nn.ReLU(), "pool1": nn.MaxPool2d(2), "conv2": nn.ReLU()}
        layers: list[nn.Module] = [
            nn.Conv2d(channels, c1, 3, padding=1), named["conv1"], named["pool1"],
            nn.Conv2d(c1, c2, 3, padding=1), named["conv2"],
        ]
        for index in range(max(0, depth - 2)):
            named[f"conv{index + 3}"] = nn.ReLU()
            layers += [nn.Conv2d(c2, c2, 3, padding=1), named[f"conv{index + 3}"]]
        named["pool2"] = nn.MaxPool2d(2)
        layers += [named["pool2"], nn.Flatten()]
        flat = c2 * (height // 4) * (width_px // 4)
        hidden = max(1, round(128 * width))
        named["features"] = nn.ReLU()
        layers += [nn.Linear(flat, hidden), named["features"]]
        self._layers = named
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden, num_classes)

    def layers(self) -> dict[str, nn.Module]:
        """The named layers: ``conv1``, ``pool1``, ``conv2`` (``conv3``… with depth), ``pool2``, ``features``."""
        return dict(self._layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the hidden layer's activations (before its dropout)."""
        return self.body(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Returns logits from :meth:`features` (dropout, then the head)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns logits."""
        return self.classify(self.features(x))


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn": CNN}
"""Classifier families: ``input_shape`` and ``num_classes`` in, logits per class out."""

LM_MODELS: dict[str, Callable[..., nn.Module]] = {"llama": build_llama_student}
"""Causal language-model families: logits per token over a vocabulary (``still.llama``)."""


def build_model(family: str, **model_args: Any) -> nn.Module:
    """Builds a model of a registered family.

    Args:
        family: A key of :data:`MODELS` or :data:`LM_MODELS`.
        **model_args: The family's constructor arguments (``input_shape``,
            ``num_classes``, ``width``, ``depth``, ``dropout``...; for a language model
            ``width``, ``depth``, ``vocab_size``, ``max_positions``, ``special_ids``).

    Raises:
        StillError: The family is unknown.
    """
    if family in LM_MODELS:
        return LM_MODELS[family](**model_args)
    if family not in MODELS:
        raise StillError(f"unknown model family {family!r}; known families: {', '.join(sorted({**MODELS, **LM_MODELS}))}")
    if "input_shape" in model_args:
        model_args["input_shape"] = tuple(model_args["input_shape"])
    return MODELS[family](**model_args)


def family_of(model: Any) -> str | None:
    """The registered family a loaded model is of (a TorchScript module by its original
    class name, a language model by its transformers ``model_type``), or None for a model
    of no registered family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LM_MODELS:
        return model_type
    for family, cls in MODELS.items():
        if isinstance(model, cls) or getattr(model, "original_name", None) == cls.__name__:
            return family
    return None


def count_parameters(model: nn.Module) -> int:
    """Returns the number of parameters of a model."""
    return sum(p.numel() for p in model.parameters())
