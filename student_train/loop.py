"""The per-worker training loop, written once for both ways of running it.

``run_loop(spec, session)`` is the whole loop: build the student (plus a hint
projector), restore the last checkpoint if there is one, then per epoch train on
this worker's shard, evaluate on the validation split (rank 0), report metrics and a
checkpoint (model, optimizer, epoch, metrics history, config). The *session* hides
where it runs:

- :class:`RaySession` inside a Ray Train V2 worker (``train_loop_per_worker``): data
  from ``ray.train.get_dataset_shard``, DDP through ``prepare_model``, reports and
  checkpoints through ``ray.train.report`` (so ``FailureConfig`` restarts and
  ``train.resume`` continue from the last epoch).
- :class:`LocalSession` in the calling process (``scaling.num_workers=0``, and
  Tune trials that want no TorchTrainer start-up): in-memory arrays, a checkpoint
  file, a Python callback per report.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from still.models import build_model
from student_train.config import TrainConfig
from student_train.data import Source, teacher_prefix
from student_train.evaluate import batches_of, evaluate
from student_train.losses import hint_loss, kd_loss, multilabel_kd_loss
from teacher_infer.targets import DenseTarget, target_from_columns

STATE_FILE = "state.pt"


@dataclasses.dataclass
class LoopSpec:
    """What a worker needs; built by the driver, pickled to every worker.

    Attributes:
        cfg: The resolved config.
        source: The data source.
        model_args: Constructor arguments of the student (``still.models``).
        init_state: Weights to start from (already filtered to matching shapes), or None.
        teacher: An online teacher (``teacher_infer.teachers.TeacherPayload``), or None.
        ingest: ``memory`` or ``stream``.
        threads: torch intra-op threads per worker (0: leave torch's default).
        quiet: No per-epoch progress line.
        pid_dir: When set (the driver's ``$STILL_TRAIN_PID_DIR``), each Ray worker writes
            its pid to ``<pid_dir>/rank<N>.pid`` (fault-injection tests kill it).
    """

    cfg: TrainConfig
    source: Source
    model_args: dict[str, Any]
    init_state: dict[str, torch.Tensor] | None = None
    teacher: Any = None
    ingest: str = "memory"
    threads: int = 0
    quiet: bool = False
    pid_dir: str = ""


class Net(nn.Module):
    """The student plus an optional hint projector, so one DDP wrapper covers both."""

    def __init__(self, student: nn.Module, projector: nn.Module | None) -> None:
        super().__init__()
        self.student = student
        self.projector = projector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits, projected features or None)."""
        if self.projector is None:
            return self.student(x), None
        features = self.student.features(x)
        return self.student.classify(features), self.projector(features)


# --------------------------------------------------------------------------- feeders


class MemoryFeeder:
    """A split held as tensors; shuffled batches by index, no per-batch conversion."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items() if k != "split"}
        self.rows = len(self.tensors["y"])

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """Yields shuffled batches covering every row once."""
        order = torch.randperm(self.rows, generator=generator)
        for start in range(0, self.rows, batch_size):
            index = order[start : start + batch_size]
            yield {k: v.index_select(0, index) for k, v in self.tensors.items()}

    def ordered(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields all rows in order, in large batches (evaluation)."""
        yield from batches_of({k: v.numpy() for k, v in self.tensors.items()})


class StreamFeeder:
    """A Ray Data shard iterated every epoch (data larger than memory)."""

    def __init__(self, shard: Any, shuffle_buffer: int = 10_000) -> None:
        self.shard = shard
        self.shuffle_buffer = shuffle_buffer

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
        """Yields locally shuffled batches streamed from the shard."""
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        for batch in self.shard.iter_torch_batches(
            batch_size=batch_size, local_shuffle_buffer_size=self.shuffle_buffer, local_shuffle_seed=seed,
            prefetch_batches=4,
        ):
            batch.pop("split", None)
            yield batch

    def ordered(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yields all rows, in large batches."""
        for batch in self.shard.iter_torch_batches(batch_size=4096, prefetch_batches=2):
            batch.pop("split", None)
            yield batch


def read_shard(shard: Any) -> dict[str, np.ndarray]:
    """Reads a whole Ray Data shard into numpy arrays (the ``memory`` ingest)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy", prefetch_batches=2):
        for key, value in batch.items():
            parts.setdefault(key, []).append(np.asarray(value))
    return {k: np.concatenate(v) for k, v in parts.items()}


# --------------------------------------------------------------------------- sessions


class LocalSession:
    """Runs the loop in this process on in-memory arrays.

    Args:
        arrays: ``{"train"|"val"|"test": arrays}`` from ``data.load_split_arrays``.
        checkpoint_dir: Where ``state.pt`` is kept (the latest epoch only).
        on_report: Called with each epoch's metrics (e.g. ``ray.tune.report``).
    """

    rank = 0
    world_size = 1

    def __init__(self, arrays: Mapping[str, Mapping[str, np.ndarray]], checkpoint_dir: str,
                 on_report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.arrays = arrays
        self.checkpoint_dir = Path(checkpoint_dir)
        self.on_report = on_report
        self.last_metrics: dict[str, Any] = {}

    def feeder(self, split: str) -> MemoryFeeder:
        """The split as tensors."""
        return MemoryFeeder(self.arrays[split])

    def restore(self) -> dict[str, Any] | None:
        """The last saved state, if any."""
        path = self.checkpoint_dir / STATE_FILE
        return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None

    def prepare(self, net: nn.Module) -> nn.Module:
        """Nothing to wrap in one process."""
        return net

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

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.ingest = ingest

    def feeder(self, split: str) -> MemoryFeeder | StreamFeeder:
        """This worker's shard of ``split`` (train is split across workers; val and test are not)."""
        import ray.train

        shard = ray.train.get_dataset_shard(split)
        return MemoryFeeder(read_shard(shard)) if self.ingest == "memory" else StreamFeeder(shard)

    def restore(self) -> dict[str, Any] | None:
        """The state of the latest reported checkpoint (after a restart or on resume)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=False)

    def prepare(self, net: nn.Module) -> nn.Module:
        """DDP (and device placement) through Ray Train."""
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
    if spec.threads:
        torch.set_num_threads(spec.threads)
    session = RaySession(spec.ingest)
    if spec.pid_dir:
        Path(spec.pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(spec.pid_dir) / f"rank{session.rank}.pid").write_text(str(os.getpid()))
    run_loop(spec, session)


# --------------------------------------------------------------------------- the loop


def jitter(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image of ``x`` (n, C, H, W) by a random (dy, dx) in [−pixels, pixels], zero fill."""
    n, _, height, width = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels)).permute(0, 2, 3, 1)
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=generator)
    rows = dy[:, None] + torch.arange(height)
    cols = dx[:, None] + torch.arange(width)
    shifted = padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return shifted.permute(0, 3, 1, 2).contiguous()


def make_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def build_net(spec: LoopSpec) -> Net:
    """The student (seeded, initialised from ``init_state``) and its hint projector."""
    cfg = spec.cfg
    torch.manual_seed(cfg.train.seed)
    student = build_model(cfg.student.family, **dict(spec.model_args))
    if spec.init_state:
        student.load_state_dict(spec.init_state, strict=False)
    projector = None
    if cfg.kd.hint_weight > 0 and spec.source.feature_dim:
        projector = nn.Linear(student.feature_dim, spec.source.feature_dim)
    return Net(student, projector)


def run_loop(spec: LoopSpec, session: Any) -> dict[str, Any]:
    """Trains for ``train.epochs`` (continuing from the session's last checkpoint).

    Returns:
        The last reported metrics (the final epoch's carry the test metrics).
    """
    cfg, source = spec.cfg, spec.source
    net = build_net(spec)
    optimizer = make_optimizer(cfg, net.parameters())
    start_epoch, history = 0, []
    state = session.restore()
    if state is not None:
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
    resumed_from = start_epoch
    model = session.prepare(net)
    teacher = spec.teacher.load() if spec.teacher is not None else None
    multilabel = source.task == "multilabel"
    loss_fn = multilabel_kd_loss if multilabel else kd_loss
    use_teacher = source.has_teacher or teacher is not None
    T, lam, beta = cfg.kd.temperature, cfg.kd.weight, cfg.kd.hint_weight
    image = len(source.input_shape) == 3 and cfg.train.jitter > 0
    per_worker_batch = max(1, cfg.train.batch_size // max(1, session.world_size))
    train = session.feeder("train")
    held_out: dict[str, Any] = {}

    def teacher_of(batch: Mapping[str, Any]) -> list[Any] | None:
        """The batch's teacher targets, built on the batch's device: one per store, or the online teacher's."""
        if teacher is not None:
            with torch.no_grad():
                return [DenseTarget(teacher(batch["x"]), source.task)]
        if not source.has_teacher:
            return None
        device = batch["x"].device
        return [target_from_columns(batch, spec, prefix=teacher_prefix(i), device=device)
                for i, spec in enumerate(source.teachers)]

    def eval_split(split: str) -> dict[str, Any]:
        if split not in held_out:
            held_out[split] = session.feeder(split)
        return evaluate(net.student, held_out[split].ordered(), multilabel=multilabel, teacher_of=teacher_of)

    def state_now(epoch: int) -> dict[str, Any]:
        return {
            "net": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "history": history, "config": _plain_config(cfg), "family": cfg.student.family,
            "model_args": dict(spec.model_args),
        }

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.train.epochs):
        generator = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + epoch * 101 + session.rank)
        model.train()
        sums = torch.zeros(4, dtype=torch.float64)
        steps = samples = 0
        started = time.perf_counter()
        for batch in train.epoch(per_worker_batch, generator):
            x, y = batch["x"], batch["y"]
            if image:
                x = jitter(x, cfg.train.jitter, generator)
                batch = {**batch, "x": x}  # an online teacher sees the jittered input too
            targets = teacher_of(batch) if use_teacher else None
            logits, projected = model(x)
            terms = loss_fn(logits, targets, y, T, lam, cfg.kd.tail)
            loss = terms["loss"]
            hint = torch.zeros((), dtype=loss.dtype)
            if projected is not None:
                hint = hint_loss(projected, batch["f"])
                loss = loss + beta * hint
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach(), terms["ce"].detach(), terms["kl"].detach(), hint.detach()]).double()
            steps += 1
            samples += len(y)
        seconds = time.perf_counter() - started
        mean = (sums / max(1, steps)).tolist()
        metrics = {
            "epoch": epoch + 1, "train_loss": mean[0], "train_ce": mean[1], "train_kl": mean[2],
            "train_hint": mean[3], "epoch_s": seconds,
            "samples_per_s": samples * session.world_size / seconds if seconds > 0 else 0.0,
            "world_size": session.world_size, "resumed_from": resumed_from,
        }
        if session.rank == 0:
            val = eval_split("val")
            metrics.update(val_accuracy=val["accuracy"], val_nll=val["nll"], agreement=val["agreement"])
            if multilabel:
                metrics.update(val_f1_micro=val["f1_micro"], val_f1_macro=val["f1_macro"], val_mean_ap=val["mean_ap"])
            if epoch + 1 == cfg.train.epochs:
                metrics.update(_test_metrics(eval_split("test")))
            history.append(dict(metrics))
        session.report(metrics, state_now(epoch + 1) if session.rank == 0 else None)
        if session.rank == 0 and not spec.quiet:
            print(_epoch_line(metrics, cfg.train.epochs), flush=True)
    if start_epoch >= cfg.train.epochs:  # resumed a finished run: report the test metrics again
        metrics = dict(history[-1]) if history else {"epoch": start_epoch}
        metrics["resumed_from"] = resumed_from
        if session.rank == 0:
            metrics.update(_test_metrics(eval_split("test")))
        session.report(metrics, None)
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

