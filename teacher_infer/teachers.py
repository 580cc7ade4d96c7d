"""Loading a teacher from any of its four forms, and its fingerprint.

Forms of ``teacher.uri``:

- a still checkpoint (``still.checkpoints``): family + constructor args + weights;
- a TorchScript file (``torch.jit.save``);
- a ``torch.export`` file (``torch.export.save``, usually ``.pt2``);
- an MLflow model URI: ``runs:/<run_id>/<name>``, ``models:/<name>@<alias>``,
  ``models:/<name>/<version>`` (``mlflow.pytorch.load_model``).

Language-model teachers (``builtin:…``, ``.gguf``, a ``save_pretrained`` directory) load
through ``teacher_infer.lm_teacher``; :func:`teacher_fingerprint` covers them too.

The fingerprint is sha256 over the architecture (family + args, TorchScript code,
the exported graph, or the module's repr) and every weight tensor (name, dtype,
shape, bytes). It enters the store's cache key: retraining a teacher changes it,
copying or renaming its file does not.

Workers get the teacher as a :class:`TeacherPayload` (bytes), never by reloading the
URI: an MLflow URI or a sqlite tracking database need not be reachable from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Callable

import torch
from torch import nn

from still.errors import StillError
from still.lm_files import is_lm_uri
from still.storage import resolve

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


@dataclasses.dataclass
class Teacher:
    """A loaded teacher.

    Attributes:
        model: A callable ``x -> logits`` in eval mode (nn.Module, ScriptModule, or an
            exported program's module).
        form: ``checkpoint``, ``torchscript``, ``export`` or ``mlflow``.
        uri: Where it came from.
        fingerprint: sha256 hex of architecture + weights.
        meta: Facts from the source (a still checkpoint's ``meta``: input_scale,
            class_names…).
    """

    model: Any
    form: str
    uri: str
    fingerprint: str
    meta: dict[str, Any]

    def payload(self) -> "TeacherPayload":
        """Serialises the model for shipping to Ray workers."""
        buffer = io.BytesIO()
        if self.form == "torchscript":
            torch.jit.save(self.model, buffer)
            form = "torchscript"
        elif self._exported is not None:
            torch.export.save(self._exported, buffer)
            form = "export"
        else:
            torch.save(self.model, buffer)
            form = "module"
        return TeacherPayload(form, buffer.getvalue(), self.fingerprint)

    _exported: Any = None


@dataclasses.dataclass(frozen=True)
class TeacherPayload:
    """A teacher as bytes: what Ray tasks and actors receive."""

    form: str
    data: bytes
    fingerprint: str

    def load(self) -> Any:
        """Rebuilds the model (eval mode, CPU) from the bytes."""
        buffer = io.BytesIO(self.data)
        if self.form == "torchscript":
            model = torch.jit.load(buffer, map_location="cpu")
        elif self.form == "export":
            model = torch.export.load(buffer).module()
        else:
            model = torch.load(buffer, map_location="cpu", weights_only=False)
        return _eval(model)


def _eval(model: Any) -> Any:
    try:
        model.eval()
    except (AttributeError, NotImplementedError, RuntimeError):
        pass  # exported modules refuse .eval(); they are already inference graphs
    return model


def fingerprint(architecture: str, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over an architecture description and named tensors (sorted by name)."""
    digest = hashlib.sha256(architecture.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) has no uint8 view of its own
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _checkpoint_fingerprint(payload: dict[str, Any]) -> str:
    arch = json.dumps({"form": "still-checkpoint", "family": payload["family"],
                       "model_args": payload["model_args"]}, sort_keys=True, default=str)
    return fingerprint(arch, payload["state_dict"])


def _script_architecture(model: Any) -> str:
    parts = []
    for name, module in model.named_modules():
        code = getattr(module, "code", "")
        parts.append(f"{name}:{getattr(module, 'original_name', type(module).__name__)}\n{code}")
    return "torchscript\n" + "\n".join(parts)


def is_mlflow_uri(uri: str) -> bool:
    """True for ``runs:/``, ``models:/`` and ``mlflow-artifacts:/`` URIs."""
    return uri.startswith(MLFLOW_SCHEMES)


def _read_bytes(uri: str) -> bytes:
    location = resolve(uri)
    if not location.exists():
        raise StillError(f"teacher.uri {uri!r} does not exist (expected a still checkpoint, TorchScript, "
                         "torch.export .pt2 file or an MLflow model URI)")
    if location.fs.isdir(location.path):
        raise StillError(f"teacher.uri {uri!r} is a directory, expected a model file or an MLflow model URI")
    with location.fs.open(location.path, "rb") as handle:
        return handle.read()


def load_teacher(uri: str) -> Teacher:
    """Loads a teacher from any of its forms (see the module docstring).

    Raises:
        StillError: The URI is empty, missing, or not a model of a known form.
    """
    if not uri:
        raise StillError("teacher.uri is required (a still checkpoint, TorchScript or .pt2 file, or an MLflow model URI)")
    if is_mlflow_uri(uri):
        return _load_mlflow(uri)
    data = _read_bytes(uri)
    errors = []
    for form, loader in _FILE_LOADERS:
        try:
            return loader(uri, data)
        except _NotThisForm as exc:
            errors.append(f"{form}: {exc}")
    raise StillError(
        f"teacher.uri {uri!r} is not a model (expected a still checkpoint, TorchScript file, "
        "torch.export .pt2 file or an MLflow model URI)"
    )


class _NotThisForm(Exception):
    pass


def _torch_load(data: bytes) -> Any:
    """``torch.load(weights_only=True)``, quiet about TorchScript archives (tried next)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _try_checkpoint(uri: str, data: bytes) -> Teacher:
    from still.checkpoints import FORMAT
    from still.models import build_model

    try:
        payload = _torch_load(data)
    except Exception as exc:  # not a torch.save zip, or one with foreign objects
        raise _NotThisForm(type(exc).__name__) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise _NotThisForm("no still checkpoint format tag")
    try:
        model = build_model(payload["family"], **dict(payload["model_args"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise StillError(f"teacher.uri {uri!r}: broken still checkpoint ({type(exc).__name__}: {str(exc)[:100]})") from None
    return Teacher(_eval(model), "checkpoint", uri, _checkpoint_fingerprint(payload), dict(payload.get("meta", {})))


def _try_torchscript(uri: str, data: bytes) -> Teacher:
    try:
        model = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # RuntimeError for non-TorchScript zips, others for garbage
        raise _NotThisForm(type(exc).__name__) from None
    arch = _script_architecture(model)
    return Teacher(_eval(model), "torchscript", uri, fingerprint(arch, dict(model.state_dict())), {})


def _try_export(uri: str, data: bytes) -> Teacher:
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch.export raises a variety for non-.pt2 input
        raise _NotThisForm(type(exc).__name__) from None
    tensors = {f"state.{k}": v for k, v in program.state_dict.items() if isinstance(v, torch.Tensor)}
    tensors.update({f"const.{k}": v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    arch = "export\n" + program.graph_module.code
    teacher = Teacher(program.module(), "export", uri, fingerprint(arch, tensors), {})
    teacher._exported = program
    return teacher


_FILE_LOADERS: list[tuple[str, Callable[[str, bytes], Teacher]]] = [
    ("still checkpoint", _try_checkpoint),
    ("torchscript", _try_torchscript),
    ("torch.export", _try_export),
]


def _load_mlflow(uri: str) -> Teacher:
    """Loads an MLflow PyTorch model (pickle or pt2 serialisation; MLflow 3 defaults to pt2)."""
    import glob
    import os
    import tempfile

    try:
        import mlflow.artifacts
        import mlflow.pytorch
    except ImportError:  # pragma: no cover - mlflow is a dependency
        raise StillError(f"teacher.uri {uri!r} needs mlflow installed") from None
    try:
        with tempfile.TemporaryDirectory(prefix="still-teacher-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            pt2 = glob.glob(os.path.join(local, "data", "model.pt2"))
            if pt2:
                with open(pt2[0], "rb") as handle:
                    teacher = _try_export(uri, handle.read())
                teacher.form = "mlflow"
                return teacher
            model = mlflow.pytorch.load_model(local, map_location="cpu")
    except _NotThisForm as exc:
        raise StillError(f"teacher.uri {uri!r}: unreadable pt2 model in MLflow ({exc})") from None
    except Exception as exc:  # MlflowException, OSError…: report the URI, one line
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise StillError(f"teacher.uri {uri!r}: cannot load MLflow model ({first})") from None
    if not isinstance(model, nn.Module):
        raise StillError(f"teacher.uri {uri!r} is not a PyTorch model (got {type(model).__name__})")
    arch = f"mlflow\n{type(model).__module__}.{type(model).__qualname__}\n{model!r}"
    return Teacher(_eval(model), "mlflow", uri, fingerprint(arch, dict(model.state_dict())), {})


def teacher_fingerprint(uri: str) -> str:
    """The fingerprint alone; for still checkpoints without building the model, for
    language models from their files (``teacher_infer.lm_teacher.lm_fingerprint``)."""
    if is_lm_uri(uri):
        from teacher_infer.lm_teacher import lm_fingerprint

        return lm_fingerprint(uri)
    if not is_mlflow_uri(uri):
        data = _read_bytes(uri)
        try:
            payload = _torch_load(data)
        except Exception:  # not a checkpoint: fall back to loading the model
            payload = None
        from still.checkpoints import FORMAT

        if isinstance(payload, dict) and payload.get("format") == FORMAT and "state_dict" in payload:
            return _checkpoint_fingerprint(payload)
    return load_teacher(uri).fingerprint
