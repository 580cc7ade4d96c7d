"""What a store is: the settings resolved for a dataset, and the content address they hash to.

    settings = resolve_settings(config, spec)          # include_inputs, precision, plan: no "auto" left
    soft_labels = storage_spec(config, spec)
    key, doc = cache_key(spec, teacher_fingerprint, soft_labels, settings)

Everything that changes a stored value enters the key: teacher, dataset fingerprint,
columns, preprocessing (shape, scale, mean/std, image decoding), split rule, storage
mode and parameters, views and their augmentation, whether inputs are included, and the
forward-pass precision.
Speed settings (batch sizes, shard sizes, the plan, actor counts) do not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from still.errors import StillError
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.soft_labels import SoftLabelSpec

SELF_CONTAINED_MAX_BYTES = 1 << 30
"""``store.include_inputs=auto`` copies the inputs into the store when the dataset's
decoded inputs are at most this big (MNIST: 55 MB, self-contained); larger data gets
a labels-only store that training joins back to the source."""
DEFAULT_K = 10  # store.k = 0 for a classifier
DEFAULT_SAMPLES = 64  # store.samples = 0 for a classifier


@dataclasses.dataclass(frozen=True)
class Settings:
    """The ``auto`` settings of a run, resolved."""

    include_inputs: bool
    precision: str
    plan: str


def resolve_settings(config: InferConfig, spec: Any, input_itemsize: int) -> Settings:
    """Resolves ``store.include_inputs``, ``infer.precision`` and ``infer.plan`` for this dataset.

    ``auto`` means: inputs included up to :data:`SELF_CONTAINED_MAX_BYTES` of decoded
    input (``input_itemsize`` bytes per decoded value); ``bf16`` on GPUs and ``fp32`` on
    CPUs; the streaming plan on GPUs and the fused plan on CPUs (``teacher_infer.pipeline``
    has the measurements).
    """
    include = config.store.include_inputs
    if include == "auto":
        stored_rows = spec.num_rows * config.store.views  # a self-contained multi-view store keeps each view's input
        include = stored_rows * math.prod(spec.input_shape) * input_itemsize <= SELF_CONTAINED_MAX_BYTES
    gpu = config.infer.num_gpus > 0
    precision = config.infer.precision if config.infer.precision != "auto" else ("bf16" if gpu else "fp32")
    plan = config.infer.plan if config.infer.plan != "auto" else ("streaming" if gpu else "fused")
    return Settings(include_inputs=bool(include), precision=precision, plan=plan)


def storage_spec(config: InferConfig, spec: Any) -> SoftLabelSpec:
    """The storage settings for this dataset, checked against it (mode vs task, k vs classes, augmentation vs shape)."""
    store = config.store
    store.augment.check(spec.input_shape, "store.augment")
    try:
        return SoftLabelSpec.create(store.mode, spec.num_classes, dtype=store.dtype, k=store.k or DEFAULT_K,
                                    samples=store.samples or DEFAULT_SAMPLES, sample_temperature=store.sample_temperature,
                                    temperatures=store.temperatures, task=spec.task)
    except StillError as exc:
        raise StillError(f"dataset {spec.name!r} ({spec.num_classes} classes, {spec.task}): {exc}") from None


def storage_fields(config: InferConfig, soft_labels: SoftLabelSpec, settings: Settings) -> dict[str, Any]:
    """What the store keeps, as the cache key and the manifest's ``storage`` section record it.

    Multi-view stores add ``views``, ``augment`` and ``augment_params`` (absent for one
    view: keys of single-view stores are what they were).
    """
    fields = {**soft_labels.manifest_fields(), "include_inputs": settings.include_inputs,
              "feature_layers": list(config.teacher.feature_layers)}
    if config.store.views > 1:
        from still.augment import param_names

        fields.update(views=config.store.views, augment=config.store.augment.to_dict(),
                      augment_params=list(param_names(config.store.augment)))
    return fields


def cache_key(config: InferConfig, spec: Any, teacher_fp: str, soft_labels: SoftLabelSpec,
              settings: Settings) -> tuple[str, dict[str, Any]]:
    """The store's content address: sha256 of teacher, data, preprocessing, storage and precision.

    Returns:
        (16-hex-digit key, the document it hashes).
    """
    doc = {
        "format_version": st.FORMAT_VERSION,
        "teacher": teacher_fp,
        "dataset": spec.fingerprint,
        "columns": [spec.id_column, spec.feature_column, spec.label_column, spec.split_column],
        "task": spec.task,
        "preprocessing": spec.preprocessing,
        "split_rule": dict(spec.split_rule),
        "storage": storage_fields(config, soft_labels, settings),
    }
    if settings.precision != "fp32":
        doc["precision"] = settings.precision  # absent for fp32: keys of earlier fp32 stores stay valid
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:16], doc
