"""Transfer learning: start from a model of another task, freeze, and train parameter groups at their own rates.

- ``student.init`` (a still checkpoint, TorchScript file or MLflow model URI) must be
  of the student's family, and every tensor must match the student's name and shape,
  except the head (``still.models.HEAD``), which ``student.init_head`` decides: ``auto``
  re-initialises it when the init was trained for other classes (another count, or
  other class names where its checkpoint records them: MNIST digits → Fashion-MNIST
  garments), ``reinit`` always, ``keep`` never (its shape must then match). The job
  says what it did (stderr, the MLflow run's ``init.*`` params, the summary's ``init``).
- ``train.freeze``: glob patterns (``fnmatch``) of student parameter names, e.g.
  ``body.*``; matching parameters get no gradient and stay out of the optimizer.
- ``train.lr_groups``: ``"pattern=factor"`` entries, e.g. ``head.*=10``: matching
  parameters train at ``factor × train.lr`` (the schedule scales every group alike);
  the first matching entry wins, the rest train at ``train.lr``. Hint projectors
  always train at ``train.lr``.

A pattern that matches no parameter is an error naming it, with the parameter names
there are: a typo must not leave a backbone silently unfrozen.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from still.errors import StillError
from still.models import HEAD, build_model, family_of


def load_init_state(uri: str, family: str, model_args: Mapping[str, Any], class_names: Sequence[str] = (),
                    head_policy: str = "auto", tracking_uri: str = ""
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Loads the weights ``student.init`` names, checked against the student.

    Args:
        uri: A still checkpoint, TorchScript file or MLflow model URI (``runs:/…``, ``models:/…``).
        family: The student's family.
        model_args: The student's constructor arguments.
        class_names: The classes the student is trained for (compared with the init's).
        head_policy: ``student.init_head``: ``auto``, ``reinit`` or ``keep``.
        tracking_uri: For MLflow URIs.

    Returns:
        The tensors to load, and the report: ``source``, ``family``, ``loaded`` (tensor
        names), ``reinitialized`` (the head's tensors, when the class count differs) and
        ``reason``.

    Raises:
        StillError: The URI cannot be loaded, is of another family, or a tensor other
            than the head is missing or of another shape (the message names it).
    """
    from teacher_infer.teachers import is_mlflow_uri, load_teacher

    if tracking_uri and is_mlflow_uri(uri):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    try:
        loaded = load_teacher(uri)
    except StillError as exc:
        raise StillError(f"student.init: {exc}") from None
    model = loaded.model
    init_family = family_of(model)
    if init_family is not None and init_family != family:
        raise StillError(f"student.init {uri!r} is a {init_family} model; student.family={family}: "
                         f"initialise a {family} student from a {family} checkpoint")
    source = model.state_dict()
    target = build_model(family, **dict(model_args)).state_dict()
    head = [name for name in target if name.startswith(HEAD + ".")]
    reason = _head_reason(source, loaded.meta, int(model_args["num_classes"]), list(class_names))
    new_head = bool(head) and head_policy != "keep" and (head_policy == "reinit" or bool(reason))
    if new_head and not reason:
        reason = "student.init_head=reinit"
    mismatched = []
    for name, tensor in target.items():
        if new_head and name in head:
            continue
        if name not in source:
            mismatched.append(f"{name} is absent from it")
        elif tuple(source[name].shape) != tuple(tensor.shape):
            mismatched.append(f"{name} is {tuple(source[name].shape)} there, {tuple(tensor.shape)} here")
    if mismatched:
        raise StillError(f"student.init {uri!r} does not fit the {family} student: {'; '.join(mismatched[:3])}"
                         f"{f' (and {len(mismatched) - 3} more)' if len(mismatched) > 3 else ''}; "
                         + ("re-initialise the head with student.init_head=auto or reinit"
                            if all(m.startswith(HEAD + ".") for m in mismatched)
                            else "make student.width/depth those of the checkpoint"))
    state = {name: source[name].detach().clone().to(tensor.dtype) for name, tensor in target.items()
             if not (new_head and name in head)}
    report = {"source": uri, "family": init_family or family, "loaded": list(state),
              "reinitialized": head if new_head else [], "reason": reason if new_head else ""}
    return state, report


def _head_reason(source: Mapping[str, torch.Tensor], meta: Mapping[str, Any], classes: int,
                 class_names: list[str]) -> str:
    """Why the init's head does not fit this task ("" when it does, as far as can be told)."""
    bias = source.get(f"{HEAD}.bias")
    if bias is not None and tuple(bias.shape) != (classes,):
        return f"the init has {bias.shape[0]} classes, this student {classes}"
    theirs = [str(name) for name in meta.get("class_names") or []]
    if theirs and class_names and theirs != [str(name) for name in class_names]:
        return (f"the init's classes ({', '.join(theirs[:3])}, ...) are not this data's "
                f"({', '.join(map(str, class_names[:3]))}, ...)")
    return ""


def matching(names: Sequence[str], pattern: str, key: str) -> list[str]:
    """The parameter names ``pattern`` matches.

    Raises:
        StillError: It matches none (the message lists the parameter names).
    """
    found = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if not found:
        listed = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise StillError(f"{key}: pattern {pattern!r} matches no student parameter; the parameters: {listed}")
    return found


def parse_lr_groups(entries: Sequence[str]) -> list[tuple[str, float]]:
    """``train.lr_groups`` entries as (pattern, factor).

    Raises:
        StillError: An entry is not ``pattern=factor`` with a factor > 0.
    """
    groups = []
    for entry in entries:
        pattern, sep, factor = str(entry).rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            value = 0.0
        if not sep or not pattern or not value > 0:
            raise StillError(f"train.lr_groups: {entry!r} is not 'pattern=factor' with a factor > 0 "
                             "(e.g. head.*=10: the head at 10 x train.lr)")
        groups.append((pattern, value))
    return groups


def frozen_names(student: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The student parameters ``train.freeze`` matches, sorted.

    Raises:
        StillError: A pattern matches no parameter.
    """
    names = [name for name, _ in student.named_parameters()]
    return sorted({name for pattern in patterns for name in matching(names, pattern, "train.freeze")})


def freeze(student: nn.Module, patterns: Sequence[str]) -> None:
    """Freezes the student's parameters that ``train.freeze`` matches."""
    parameters = dict(student.named_parameters())
    for name in frozen_names(student, patterns):
        parameters[name].requires_grad_(False)


def check_patterns(student: nn.Module, freeze_patterns: Sequence[str], lr_groups: Sequence[str]) -> dict[str, int]:
    """Checks ``train.freeze`` and ``train.lr_groups`` against the student, on the driver.

    Returns:
        The parameters ``train.freeze`` freezes, with their sizes.

    Raises:
        StillError: A pattern matches no parameter, an lr group is malformed, or every
            parameter is frozen.
    """
    parameters = dict(student.named_parameters())
    frozen = frozen_names(student, freeze_patterns)
    for pattern, _ in parse_lr_groups(lr_groups):
        matching(list(parameters), pattern, "train.lr_groups")
    if frozen and len(frozen) == len(parameters):
        raise StillError(f"train.freeze {list(freeze_patterns)} freezes every student parameter: nothing would train")
    return {name: parameters[name].numel() for name in frozen}


def parameter_groups(student: nn.Module, extra: nn.Module | None, lr_groups: Sequence[str]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: trainable student parameters by ``train.lr_groups``, then ``extra``.

    Each group carries ``lr_scale`` (its factor of the scheduled learning rate) and
    ``name`` (its pattern, ``default`` or ``projectors``).
    """
    groups = parse_lr_groups(lr_groups)
    buckets: dict[str, list[nn.Parameter]] = {pattern: [] for pattern, _ in groups}
    buckets["default"] = []
    for name, parameter in student.named_parameters():
        if not parameter.requires_grad:
            continue
        pattern = next((p for p, _ in groups if fnmatch.fnmatchcase(name, p)), "default")
        buckets[pattern].append(parameter)
    scale = dict(groups)
    out = [{"params": params, "lr_scale": scale.get(pattern, 1.0), "name": pattern}
           for pattern, params in buckets.items() if params]
    if extra is not None:
        params = [p for p in extra.parameters() if p.requires_grad]
        if params:
            out.append({"params": params, "lr_scale": 1.0, "name": "projectors"})
    return out
