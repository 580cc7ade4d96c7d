"""Hint (feature) distillation: which student layer matches which stored teacher layer, and how.

``kd.hints`` pairs a student layer with a teacher layer the store keeps
(``teacher.feature_layers``), as ``"student_layer:teacher_layer"`` or one name for
both. Each pair gets its own learned projector from the student's layer to the
teacher's shape and one hint term, the mean squared error between the projected
student layer and the stored teacher layer (:func:`hint_terms`), weighted by β
(``kd.hint_weight``). The loss, its FitNets citation and how it relates to FitNets'
α-blend are written down once, in the README ("Feature distillation and transfer
learning"). Each term is logged per epoch as ``train_hint_<student>``
(``train_hint_<student>_<teacher>`` when the names differ), their sum as ``train_hint``.

The projector is a linear map between vectors (``(d_s,)`` → ``(d_t,)``) or a 1×1
convolution between feature maps of the same height and width (``(C_s, H, W)`` →
``(C_t, H, W)``). :func:`plan_hints` checks every pair on the driver, before any
worker starts: the layers exist (the error lists the layers there are) and a
projector can map their shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from still.errors import StillError
from still.layers import LayerTap
from student_train.losses import hint_loss


@dataclasses.dataclass(frozen=True)
class HintPair:
    """One checked student ↔ teacher layer pair.

    Attributes:
        student: The student's layer (:mod:`still.layers`).
        teacher: The stored teacher layer (its training column: ``data.hint_key(teacher)``).
        student_shape: One row's output shape of the student's layer.
        teacher_shape: One row's shape of the teacher's layer.
    """

    student: str
    teacher: str
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]

    @property
    def metric(self) -> str:
        """The per-epoch metric of this pair's term."""
        return f"train_hint_{self.student}" if self.student == self.teacher else \
            f"train_hint_{self.student}_{self.teacher}"


def parse_hints(hints: Sequence[str]) -> list[tuple[str, str]]:
    """``kd.hints`` entries as (student layer, teacher layer) pairs.

    Raises:
        StillError: An entry is empty or has more than one ``:``.
    """
    pairs = []
    for entry in hints:
        parts = [part.strip() for part in str(entry).split(":")]
        if len(parts) > 2 or not all(parts):
            raise StillError(f"kd.hints: {entry!r} is not 'student_layer:teacher_layer' (or one layer name for both)")
        pairs.append((parts[0], parts[-1]))
    return pairs


def layer_shapes(model: nn.Module, names: Sequence[str], input_shape: Sequence[int], what: str
                 ) -> dict[str, tuple[int, ...]]:
    """One row's output shape of each named layer, from a forward pass over zeros (CPU, eval mode)."""
    with LayerTap(model, names, what) as tap, torch.no_grad():
        was_training = model.training
        model.eval()
        model(torch.zeros((2, *input_shape)))
        model.train(was_training)
        return {name: tuple(tap.outputs[name].shape[1:]) for name in names}


def make_projector(student_shape: Sequence[int], teacher_shape: Sequence[int], where: str) -> nn.Module:
    """The learned map from a student layer's shape to a teacher layer's.

    Raises:
        StillError: No linear map or 1×1 convolution takes one shape to the other.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) == 1 and len(t) == 1:
        return nn.Linear(s[0], t[0])
    if len(s) == 3 and len(t) == 3 and s[1:] == t[1:]:
        return nn.Conv2d(s[0], t[0], kernel_size=1)
    raise StillError(
        f"kd.hints {where}: no projector maps the student's {s} to the teacher's {t}; a vector pairs with a vector "
        "(linear map), a feature map (C, H, W) with one of the same H and W (1x1 convolution)"
    )


def plan_hints(hints: Sequence[str], hint_weight: float, student: nn.Module, input_shape: Sequence[int],
               stored: Sequence[Any], store_name: str) -> tuple[HintPair, ...]:
    """Checks ``kd.hints`` against the student and the store, on the driver.

    Args:
        hints: ``kd.hints``.
        hint_weight: β (``kd.hint_weight``); 0 leaves the hints out of the loss (a sweep
            over β may include it).
        student: A freshly built student (CPU).
        input_shape: Its input shape.
        stored: The store's teacher layers (``Source.features``).
        store_name: For messages.

    Returns:
        The pairs, in ``kd.hints`` order; empty when there are none or β is 0.

    Raises:
        StillError: β > 0 without hints, hints without stored teacher layers, a layer
            neither side has (the message lists what there is), or shapes no projector maps.
    """
    pairs = parse_hints(hints)
    if hint_weight > 0 and not pairs:
        raise StillError("kd.hint_weight > 0 needs kd.hints: pairs 'student_layer:teacher_layer' "
                         "(e.g. kd.hints=[pool2,features])")
    if not pairs or hint_weight == 0:
        return ()
    by_layer = {feature.layer: feature for feature in stored}
    if not by_layer:
        raise StillError(f"kd.hints needs a store with teacher layers; {store_name!r} has none "
                         "(write one with still infer teacher.feature_layers=[<layer>, ...])")
    for _, teacher in pairs:
        if teacher not in by_layer:
            raise StillError(f"kd.hints: the store {store_name!r} has no teacher layer {teacher!r}; "
                             f"its layers: {', '.join(by_layer)}")
    shapes = layer_shapes(student, sorted({s for s, _ in pairs}), input_shape, "kd.hints")
    planned = []
    for student_layer, teacher in pairs:
        shape = tuple(by_layer[teacher].shape)
        make_projector(shapes[student_layer], shape, f"{student_layer}:{teacher}")
        planned.append(HintPair(student_layer, teacher, shapes[student_layer], shape))
    return tuple(planned)


def keep_hinted_layers(source: Any, hints: Sequence[str]) -> Any:
    """``source`` without the stored teacher layers no hint uses, so their columns are never read.

    A logits-only student of a store with feature maps reads (and holds) only what it
    trains on. When a hint names a layer the store lacks, ``source`` is returned whole,
    for :func:`plan_hints` to name the layers there are.

    Args:
        source: A ``student_train.data.Source``.
        hints: The ``kd.hints`` in use (empty when β is 0).
    """
    wanted = {teacher for _, teacher in parse_hints(hints)}
    if not wanted <= {feature.layer for feature in source.features}:
        return source
    return dataclasses.replace(source, features=tuple(f for f in source.features if f.layer in wanted))


class HintedStudent(nn.Module):
    """The student and one projector per hint pair, so one DDP wrapper covers all of them.

    ``forward(x)`` returns the logits and each pair's projected student layer (the
    student's layers are captured by forward hooks in its one forward pass).
    """

    def __init__(self, student: nn.Module, pairs: Sequence[HintPair]) -> None:
        super().__init__()
        self.student = student
        self.pairs = tuple(pairs)
        self.projectors = nn.ModuleList(make_projector(p.student_shape, p.teacher_shape, f"{p.student}:{p.teacher}")
                                        for p in self.pairs)
        names = sorted({p.student for p in self.pairs})
        self._tap = LayerTap(student, names, "kd.hints") if names else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (logits, [projected student layer per pair])."""
        if self._tap is not None:
            self._tap.outputs.clear()  # evaluation's last batch, captured by the same hooks
        logits = self.student(x)
        if self._tap is None:
            return logits, []
        outputs = dict(self._tap.outputs)
        self._tap.outputs.clear()
        return logits, [projector(outputs[pair.student]) for pair, projector in zip(self.pairs, self.projectors)]


def hint_terms(pairs: Sequence[HintPair], projected: Sequence[torch.Tensor], batch: Mapping[str, torch.Tensor],
               key_of: Any) -> list[torch.Tensor]:
    """Each pair's hint term: the mean squared error to the stored teacher layer, in float32.

    Args:
        pairs: The hint pairs.
        projected: The projected student layers (:class:`HintedStudent`).
        batch: The batch (stored teacher layers under ``key_of(pair.teacher)``).
        key_of: ``student_train.data.hint_key``.
    """
    terms = []
    for pair, value in zip(pairs, projected):
        terms.append(hint_loss(value.float(), batch[key_of(pair.teacher)].reshape(value.shape)))
    return terms

