"""``TeacherPredictor``: the batch-inference callable (no Ray imports; testable on numpy).

    spec = SoftLabelSpec.create("topk", 10, k=5, dtype="float16")
    predictor = TeacherPredictor(teacher_payload, input_shape=(64,), input_scale=1/16, soft_labels=spec)
    out = predictor({"id": ids, "input": raw, "label": labels, "split": splits})

The model is loaded once in ``__init__``. ``__call__`` preprocesses (raw × input_scale,
reshaped to input_shape), runs the teacher under ``torch.inference_mode`` (and fp16
autocast on CUDA), compresses the logits for the store
(:func:`teacher_infer.soft_labels.compress`), and adds per-row statistics computed
from the FULL logits (``_`` columns, :func:`teacher_infer.metrics.row_stats`), which
the writer aggregates into teacher metrics and drops before writing. Rows flagged in
an optional boolean ``_measure`` column also get their fidelity measured
(``_fidelity``: :func:`teacher_infer.fidelity.measure_rows` of those rows).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from still.errors import StillError
from teacher_infer.fidelity import measure_rows
from teacher_infer.metrics import row_stats
from teacher_infer.soft_labels import Ragged, SoftLabelSpec, compress


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
        soft_labels: How outputs are stored; None: :meth:`__call__` is not used
            (probing calls :meth:`logits` only).
        feature_layer: Submodule (forward hook) or method name whose output is stored
            as ``features``; empty for none.
        device: ``cpu`` or ``cuda``; autocast (fp16) is used on CUDA.
        torch_threads: Intra-op threads (0 leaves torch's setting).
        seed: Seeds the draws of ``sampled`` storage in :meth:`__call__` (:meth:`label`
            takes a generator of its own).
    """

    def __init__(
        self,
        teacher: Any,
        input_shape: tuple[int, ...],
        input_scale: float,
        soft_labels: SoftLabelSpec | None = None,
        feature_layer: str = "",
        device: str = "cpu",
        torch_threads: int = 0,
        seed: int = 0,
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
        self.soft_labels = soft_labels
        self._rng = np.random.default_rng(seed)
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
        x = torch.from_numpy(np.ascontiguousarray(raw).astype(np.float32, copy=not raw.flags.writeable))
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Infers one batch (:meth:`label` with this predictor's own random generator)."""
        return self.label(batch, self._rng)

    def label(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, Any]:
        """Infers one batch and turns the logits into store columns.

        Args:
            batch: ``input`` (n, ...) raw values, and optionally ``id``, ``split``
                (passed through unchanged), ``label`` (multi-class ``(n,)`` with -1 for
                unlabelled rows; multi-label ``(n, C)`` 0/1 with rows of -1) and
                ``_measure`` (bool ``(n,)``: the rows whose fidelity to measure).
            rng: Draws the samples of ``sampled`` storage.

        Returns:
            The pass-through columns, the compressed teacher outputs (numpy, or
            :class:`~teacher_infer.soft_labels.Ragged` list columns), ``features``
            when configured, the per-row ``_`` statistics and, with ``_measure``,
            ``_fidelity`` (the measured rows' fidelity, in row order).
        """
        if self.soft_labels is None:
            raise StillError("TeacherPredictor needs soft_labels to label batches")
        spec = self.soft_labels
        logits, feats = self.logits(batch["input"])
        if logits.shape[1] != spec.num_classes:
            raise StillError(f"teacher outputs {logits.shape[1]} classes, the store expects {spec.num_classes}")
        out: dict[str, Any] = {k: v for k, v in batch.items() if not k.startswith("_")}
        columns = compress(logits, spec, rng)
        out.update(columns)
        if feats is not None:
            out["features"] = feats.astype(spec.dtype, copy=False)
        labels = batch.get("label")
        if labels is not None and np.asarray(labels).dtype == object:
            labels = None  # labels with missing values as Python objects: treat as unlabelled
        out.update(row_stats(logits, labels, spec.task))
        measure = batch.get("_measure")
        if measure is not None and np.asarray(measure).any():
            rows = np.flatnonzero(measure)
            measured = {name: value.take(rows) if isinstance(value, Ragged) else value[rows]
                        for name, value in columns.items()}
            out["_fidelity"] = measure_rows(logits[rows], measured, spec)
        return out

