"""``TeacherPredictor``: the teacher's forward passes, and nothing else (no Ray imports).

    predictor = TeacherPredictor(teacher_payload, Normalisation((64,), 1 / 16), device="cuda", precision="bf16")
    logits, features = predictor.forward(raw_uint8_rows)      # float32 (n, C), {layer: (n, *shape)}
    logits, _ = predictor.forward(raw, source_index, params)   # a multi-view shard: row i is view
                                                               # params[i] of raw[source_index[i]]

The model is loaded once in ``__init__``. :meth:`TeacherPredictor.forward` takes the
rows as stored in the source (uint8 pixels stay uint8), moves each batch to the device
(pinned host memory and an asynchronous copy on CUDA), turns it into the model input
there (raw × scale, minus mean, over std, per channel), augments it there when the rows
are views (:func:`still.augment.apply_augment`, the function students replay them with),
and runs the teacher under
``torch.inference_mode`` at ``precision`` (``fp32``; ``bf16``/``fp16`` by autocast,
so weights and reductions the autocast policy keeps in float32 stay there). Logits
come back as float32 numpy. Compression and statistics happen elsewhere, on CPUs
(:mod:`teacher_infer.shards`), so on a GPU cluster the actor holding this object
spends its time in forward passes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch

from still.augment import AugmentConfig, apply_augment, background_of
from still.datasets.inputs import Normalisation
from still.errors import StillError
from still.layers import LayerTap, named_layers

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TeacherPredictor:
    """Holds a teacher on a device and runs forward passes over raw rows.

    Args:
        teacher: A ``TeacherPayload`` (bytes, loaded here), a ``Teacher`` or a model.
        normalisation: How raw rows become model inputs.
        feature_layers: Layers whose outputs are returned as features
            (:mod:`still.layers`: a family's named layer or a submodule, captured by a
            forward hook in the one forward pass; or, for a TorchScript teacher, a
            method such as ``features``, called as ``model.features(x)``).
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast on the device).
        batch_size: Rows per forward pass.
        torch_threads: Intra-op threads (0 leaves torch's setting).
        augment: What the ``params`` of :meth:`forward` describe (multi-view stores).
    """

    def __init__(
        self,
        teacher: Any,
        normalisation: Normalisation,
        *,
        feature_layers: tuple[str, ...] = (),
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 4096,
        torch_threads: int = 0,
        augment: AugmentConfig = AugmentConfig(),
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if precision not in PRECISIONS:
            raise StillError(f"infer.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
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
        self.normalisation = normalisation
        self.precision = precision
        self.batch_size = int(batch_size)
        self.augment = augment
        self.background = background_of(normalisation, self.device) if augment.enabled else None
        self.feature_layers = tuple(feature_layers)
        hookable = named_layers(model)
        self._methods = {name: getattr(model, name) for name in self.feature_layers
                         if name not in hookable and callable(getattr(model, name, None))}
        hooked = [name for name in self.feature_layers if name not in self._methods]
        self._tap = LayerTap(model, hooked, "teacher.feature_layers") if hooked else None

    def close(self) -> None:
        """Removes the forward hooks this predictor put on the model."""
        if self._tap is not None:
            self._tap.close()

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def forward(self, raw: np.ndarray, source_index: np.ndarray | None = None,
                params: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Runs the teacher over all rows (or all views), ``batch_size`` at a time.

        Args:
            raw: ``(n, ...)`` rows as the source holds them (any numeric dtype).
            source_index: For views: the row of ``raw`` each output row is a view of.
            params: For views: ``(len(source_index), P)`` augmentation parameters.

        Returns:
            float32 logits ``(m, C)`` and features ``{layer: (m, *shape)}`` (empty
            without feature layers), one row per row of ``raw``, or per view.

        Raises:
            StillError: The rows cannot be reshaped to the input shape, or the teacher
                does not return ``(batch, C)``.
        """
        raw = np.asarray(raw)
        n = raw.shape[0]
        per_row = math.prod(self.normalisation.input_shape)
        if raw.size != n * per_row:
            raise StillError(f"teacher input: rows of {raw.size // max(n, 1)} values cannot be reshaped to input "
                             f"shape {self.normalisation.input_shape}")
        raw = np.ascontiguousarray(raw).reshape(n, per_row)
        cuda = self.device.type == "cuda"
        if cuda:  # one copy, into pinned memory, so that the copies to the device run asynchronously
            dtype = torch.from_numpy(np.empty(0, raw.dtype)).dtype
            host = torch.empty(raw.shape, dtype=dtype, pin_memory=True)
            host.numpy()[:] = raw
        else:
            host = torch.from_numpy(raw if raw.flags.writeable else raw.copy())  # Arrow buffers are read-only
        views = source_index is not None
        if views:
            index = torch.from_numpy(np.asarray(source_index, dtype=np.int64))
            view_params = torch.from_numpy(np.ascontiguousarray(params, dtype=np.int16))
        rows = len(index) if views else n
        logits: list[torch.Tensor] = []
        feats: dict[str, list[torch.Tensor]] = {name: [] for name in self.feature_layers}
        with torch.inference_mode():
            for lo in range(0, rows, self.batch_size):
                if views:
                    chunk = host.index_select(0, index[lo:lo + self.batch_size]).to(self.device, non_blocking=cuda)
                    x = apply_augment(self.augment, self.normalisation.apply(chunk),
                                      view_params[lo:lo + self.batch_size].to(self.device), self.background)
                else:
                    x = self.normalisation.apply(host[lo:lo + self.batch_size].to(self.device, non_blocking=cuda))
                out, feat = self._forward_batch(x)
                logits.append(out)
                for name, value in feat.items():
                    feats[name].append(value)
            logits_np = torch.cat(logits).cpu().numpy() if logits else np.zeros((0, 0), np.float32)
            feats_np = {name: torch.cat(values).cpu().numpy() for name, values in feats.items() if values}
        if logits_np.ndim != 2:
            raise StillError(f"teacher output has shape {tuple(logits_np.shape)}, expected (batch, num_classes)")
        bad = ~np.isfinite(logits_np).all(axis=1)
        if bad.any():
            hint = "; run it at infer.precision=fp32 (or bf16, which has fp32's range)" if self.precision == "fp16" \
                else ""
            raise StillError(f"the teacher returned NaN/inf logits for {int(bad.sum())} of {rows} rows at "
                             f"infer.precision={self.precision}{hint}")
        return logits_np, feats_np

    def _forward_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self._autocast():
            out = self.model(x)
            if isinstance(out, (tuple, list)):
                out = out[0]
            feats = dict(self._tap.outputs) if self._tap is not None else {}
            feats.update({name: method(x) for name, method in self._methods.items()})
        if self._tap is not None:
            self._tap.outputs.clear()
        return out.float(), {name: value.float() for name, value in feats.items()}
