"""The still checkpoint: a model family, its constructor arguments and its weights.

``still train`` writes one for every student (and teacher: a teacher is a student
trained without a store); ``still infer`` loads one as a teacher; ``student.init``
loads one to fine-tune. One file, ``torch.save`` of a plain dict, readable from any
storage URI:

    {"format": "still-checkpoint/v1", "family": "mlp",
     "model_args": {"input_shape": [1, 28, 28], "num_classes": 10, "width": 800, ...},
     "state_dict": {...}, "meta": {"input_scale": 0.0039, "class_names": [...], ...}}
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from still.errors import StillError
from still.models import build_model
from still.storage import resolve

FORMAT = "still-checkpoint/v1"


def save_checkpoint(
    uri: str, model: nn.Module, family: str, model_args: dict[str, Any], meta: dict[str, Any] | None = None
) -> str:
    """Writes a still checkpoint atomically and returns its URI.

    Args:
        uri: Destination file (any storage URI).
        model: The trained module (its ``state_dict`` is saved, moved to CPU).
        family: Its family name in :data:`still.models.MODELS`.
        model_args: The constructor arguments that rebuild it.
        meta: Extra facts: ``input_scale``, ``class_names``, the training config...
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "family": family,
        "model_args": {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()},
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    location = resolve(uri)
    location.write_atomic(buffer.getvalue())
    return location.uri


def read_checkpoint_payload(uri: str) -> dict[str, Any]:
    """Reads the raw checkpoint dict.

    Raises:
        StillError: The file is missing or is not a still checkpoint.
    """
    location = resolve(uri)
    if not location.exists():
        raise StillError(f"checkpoint {uri!r} does not exist")
    with location.fs.open(location.path, "rb") as handle:
        data = handle.read()
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- torch raises many types for foreign files
        raise StillError(f"{uri!r} is not a still checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise StillError(f"{uri!r} is not a still checkpoint (expected format {FORMAT})")
    return payload


def load_checkpoint(uri: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the model of a still checkpoint, in eval mode on the CPU.

    Returns:
        The model and the checkpoint dict without its ``state_dict``.
    """
    payload = read_checkpoint_payload(uri)
    model = build_model(payload["family"], **payload["model_args"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info
