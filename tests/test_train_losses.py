"""Golden values and properties of the distillation losses (student_train.losses)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_train.losses import hint_loss, kd_loss, multilabel_kd_loss

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
    for key in ("loss", "ce", "kl"):
        assert out[key].item() == pytest.approx(case[key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c['temperature']}-lam{c['kd_weight']}")
def test_multilabel_loss_matches_numpy_golden_values(case):
    s, t = _tensors()
    y = torch.tensor(GOLDEN["multilabel_labels"])
    out = multilabel_kd_loss(s, t, y, case["temperature"], case["kd_weight"])
    assert out["loss"].item() == pytest.approx(case["ml_loss"], rel=1e-9, abs=1e-12)
    assert out["ce"].item() == pytest.approx(case["ml_ce"], rel=1e-9)
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


def test_gradients_flow_only_to_the_student():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    kd_loss(s, t.detach(), torch.tensor([0, 1, 2, 0]), 2.0, 0.5)["loss"].backward()
    assert s.grad is not None and t.grad is None


def test_unlabelled_rows_are_left_out_of_the_hard_term():
    s = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, -1, 2, -1])
    out = kd_loss(s, s, y, 1.0, 0.0)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(s[[0, 2]], y[[0, 2]]).item())


def test_hint_loss_is_mse():
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert hint_loss(a, b).item() == pytest.approx(1.0)
