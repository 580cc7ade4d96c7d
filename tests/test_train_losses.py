"""Golden values and properties of the distillation losses (student_train.losses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_train.losses import binned_divergence, hint_loss, kd_loss, multilabel_kd_loss, soft_kl

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "losses" / "kd_golden.json").read_text())
CASES = GOLDEN["cases"]


def _tensors():
    s = torch.tensor(GOLDEN["student_logits"], dtype=torch.float64)
    t = torch.tensor(GOLDEN["teacher_logits"], dtype=torch.float64)
    return s, t


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c['temperature']}-lam{c['kd_weight']}")
def test_kd_loss_matches_numpy_golden_values(case):
    s, t = _tensors()
    y = torch.tensor(GOLDEN["labels"])
    out = kd_loss(s, t, y, case["temperature"], case["kd_weight"])
    for key in ("loss", "ce"):
        assert out[key].item() == pytest.approx(case[key], rel=1e-9, abs=1e-12), key
    assert soft_kl(s, t, case["temperature"]).item() == pytest.approx(case["kl"], rel=1e-9, abs=1e-12)
    if case["kd_weight"] == 0:
        assert out["kl"] is None  # λ = 0: no KL computed at all
    else:
        assert out["kl"].item() == pytest.approx(case["kl"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c['temperature']}-lam{c['kd_weight']}")
def test_multilabel_loss_matches_numpy_golden_values(case):
    s, t = _tensors()
    y = torch.tensor(GOLDEN["multilabel_labels"])
    out = multilabel_kd_loss(s, t, y, case["temperature"], case["kd_weight"])
    assert out["loss"].item() == pytest.approx(case["ml_loss"], rel=1e-9, abs=1e-12)
    assert out["ce"].item() == pytest.approx(case["ml_ce"], rel=1e-9)
    if case["kd_weight"] > 0:
        assert out["kl"].item() == pytest.approx(case["ml_kl"], rel=1e-9, abs=1e-12)


def test_hand_computed_two_class_case():
    # teacher p = (3/4, 1/4) at T = 1; student q = (1/2, 1/2); label 0.
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    out = kd_loss(s, t, torch.tensor([0]), temperature=1.0, kd_weight=0.5)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert out["ce"].item() == pytest.approx(math.log(2.0))
    assert out["kl"].item() == pytest.approx(kl)
    assert out["loss"].item() == pytest.approx(0.5 * math.log(2.0) + 0.5 * kl)
    # at T = 2 the teacher becomes (sqrt3, 1)/(sqrt3 + 1) and the KL is scaled by T² = 4
    out2 = kd_loss(s, t, torch.tensor([0]), temperature=2.0, kd_weight=1.0)
    p = np.array([math.sqrt(3.0), 1.0]) / (math.sqrt(3.0) + 1.0)
    assert out2["loss"].item() == pytest.approx(4.0 * float(np.sum(p * np.log(p / 0.5))))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_kl_is_zero_when_student_equals_teacher(temperature):
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (8,))
    assert kd_loss(z, z.clone(), y, temperature, 0.7)["kl"].item() == pytest.approx(0.0, abs=1e-6)
    ml = multilabel_kd_loss(z, z.clone(), (z > 0).long(), temperature, 0.7)
    assert ml["kl"].item() == pytest.approx(0.0, abs=1e-6)


def test_zero_weight_is_plain_cross_entropy():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(16, 7, generator=g), torch.randn(16, 7, generator=g)
    y = torch.randint(0, 7, (16,), generator=g)
    out = kd_loss(s, t, y, 3.0, 0.0)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(s, y).item())
    assert kd_loss(s, None, y, 3.0, 0.5)["loss"].item() == pytest.approx(F.cross_entropy(s, y).item())


@pytest.mark.parametrize("mode", ["dense", "topk", "sampled"])
def test_gradients_flow_only_to_the_student(mode):
    """The teacher side is handed in as it comes (requiring grad): the loss itself must not let gradients reach it."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = (3 * torch.randn(6, 8, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = t if mode == "dense" else _store_target(t, mode, temperature=None, requires_grad=True)
    kd_loss(s, teacher, torch.tensor([0, 1, 2, -1, 4, 5]), 2.0, 0.5)["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    leaves = [t] if mode == "dense" else [v for v in vars(teacher).values() if isinstance(v, torch.Tensor)]
    assert all(leaf.grad is None for leaf in leaves)


def _store_target(logits, mode, temperature, requires_grad=False, k=3):
    """A top-k or sampled store's target of ``logits`` (T-independent, or bound at ``temperature``)."""
    from teacher_infer.soft_labels import SoftLabelSpec, compress
    from teacher_infer.targets import at_temperature, prepare, target_from_columns

    spec = SoftLabelSpec.create(mode, logits.shape[1], k=k, samples=64, dtype="float32")
    columns = prepare(compress(logits.detach().numpy(), spec, np.random.default_rng(0)), spec)
    if temperature is not None:
        columns = at_temperature(columns, spec, temperature)
    target = target_from_columns(columns, spec, dtype=torch.float64, temperature=temperature)
    for name, value in vars(target).items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and requires_grad:
            value.requires_grad_()
    return target


@pytest.mark.parametrize("mode,tail", [("topk", "bucket"), ("topk", "uniform"), ("sampled", "bucket")])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_fused_kl_matches_autograd_of_its_formula(mode, tail, temperature):
    """Value and gradient of the fused KL against autograd through the written-out formula, on a confident
    teacher (peaks of 8-16 over noise), many classes, k < C, T ≠ 1 and unlabelled rows."""
    g = torch.Generator().manual_seed(5)
    n, classes = 32, 200
    t = 1.5 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    t[torch.arange(n), torch.randint(0, classes, (n,), generator=g)] += 8 + 8 * torch.rand(n, generator=g, dtype=torch.float64)
    target = _store_target(t, mode, temperature, k=10)
    s = (2 * torch.randn(n, classes, generator=g, dtype=torch.float64)).requires_grad_()
    kl = soft_kl(s, target, temperature, tail)
    kl.backward()
    s2 = s.detach().clone().requires_grad_()
    reference = _kl_by_formula(s2, target, mode, tail, temperature)
    reference.backward()
    assert kl.item() == pytest.approx(reference.item(), rel=1e-9)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-7, atol=1e-12)


def _kl_by_formula(s, target, mode, tail, temperature):
    """The forward KL of a bound store target, written out over the student's full log-softmax."""
    log_q = torch.log_softmax(s / temperature, dim=1)
    if mode == "sampled":
        w = target.log_w.exp()
        return (w * (target.log_w.clamp_min(-1e300) - log_q.gather(1, target.idx))).sum(1).mean()
    p_top, p_tail = target.log_p.exp(), target.log_tail.exp()
    kl = (p_top * (target.log_p - log_q.gather(1, target.idx))).sum(1)
    tail_log_q = log_q.scatter(1, target.idx, -math.inf)
    if tail == "bucket":
        return (kl + p_tail * (target.log_tail - torch.logsumexp(tail_log_q, 1))).mean()
    u = p_tail / (s.shape[1] - target.idx.shape[1])
    return (kl + (u[:, None] * (u.log()[:, None] - log_q)).scatter(1, target.idx, 0.0).sum(1)).mean()


@pytest.mark.parametrize("mode,tail", [("topk", "bucket"), ("topk", "uniform"), ("sampled", "bucket")])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_one_pass_cross_entropy_and_kl_match_autograd_of_their_formula(mode, tail, temperature):
    """kd_loss on a top-k or sampled target computes CE and KL in one kernel: its loss, both terms and its
    gradient against autograd through ``(1 − λ)·CE + λ·T²·KL`` written out, with a confident teacher, 200
    classes, k = 10, T ≠ 1, a confident student row and unlabelled rows."""
    t = _confident_teacher(32, 200, seed=8)
    target = _store_target(t, mode, temperature, k=10)
    g = torch.Generator().manual_seed(9)
    s = 2 * torch.randn(32, 200, generator=g, dtype=torch.float64)
    s[0, 3] = 150.0  # sure of one class: its tail mass underflows a shift by the global maximum
    s.requires_grad_()
    labels = torch.randint(0, 200, (32,), generator=g)
    labels[::3] = -1
    out = kd_loss(s, target, labels, temperature, 0.3, tail)
    out["loss"].backward()
    s2 = s.detach().clone().requires_grad_()
    labelled = labels >= 0
    ce = F.cross_entropy(s2[labelled], labels[labelled])
    kl = _kl_by_formula(s2, target, mode, tail, temperature)
    reference = 0.7 * ce + 0.3 * temperature**2 * kl
    reference.backward()
    assert out["ce"].item() == pytest.approx(ce.item(), rel=1e-10)
    assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-9)
    assert out["loss"].item() == pytest.approx(reference.item(), rel=1e-9)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-7, atol=1e-12)


def _confident_teacher(n: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = 1.5 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    t[torch.arange(n), torch.randint(0, classes, (n,), generator=g)] += 8 + 8 * torch.rand(n, generator=g, dtype=torch.float64)
    return t


@pytest.mark.parametrize("mode", ["dense", "topk"])
@pytest.mark.parametrize("divergence,beta", [("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_reverse_kl_and_jsd_match_the_teachers_full_softmax_over_bins(mode, divergence, beta, temperature):
    """Value and gradient of ``kd.divergence=reverse|jsd`` against a written-out derivation from the teacher's
    full logits (not the store's columns): the k classes the teacher ranks highest plus one tail bin (all
    classes for a dense target), a confident teacher, 300 classes, k = 12, T ≠ 1, unlabelled rows."""
    n, classes, k = 24, 300, 12
    t = _confident_teacher(n, classes, seed=7)
    g = torch.Generator().manual_seed(8)
    s = (2 * torch.randn(n, classes, generator=g, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, classes, (n,), generator=g)
    y[::5] = -1
    teacher = t if mode == "dense" else _store_target(t, "topk", temperature, k=k)
    out = kd_loss(s, teacher, y, temperature, 0.6, divergence=divergence, jsd_beta=beta)
    out["loss"].backward()

    s2 = s.detach().clone().requires_grad_()
    log_p, log_q = torch.log_softmax(t / temperature, 1), torch.log_softmax(s2 / temperature, 1)
    if mode == "topk":
        top = t.topk(k, dim=1).indices
        def binned(log_probs):
            return torch.cat([log_probs.gather(1, top),
                              torch.logsumexp(log_probs.scatter(1, top, -math.inf), 1, keepdim=True)], 1)
        log_p, log_q = binned(log_p), binned(log_q)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "reverse":
        d = (q * (log_q - log_p)).sum(1).mean()
    else:
        m = beta * p + (1 - beta) * q
        d = (beta * (p * (log_p - m.log())).sum(1) + (1 - beta) * (q * (log_q - m.log())).sum(1)).mean()
    labelled = y >= 0
    ce = F.cross_entropy(s2[labelled], y[labelled])
    reference = 0.4 * ce + 0.6 * temperature**2 * d
    reference.backward()
    assert out["kl"].item() == pytest.approx(d.item(), rel=1e-5)  # the store keeps float32 values
    assert out["loss"].item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-7)


def test_jsd_approaches_the_forward_and_reverse_kl_at_its_ends():
    """β·KL(p ‖ m) + (1 − β)·KL(q ‖ m) ≈ β·KL(p ‖ q) as β → 0 and (1 − β)·KL(q ‖ p) as β → 1."""
    t = _confident_teacher(8, 100, seed=9)
    s = torch.randn(8, 100, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    target = _store_target(t, "topk", 2.0, k=10)
    forward = soft_kl(s, target, 2.0, "bucket").item()
    reverse = binned_divergence(s, target, 2.0, "reverse").item()
    assert forward != pytest.approx(reverse, rel=0.05)
    assert binned_divergence(s, target, 2.0, "jsd", 1e-6).item() / 1e-6 == pytest.approx(forward, rel=1e-3)
    assert binned_divergence(s, target, 2.0, "jsd", 1 - 1e-6).item() / 1e-6 == pytest.approx(reverse, rel=1e-3)


def test_reverse_kl_and_jsd_refuse_a_sampled_target():
    target = _store_target(_confident_teacher(4, 50, seed=11), "sampled", 1.0)
    with pytest.raises(ValueError, match="sampled store's estimate is unbiased for the forward KL's gradient only"):
        kd_loss(torch.zeros(4, 50), target, torch.zeros(4, dtype=torch.long), 1.0, 0.5, divergence="reverse")


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_a_confident_student_gets_a_finite_reverse_kl_and_jsd(divergence):
    target = _store_target(4 * torch.randn(4, 50, generator=torch.Generator().manual_seed(6), dtype=torch.float64),
                           "topk", 1.0)
    s = torch.zeros(4, 50)
    s[:, 0] = 300.0
    s.requires_grad_()
    out = kd_loss(s, target, torch.tensor([0, 1, -1, 3]), 1.0, 0.9, divergence=divergence)
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and torch.isfinite(s.grad).all()


def test_a_confident_student_gets_a_finite_loss_and_gradient():
    """A student 300 nats sure of one class: its tail mass underflows float32's exp, the loss must not."""
    g = torch.Generator().manual_seed(6)
    target = _store_target(4 * torch.randn(4, 50, generator=g, dtype=torch.float64), "topk", 1.0)
    s = torch.zeros(4, 50)
    s[:, 0] = 300.0
    s.requires_grad_()
    out = kd_loss(s, target, torch.tensor([0, 1, -1, 3]), 1.0, 0.9)
    out["loss"].backward()
    assert math.isfinite(out["loss"].item()) and torch.isfinite(s.grad).all()


def test_unlabelled_rows_are_left_out_of_the_hard_term():
    s = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, -1, 2, -1])
    out = kd_loss(s, s, y, 1.0, 0.0)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(s[[0, 2]], y[[0, 2]]).item())


def test_hint_loss_is_mse():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert hint_loss(a, b).item() == pytest.approx(1.0)
