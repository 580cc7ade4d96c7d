"""The config of ``still infer``: data, teacher, store, run settings, tracking, ray.

Load it with ``still.config.load_config(InferConfig, path, ["store.mode=dense"])``;
every key below is a dotted override on the command line::

    still infer data.source=builtin:digits teacher.uri=teacher.pt store.mode=topk store.k=5
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from still.augment import AugmentConfig
from still.config import DataConfig, RayConfig, TrackingConfig
from still.errors import StillError


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Which teacher to run."""

    uri: str = ""
    """A still checkpoint, a TorchScript file, a ``torch.export`` file (``.pt2``), or an
    MLflow model URI (``runs:/<run>/<name>``, ``models:/<name>@<alias>``). Required."""
    feature_layers: tuple[str, ...] = ()
    """Hidden layers stored for feature (hint) distillation, one ``features_<layer>``
    column each (:mod:`still.layers`): a still family's named layer (``conv1``,
    ``pool1``, ``conv2``, ``pool2``, ``features`` for ``cnn``; ``hidden1``…,
    ``features`` for ``mlp``), any submodule name, or a TorchScript teacher's method
    (``features``). Each is stored flattened, its shape in the manifest. Empty: none."""

    def __post_init__(self) -> None:
        if self.uri != self.uri.strip():
            raise StillError(f"teacher.uri must not have surrounding spaces, got {self.uri!r}")
        if not self.feature_layers:
            return  # teacher_infer.store imports torch (1.5 s): not for every config built
        from teacher_infer.store import feature_column

        columns = [feature_column(name) for name in self.feature_layers]
        for index, name in enumerate(self.feature_layers):
            if not name or columns.index(columns[index]) != index:
                raise StillError(f"teacher.feature_layers: {name!r} is empty or repeats another layer's column "
                                 f"({columns[index]!r}); got {list(self.feature_layers)}")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where and how the soft labels are stored (the storage settings enter the key)."""

    root: str = "stores"
    """Directory (any storage URI) holding stores; each store is ``<root>/<key>``."""
    mode: Literal["dense", "topk", "sampled"] = "topk"
    """``dense``: all C logits; ``topk``: the k largest logits with their class ids, the
    log-normaliser and the tail's exact log-mass at each of ``store.temperatures``;
    ``sampled``: the classes of ``store.samples`` draws from the teacher distribution at
    ``store.sample_temperature``, with counts and logits (an unbiased estimate;
    Anshumann et al. 2025). What each can and cannot know: ``teacher_infer.soft_labels``."""
    k: int = 0
    """Number of classes kept per row in ``topk`` mode (must be <= num_classes); 0: 10 for a
    classifier, 32 per token for a language model."""
    samples: int = 0
    """Draws per row in ``sampled`` mode (with replacement; distinct classes are stored
    once); 0: 64 for a classifier, 24 per token for a language model."""
    sample_temperature: float = 1.0
    """The temperature of the distribution ``sampled`` mode draws from. The estimate is
    unbiased at every temperature of the grid, but noisy far from this one: draw at the
    temperature students will train at (bench/tail.py)."""
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    """Temperatures at which ``topk`` and ``sampled`` rows keep exact log-normalisers
    (float32 each); training at other temperatures interpolates between them. 1 (and
    ``store.sample_temperature``) are always added."""
    dtype: Literal["float16", "float32"] = "float16"
    """Storage type of the logits (and features); normalisers are always float32."""
    include_inputs: bool | Literal["auto"] = "auto"
    """``true``: copy the raw (decoded) inputs into the store as ``input``, so it is
    self-contained (small data; moving a store between clusters). ``false``: a
    labels-only store: ids, labels, splits and teacher outputs; training reads the
    inputs from the source recorded in the manifest and refuses a source whose
    fingerprint changed. ``auto``: ``true`` up to 1 GiB of decoded inputs (counted once
    per view; ``teacher_infer.key.SELF_CONTAINED_MAX_BYTES``), else ``false``."""
    views: int = 1
    """K: rows per sample. View 0 is the input as it is; views 1…K−1 are augmented by
    ``store.augment``, each with its parameters stored in the ``augment`` column, and the
    teacher runs on every view. Students replay each row's view exactly (``train.views``
    chooses one view per sample per epoch, or all). Enters the cache key."""
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    """The augmentation of views 1…K−1 (``store.views`` > 1 needs one)."""

    def __post_init__(self) -> None:
        if not self.root:
            raise StillError("store.root must not be empty")
        if self.k < 0:
            raise StillError(f"store.k must be >= 1 (0: the default), got {self.k}")
        if self.samples < 0:
            raise StillError(f"store.samples must be >= 1 (draws per row in sampled mode; 0: the default), "
                             f"got {self.samples}")
        if self.sample_temperature <= 0:
            raise StillError(f"store.sample_temperature must be > 0, got {self.sample_temperature}")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise StillError(f"store.temperatures must be a non-empty list of values > 0, got {list(self.temperatures)}")
        if self.views < 1:
            raise StillError(f"store.views must be >= 1 (1: the inputs as they are; K > 1: K views per sample, "
                             f"view 0 un-augmented), got {self.views}")
        self.augment.validate("store.augment")
        if self.views > 1 and not self.augment.enabled:
            raise StillError(f"store.views={self.views} needs an augmentation for views 1…{self.views - 1}: set "
                             "store.augment.jitter, store.augment.crop or store.augment.flip")
        if self.views == 1 and self.augment.enabled:
            raise StillError("store.augment is set but store.views=1 keeps only view 0, the un-augmented input: "
                             "set store.views to the number of views per sample")


@dataclasses.dataclass(frozen=True)
class InferRunConfig:
    """Execution settings: they change speed, never the store's content or key."""

    batch_size: int = 4096
    """Rows per teacher forward pass."""
    shard_rows: int = 0
    """Rows per store shard (the unit that is written, and resumed, exactly once);
    0: at most 32 MiB of decoded input per shard, at least two shards per CPU of the
    cluster, and a whole number of shards per CPU (``teacher_infer.plan.make_plan``)."""
    num_gpus: float = 0.0
    """GPUs per teacher actor (fractions share a GPU); > 0 runs the teacher in an actor
    pool on GPU nodes. A value no node of the cluster has is refused before any work."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Forward-pass precision (autocast for bf16/fp16); enters the cache key and the
    manifest. ``auto``: bf16 on GPUs (use fp16 on GPUs older than Ampere), fp32 on CPUs."""
    plan: Literal["auto", "fused", "streaming"] = "auto"
    """``fused``: one Ray task per shard reads, infers, compresses and writes (fastest on
    CPUs); ``streaming``: CPU read tasks → teacher actor pool → CPU compress/write tasks
    (GPUs busy while CPUs do I/O). ``auto``: streaming with GPUs, fused without."""
    min_actors: int = 1
    """Streaming plan: teacher actors kept however idle."""
    max_actors: int = 0
    """Streaming plan: most teacher actors; 0: as many as the cluster can place (the
    pool grows as GPU nodes join and shrinks when they idle). On CPUs the pool leaves
    one CPU for the read and write tasks."""
    torch_threads: int = 0
    """Intra-op threads per inference task; 0: the task's CPU count (Ray's default)."""
    num_cpus_per_task: float = 1.0
    """CPUs reserved per inference task on CPU clusters."""
    fidelity_rows: int = 2048
    """About how many rows (spread over all shards) get the stored target compared with
    the full teacher output (``fidelity`` in the manifest); 0: none."""
    splits: tuple[str, ...] = ("train", "val")
    """Language-model teachers: the splits of the token blocks captured (``train``,
    ``val``, ``test``); enters the key."""
    max_blocks: int = 0
    """Language-model teachers: at most this many training blocks (the first ones in the
    block cache's order); 0: all. Enters the key."""
    max_eval_blocks: int = 0
    """Language-model teachers: at most this many blocks of each held-out split (val,
    test); 0: all. Enters the key."""

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
        if self.min_actors < 1:
            raise StillError(f"infer.min_actors must be >= 1, got {self.min_actors}")
        if self.max_actors < 0 or (self.max_actors and self.max_actors < self.min_actors):
            raise StillError(f"infer.max_actors must be 0 (no limit) or >= infer.min_actors, got {self.max_actors}")
        if self.fidelity_rows < 0:
            raise StillError(f"infer.fidelity_rows must be >= 0, got {self.fidelity_rows}")
        unknown = sorted(set(self.splits) - {"train", "val", "test"})
        if not self.splits or unknown:
            raise StillError(f"infer.splits must name some of train, val, test; got {list(self.splits)}")
        if self.max_blocks < 0 or self.max_eval_blocks < 0:
            raise StillError(f"infer.max_blocks and infer.max_eval_blocks must be >= 0 (0: every block), got "
                             f"{self.max_blocks} and {self.max_eval_blocks}")


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
