"""``TeacherPredictor``: the batch-inference callable (no Ray imports; testable on numpy).

    predictor = TeacherPredictor(teacher_payload, input_shape=(64,), input_scale=1/16,
                                 mode="topk", k=5, dtype="float16")
    out = predictor({"id": ids, "input": raw, "label": labels, "split": splits})

The model is loaded once in ``__init__``. ``__call__`` preprocesses (raw × input_scale,
reshaped to input_shape), runs the teacher under ``torch.inference_mode`` (and fp16
autocast on CUDA), compresses the logits for the store, and adds per-row statistics
computed from the FULL logits (``_conf``, ``_correct``, ``_nll``, ``_entropy``), which the
writer aggregates into teacher metrics and drops before writing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from still.errors import StillError
from teacher_infer.store import compress, row_stats


def _as_matrix(values: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == object:
        array = np.stack([np.asarray(row) for row in array]) if len(array) else array.reshape(0, 0)
    return array


class TeacherPredictor:
    """Runs a teacher over dict-of-numpy batches and returns store columns.

    Args:
        teacher: A ``TeacherPayload`` (bytes, loaded here), a ``Teacher`` or a model.
        input_shape: Shape of one model input.
        input_scale: Model input = raw × this.
        mode: ``dense`` or ``topk``.
        k: Classes kept per row in top-k mode.
        dtype: ``float16`` or ``float32`` for stored logits and features.
        feature_layer: Submodule (forward hook) or method name whose output is stored
            as ``features``; empty for none.
        device: ``cpu`` or ``cuda``; autocast (fp16) is used on CUDA.
        torch_threads: Intra-op threads (0 leaves torch's setting).
        with_stats: Add the per-row ``_*`` statistic columns.
    """

    def __init__(
        self,
        teacher: Any,
        input_shape: tuple[int, ...],
        input_scale: float,
        mode: str = "topk",
        k: int = 10,
        dtype: str = "float16",
        feature_layer: str = "",
        device: str = "cpu",
        torch_threads: int = 0,
        with_stats: bool = True,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if hasattr(teacher, "load") and hasattr(teacher, "data"):
            model = teacher.load()
        elif hasattr(teacher, "model") and hasattr(teacher, "fingerprint"):
            model = teacher.model
        else:
            model = teacher
        self.device = torch.device(device)
        if self.device.type != "cpu":
            model = model.to(self.device)
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_scale = float(input_scale)
        self.mode, self.k, self.dtype = mode, int(k), dtype
        self.with_stats = with_stats
        self.feature_layer = feature_layer
        self._captured: list[torch.Tensor] = []
        self._feature_method = None
        self._hooks: list[Any] = []
        if feature_layer:
            modules = dict(model.named_modules()) if hasattr(model, "named_modules") else {}
            if feature_layer in modules and not isinstance(model, torch.jit.ScriptModule):
                self._hooks.append(modules[feature_layer].register_forward_hook(self._capture))
            elif callable(getattr(model, feature_layer, None)):
                self._feature_method = getattr(model, feature_layer)
            else:
                raise StillError(
                    f"teacher.feature_layer={feature_layer!r} is neither a submodule nor a method of the teacher "
                    f"(submodules: {', '.join(n for n in modules if n) or 'none'})"
                )

    def _capture(self, _module: Any, _inputs: Any, output: Any) -> None:
        self._captured.append(output)

    def close(self) -> None:
        """Removes the forward hooks this predictor put on the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def logits(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Full float32 logits (n, C) and features (n, d) or None for raw inputs."""
        raw = _as_matrix(raw)
        n = raw.shape[0]
        if raw.size != n * math.prod(self.input_shape):
            raise StillError(
                f"teacher input: rows of {raw.size // max(n, 1)} values cannot be reshaped to input shape {self.input_shape}"
            )
        x = torch.from_numpy(np.ascontiguousarray(raw).astype(np.float32, copy=False))
        with torch.inference_mode(), self._autocast():
            x = x.to(self.device, non_blocking=True)
            if self.input_scale != 1.0:
                x = x * self.input_scale
            x = x.reshape(n, *self.input_shape)
            self._captured.clear()
            out = self.model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            feats = None
            if self._feature_method is not None:
                feats = self._feature_method(x)
            elif self._captured:
                feats = self._captured[-1]
            logits = out.float().cpu().numpy()
            if feats is not None:
                feats = feats.float().reshape(n, -1).cpu().numpy()
        if logits.ndim != 2:
            raise StillError(f"teacher output has shape {tuple(logits.shape)}, expected (batch, num_classes)")
        return logits, feats

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Infers one batch.

        Args:
            batch: ``input`` (n, ...) raw values, and optionally ``id``, ``label``,
                ``split`` (passed through unchanged).

        Returns:
            The pass-through columns, the compressed teacher outputs (``logits`` or
            ``topk_idx``/``topk_logit``/``logsumexp``), ``features`` when configured,
            and the per-row ``_conf``/``_correct``/``_nll``/``_entropy`` statistics.
        """
        logits, feats = self.logits(batch["input"])
        out: dict[str, np.ndarray] = {k: v for k, v in batch.items()}
        out.update(compress(logits, self.mode, self.k, self.dtype))
        if feats is not None:
            out["features"] = feats.astype(self.dtype, copy=False)
        if self.with_stats:
            labels = batch.get("label")
            if labels is not None and np.asarray(labels).dtype == object:
                labels = None  # nullable labels with missing values: no accuracy
            out.update(row_stats(logits, labels))
        return out
