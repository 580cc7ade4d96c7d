"""The ``still tune`` config: the ``still train`` sections plus ``tune`` and ``space``.

A sweep is many ``still train`` runs that differ in a few keys, so ``TuneConfig``
carries every section of :class:`student_train.config.TrainConfig` (the base config of
each trial) and adds two of its own:

- ``tune``: the searcher, the scheduler (ASHA), how many trials and how many at once,
  where results go, resume and retrain-best switches;
- ``space``: the swept keys. Each of ``space.temperature`` (``kd.temperature``),
  ``space.weight`` (``kd.weight``), ``space.width`` (``student.width``) and
  ``space.lr`` (``train.lr``) is a list (``grid`` sweeps it, ``random``/``optuna``
  choose from it) or a range ``{low: 1, high: 20, log: true}``. Width ranges with
  integer bounds sample integers. An unset key is not swept (the base value holds),
  except temperature, weight and width, which have defaults so that
  ``still tune store.uri=…`` alone runs a sensible sweep.

Example::

    still tune store.uri=stores/<key> tune.searcher=optuna tune.num_samples=16 \\
        'space.temperature={low: 1, high: 20, log: true}' space.width=[64,128,256]

Every value check names its key (``tune.num_samples must be >= 1, got 0``); the
space itself is checked in :func:`tuning.space.resolve_space`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Literal

from still.config import DataConfig, RayConfig, TrackingConfig, to_dict
from still.errors import StillError
from student_train.config import (
    KDConfig,
    RegisterConfig,
    ScalingConfig,
    StoreConfig,
    StudentConfig,
    TrainConfig,
    TrainLoopConfig,
)

# Metrics every trial reports once per epoch, with the direction that is better.
METRICS: dict[str, str] = {"val_accuracy": "max", "val_nll": "min", "val_ce": "min"}


@dataclasses.dataclass(frozen=True)
class TuneSection:
    """The search: searcher, scheduler, trial counts and resources, outputs."""

    name: str = ""
    """Sweep name: names the output folder, the MLflow parent run and (with a trial
    counter) every trial. Empty: ``sweep-<hash of the config>``, deterministic."""
    searcher: Literal["grid", "random", "optuna"] = "random"
    """``grid`` (every combination of the lists, ``num_samples`` times), ``random``,
    or ``optuna`` (Optuna's TPE sampler through Ray Tune's OptunaSearch)."""
    num_samples: int = 8
    """Trials for random/optuna; repetitions of the whole grid for grid."""
    metric: str = "val_accuracy"
    """The per-epoch metric that ASHA and the best-trial choice use: val_accuracy or val_nll
    (classifiers), val_ce (language models: held-out cross-entropy, nats/token)."""
    mode: Literal["", "max", "min"] = ""
    """Whether the metric is better high or low; empty: the metric's natural mode."""
    scheduler: Literal["asha", "none"] = "asha"
    """``asha``: stop poorly performing trials early (async successive halving)."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it may be stopped."""
    reduction_factor: float = 2.0
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0: as many as the cluster's resources allow."""
    cpus_per_trial: float = 1.0
    """CPUs reserved by an in-process trial (a ``trainer`` trial reserves its workers'
    resources through scaling.* instead)."""
    gpus_per_trial: float = 0.0
    """GPUs reserved by an in-process trial."""
    trial_mode: Literal["in_process", "trainer"] = "in_process"
    """``in_process``: each trial trains in its own Tune actor, one worker, no
    TorchTrainer (about 10x cheaper per trial in bench/sweep.py, see tuning/trainable.py);
    ``trainer``: each trial builds a Ray Train TorchTrainer with scaling.* workers."""
    seed: int = 0
    """Seed of the searcher's sampling (the trials' own seed is train.seed)."""
    output_dir: str = ""
    """Where the trial folders, table, plot and results go; empty: runs/tune-<name>/."""
    resume: bool = False
    """Continue an interrupted sweep of the same name without re-running finished trials."""
    retrain_best: bool = False
    """After the sweep, train the best config on train+val and log it as the sweep's model."""

    def __post_init__(self) -> None:
        checks = [
            (self.num_samples >= 1, f"tune.num_samples must be >= 1, got {self.num_samples}"),
            (self.grace_period >= 1, f"tune.grace_period must be >= 1, got {self.grace_period}"),
            (self.reduction_factor > 1, f"tune.reduction_factor must be > 1, got {self.reduction_factor}"),
            (self.max_concurrent_trials >= 0,
             f"tune.max_concurrent_trials must be >= 0, got {self.max_concurrent_trials}"),
            (self.cpus_per_trial > 0, f"tune.cpus_per_trial must be > 0, got {self.cpus_per_trial}"),
            (self.gpus_per_trial >= 0, f"tune.gpus_per_trial must be >= 0, got {self.gpus_per_trial}"),
            ("/" not in self.name and self.name.strip() == self.name,
             f"tune.name must be a plain name without '/' or surrounding spaces, got {self.name!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise StillError(message)
        if self.metric not in METRICS:
            raise StillError(f"tune.metric must be one of {', '.join(METRICS)}; got {self.metric!r}")

    @property
    def resolved_mode(self) -> str:
        """``max`` or ``min``: the configured mode, else the metric's natural one."""
        return self.mode or METRICS[self.metric]


@dataclasses.dataclass(frozen=True)
class SpaceSection:
    """The swept keys: each a list of values or a range ``{low, high[, log]}``; None: default."""

    temperature: Any = None
    """kd.temperature; default [1, 2, 4, 8]."""
    weight: Any = None
    """kd.weight (λ); default [0.5, 0.7, 0.9]."""
    width: Any = None
    """student.width; default [32, 64, 128, 256] for mlp, [0.25, 0.5, 1.0] for cnn.
    Integer bounds of a range sample integers."""
    lr: Any = None
    """train.lr; default: not swept."""
    hint_weight: Any = None
    """kd.hint_weight (β of the hint terms, with kd.hints; 0 turns them off); default: not swept."""
    depth: Any = None
    """student.depth (layers); default: not swept. Integer values."""
    divergence: Any = None
    """kd.divergence: a list of ``forward``, ``reverse``, ``jsd``; default: not swept."""


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """Root config of ``still tune``: a TrainConfig's sections (the base of every trial),
    plus the search (``tune``) and the space (``space``)."""

    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    scaling: ScalingConfig = dataclasses.field(default_factory=lambda: ScalingConfig(num_workers=(1,)))
    """Workers of a ``tune.trial_mode=trainer`` trial (default one; in_process trials use one)."""
    register: RegisterConfig = dataclasses.field(default_factory=RegisterConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    tune: TuneSection = dataclasses.field(default_factory=TuneSection)
    space: SpaceSection = dataclasses.field(default_factory=SpaceSection)

    def __post_init__(self) -> None:
        # The base trial config runs TrainConfig's own checks (kd.weight in [0, 1], ...).
        self.base_train_config()
        if len(self.store.uri) > 1:
            raise StillError(f"store.uri: a sweep reads one store, got {len(self.store.uri)}")
        if not self.store.uri and not self.kd.online_teacher:
            raise StillError("store.uri is required: a sweep trains every trial from one soft-label store")
        if self.tune.grace_period > self.train.epochs:
            raise StillError(
                f"tune.grace_period ({self.tune.grace_period}) must be <= train.epochs ({self.train.epochs})"
            )
        if self.tune.trial_mode == "in_process" and self.scaling.num_workers not in ((0,), (1,)):
            raise StillError(
                "tune.trial_mode=in_process trains each trial on one worker; scaling.num_workers="
                f"{list(self.scaling.num_workers)} needs tune.trial_mode=trainer"
            )

    def base_train_config(self) -> TrainConfig:
        """Returns the TrainConfig every trial starts from (this config minus tune/space)."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**sections)

    @property
    def sweep_name(self) -> str:
        """``tune.name``, else ``sweep-<8 hex>`` hashed from the config (resume-stable)."""
        if self.tune.name:
            return self.tune.name
        tree = to_dict(self)
        for volatile in ("resume", "retrain_best", "output_dir"):
            tree["tune"].pop(volatile, None)
        tree.pop("ray", None)
        digest = hashlib.sha256(json.dumps(tree, sort_keys=True, default=str).encode()).hexdigest()
        return f"sweep-{digest[:8]}"

    @property
    def output_dir(self) -> str:
        """``tune.output_dir``, else ``runs/tune-<name>``."""
        return self.tune.output_dir or f"runs/tune-{self.sweep_name}"
