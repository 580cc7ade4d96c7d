"""Multi-view stores: each view replayed exactly, one view per sample per epoch, bad input.

The data are 1,200 real MNIST digits in a Parquet tensor column (1, 28, 28) and a
confident teacher trained on them, so a one-pixel shift or a flip moves its logits by
far more than fp16 rounding: a replay that is off by anything cannot pass.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from _teacher_fixtures import mnist_digits, still_cli, still_in_process, summary_json, train_pixel_teacher
from still.augment import AugmentConfig, apply_augment, param_names, random_params, view_params
from still.config import DataConfig, load_config
from still.errors import StillError
from student_train.config import TrainConfig
from student_train.data import one_view_mask, resolve_source
from student_train.feed import load_split_arrays
from student_train.loop import Augmenter, LoopSpec
from teacher_infer import store as st
from teacher_infer.config import InferConfig
from teacher_infer.infer import run_infer
from teacher_infer.teachers import load_teacher

ROWS = 1200
VIEWS = 4
AUGMENT = ["store.augment.jitter=2", "store.augment.crop=24", "store.augment.flip=true"]


@pytest.fixture(scope="module")
def digits_28(tmp_path_factory):
    """(Parquet path of 1,200 MNIST digits as a uint8 (1, 28, 28) tensor column, a confident teacher)."""
    base = tmp_path_factory.mktemp("views")
    ids, pixels, labels = mnist_digits(ROWS)
    tensor = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.uint8(), (1, 28, 28)),
                                            pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 784))
    data = base / "digits28.parquet"
    pq.write_table(pa.table({"id": ids, "features": tensor, "label": labels}), data)
    return data, train_pixel_teacher(base / "teacher.pt", pixels, labels)


def _infer(data, teacher, root, *overrides):
    cfg = load_config(InferConfig, None, [f"data.source={data}", f"teacher.uri={teacher}", f"store.root={root}",
                                          "tracking.enabled=false", *overrides])
    return run_infer(cfg)


# --------------------------------------------------------------------------- units


def test_view_parameters_and_their_operations():
    augment = AugmentConfig(jitter=2, crop=6, flip=True)
    assert param_names(augment) == ("crop_y", "crop_x", "crop_side", "flip", "dy", "dx")
    ids, views = np.repeat(np.arange(500, dtype=np.uint64), 3), np.tile(np.arange(3), 500)
    params = view_params(augment, (1, 8, 8), ids, views, seed=7)
    assert params.dtype == np.int16 and params.shape == (1500, 6)
    assert not params[views == 0].any()  # view 0 is the identity
    drawn = params[views > 0]
    assert drawn[:, :2].min() >= 0 and drawn[:, :2].max() <= 2 and (drawn[:, 2] == 6).all()
    assert set(drawn[:, 3]) == {0, 1} and drawn[:, 4:].min() == -2 and drawn[:, 4:].max() == 2
    assert np.array_equal(params, view_params(augment, (1, 8, 8), ids, views, seed=7))  # replays
    assert not np.array_equal(params, view_params(augment, (1, 8, 8), ids, views, seed=8))
    assert len({tuple(row) for row in drawn}) > 200  # views differ across samples and views

    x = torch.zeros(4, 1, 8, 8)
    x[:, 0, 3, 5] = 1.0
    background = torch.full((1, 1, 8, 8), -0.5)  # the normalised black pixel: what a shift fills in
    shift = AugmentConfig(jitter=2)
    moved = apply_augment(shift, x + background, torch.tensor([[0, 0], [1, 0], [0, -2], [2, 2]]), background)
    peaks = [divmod(int(i), 8) for i in (moved - background)[:, 0].flatten(1).argmax(1)]
    assert peaks == [(3, 5), (2, 5), (3, 7), (1, 3)]  # out(r, c) = in(r + dy, c + dx)
    assert torch.allclose(moved.min(), torch.tensor(-0.5))  # vacated pixels are black, not 0
    flipped = apply_augment(AugmentConfig(flip=True), x, torch.tensor([[1], [0], [1], [0]]), torch.zeros(1))
    assert flipped[0, 0, 3, 2] == 1 and flipped[1, 0, 3, 5] == 1
    ramp = torch.arange(8.0).repeat(2, 1, 8, 1).transpose(2, 3)  # value = row index
    crops = apply_augment(AugmentConfig(crop=4), ramp, torch.tensor([[0, 0, 4], [4, 0, 4]]), torch.zeros(1))
    assert crops.shape == ramp.shape and crops[0].mean() < 2 < 5 < crops[1].mean()
    same = apply_augment(AugmentConfig(crop=4), ramp, torch.tensor([[3, 3, 0], [0, 0, 0]]), torch.zeros(1))
    assert torch.equal(same, ramp)  # crop_side 0: no crop

    drawn = random_params(augment, (1, 8, 8), 1000, torch.Generator().manual_seed(0))
    assert drawn.shape == (1000, 6) and int(drawn[:, 4:].abs().max()) == 2 and set(drawn[:, 2].tolist()) == {6}


def test_one_view_per_sample_whatever_the_sharding():
    samples, views = np.repeat(np.arange(1000, dtype=np.int64), 4), np.tile(np.arange(4), 1000)
    mask = one_view_mask(samples, views, 4, seed=11)
    assert np.array_equal(np.sort(samples[mask]), np.arange(1000))  # each sample exactly once
    # rows split between two workers any way: together they still train each sample once
    order = np.random.default_rng(0).permutation(len(samples))
    halves = [order[:1700], order[1700:]]
    picked = np.concatenate([h[one_view_mask(samples[h], views[h], 4, seed=11)] for h in halves])
    assert np.array_equal(np.sort(samples[picked]), np.arange(1000))
    assert np.bincount(views[mask], minlength=4).min() > 200  # every view gets drawn
    assert not np.array_equal(mask, one_view_mask(samples, views, 4, seed=12))  # a new draw per epoch


@pytest.fixture(scope="module")
def labels_only_views(digits_28, tmp_path_factory):
    """A labels-only store of the digits with 4 views each (jitter, crop, flip)."""
    data, teacher_uri = digits_28
    root = tmp_path_factory.mktemp("view-stores")
    return _infer(data, teacher_uri, root, "store.include_inputs=false", f"store.views={VIEWS}", *AUGMENT)["store"]


@pytest.mark.parametrize("ingest", ["memory", "stream"])
def test_ranks_take_equal_steps_and_train_each_sample_once_per_epoch(labels_only_views, ingest):
    """Two ranks of one multi-view store, one view per sample: the same number of steps each, every
    training sample once over both (a batch of an odd size, a pool far smaller than a unit), the same
    batches again for the same seed and epoch, other views in the next epoch."""
    from student_train.feed import Feed, FeedSettings

    source = resolve_source([labels_only_views], DataConfig())
    train_samples = source.split_rows["train"] // VIEWS
    settings = FeedSettings(ingest=ingest, batch_size=37, temperature=4.0, seed=3, views="one", pool_rows=50)

    def epoch(rank, number):
        batches = list(Feed(source, settings, rank, 2, torch.device("cpu")).epoch(number))
        return batches, np.concatenate([b["x"].numpy().reshape(len(b["x"]), -1) for b in batches])

    (first, x0), (second, x1) = epoch(0, 0), epoch(1, 0)
    steps = Feed(source, settings, 0, 2, torch.device("cpu")).steps
    assert len(first) == len(second) == steps == -(-(train_samples // 2 + train_samples % 2) // 37)
    both = np.concatenate([x0, x1])
    assert len(np.unique(both, axis=0)) == train_samples  # each sample once (a rank short of a row repeats one)
    assert len(both) - train_samples <= 37
    again, x_again = epoch(0, 0)
    assert np.array_equal(x0, x_again) and all(torch.equal(a["aug"], b["aug"]) for a, b in zip(first, again))
    later, _ = epoch(0, 1)
    assert not torch.equal(torch.cat([b["aug"] for b in first]), torch.cat([b["aug"] for b in later]))


def test_epoch_plans_split_items_evenly_and_agree_on_steps():
    from student_train.reader import batch_sizes, share, share_items, steps_per_epoch

    counts = [5, 0, 7, 3]
    pieces = [share(counts, [2, 0, 3, 1], 3, rank) for rank in range(3)]
    assert [sum(p.stop - p.start for p in ps) for ps in pieces] == share_items(counts, 3) == [5, 5, 5]
    assert [(p.unit, p.start, p.stop) for p in pieces[0]] == [(2, 0, 5)]  # units visited in the order given
    covered = sorted((p.unit, i) for ps in pieces for p in ps for i in range(p.start, p.stop))
    assert covered == sorted((u, i) for u, n in enumerate(counts) for i in range(n))  # every item once
    assert steps_per_epoch([5, 6], 2) == 3 and batch_sizes(5, 3, 2) == [2, 2, 1] and batch_sizes(4, 3, 2) == [2, 2, 1]
    assert batch_sizes(6, 3, 2) == [2, 2, 2]


# --------------------------------------------------------------------------- the replay is exact


def _stored_log_probs(table: pa.Table, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row: classes it stores and their stored log-probabilities at T = 1 (sampled: the most drawn)."""
    def matrix(name: str, width: int | None = None) -> np.ndarray:
        return np.stack([np.asarray(r)[:width] for r in table[name].to_numpy(zero_copy_only=False)])

    if mode == "dense":
        logits = matrix("logits").astype(np.float64)
        log_probs = logits - logits.max(1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
        return np.tile(np.arange(logits.shape[1]), (len(logits), 1)), log_probs
    prefix, width = ("topk", None) if mode == "topk" else ("sample", 1)
    lse = table["logsumexp"].to_numpy()[:, None]
    return matrix(f"{prefix}_idx", width), matrix(f"{prefix}_logit", width).astype(np.float64) - lse


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode,include_inputs", [("topk", "false"), ("dense", "true"), ("sampled", "false")])
def test_replayed_views_reproduce_the_stored_teacher_outputs(ray_cluster, digits_28, tmp_path, mode,
                                                             include_inputs):
    data, teacher_uri = digits_28
    summary = _infer(data, teacher_uri, tmp_path / "stores", f"store.mode={mode}", "store.k=3",
                     "store.samples=16", "store.dtype=float16", f"store.include_inputs={include_inputs}",
                     f"store.views={VIEWS}", *AUGMENT)
    store = st.open_store(summary["store"])
    assert store.num_rows == VIEWS * ROWS and store.views == VIEWS and summary["rows"] == VIEWS * ROWS
    assert store.augment == AugmentConfig(jitter=2, crop=24, flip=True)
    assert store.manifest["cache_key_inputs"]["storage"]["views"] == VIEWS  # views enter the key
    assert store.include_inputs == (include_inputs == "true")
    assert st.verify_store(store.uri)["ok"]
    table = store.read_table()
    assert table.column_names[:5] == ["id", "view", "label", "split", "augment"]
    ids, views = table["id"].to_numpy(), table["view"].to_numpy()
    assert sorted(np.bincount(views)) == [ROWS] * VIEWS
    assert np.array_equal(np.sort(ids[views == 2]), np.sort(ids[views == 0]))  # every sample, every view

    # The student's path: the store read for training (labels-only: inputs joined from the source),
    # each row's view replayed by the training loop's Augmenter.
    source = resolve_source([store.uri], DataConfig())
    arrays = load_split_arrays(source)["train"]
    spec = LoopSpec(cfg=TrainConfig(), source=source, model_args={})
    rows = np.flatnonzero(arrays["view"] > 0)[:: 7][:300]
    batch = {"x": source.normalisation.apply(torch.from_numpy(arrays["x"][rows])),
             "aug": torch.from_numpy(arrays["aug"][rows])}
    teacher = load_teacher(str(teacher_uri)).model
    with torch.no_grad():
        replayed = torch.log_softmax(teacher(Augmenter(spec, torch.device("cpu"))(batch, torch.Generator())), 1)
        unaugmented = torch.log_softmax(teacher(batch["x"]), 1)

    position = {(int(i), int(v)): n for n, (i, v) in enumerate(zip(ids, views))}
    at = [position[(int(s), int(v))] for s, v in zip(arrays["sample"][rows], arrays["view"][rows])]
    classes, stored = _stored_log_probs(table.take(pa.array(at)), mode)
    replay_error = np.abs(np.take_along_axis(replayed.numpy(), classes, 1) - stored)
    assert replay_error.max() < 0.05, replay_error.max()  # fp16 storage of the logits
    # The same rows without their views are far off: the check can tell a view from the plain input.
    plain_error = np.abs(np.take_along_axis(unaugmented.numpy(), classes, 1) - stored).max(1)
    assert np.median(plain_error) > 0.2, np.median(plain_error)

    if mode == "topk":  # a killed run resumes: the rewritten shard holds the same views, byte for byte
        first = store.manifest["shards"][0]
        (tmp_path / "stores" / store.key / st.MANIFEST_NAME).unlink()
        (tmp_path / "stores" / store.key / first["name"]).unlink()
        again = _infer(data, teacher_uri, tmp_path / "stores", f"store.mode={mode}", "store.k=3", "store.samples=16",
                       "store.dtype=float16", f"store.include_inputs={include_inputs}", f"store.views={VIEWS}",
                       *AUGMENT)
        assert again["shards_written"] == 1 and again["shards_resumed"] == len(store.manifest["shards"]) - 1
        assert st.open_store(again["store"]).manifest["shards"][0]["sha256"] == first["sha256"]


# --------------------------------------------------------------------------- end to end, and bad input


@pytest.mark.timeout(900)
def test_cli_trains_on_views_and_refuses_bad_views(ray_cluster, digits_28, tmp_path):
    data, teacher_uri = digits_28
    common = [f"data.source={data}", f"teacher.uri={teacher_uri}", f"store.root={tmp_path / 'stores'}"]

    result = still_in_process(["infer", *common, "store.views=0"], tmp_path)
    assert result.returncode != 0 and "store.views must be >= 1" in result.stderr
    with pytest.raises(StillError, match=r"store.views=3 needs an augmentation"):
        _infer(data, teacher_uri, tmp_path / "stores", "store.views=3")
    with pytest.raises(StillError, match=r"store.augment.crop=32 does not fit the input shape \(1, 28, 28\)"):
        _infer(data, teacher_uri, tmp_path / "stores", "store.views=3", "store.augment.crop=32")
    assert not (tmp_path / "stores").exists()  # refused before anything was written

    uri = _infer(data, teacher_uri, tmp_path / "stores", "store.include_inputs=false", f"store.views={VIEWS}",
                 *AUGMENT)["store"]
    before = st.verify_store(uri)

    train = ["train", f"store.uri={uri}", "student.width=128", "train.epochs=6", "train.lr=0.003",
             "scaling.num_workers=0", f"train.output_dir={tmp_path / 'student'}"]
    result = still_in_process([*train, "train.augment.jitter=1", "--json"], tmp_path)
    assert result.returncode != 0
    assert "train.augment={'jitter': 1, 'crop': 0, 'flip': False} differs" in result.stderr
    assert "store.augment={'jitter': 2, 'crop': 24, 'flip': True}" in result.stderr
    assert not (tmp_path / "student").exists() and st.verify_store(uri) == before

    # Two Ray Train workers, one view per sample per epoch (the default), held in memory and streamed from the
    # labels-only store (inputs joined from the source) through a pool of 50 rows, far smaller than a unit: each
    # must end (they hung before: ranks took different step counts) and learn (the teacher is right on these
    # digits; six short epochs of a student are far above chance, 0.1). The streamed run is a real `still`
    # process on its own embedded 2-CPU cluster, as a user's first run is; the memory one joins the session's.
    two = [t for t in train if t != "scaling.num_workers=0"] + ["scaling.num_workers=2"]
    streamed = functools.partial(still_cli, timeout=300)
    for ingest, extra, run in (("memory", [], still_in_process),
                               ("stream", ["train.shuffle_buffer=50"], streamed)):
        result = run([*two, f"train.ingest={ingest}", *extra, f"train.name=two-{ingest}", "--json"], tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        summary = summary_json(result)
        assert summary["ingest"] == ingest and summary["history"][-1]["world_size"] == 2
        assert summary["student_test_accuracy"] > 0.75, (ingest, summary["student_test_accuracy"])


def test_augmentation_must_fit_plain_training_data(tmp_path):
    cfg = load_config(TrainConfig, None, ["data.source=builtin:digits", "train.augment.jitter=1",
                                          "tracking.enabled=false", "scaling.num_workers=0"])
    from student_train.driver import JobOptions, prepare_job

    with pytest.raises(StillError, match=r"train.augment augments images .* shape \(64,\)"):
        prepare_job(cfg, "x", JobOptions())
