"""What a finished student becomes.

- ``student.pt``: a still checkpoint (``still.checkpoints``), loadable by ``still
  infer`` as a teacher and by ``student.init`` (``student_train.transfer``);
- ``student.torchscript.pt``: TorchScript, for serving without still installed;
- the MLflow model ``model`` of the run (``mlflow.pytorch.log_model``), optionally
  registered with an alias.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from still.checkpoints import save_checkpoint
from still.models import build_model


def student_from_state(net_state: Mapping[str, torch.Tensor], family: str, model_args: Mapping[str, Any]) -> nn.Module:
    """Rebuilds the student from a loop state's ``net`` weights (drops the projector)."""
    model = build_model(family, **dict(model_args))
    prefix = "student."
    model.load_state_dict({k[len(prefix):]: v for k, v in net_state.items() if k.startswith(prefix)})
    return model.eval()


def save_student(model: nn.Module, family: str, model_args: Mapping[str, Any], meta: Mapping[str, Any],
                 output_dir: str | Path) -> dict[str, str]:
    """Writes the still checkpoint and the TorchScript file; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(str(out / "student.pt"), model, family, dict(model_args), dict(meta))
    example = torch.zeros(2, *model_args["input_shape"])
    scripted = torch.jit.trace(model.eval(), example, check_trace=False)
    script_path = out / "student.torchscript.pt"
    tmp = out / ".student.torchscript.pt.tmp"
    torch.jit.save(scripted, str(tmp))
    tmp.replace(script_path)
    return {"checkpoint": checkpoint, "torchscript": str(script_path)}


def log_mlflow_model(tracker: Any, model: nn.Module, input_shape: tuple[int, ...], register_name: str = "",
                     alias: str = "") -> dict[str, Any]:
    """Logs the student as the run's MLflow model ``model``; registers it when asked.

    Returns:
        ``{"model_uri", "registered_version"}`` (version None when not registered).
    """
    if not getattr(tracker, "run_id", ""):
        return {"model_uri": None, "registered_version": None}
    import cloudpickle
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracker.tracking_uri)
    example = np.zeros((2, *input_shape), dtype=np.float32)
    # Naming the requirements skips MLflow's dependency inference, which imports the
    # model in a subprocess and costs ~10 s per logged model.
    # cloudpickle: mlflow.pytorch pickles the model with it, and loading needs it.
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"cloudpickle=={cloudpickle.__version__}",
                    f"numpy=={np.__version__}"]
    with mlflow.start_run(run_id=tracker.run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=example, pip_requirements=requirements,
            registered_model_name=register_name or None,
        )
    version = getattr(info, "registered_model_version", None)
    if register_name and alias and version is not None:
        mlflow.MlflowClient(tracking_uri=tracker.tracking_uri).set_registered_model_alias(
            register_name, alias, str(version))
    return {"model_uri": info.model_uri, "registered_version": version}


def latency_ms(model: Any, input_shape: tuple[int, ...], batch_size: int, repeats: int = 20) -> float:
    """Median milliseconds of one forward pass over a batch, on this machine's CPU."""
    x = torch.randn(batch_size, *input_shape)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            started = time.perf_counter()
            model(x)
            if i >= 3:
                times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000.0)


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights (parameters and buffers) in memory."""
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))
