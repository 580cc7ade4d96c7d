"""Exact soft labels: compression, the rebuilt targets, sparse KL on the device, sampled storage.

Every numeric test uses what a user's teacher hands the store: a confident 1000-class
teacher (a peak of 8-16 over N(0, 1.5) noise), fp16 values, k < C and T != 1 — the
inputs on which format v1's derived tail mass was orders of magnitude wrong.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from still.config import load_config
from still.errors import StillError
from student_train.config import TrainConfig
from student_train.losses import kd_loss, soft_kl
from teacher_infer.config import InferConfig
from teacher_infer.fidelity import measure_rows
from teacher_infer.soft_labels import Ragged, SoftLabelSpec, compress
from teacher_infer.targets import (SampledTarget, TopKTarget, at_temperature, lognorm_at, prepare, row_logsumexp,
                                   target_from_columns)

C = 1000


def confident_logits(rows: int, classes: int = C, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (rows, classes)).astype(np.float32)
    logits[np.arange(rows), rng.integers(0, classes, rows)] += rng.uniform(8, 16, rows).astype(np.float32)
    return logits


def target(logits, mode="topk", dtype="float16", torch_dtype=torch.float64, **kw):
    spec = SoftLabelSpec.create(mode, logits.shape[1], dtype=dtype, **kw)
    return target_from_columns(prepare(compress(logits, spec, np.random.default_rng(1)), spec), spec,
                               dtype=torch_dtype), spec


def test_topk_golden_values():
    # logits [2, 1, 0, -1], k = 2: shifted v = [0, -1, -2, -3]; logsumexp(v) = log(1 + e^-1 + e^-2 + e^-3)
    # = 0.4401897; the tail {2, 3} at T = 1: log(e^-2 + e^-3) = -1.6867383; at T = 2: log(e^-1 + e^-1.5) = -0.5259230.
    spec = SoftLabelSpec.create("topk", 4, dtype="float32", k=2)
    packed = compress(np.array([[2.0, 1.0, 0.0, -1.0]], dtype=np.float32), spec)
    assert packed["topk_idx"].tolist() == [[0, 1]] and packed["topk_logit"].tolist() == [[0.0, -1.0]]
    np.testing.assert_allclose(packed["logsumexp"], [0.4401897], rtol=1e-6)
    np.testing.assert_allclose(packed["tail_lognorm"][0, :2], [-1.6867383, -0.5259230], rtol=1e-6)
    rebuilt = target_from_columns(prepare(packed, spec), spec, dtype=torch.float64)
    top, tail = rebuilt.parts(1.0)
    # softmax([2, 1, 0, -1]) = [0.6439142, 0.2368828, 0.0871443, 0.0320586]
    np.testing.assert_allclose(top.exp().numpy(), [[0.6439142, 0.2368828]], rtol=1e-6)
    np.testing.assert_allclose(tail.exp().numpy(), [0.0871443 + 0.0320586], rtol=1e-6)
    # softmax([2, 1, 0, -1] / 2) = (e^1, e^0.5, 1, e^-0.5) / 5.9735340 = [0.4550542, 0.2760043, 0.1674051, 0.1015363]
    top, tail = rebuilt.parts(2.0)
    np.testing.assert_allclose(top.exp().numpy(), [[0.4550542, 0.2760043]], rtol=1e-6)
    np.testing.assert_allclose(tail.exp().numpy(), [0.1674051 + 0.1015363], rtol=1e-6)
    np.testing.assert_allclose(rebuilt.dense_log_probs(2.0).exp().numpy(),
                               [[0.4550542, 0.2760043, 0.1344707, 0.1344707]], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_tail_mass_at_t1_is_exact_in_every_dtype(dtype):
    logits = confident_logits(400)
    rebuilt, _ = target(logits, dtype=dtype, k=10)
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=1)
    true_tail = 1.0 - p.gather(1, rebuilt.idx).sum(dim=1)
    _, log_tail = rebuilt.parts(1.0)
    assert float(((log_tail.exp() - true_tail).abs() / true_tail).max()) < 1e-4
    assert float(true_tail.min()) < 1e-5  # the confident rows where fp16 rounding used to decide the tail
    # the top-k log-probabilities carry the value dtype's own precision: half an ulp of each stored
    # value v (after the float32 shift), plus the renormalisation that makes top-k mass + tail mass = 1
    # (mass-weighted, as small)
    top, _ = rebuilt.parts(1.0)
    p_top = p.gather(1, rebuilt.idx)
    shifted = torch.tensor(logits, dtype=torch.float64)
    shifted = (shifted - shifted.max(dim=1, keepdim=True).values).gather(1, rebuilt.idx)
    eps = (2.0**-11 if dtype == "float16" else 0.0) + 2.0**-23
    bound = eps * (shifted.abs() + (p_top * shifted.abs()).sum(dim=1, keepdim=True) + math.log(C))  # + float32 lse
    assert bool(((top - torch.log(p_top)).abs() <= bound).all())
    mass_weighted = float((p_top * (top.exp() / p_top - 1).abs()).sum(1).max())
    assert mass_weighted < (1.5e-3 if dtype == "float16" else 1e-6)


def test_fp16_topk_is_as_faithful_as_fp32_at_every_temperature():
    logits = confident_logits(600)
    kls = {}
    for dtype in ("float16", "float32"):
        spec = SoftLabelSpec.create("topk", C, dtype=dtype, k=10)
        kls[dtype] = measure_rows(logits, compress(logits, spec), spec)["kl"].mean(axis=0)
    assert (kls["float16"] <= 1.05 * kls["float32"] + 1e-4).all(), kls
    assert kls["float16"][2] < 0.1  # T = 4; format v1 measured a mean KL of 1.37 nats here


@pytest.mark.parametrize("temperature,tolerance", [(2.0, 1e-5), (4.0, 1e-5), (8.0, 1e-5), (3.0, 0.01),
                                                   (20.0, 1e-3)])
def test_tail_mass_exact_on_the_grid_interpolated_between(temperature, tolerance):
    logits = confident_logits(300)
    rebuilt, spec = target(logits, dtype="float32", k=10)
    assert spec.temperatures == (1.0, 2.0, 4.0, 8.0)
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, dim=1)
    true_tail = 1.0 - p.gather(1, rebuilt.idx).sum(dim=1)
    _, log_tail = rebuilt.parts(temperature)
    assert float(((log_tail.exp() - true_tail).abs() / true_tail).max()) < tolerance


def test_topk_with_k_equal_to_classes_is_exact():
    logits = confident_logits(20, classes=7)
    rebuilt, _ = target(logits, dtype="float32", k=7)
    for temperature in (1.0, 3.0):
        np.testing.assert_allclose(rebuilt.dense_log_probs(temperature).numpy(),
                                   torch.log_softmax(torch.tensor(logits, dtype=torch.float64) / temperature, 1),
                                   atol=1e-5)
    assert math.isinf(float(rebuilt.parts(1.0)[1][0]))


def _dense_reference(student, rebuilt, temperature, tail):
    """The loss computed the expensive way: the dense (n, C) target rebuilt, then a plain KL."""
    log_q = F.log_softmax(student / temperature, dim=1)
    log_p = rebuilt.dense_log_probs(temperature)
    if isinstance(rebuilt, TopKTarget) and tail == "bucket":  # coarsen both to k classes + one tail bin
        tail_mask = torch.ones_like(log_p, dtype=torch.bool).scatter(1, rebuilt.idx, False)

        def coarse(log_x):
            return torch.cat([log_x.gather(1, rebuilt.idx),
                              torch.logsumexp(log_x.masked_fill(~tail_mask, -math.inf), 1, keepdim=True)], 1)

        log_p, log_q = coarse(log_p), coarse(log_q)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1).mean()


@pytest.mark.parametrize("mode,tail", [("topk", "uniform"), ("topk", "bucket"), ("sampled", "bucket"),
                                       ("dense", "bucket")])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0, 20.0])
def test_sparse_loss_matches_the_dense_rebuild(mode, tail, temperature):
    logits = confident_logits(64)
    labels = torch.tensor(np.where(np.arange(64) % 5 == 0, -1, logits.argmax(1)))  # some rows unlabelled
    # fp32: both sides round log q to ~6e-8 × log C per class; at T = 20 the KL (~6e-4) is a difference of terms of
    # size log C, so absolute agreement is 3e-7 at best (the fp64 pass checks the formula to 1e-10)
    for torch_dtype, rtol, atol in ((torch.float64, 1e-10, 1e-12), (torch.float32, 1e-5, 5e-7)):
        rebuilt, _ = target(logits, mode=mode, torch_dtype=torch_dtype, k=10, samples=64, sample_temperature=2.0)
        student = torch.tensor(np.random.default_rng(2).normal(0, 2, (64, C)), dtype=torch_dtype, requires_grad=True)
        sparse = soft_kl(student, rebuilt, temperature, tail)
        (sparse_grad,) = torch.autograd.grad(sparse, student)
        dense = _dense_reference(student, rebuilt, temperature, tail)
        (dense_grad,) = torch.autograd.grad(dense, student)
        assert sparse.item() == pytest.approx(dense.item(), rel=rtol, abs=atol)
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=rtol * 10, atol=1e-9)
        total = kd_loss(student, rebuilt, labels, temperature, 0.7, tail)
        ce = F.cross_entropy(student[labels >= 0], labels[labels >= 0])
        assert total["loss"].item() == pytest.approx((0.3 * ce + 0.7 * temperature**2 * dense).item(), rel=rtol * 10)


@pytest.mark.parametrize("sample_temperature,temperatures", [(1.0, (1.0, 2.0)), (2.0, (1.0, 2.0, 4.0))])
def test_sampled_rows_are_an_unbiased_estimate(sample_temperature, temperatures):
    """Averaged over many independent draws, the rebuilt target converges to softmax(t/T)."""
    draws = 6000
    one = np.array([[4.0, 3.0, 2.5, 1.0, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0]], dtype=np.float32)
    logits = np.repeat(one, draws, axis=0)
    rebuilt, spec = target(logits, mode="sampled", dtype="float32", samples=8, sample_temperature=sample_temperature)
    assert isinstance(rebuilt, SampledTarget) and spec.temperatures == (1.0, 2.0, 4.0, 8.0)
    for temperature in temperatures:
        estimates = rebuilt.dense_log_probs(temperature).exp()  # one row per independent draw
        truth = torch.softmax(torch.tensor(one[0], dtype=torch.float64) / temperature, dim=0)
        mean, error = estimates.mean(dim=0), estimates.std(dim=0) / math.sqrt(draws)
        assert bool(((mean - truth).abs() <= 5 * error + 1e-12).all()), (temperature, mean, truth)
        other = torch.softmax(torch.tensor(one[0], dtype=torch.float64) / (temperature * 2), dim=0)
        assert float(((mean - other).abs() / (5 * error + 1e-12)).max()) > 1  # the test tells temperatures apart
    assert bool((rebuilt.drawn().sum(dim=1) <= 8).all()) and bool(rebuilt.drawn()[:, 0].all())


def test_ragged_rows_taken_and_padded_match_the_python_lists():
    rows = [[3, 1], [], [7], [2, 2, 9, 4], [5]]
    lengths = [len(r) for r in rows]
    ragged = Ragged(np.concatenate([[0], np.cumsum(lengths)]), np.array(sum(rows, []), dtype=np.int32))

    def as_lists(r: Ragged) -> list[list[int]]:
        return [r.values[r.offsets[i]:r.offsets[i + 1]].tolist() for i in range(len(r))]

    picked = np.array([3, 0, 1, 3])
    assert as_lists(ragged.take(picked)) == [rows[i] for i in picked]
    tail = ragged.take(np.array([2, 3, 4]))  # its offsets start at 0; a slice of the parent's would not
    sliced = Ragged(ragged.offsets[3:], ragged.values)  # rows 3 and 4, offsets starting mid-array
    assert as_lists(tail) == rows[2:]
    assert ragged.padded(3, fill=-1).tolist() == [[3, 1, -1], [-1, -1, -1], [7, -1, -1], [2, 2, 9], [5, -1, -1]]
    assert sliced.padded(2).tolist() == [[2, 2], [5, 0]]


def test_bad_storage_and_loss_settings_fail_naming_the_key():
    with pytest.raises(StillError, match=r"store.samples must be >= 1"):
        load_config(InferConfig, None, ["store.mode=sampled", "store.samples=-1"])
    with pytest.raises(StillError, match=r"store.temperatures must be a non-empty list of values > 0"):
        load_config(InferConfig, None, ["store.temperatures=[1, -2]"])
    with pytest.raises(StillError, match=r"kd.tail must be one of 'uniform', 'bucket'; got 'gaussian'"):
        load_config(TrainConfig, None, ["kd.tail=gaussian"])
    with pytest.raises(StillError, match=r"store.k=11 must be in \[1, 10\], the number of classes"):
        SoftLabelSpec.create("topk", 10, k=11)
    with pytest.raises(StillError, match="multi-label"):
        SoftLabelSpec.create("topk", 10, k=3, task="multilabel")


@pytest.mark.parametrize("width", [1, 5, 16, 17, 64])
def test_row_logsumexp_matches_the_definition_on_confident_rows(width):
    rng = np.random.default_rng(width)
    values = rng.normal(0, 30, (200, width))  # peaks hundreds of nats apart: a naive sum overflows
    values[::7, 0] = -np.inf  # a class with no mass
    values[3] = 800.0  # a row of equal maxima, each beyond float64's exp
    values[5] = -np.inf  # a row without mass

    def logsumexp(row):
        peak = max(row)
        return peak if peak == -math.inf else peak + math.log(sum(math.exp(v - peak) for v in row))

    expected = [logsumexp(row) for row in values.tolist()]
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        np.testing.assert_allclose(row_logsumexp(values), expected, rtol=1e-13, atol=0, equal_nan=False)
    assert row_logsumexp(values[:0]).shape == (0,)


def test_a_tail_without_finite_mass_gives_no_nan_between_grid_temperatures():
    """Rows whose tail holds no mass at the grid temperatures (log-mass −inf there): between grid points
    the tail's mass is 0 (it was NaN), the top-k carries it all, and the loss stays finite."""
    spec = SoftLabelSpec.create("topk", 20, dtype="float16", k=2)
    columns = prepare(compress(confident_logits(3, 20), spec), spec)
    columns["topk_tail"][:] = -np.inf
    log_p = columns["topk_logp"].astype(np.float64)
    columns["topk_logp"] = (log_p - np.log(np.exp(log_p).sum(1, keepdims=True))).astype(np.float32)
    for temperature in (1.5, 3.0, 20.0):
        bound = at_temperature(columns, spec, temperature)
        assert np.isneginf(bound["topk_logtail_at"]).all()
        top = np.exp(bound["topk_logp_at"].astype(np.float64))
        np.testing.assert_allclose(top.sum(1), 1.0, rtol=1e-6)
        target = target_from_columns(bound, spec, temperature=temperature, dtype=torch.float64)
        student = torch.zeros(3, 20, dtype=torch.float64, requires_grad=True)
        loss = kd_loss(student, target, torch.tensor([0, -1, 1]), temperature, 0.7)["loss"]
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(student.grad).all()
    values = np.array([[-np.inf, -np.inf], [-3.0, -1.0]])
    assert np.isneginf(lognorm_at(values, (1.0, 2.0), 1.5, math.log(5))[0])
    assert math.isfinite(lognorm_at(values, (1.0, 2.0), 1.5, math.log(5))[1])


def test_compress_refuses_non_finite_logits_naming_the_row():
    logits = confident_logits(6)
    logits[4, 3] = np.nan
    for mode in ("dense", "topk", "sampled"):
        spec = SoftLabelSpec.create(mode, C, k=5, samples=8)
        with pytest.raises(StillError, match=r"NaN/inf in 1 of 6 rows \(first: row 4\)"):
            compress(logits, spec, np.random.default_rng(0))
    logits[4, 3] = np.inf
    with pytest.raises(StillError, match="first: row 4"):
        compress(logits, SoftLabelSpec.create("topk", C, k=5))


def test_a_temperature_below_the_grid_is_refused_not_extrapolated():
    spec = SoftLabelSpec.create("topk", C, k=5)
    columns = prepare(compress(confident_logits(4), spec), spec)
    with pytest.raises(StillError, match=r"kd.temperature=0.5 is below the store's temperature grid"):
        at_temperature(columns, spec, 0.5)
    low = SoftLabelSpec.create("topk", C, k=5, temperatures=(0.5, 1.0, 2.0))
    exact = target(confident_logits(4), k=5, temperatures=(0.5, 1.0, 2.0))[0]  # on a grid that holds 0.5: exact
    true_tail = 1 - torch.softmax(torch.tensor(confident_logits(4), dtype=torch.float64) / 0.5, 1).gather(
        1, exact.idx).sum(1)
    torch.testing.assert_close(exact.parts(0.5)[1].exp(), true_tail, rtol=1e-3, atol=1e-12)
    assert low.temperatures[0] == 0.5
