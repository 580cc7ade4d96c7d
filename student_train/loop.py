"""The per-worker training loop, written once for both ways of running it.

``run_loop(spec, session)`` is the whole loop: build the student (plus a projector
per hint pair, ``student_train.hints``; frozen parameters and learning-rate groups,
``student_train.transfer``) on the session's device, restore the last checkpoint if there is one,
then per epoch train on this worker's shard, evaluate on the validation split
(rank 0), log the epoch to MLflow (rank 0, as it ends), report metrics and a
checkpoint (model, optimizer, epoch, metrics history, config). The *session* hides
where it runs:

- :class:`RaySession` inside a Ray Train V2 worker (``train_loop_per_worker``): rank,
  device and DDP from ``ray.train.torch``, reports and checkpoints through
  ``ray.train.report`` (so ``FailureConfig`` restarts and ``train.resume`` continue
  from the last epoch).
- :class:`LocalSession` in the calling process (``scaling.num_workers=0``, and
  Tune trials that want no TorchTrainer start-up): a checkpoint file, a Python
  callback per report, and a sweep's shared arrays where it has them.

Either way the worker's data is a :class:`student_train.feed.Feed`, which reads the
rank's rows itself (``student_train.reader``).

One device per worker holds everything: the model, every batch (moved with
``non_blocking`` from pinned memory on CUDA), the loss sums, the evaluation and the
online teacher. Inputs travel as stored (uint8 pixels stay uint8) and are normalised
on that device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from still.augment import apply_augment, background_of, random_params
from still.models import build_model
from still.ray_setup import quiet_worker_console
from still.tracking import attach
from student_train.config import TrainConfig
from student_train.data import Source, hint_key, teacher_prefix
from student_train.evaluate import evaluate
from student_train.feed import AUGMENT, TORCH_RNG, Feed, FeedSettings, derive_seed
from student_train.hints import HintedStudent, HintPair, hint_terms
from student_train.losses import kd_loss, multilabel_kd_loss
from student_train.transfer import freeze, parameter_groups
from teacher_infer.targets import DenseTarget, target_from_columns

STATE_FILE = "state.pt"


@dataclasses.dataclass
class LoopSpec:
    """What a worker needs; built by the driver, pickled to every worker.

    Attributes:
        cfg: The resolved config.
        source: The data source.
        model_args: Constructor arguments of the student (``still.models``).
        init_state: Weights to start from (``student_train.transfer.load_init_state``:
            all but a re-initialised head), or None.
        hints: The checked hint pairs (``student_train.hints.plan_hints``).
        teacher: An online teacher (``teacher_infer.teachers.TeacherPayload``), or None.
        ingest: ``memory`` or ``stream``.
        threads: torch intra-op threads per worker (0: leave torch's default).
        quiet: No per-epoch progress line.
        tracking: ``Tracker.address`` of the job's MLflow run (rank 0 logs every epoch
            to it as the epoch ends), or None.
        pool_rows: Rows in a streaming worker's shuffle pool (``student_train.feed.pool_rows``).
    """

    cfg: TrainConfig
    source: Source
    model_args: dict[str, Any]
    init_state: dict[str, torch.Tensor] | None = None
    hints: tuple[HintPair, ...] = ()
    teacher: Any = None
    ingest: str = "memory"
    threads: int = 0
    quiet: bool = False
    tracking: tuple[str, str] | None = None
    pool_rows: int = 0

    @property
    def temperature(self) -> float:
        """The T teacher columns are bound at: ``kd.temperature``, or, where no KL is computed (λ = 0),
        the nearest temperature a store's grid holds (only the teacher's class is read then)."""
        t = self.cfg.kd.temperature
        if self.cfg.kd.weight > 0:
            return t
        floors = [min(spec.temperatures) for spec in self.source.teachers if spec.temperatures]
        return max([t, *floors])

    def feed_settings(self, world: int) -> FeedSettings:
        """How each of ``world`` workers is fed."""
        train = self.cfg.train
        return FeedSettings(ingest=self.ingest, batch_size=max(1, train.batch_size // max(1, world)),
                            temperature=self.temperature, seed=train.seed, views=train.views,
                            include_val=train.include_val, pool_rows=self.pool_rows,
                            teacher_in_loss=self.cfg.kd.weight > 0, val_rows=train.val_rows)


# --------------------------------------------------------------------------- sessions


def local_device(use_gpu: bool) -> torch.device:
    """The device of an in-process run: the first visible GPU when ``use_gpu``, else the CPU.

    Raises:
        RuntimeError: ``use_gpu`` without a visible CUDA device (the driver checks
            this before training; a Tune trial gets its GPU through CUDA_VISIBLE_DEVICES).
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("scaling.use_gpu: no CUDA device is visible to this process")
    return torch.device("cuda", 0)


class LocalSession:
    """Runs the loop in this process.

    Args:
        checkpoint_dir: Where ``state.pt`` is kept (the latest epoch only).
        device: Where the model and batches live (:func:`local_device`).
        on_report: Called with each epoch's metrics (e.g. ``ray.tune.report``).
        arrays: ``{split: arrays}`` already in memory (a sweep's shared arrays), or None.
    """

    rank = 0
    world_size = 1

    def __init__(self, checkpoint_dir: str, device: torch.device,
                 on_report: Callable[[dict[str, Any]], None] | None = None,
                 arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = device
        self.on_report = on_report
        self.arrays = arrays

    def restore(self) -> dict[str, Any] | None:
        """The last saved state, if any."""
        path = self.checkpoint_dir / STATE_FILE
        return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None

    def prepare(self, net: nn.Module) -> nn.Module:
        """Moves the model to the session's device (nothing to wrap in one process)."""
        return net.to(self.device)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Saves the state atomically, then hands the metrics on."""
        if state is not None:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.checkpoint_dir / f".{STATE_FILE}.tmp"
            torch.save(state, tmp)
            os.replace(tmp, self.checkpoint_dir / STATE_FILE)
        if self.on_report is not None:
            self.on_report(metrics)


class RaySession:
    """Runs the loop inside a Ray Train worker."""

    arrays = None

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def restore(self) -> dict[str, Any] | None:
        """The state of the latest reported checkpoint (after a restart or on resume)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)

    def prepare(self, net: nn.Module) -> nn.Module:
        """Places the model on this worker's device and wraps it in DDP (Ray Train)."""
        import ray.train.torch

        return ray.train.torch.prepare_model(net)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Every rank reports; rank 0 attaches the checkpoint."""
        import ray.train

        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="still-ckpt-") as directory:
            torch.save(state, Path(directory) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def start_worker(config: dict[str, Any]) -> LoopSpec:
    """A Ray Train worker's first step: its spec, Ray's console quieted, torch's threads set."""
    spec: LoopSpec = config["spec"]
    quiet_worker_console(spec.cfg.ray.verbose)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    return spec


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (``TorchTrainer(train_loop_per_worker=...)``)."""
    run_loop(start_worker(config), RaySession())


# --------------------------------------------------------------------------- the loop


class Augmenter:
    """A batch's model input, augmented on its device (:mod:`still.augment`).

    A multi-view store's rows carry their view (``aug``): replayed, so the input is the
    one the teacher's target was computed on. Otherwise ``train.augment`` is drawn
    afresh for every row from the epoch's CPU generator (the same draws on any device).
    """

    def __init__(self, spec: LoopSpec, device: torch.device) -> None:
        source = spec.source
        self.replay = source.views > 1
        self.augment = source.augment if self.replay else spec.cfg.train.augment
        self.input_shape = source.input_shape
        self.background = background_of(source.normalisation, device) if self.augment.enabled else None

    def __call__(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x = batch["x"]
        if not self.augment.enabled:
            return x
        if self.replay:
            params = batch["aug"]
        else:
            params = random_params(self.augment, self.input_shape, len(x), generator).to(x.device)
        return apply_augment(self.augment, x, params, self.background)


def learning_rate(cfg: TrainConfig, progress: float) -> float:
    """``train.lr`` at ``progress`` ∈ [0, 1] of the run (``train.lr_schedule``)."""
    if cfg.train.lr_schedule == "cosine":
        return cfg.train.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.train.lr


def make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``, over parameters or parameter groups (already placed).

    Fused (one kernel for every parameter's update, on CPUs and GPUs alike) where torch
    has it for the parameters' device: measured on 2 CPU cores, a small student's whole
    step took 1.12 ms with fused Adam against 2.0 ms with the default.
    """
    t = cfg.train
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay, fused=fused)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay, fused=fused)


def build_net(spec: LoopSpec) -> HintedStudent:
    """The student (seeded, initialised from ``init_state``, ``train.freeze`` applied) and its
    hint projectors, on the CPU."""
    cfg = spec.cfg
    torch.manual_seed(cfg.train.seed)
    student = build_model(cfg.student.family, **dict(spec.model_args))
    if spec.init_state:
        student.load_state_dict(spec.init_state, strict=False)  # strict but for a re-initialised head
    freeze(student, cfg.train.freeze)
    return HintedStudent(student, spec.hints)


@dataclasses.dataclass
class Model:
    """The placed model, its optimizer and where a restored run left off.

    Attributes:
        net: The unwrapped student + projectors (what checkpoints hold).
        model: ``net`` as trained: on the session's device, DDP-wrapped under Ray Train.
        optimizer: Built after placement, its state restored after placement too (state
            loaded earlier stays on the CPU while the parameters move).
        start_epoch: Epochs already done (0 for a fresh run).
        history: The metrics of those epochs.
    """

    net: HintedStudent
    model: nn.Module
    optimizer: torch.optim.Optimizer
    start_epoch: int
    history: list[dict[str, Any]]


def place_model(spec: LoopSpec, session: Any) -> Model:
    """Builds the net, restores the last checkpoint, places it, then builds and restores the optimizer."""
    net = build_net(spec)
    state = session.restore()
    if state is not None:
        net.load_state_dict(state["net"])
    model = session.prepare(net)
    optimizer = make_optimizer(spec.cfg, parameter_groups(net.student, net.projectors, spec.cfg.train.lr_groups))
    if state is None:
        return Model(net, model, optimizer, 0, [])
    optimizer.load_state_dict(state["optimizer"])
    return Model(net, model, optimizer, int(state["epoch"]), list(state["history"]))


class Targets:
    """Builds a batch's teacher targets on the batch's device: one per store, or the online teacher's.

    Attributes:
        present: True when the loss has a teacher signal (a store's columns or an online teacher).
    """

    def __init__(self, spec: LoopSpec, device: torch.device) -> None:
        self.task = spec.source.task
        self.temperature = spec.temperature
        # the stores' specs once, not every step: Source builds them from the manifests on each access
        self.stores = [(teacher_prefix(i), store, self.temperature if store.mode != "dense" else None)
                       for i, store in enumerate(spec.source.teachers)]
        self.teacher = spec.teacher.load() if spec.teacher is not None else None
        if isinstance(self.teacher, nn.Module):  # TorchScript modules are Modules too
            self.teacher = self.teacher.to(device)
        self.present = bool(self.stores) or self.teacher is not None

    def __call__(self, batch: Mapping[str, Any]) -> list[Any] | None:
        if self.teacher is not None:
            with torch.no_grad():
                return [DenseTarget(self.teacher(batch["x"]), self.task)]
        if not self.stores:
            return None
        device = batch["x"].device
        return [target_from_columns(batch, spec, prefix=prefix, device=device, temperature=temperature)
                for prefix, spec, temperature in self.stores]


def train_epoch(spec: LoopSpec, placed: Model, feed: Feed, targets: Targets, augmenter: Augmenter,
                generator: torch.Generator, epoch: int, device: torch.device) -> dict[str, Any]:
    """One epoch of this worker's training batches (``feed.steps`` of them, as on every rank);
    returns the epoch's mean losses, its samples and steps, and how long its first batch took to arrive."""
    cfg, source = spec.cfg, spec.source
    loss_fn = multilabel_kd_loss if source.task == "multilabel" else kd_loss
    T, lam, beta, pairs = cfg.kd.temperature, cfg.kd.weight, cfg.kd.hint_weight, spec.hints
    placed.model.train()
    sums = torch.zeros(4 + len(pairs), dtype=torch.float64, device=device)
    zero = torch.zeros((), device=device)
    kl_computed = False
    steps = samples = 0
    base_lr = learning_rate(cfg, epoch / cfg.train.epochs)
    started, first_batch_s = time.perf_counter(), 0.0
    for batch in feed.epoch(epoch):
        if not steps:
            first_batch_s = time.perf_counter() - started
        base_lr = learning_rate(cfg, (epoch + steps / feed.steps) / cfg.train.epochs)
        for group in placed.optimizer.param_groups:
            group["lr"] = base_lr * group["lr_scale"]
        x, y = augmenter(batch, generator), batch["y"]
        batch = {**batch, "x": x}  # an online teacher sees the augmented input too
        logits, projected = placed.model(x)
        teacher = targets(batch) if targets.present and lam > 0 else None  # λ = 0: no teacher term at all
        terms = loss_fn(logits, teacher, y, T, lam, cfg.kd.tail, cfg.kd.divergence, cfg.kd.jsd_beta)
        hints = hint_terms(pairs, projected, batch, hint_key)
        hint = torch.stack(hints).sum() if hints else zero
        loss = terms["loss"] + beta * hint if hints else terms["loss"]
        placed.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        placed.optimizer.step()
        kl = terms["kl"]
        kl_computed = kl is not None
        with torch.no_grad():  # float32 terms summed into float64 in place: one stack, one add
            sums += torch.stack([loss, terms["ce"], zero if kl is None else kl, hint, *hints])
        steps += 1
        samples += len(y)
    mean = (sums / max(1, steps)).tolist()
    return {"train_loss": mean[0], "train_ce": mean[1], "train_kl": mean[2] if kl_computed else None,
            "train_hint": mean[3], **{pair.metric: value for pair, value in zip(pairs, mean[4:])},
            "samples": samples, "steps": steps, "lr": base_lr, "first_batch_s": first_batch_s}


def run_loop(spec: LoopSpec, session: Any) -> dict[str, Any]:
    """Trains for ``train.epochs`` (continuing from the session's last checkpoint).

    Every epoch starts from seeds of (``train.seed``, epoch, rank) alone: the batch
    order, the mixing, the view draw, the augmentation and torch's own generator (dropout),
    so a resumed run continues exactly as the uninterrupted one would have.

    Returns:
        The last reported metrics (the final epoch's carry the test metrics).
    """
    cfg, source = spec.cfg, spec.source
    placed = place_model(spec, session)
    resumed_from, history = placed.start_epoch, placed.history
    targets = Targets(spec, session.device)
    augmenter = Augmenter(spec, session.device)
    tracker = attach(spec.tracking) if session.rank == 0 else attach(None)
    multilabel = source.task == "multilabel"
    feed = Feed(source, spec.feed_settings(session.world_size), session.rank, session.world_size, session.device,
                session.arrays)

    def state_now(epoch: int) -> dict[str, Any]:
        return {
            "net": placed.net.state_dict(), "optimizer": placed.optimizer.state_dict(), "epoch": epoch,
            "history": history, "config": plain_config(cfg), "family": cfg.student.family,
            "model_args": dict(spec.model_args),
        }

    def test_metrics() -> dict[str, Any]:
        return _test_metrics(evaluate(placed.net.student, feed.test(), multilabel=multilabel, teacher_of=targets))

    metrics: dict[str, Any] = {}
    seed = cfg.train.seed
    if placed.start_epoch < cfg.train.epochs:
        feed.hold()
    for epoch in range(placed.start_epoch, cfg.train.epochs):
        torch.manual_seed(derive_seed(seed, epoch, session.rank, TORCH_RNG))
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch, session.rank, AUGMENT))
        started = time.perf_counter()
        losses = train_epoch(spec, placed, feed, targets, augmenter, generator, epoch, session.device)
        seconds = time.perf_counter() - started
        samples = losses.pop("samples")
        metrics = {
            "epoch": epoch + 1, **losses, "epoch_s": seconds,
            "samples_per_s": samples * session.world_size / seconds if seconds > 0 else 0.0,
            "world_size": session.world_size, "resumed_from": resumed_from,
        }
        if session.rank == 0:
            started = time.perf_counter()
            val = evaluate(placed.net.student, feed.val(), multilabel=multilabel, teacher_of=targets)
            metrics.update(_val_metrics(val, multilabel), val_rows=feed.val_rows, val_s=time.perf_counter() - started)
            if epoch + 1 == cfg.train.epochs:
                metrics.update(test_metrics())
            history.append(dict(metrics))
            tracker.log_metrics(loggable(metrics), step=epoch + 1)
        session.report(metrics, state_now(epoch + 1) if session.rank == 0 else None)
        if session.rank == 0 and not spec.quiet:
            print(_epoch_line(metrics, cfg.train.epochs), flush=True)
    feed.close()
    if placed.start_epoch >= cfg.train.epochs:  # resumed a finished run: report the test metrics again
        metrics = dict(history[-1]) if history else {"epoch": placed.start_epoch}
        metrics["resumed_from"] = resumed_from
        if session.rank == 0:
            metrics.update(test_metrics())
        session.report(metrics, None)
    return metrics


def loggable(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The epoch metrics MLflow gets: finite numbers, test metrics left to the job's summary."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and not k.startswith("test_")}


def _val_metrics(val: Mapping[str, Any], multilabel: bool) -> dict[str, Any]:
    metrics = {"val_accuracy": val["accuracy"], "val_nll": val["nll"], "agreement": val["agreement"]}
    if multilabel:
        metrics.update(val_f1_micro=val["f1_micro"], val_f1_macro=val["f1_macro"], val_mean_ap=val["mean_ap"])
    return metrics


def _test_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    metrics = {
        "test_accuracy": result["accuracy"], "test_nll": result["nll"], "test_errors": result["errors"],
        "test_count": result["count"], "test_agreement": result["agreement"],
        "teacher_test_accuracy_computed": result["teacher_accuracy"],
    }
    metrics.update({f"test_{name}": result[name] for name in ("f1_micro", "f1_macro", "mean_ap") if name in result})
    return metrics


def _epoch_line(m: Mapping[str, Any], epochs: int) -> str:
    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    return (f"[still train] epoch {m['epoch']}/{epochs} loss {m['train_loss']:.4f} "
            f"val_acc {fmt(m.get('val_accuracy'))} val_nll {fmt(m.get('val_nll'))} "
            f"agreement {fmt(m.get('agreement'))} {m['samples_per_s']:.0f} samples/s")


def plain_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain data (what checkpoints record)."""
    from still.config import to_dict

    return to_dict(cfg)
