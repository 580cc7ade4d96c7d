"""The ``still train`` config: a frozen TrainConfig made of one dataclass per section.

Contract keys (DESIGN.md): ``store.uri``, ``student.family``, ``student.width``,
``student.depth``, ``kd.temperature``, ``kd.weight``, ``train.epochs``,
``train.batch_size``, ``train.lr``, ``train.seed``, ``scaling.num_workers``,
``tracking.experiment``. Every value check names its key.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from still.augment import AugmentConfig
from still.config import DataConfig, RayConfig, TrackingConfig
from still.errors import StillError


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where the teacher's soft labels come from."""

    uri: tuple[str, ...] = ()
    """One store URI, or several (an ensemble: teacher probabilities averaged at
    temperature T, rows joined by id). Empty: plain supervised training on data.source."""


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    """The student model (a family of still.models)."""

    family: str = "mlp"
    """A family of still.models: ``mlp`` or ``cnn`` (classifiers), ``llama`` (a causal language
    model, trained on token blocks of a text source: still.llama)."""
    width: float = 256
    """Hidden units (mlp), channel multiplier (cnn) or hidden size (llama)."""
    depth: int = 2
    """Hidden layers (mlp), conv layers in the second block (cnn) or transformer layers (llama)."""
    max_positions: int = 2048
    """Language models: the longest sequence the student can take (``max_position_embeddings``);
    ``data.seq_len`` must not exceed it."""
    dropout: float = 0.0
    """Dropout after each hidden layer."""
    input_dropout: float = 0.0
    """Dropout on the inputs (mlp only; Hinton et al. used 0.2 for the MNIST teacher)."""
    num_classes: int = 0
    """Output size; 0 takes the store's (or dataset's) classes. Any other value must match them."""
    init: str = ""
    """Initial weights (transfer learning): a still checkpoint, TorchScript file or MLflow
    model URI (runs:/…, models:/…) of the same family, width and depth; any tensor of
    another name or shape but the head's is an error (student_train.transfer)."""
    init_head: Literal["auto", "reinit", "keep"] = "auto"
    """The head of ``student.init``: ``auto`` re-initialises it when the init was trained for
    other classes (another count, or other class names where its checkpoint records them),
    ``reinit`` always, ``keep`` never."""


@dataclasses.dataclass(frozen=True)
class KDConfig:
    """The distillation loss (DESIGN.md): (1−λ)·CE + λ·T²·KL + β·Σ hint (student_train.hints)."""

    temperature: float = 4.0
    """T: softmax temperature of teacher and student in the KL term."""
    weight: float = 0.5
    """λ (kd_weight) in [0, 1]; 0 is plain supervised training."""
    tail: Literal["uniform", "bucket"] = "bucket"
    """How the loss treats a top-k store's tail, whose total mass at T is known but whose
    shape is not: ``bucket`` is a KL over the k classes plus one tail bin; ``uniform``
    spreads the tail mass evenly over the tail classes (student_train.losses)."""
    divergence: Literal["forward", "reverse", "jsd"] = "forward"
    """The soft term: ``forward`` KL(teacher ‖ student) (the convention); ``reverse``
    KL(student ‖ teacher); ``jsd``, the generalised Jensen–Shannon divergence with
    ``kd.jsd_beta``. ``reverse`` and ``jsd`` are over the bins the store knows exactly
    (a top-k store's k classes plus its tail bin: ``kd.tail=bucket``), not for sampled
    or multi-label stores (student_train.losses)."""
    jsd_beta: float = 0.5
    """β of ``kd.divergence=jsd``, in (0, 1): ``β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)``,
    ``m = β·p + (1 − β)·q`` (TRL's GKD convention, whose β = 0 and 1 stand for the forward and reverse KL)."""
    hint_weight: float = 0.0
    """β: weight of the hint terms, each the mean squared error between a projected student
    layer and the stored teacher layer it is paired with (``kd.hints``); 0: no hints."""
    hints: tuple[str, ...] = ()
    """Hint pairs ``"student_layer:teacher_layer"`` (one name: the same on both sides), e.g.
    ``[pool2, features]``: the student's layer (still.layers) through a learned projector
    (linear, or 1x1 conv for feature maps) to a teacher layer the store keeps
    (``teacher.feature_layers``)."""
    online_teacher: str = ""
    """A teacher checkpoint forwarded every step instead of a store (online KD; for the
    bench's comparison only — the point of still is not to do this)."""


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """The optimisation loop and its outputs."""

    epochs: int = 10
    """Passes over the training split."""
    batch_size: int = 128
    """Global batch size (split evenly across workers)."""
    lr: float = 5e-3
    """Learning rate. The default suits small data, where an epoch is few steps: a width-64
    student on digits (1,437 training rows, 5 epochs) reached 0.75 test accuracy at 1e-3
    and 0.88–0.92 at 5e-3 (seeds 0–3). Large datasets want less (configs/mnist.yaml: 1e-3)."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """Optimizer; sgd uses momentum 0.9."""
    weight_decay: float = 0.0
    """L2 weight decay."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """``cosine``: the learning rate falls from ``train.lr`` to 0 along a half cosine over
    the run's steps (Loshchilov & Hutter 2017, without restarts)."""
    seed: int = 0
    """Seed of weight init, shuffling, dropout, augmentation and view choice."""
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    """Augmentation of image inputs, drawn afresh for every batch (data without a teacher,
    and single-view stores, whose targets were computed on the un-augmented input). A
    multi-view store replays its own views: leave this unset, or set it to the store's
    ``store.augment`` (anything else is refused: the targets would not match the inputs)."""
    freeze: tuple[str, ...] = ()
    """Student parameters not to train: glob patterns of parameter names (``body.*``,
    ``body.0.*``); each must match one (student_train.transfer)."""
    lr_groups: tuple[str, ...] = ()
    """Learning rate per parameter group: ``"pattern=factor"`` entries (``head.*=10``: the
    head at 10 × train.lr); first match wins, unmatched parameters train at train.lr."""
    views: Literal["one", "all"] = "one"
    """Multi-view stores: ``one`` trains each epoch on one view per sample, drawn afresh
    every epoch (an epoch is as long as with one view); ``all`` on every view."""
    resume: bool = False
    """Continue a stopped run of the same name from its last checkpoint."""
    output_dir: str = ""
    """Where the student (still checkpoint + TorchScript) goes; empty: runs/<name>/."""
    name: str = ""
    """Run name; empty: derived deterministically from the config."""
    ingest: Literal["auto", "memory", "stream"] = "auto"
    """Per-worker data: ``memory`` reads the worker's share once into tensors (on the GPU
    when training on one), ``stream`` reads Ray Data every epoch (stores larger than a
    worker's memory), ``auto`` picks memory when the worker's share of the training
    rows takes under 1 GiB (``Source.row_bytes`` × rows ÷ workers), else stream."""
    shuffle_buffer: int = 0
    """Rows a streaming worker mixes locally (the shards also come in a new random order
    every epoch); 0: four shards' worth, at least 16 batches, at most 128 MiB of rows."""
    val_rows: int = 50_000
    """Validation rows evaluated every epoch: the whole split when it holds no more, else a fixed
    sample of this many (the split's rows of row groups taken in a seeded order), read once per
    run. 0: the whole split. The test split is always evaluated whole, once, at the end."""
    verify_store: bool = False
    """Re-read every shard against the manifest (checksums, values, unique ids) before
    training, as ``still store verify`` does. Off, opening a store checks the manifest,
    each shard's size and its footer schema (milliseconds)."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the job fails."""
    warmup_steps: int = 0
    """Optimizer steps over which the learning rate rises linearly from 0 to ``train.lr``
    before ``train.lr_schedule`` takes over (language models want a few hundred)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all (the epoch under way ends there, evaluated and
    checkpointed); 0: run every epoch in full."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this before each optimizer step; 0: no clipping."""
    grad_accum: int = 1
    """Batches whose gradients are summed into one optimizer step (each batch is
    ``train.batch_size``): an effective batch ``grad_accum`` times larger in the same memory."""
    log_every: int = 0
    """Log the training loss, learning rate and throughput to MLflow every this many optimizer
    steps (a language-model run may be a single epoch); 0: once an epoch."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Language models: ``auto`` trains under bf16 autocast on GPUs and in fp32 on CPUs; ``bf16``
    forces autocast (CPU too), ``fp32`` never."""
    include_val: bool = False
    """Train on train+val (``still tune --retrain-best`` refits the best config this way);
    the reported val metrics are then on seen data."""


@dataclasses.dataclass(frozen=True)
class ScalingConfig:
    """How many Ray Train workers, and what each gets."""

    num_workers: tuple[int, ...] = (2,)
    """N workers, or [min, max] for elastic training; 0: in-process (no TorchTrainer)."""
    use_gpu: bool = False
    """Train on GPUs: each worker uses one device (``ray.train.torch.get_device()``;
    in process, the first visible GPU)."""
    gpus_per_worker: float = 0.0
    """GPU share each worker reserves, in (0, 1]: 0.25 packs four small students on a GPU.
    0: 1 when ``use_gpu``; a value > 0 implies ``use_gpu``."""
    cpus_per_worker: float = 0.0
    """CPUs reserved per worker; 0: 1 when the cluster has CPUs to spare, else a fraction.
    Also the torch threads per worker (at least 1; in process: unset keeps torch's default)."""
    resources_per_worker: dict[str, float] = dataclasses.field(default_factory=dict)
    """Custom Ray resources each worker also reserves, e.g. ``{still_worker: 1}`` to keep
    workers on nodes that carry that resource (CPUs: ``cpus_per_worker``; GPUs: ``use_gpu``)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How the workers' placement group is laid out over nodes; ``STRICT_SPREAD`` puts each
    worker on a node of its own (fails to schedule when there are fewer nodes than workers)."""

    def __post_init__(self) -> None:
        if len(self.num_workers) not in (1, 2):
            raise StillError(f"scaling.num_workers must be an int or [min, max], got {list(self.num_workers)}")
        if any(n < 0 for n in self.num_workers):
            raise StillError(f"scaling.num_workers must be >= 0, got {list(self.num_workers)}")
        if len(self.num_workers) == 2 and not 1 <= self.num_workers[0] <= self.num_workers[1]:
            raise StillError(f"scaling.num_workers [min, max] needs 1 <= min <= max, got {list(self.num_workers)}")
        if self.cpus_per_worker < 0:
            raise StillError(f"scaling.cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if not 0 <= self.gpus_per_worker <= 1:
            raise StillError(f"scaling.gpus_per_worker must be in (0, 1] (0: one GPU when scaling.use_gpu), got "
                             f"{self.gpus_per_worker:g}: a worker trains on one device; for more GPUs, use more "
                             "workers (scaling.num_workers)")
        for name, amount in self.resources_per_worker.items():
            if name in ("CPU", "GPU"):
                raise StillError(f"scaling.resources_per_worker.{name}: set "
                                 f"{'scaling.cpus_per_worker' if name == 'CPU' else 'scaling.gpus_per_worker'} "
                                 "instead")
            if not amount > 0:
                raise StillError(f"scaling.resources_per_worker.{name} must be > 0, got {amount}")

    @property
    def gpus(self) -> float:
        """The GPU share of each worker (0: CPU training)."""
        return self.gpus_per_worker or (1.0 if self.use_gpu else 0.0)

    @property
    def in_process(self) -> bool:
        """True when training runs in the calling process (num_workers 0)."""
        return self.num_workers == (0,)

    @property
    def ray_num_workers(self) -> int | tuple[int, int]:
        """The value for ``ray.train.ScalingConfig(num_workers=...)``."""
        if len(self.num_workers) == 2:
            return (self.num_workers[0], self.num_workers[1])
        return self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The largest number of workers the job may run on."""
        return max(1, self.num_workers[-1])


@dataclasses.dataclass(frozen=True)
class RegisterConfig:
    """Optional MLflow model registration of the final student."""

    name: str = ""
    """Registered model name; empty: do not register."""
    alias: str = ""
    """Alias set on the new version (e.g. ``champion``)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Root config of ``still train``."""

    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=ScalingConfig)
    register: RegisterConfig = dataclasses.field(default_factory=RegisterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        checks = [
            (self.kd.temperature > 0, f"kd.temperature must be > 0, got {self.kd.temperature}"),
            (0.0 <= self.kd.weight <= 1.0, f"kd.weight must be in [0, 1], got {self.kd.weight}"),
            (self.kd.hint_weight >= 0, f"kd.hint_weight must be >= 0, got {self.kd.hint_weight}"),
            (0.0 < self.kd.jsd_beta < 1.0, f"kd.jsd_beta must be in (0, 1), got {self.kd.jsd_beta}: β = 0 and 1 "
             "are the forward and reverse KL, kd.divergence=forward|reverse"),
            (self.kd.divergence == "forward" or self.kd.tail == "bucket",
             f"kd.divergence={self.kd.divergence} is computed over a top-k store's k classes and one tail bin: "
             "it takes kd.tail=bucket, not uniform"),
            (self.student.width > 0, f"student.width must be > 0, got {self.student.width}"),
            (self.student.depth >= 0, f"student.depth must be >= 0, got {self.student.depth}"),
            (0.0 <= self.student.dropout < 1.0, f"student.dropout must be in [0, 1), got {self.student.dropout}"),
            (0.0 <= self.student.input_dropout < 1.0,
             f"student.input_dropout must be in [0, 1), got {self.student.input_dropout}"),
            (self.student.num_classes >= 0, f"student.num_classes must be >= 0, got {self.student.num_classes}"),
            (self.train.epochs >= 1, f"train.epochs must be >= 1, got {self.train.epochs}"),
            (self.train.batch_size >= 1, f"train.batch_size must be >= 1, got {self.train.batch_size}"),
            (self.train.lr > 0, f"train.lr must be > 0, got {self.train.lr}"),
            (self.train.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.train.weight_decay}"),
            (self.train.max_failures >= 0, f"train.max_failures must be >= 0, got {self.train.max_failures}"),
            (self.train.shuffle_buffer >= 0, f"train.shuffle_buffer must be >= 0, got {self.train.shuffle_buffer}"),
            (self.train.val_rows >= 0, f"train.val_rows must be >= 0, got {self.train.val_rows}"),
            (self.train.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.train.warmup_steps}"),
            (self.train.max_steps >= 0, f"train.max_steps must be >= 0, got {self.train.max_steps}"),
            (self.train.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.train.grad_clip}"),
            (self.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.train.grad_accum}"),
            (self.train.log_every >= 0, f"train.log_every must be >= 0, got {self.train.log_every}"),
            (self.student.max_positions >= 2, f"student.max_positions must be >= 2, got {self.student.max_positions}"),
        ]
        for ok, message in checks:
            if not ok:
                raise StillError(message)
        self.train.augment.validate("train.augment")
        from student_train.hints import parse_hints
        from student_train.transfer import parse_lr_groups

        parse_hints(self.kd.hints)
        parse_lr_groups(self.train.lr_groups)
        from still.models import LM_MODELS, MODELS

        if self.student.family not in MODELS and self.student.family not in LM_MODELS:
            raise StillError(f"student.family must be one of {', '.join(sorted({**MODELS, **LM_MODELS}))}; "
                             f"got {self.student.family!r}")
        if self.language_model:
            self._check_language_model()
        if self.kd.online_teacher and self.store.uri:
            raise StillError("kd.online_teacher and store.uri are exclusive: pick a store or an online teacher")

    def _check_language_model(self) -> None:
        """What a language-model student cannot take (the classifier-only keys)."""
        unsupported = [(self.kd.online_teacher, "kd.online_teacher"), (self.kd.hints, "kd.hints"),
                       (self.train.augment.enabled, "train.augment"), (self.student.init, "student.init"),
                       (self.train.freeze, "train.freeze"), (self.train.lr_groups, "train.lr_groups"),
                       (self.student.dropout or self.student.input_dropout, "student.dropout"),
                       (self.student.num_classes, "student.num_classes")]
        for value, key in unsupported:
            if value:
                raise StillError(f"{key} applies to classifier students, not student.family={self.student.family!r}")

    @property
    def language_model(self) -> bool:
        """True when the student is a causal language model (``still.models.LM_MODELS``)."""
        from still.models import LM_MODELS

        return self.student.family in LM_MODELS

    @property
    def distills(self) -> bool:
        """True when a teacher signal (store or online teacher) enters the loss."""
        return bool(self.store.uri or self.kd.online_teacher)


@dataclasses.dataclass(frozen=True)
class ModelRefConfig:
    """The language model to evaluate."""

    uri: str = ""
    """``builtin:smollm2-135m``, a ``.gguf`` file, or a ``save_pretrained`` directory (a
    still-trained student's ``checkpoint``)."""


@dataclasses.dataclass(frozen=True)
class EvalLoopConfig:
    """What is evaluated, and how."""

    splits: tuple[str, ...] = ("val", "test")
    """Held-out splits of the token blocks to evaluate (``val``, ``test``, ``train``)."""
    max_blocks: int = 0
    """Blocks evaluated per split: the first this many in stored order; 0: all."""
    batch_size: int = 8
    """Blocks per forward pass."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on a GPU, fp32 on the CPU."""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Root config of ``still eval``: a language model's held-out cross-entropy on a text source's
    token blocks (the blocks ``still train`` makes with the same tokenizer and ``data.seq_len``)."""

    model: ModelRefConfig = dataclasses.field(default_factory=ModelRefConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval: EvalLoopConfig = dataclasses.field(default_factory=EvalLoopConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.eval.splits) - {"train", "val", "test"})
        if unknown or not self.eval.splits:
            raise StillError(f"eval.splits must name train, val or test, got {list(self.eval.splits)}")
        if self.eval.max_blocks < 0:
            raise StillError(f"eval.max_blocks must be >= 0, got {self.eval.max_blocks}")
        if self.eval.batch_size < 1:
            raise StillError(f"eval.batch_size must be >= 1, got {self.eval.batch_size}")
