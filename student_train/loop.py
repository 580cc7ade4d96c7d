"""The per-worker training loop, written once for both ways of running it.

``run_loop(spec, session)`` is the whole loop: build the student (plus a projector
per hint pair, ``student_train.hints``; frozen parameters and learning-rate groups,
``student_train.transfer``) on the session's device, restore the last checkpoint if there is one,
then per epoch train on this worker's shard, evaluate on the validation split
(rank 0), log the epoch to MLflow (rank 0, as it ends), report metrics and a
checkpoint (model, optimizer, epoch, metrics history, config). The *session* hides
where it runs:

- :class:`RaySession` inside a Ray Train V2 worker (``train_loop_per_worker``): data
  from ``ray.train.get_dataset_shard``, device and DDP from ``ray.train.torch``,
  reports and checkpoints through ``ray.train.report`` (so ``FailureConfig`` restarts
  and ``train.resume`` continue from the last epoch).
- :class:`LocalSession` in the calling process (``scaling.num_workers=0``, and
  Tune trials that want no TorchTrainer start-up): in-memory arrays (or Ray Data
  iterators for a store too large for memory), a checkpoint file, a Python callback
  per report.

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
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from still.augment import apply_augment, background_of, random_params
from still.errors import StillError, carried_still_error
from still.models import build_model
from still.ray_setup import quiet_worker_console
from still.tracking import attach
from student_train.config import TrainConfig
from student_train.data import READ_CHUNK_ROWS, Source, hint_key, one_view_mask, teacher_prefix
from student_train.evaluate import evaluate
from student_train.hints import HintedStudent, HintPair, hint_terms
from student_train.losses import kd_loss, multilabel_kd_loss
from student_train.transfer import freeze, parameter_groups
from teacher_infer.targets import DenseTarget, target_from_columns

STATE_FILE = "state.pt"
EVAL_BATCH = 4096


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
        shuffle_buffer: Rows in a streaming worker's shuffle buffer.
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
    shuffle_buffer: int = 0

    @property
    def one_view_of(self) -> int:
        """K when each epoch trains on one view per sample of a multi-view store, else 0."""
        return self.source.views if self.source.views > 1 and self.cfg.train.views == "one" else 0


# --------------------------------------------------------------------------- feeders


def device_batch(batch: Mapping[str, Any], device: torch.device, source: Source) -> dict[str, torch.Tensor]:
    """A batch on ``device``, its raw ``x`` normalised into the model input there."""
    out = {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}
    out["x"] = source.normalisation.apply(out["x"])
    return out


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # Arrays shared through Ray's object store are read-only; training never writes to them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class MemoryFeeder:
    """A split held as tensors on the training device; shuffled batches by index.

    The raw inputs are moved to the device and normalised there once, when the feeder
    is built (``memory`` ingest is for splits of at most ``MEMORY_INGEST_LIMIT`` bytes,
    counted at 4 bytes a value), so a batch costs an index, not a copy or a conversion.

    Args:
        arrays: The split's training arrays.
        device: The training device.
        source: The source (its normalisation).
        one_view_of: K to train each epoch on one view per sample of a multi-view
            store (:func:`student_train.data.one_view_mask`); 0: every row.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], device: torch.device, source: Source,
                 one_view_of: int = 0) -> None:
        self.device = device
        arrays = dict(arrays)
        views = {name: arrays.pop(name) for name in ("view", "sample") if name in arrays}
        if "sample" in views:  # rows reach a Ray Train worker in varying order: sorted, a seed reproduces a run
            order = np.lexsort([views[name] for name in ("view", "sample") if name in views])
            arrays = {name: values[order] for name, values in arrays.items()}
            views = {name: values[order] for name, values in views.items()}
        self.one_view_of = one_view_of if "view" in views else 0
        self.views = views
        self._drawn: tuple[int, np.ndarray] | None = None
        self.tensors = device_batch(_tensors(arrays), device, source)
        self.rows = len(self.tensors["y"])

    def epoch_rows(self, view_seed: int) -> int:
        """Rows one epoch trains on (one per sample of a multi-view store with ``one_view_of``)."""
        return len(self._selected(view_seed)) if self.one_view_of else self.rows

    def _selected(self, view_seed: int) -> np.ndarray:
        # epoch_rows and epoch ask for the same epoch's draw: hashed once
        if self._drawn is None or self._drawn[0] != view_seed:
            mask = one_view_mask(self.views["sample"], self.views["view"], self.one_view_of, view_seed)
            self._drawn = (view_seed, np.flatnonzero(mask))
        return self._drawn[1]

    def epoch(self, batch_size: int, generator: torch.Generator,
              view_seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yields shuffled batches covering every row (or every sample's drawn view) once."""
        if self.one_view_of:
            rows = torch.from_numpy(self._selected(view_seed))
            order = rows[torch.randperm(len(rows), generator=generator)].to(self.device)
        else:
            order = torch.randperm(self.rows, generator=generator).to(self.device)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield {k: v.index_select(0, index) for k, v in self.tensors.items()}

    def ordered(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields all rows in order, in large batches (evaluation)."""
        for start in range(0, self.rows, EVAL_BATCH):
            yield {k: v[start : start + EVAL_BATCH] for k, v in self.tensors.items()}


class ShuffleBuffer:
    """Mixes a stream of batches through a pool of rows held on the training device.

    The first ``capacity`` rows fill the pool; after that every incoming batch is
    swapped for as many rows taken from the pool at random (slots visited in a fresh
    random permutation per cycle, so no slot is taken twice in a cycle), and at the end
    the pool drains in random order. Each batch costs one gather and one scatter per
    column, whatever the pool's size (Ray Data's local shuffle buffer re-concatenates
    its buffer instead).

    Args:
        capacity: Rows in the pool.
        generator: The CPU generator of the epoch (the same mixing on any device).
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        self.capacity = max(1, capacity)
        self.generator = generator

    def _slots(self, n: int, device: torch.device) -> Iterator[torch.Tensor]:
        while True:
            order = torch.randperm(self.capacity, generator=self.generator).to(device)
            for start in range(0, self.capacity - n + 1, n):
                yield order[start : start + n]

    def mix(self, chunks: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """Yields the rows of ``chunks``, mixed: chunks of the incoming sizes, then the pool."""
        pool: dict[str, torch.Tensor] = {}
        filled = 0
        slots: dict[int, Iterator[torch.Tensor]] = {}
        for chunk in chunks:
            n = len(next(iter(chunk.values())))
            if not pool:
                pool = {k: torch.empty((self.capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
                        for k, v in chunk.items()}
            if filled < self.capacity:
                take = min(self.capacity - filled, n)
                for k, v in chunk.items():
                    pool[k][filled : filled + take] = v[:take]
                filled += take
                chunk, n = {k: v[take:] for k, v in chunk.items()}, n - take
                if n == 0:
                    continue
            if n not in slots:
                slots[n] = self._slots(n, next(iter(pool.values())).device)
            index = next(slots[n])
            out = {k: pool[k].index_select(0, index) for k in pool}
            for k, v in chunk.items():
                pool[k].index_copy_(0, index, v)
            yield out
        if filled:
            order = torch.randperm(filled, generator=self.generator).to(next(iter(pool.values())).device)
            yield {k: v[:filled].index_select(0, order) for k, v in pool.items()}


class StreamFeeder:
    """A Ray Data iterator read every epoch (data larger than memory).

    Args:
        iterator: A ``DataIterator`` (a Train worker's shard, or a dataset's iterator).
        device: Where batches go (pinned host memory first on CUDA).
        source: The source (its normalisation).
        shuffle_buffer: Rows mixed on the device (:class:`ShuffleBuffer`); the shards
            themselves come in a new random order every epoch
            (``data.ray_datasets(shuffle=True)``).
    """

    def __init__(self, iterator: Any, device: torch.device, source: Source, shuffle_buffer: int) -> None:
        self.iterator = iterator
        self.device = device
        self.source = source
        self.shuffle_buffer = shuffle_buffer

    def _batches(self, batch_size: int | None, prefetch_batches: int) -> Iterator[dict[str, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        try:
            yield from self.iterator.iter_torch_batches(batch_size=batch_size, prefetch_batches=prefetch_batches,
                                                        device=self.device, pin_memory=cuda)
        except StillError:
            raise
        except Exception as exc:  # a read task's StillError (a shard gone bad) arrives wrapped by Ray Data
            carried = carried_still_error(exc)
            if carried is None:
                raise
            raise carried from None

    def epoch_rows(self, view_seed: int) -> int | None:
        """Rows an epoch trains on: unknown ahead of a stream."""
        return None

    def epoch(self, batch_size: int, generator: torch.Generator,
              view_seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Yields batches streamed from the shard, mixed on the device.

        Rows come from Ray Data a block at a time (the read tasks cut blocks of
        ``data.READ_CHUNK_ROWS`` rows: one conversion to tensors per block, no
        re-batching in Ray) and are cut into batches here. A multi-view store's read
        tasks have already drawn the epoch's views (``view_seed`` is for memory ingest).
        """
        chunks = self._batches(None, prefetch_batches=2)
        if self.shuffle_buffer:
            chunks = ShuffleBuffer(max(self.shuffle_buffer, READ_CHUNK_ROWS), generator).mix(chunks)
        for chunk in chunks:
            rows = len(next(iter(chunk.values())))
            for start in range(0, rows, batch_size):
                yield device_batch({k: v[start : start + batch_size] for k, v in chunk.items()}, self.device,
                                   self.source)

    def ordered(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields all rows, in large batches."""
        for batch in self._batches(EVAL_BATCH, prefetch_batches=2):
            yield device_batch(batch, self.device, self.source)


def read_shard(shard: Any) -> dict[str, np.ndarray]:
    """Reads a whole Ray Data shard into numpy arrays (the ``memory`` ingest)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy", prefetch_batches=2):
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in parts.items()}


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
        splits: ``{"train"|"val"|"test": arrays}`` from ``data.load_split_arrays``, or
            ``{split: ray.data.Dataset}`` to stream (a store too large for memory).
        checkpoint_dir: Where ``state.pt`` is kept (the latest epoch only).
        device: Where the model and batches live (:func:`local_device`).
        on_report: Called with each epoch's metrics (e.g. ``ray.tune.report``).
    """

    rank = 0
    world_size = 1

    def __init__(self, splits: Mapping[str, Any], checkpoint_dir: str, device: torch.device,
                 on_report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.splits = splits
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = device
        self.on_report = on_report
        self.last_metrics: dict[str, Any] = {}

    def feeder(self, split: str, spec: LoopSpec) -> MemoryFeeder | StreamFeeder:
        """The split as tensors, or streamed."""
        data = self.splits[split]
        if isinstance(data, Mapping):
            return MemoryFeeder(data, self.device, spec.source, spec.one_view_of if split == "train" else 0)
        return StreamFeeder(data.iterator(), self.device, spec.source, spec.shuffle_buffer)

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
        self.last_metrics = metrics
        if self.on_report is not None:
            self.on_report(metrics)


class RaySession:
    """Runs the loop inside a Ray Train worker."""

    def __init__(self, ingest: str) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.ingest = ingest
        self.device = ray.train.torch.get_device()

    def feeder(self, split: str, spec: LoopSpec) -> MemoryFeeder | StreamFeeder:
        """This worker's shard of ``split`` (train is split across workers; val and test are not)."""
        import ray.train

        shard = ray.train.get_dataset_shard(split)
        if self.ingest == "memory":
            return MemoryFeeder(read_shard(shard), self.device, spec.source,
                                spec.one_view_of if split == "train" else 0)
        return StreamFeeder(shard, self.device, spec.source, spec.shuffle_buffer)

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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (``TorchTrainer(train_loop_per_worker=...)``)."""
    spec: LoopSpec = config["spec"]
    quiet_worker_console(spec.cfg.ray.verbose)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    run_loop(spec, RaySession(spec.ingest))


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
    """The optimizer named by ``train.optimizer``, over parameters or parameter groups."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


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
    """Builds a batch's teacher targets on the batch's device: one per store, or the online teacher's."""

    def __init__(self, spec: LoopSpec, device: torch.device) -> None:
        self.source = spec.source
        self.teacher = spec.teacher.load() if spec.teacher is not None else None
        if isinstance(self.teacher, nn.Module):  # TorchScript modules are Modules too
            self.teacher = self.teacher.to(device)

    @property
    def present(self) -> bool:
        """True when the loss has a teacher signal."""
        return self.source.has_teacher or self.teacher is not None

    def __call__(self, batch: Mapping[str, Any]) -> list[Any] | None:
        if self.teacher is not None:
            with torch.no_grad():
                return [DenseTarget(self.teacher(batch["x"]), self.source.task)]
        if not self.source.has_teacher:
            return None
        device = batch["x"].device
        return [target_from_columns(batch, spec, prefix=teacher_prefix(i), device=device)
                for i, spec in enumerate(self.source.teachers)]


def train_epoch(spec: LoopSpec, placed: Model, train: Any, targets: Targets, augmenter: Augmenter,
                generator: torch.Generator, epoch: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """One pass over this worker's training shard; returns the epoch's mean losses and its samples."""
    cfg, source = spec.cfg, spec.source
    loss_fn = multilabel_kd_loss if source.task == "multilabel" else kd_loss
    T, lam, beta, pairs = cfg.kd.temperature, cfg.kd.weight, cfg.kd.hint_weight, spec.hints
    view_seed = cfg.train.seed * 1_000_003 + epoch  # the same on every rank: one view per sample overall
    rows = train.epoch_rows(view_seed)
    steps_per_epoch = max(1, math.ceil(rows / batch_size)) if rows else None
    placed.model.train()
    sums = torch.zeros(4 + len(pairs), dtype=torch.float64, device=device)
    zero = torch.zeros((), device=device)
    steps = samples = 0
    base_lr = learning_rate(cfg, epoch / cfg.train.epochs)
    for batch in train.epoch(batch_size, generator, view_seed):
        within = min(steps, steps_per_epoch) / steps_per_epoch if steps_per_epoch else 0.0
        progress = (epoch + within) / cfg.train.epochs
        base_lr = learning_rate(cfg, progress)
        for group in placed.optimizer.param_groups:
            group["lr"] = base_lr * group["lr_scale"]
        x, y = augmenter(batch, generator), batch["y"]
        batch = {**batch, "x": x}  # an online teacher sees the augmented input too
        logits, projected = placed.model(x)
        terms = loss_fn(logits, targets(batch) if targets.present else None, y, T, lam, cfg.kd.tail)
        hints = hint_terms(pairs, projected, batch, hint_key)
        hint = torch.stack(hints).sum() if hints else zero
        loss = terms["loss"] + beta * hint if hints else terms["loss"]
        placed.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        placed.optimizer.step()
        sums += torch.stack([loss.detach(), terms["ce"].detach(), terms["kl"].detach(), hint.detach(),
                             *(term.detach() for term in hints)]).double()
        steps += 1
        samples += len(y)
    mean = (sums / max(1, steps)).tolist()
    return {"train_loss": mean[0], "train_ce": mean[1], "train_kl": mean[2], "train_hint": mean[3],
            **{pair.metric: value for pair, value in zip(pairs, mean[4:])},
            "samples": samples, "lr": base_lr}


def run_loop(spec: LoopSpec, session: Any) -> dict[str, Any]:
    """Trains for ``train.epochs`` (continuing from the session's last checkpoint).

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
    per_worker_batch = max(1, cfg.train.batch_size // max(1, session.world_size))
    train = session.feeder("train", spec)
    held_out: dict[str, Any] = {}

    def eval_split(split: str) -> dict[str, Any]:
        if split not in held_out:
            held_out[split] = session.feeder(split, spec)
        return evaluate(placed.net.student, held_out[split].ordered(), multilabel=multilabel, teacher_of=targets)

    def state_now(epoch: int) -> dict[str, Any]:
        return {
            "net": placed.net.state_dict(), "optimizer": placed.optimizer.state_dict(), "epoch": epoch,
            "history": history, "config": _plain_config(cfg), "family": cfg.student.family,
            "model_args": dict(spec.model_args),
        }

    metrics: dict[str, Any] = {}
    for epoch in range(placed.start_epoch, cfg.train.epochs):
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch * 101 + session.rank)
        started = time.perf_counter()
        losses = train_epoch(spec, placed, train, targets, augmenter, generator, epoch, per_worker_batch,
                             session.device)
        seconds = time.perf_counter() - started
        samples = losses.pop("samples")
        metrics = {
            "epoch": epoch + 1, **losses, "epoch_s": seconds,
            "samples_per_s": samples * session.world_size / seconds if seconds > 0 else 0.0,
            "world_size": session.world_size, "resumed_from": resumed_from,
        }
        if session.rank == 0:
            metrics.update(_val_metrics(eval_split("val"), multilabel))
            if epoch + 1 == cfg.train.epochs:
                metrics.update(_test_metrics(eval_split("test")))
            history.append(dict(metrics))
            tracker.log_metrics(loggable(metrics), step=epoch + 1)
        session.report(metrics, state_now(epoch + 1) if session.rank == 0 else None)
        if session.rank == 0 and not spec.quiet:
            print(_epoch_line(metrics, cfg.train.epochs), flush=True)
    if placed.start_epoch >= cfg.train.epochs:  # resumed a finished run: report the test metrics again
        metrics = dict(history[-1]) if history else {"epoch": placed.start_epoch}
        metrics["resumed_from"] = resumed_from
        if session.rank == 0:
            metrics.update(_test_metrics(eval_split("test")))
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


def _plain_config(cfg: TrainConfig) -> dict[str, Any]:
    from still.config import to_dict

    return to_dict(cfg)
