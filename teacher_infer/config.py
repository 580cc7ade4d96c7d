"""The config of ``still infer``: data, teacher, store, run settings, tracking, ray.

Load it with ``still.config.load_config(InferConfig, path, ["store.mode=dense"])``;
every key below is a dotted override on the command line::

    still infer data.source=builtin:digits teacher.uri=teacher.pt store.mode=topk store.k=5
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from still.config import DataConfig, RayConfig, TrackingConfig
from still.errors import StillError


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Which teacher to run."""

    uri: str = ""
    """A still checkpoint, a TorchScript file, a ``torch.export`` file (``.pt2``), or an
    MLflow model URI (``runs:/<run>/<name>``, ``models:/<name>@<alias>``). Required."""
    feature_layer: str = ""
    """Optional hidden layer stored as ``features``: a submodule name (captured with a
    forward hook during the one forward pass, e.g. ``body``) or a method name (e.g.
    ``features``, called as ``model.features(x)``). Empty: no features column."""

    def __post_init__(self) -> None:
        if self.uri != self.uri.strip():
            raise StillError(f"teacher.uri must not have surrounding spaces, got {self.uri!r}")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where and how the soft labels are stored (the storage settings enter the key)."""

    root: str = "stores"
    """Directory (any storage URI) holding stores; each store is ``<root>/<key>``."""
    mode: Literal["dense", "topk"] = "topk"
    """``dense``: all C logits; ``topk``: the k largest logits, their class ids and the
    logsumexp of all C (exact top-k probabilities and tail mass at any temperature)."""
    k: int = 10
    """Number of classes kept per row in ``topk`` mode (must be <= num_classes)."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage type of the logits (and features)."""
    include_inputs: bool = True
    """Store the raw inputs (``input`` column) so the store is self-contained."""

    def __post_init__(self) -> None:
        if not self.root:
            raise StillError("store.root must not be empty")
        if self.k < 1:
            raise StillError(f"store.k must be >= 1, got {self.k}")


@dataclasses.dataclass(frozen=True)
class InferRunConfig:
    """Execution settings: they change speed, never the store's content or key."""

    batch_size: int = 4096
    """Rows per teacher forward pass."""
    shard_rows: int = 0
    """Rows per store shard (one Ray task reads, infers and writes one shard);
    0: chosen from the row size (about 32 MiB of input per shard, at most
    ``ceil(rows / (2 * CPUs))`` so every CPU gets work)."""
    num_gpus: float = 0.0
    """GPUs per teacher actor; > 0 runs one actor per GPU with autocast (fp16)."""
    torch_threads: int = 0
    """Intra-op threads per inference task; 0: the task's CPU count (Ray's default)."""
    num_cpus_per_task: float = 1.0
    """CPUs reserved per inference task on CPU clusters."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise StillError(f"infer.batch_size must be >= 1, got {self.batch_size}")
        if self.shard_rows < 0:
            raise StillError(f"infer.shard_rows must be >= 0, got {self.shard_rows}")
        if self.num_gpus < 0:
            raise StillError(f"infer.num_gpus must be >= 0, got {self.num_gpus}")
        if self.torch_threads < 0:
            raise StillError(f"infer.torch_threads must be >= 0, got {self.torch_threads}")
        if self.num_cpus_per_task <= 0:
            raise StillError(f"infer.num_cpus_per_task must be > 0, got {self.num_cpus_per_task}")


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """Root config of ``still infer``."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The dataset the teacher labels."""
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    """The teacher model."""
    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    """The soft-label store written."""
    infer: InferRunConfig = dataclasses.field(default_factory=InferRunConfig)
    """Batch sizes, shard sizes, GPUs: speed only."""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    """MLflow tracking (one run per ``still infer``)."""
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    """Ray cluster (embedded local by default; ``--address`` / ``$RAY_ADDRESS``)."""
