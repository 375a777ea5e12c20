"""KD losses against hand-computed values on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from srd_ray.distill.losses import (
    IGNORE_INDEX,
    KD_LOSSES,
    LossSettings,
    StageWeights,
    dense_loss_sums,
    kd_loss,
    temperature_factor,
)

P = [0.5, 0.3, 0.2]
Q = [0.2, 0.5, 0.3]


def logits_of(probs):
    return torch.log(torch.tensor([[probs]]))  # shape [1, 1, vocab]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def mix(weight_a, a, b):
    return [weight_a * x + (1 - weight_a) * y for x, y in zip(a, b, strict=True)]


HAND = {
    "fkl": kl(P, Q),
    "rkl": kl(Q, P),
    "jsd": 0.9 * kl(Q, mix(0.1, P, Q)) + 0.1 * kl(P, mix(0.1, P, Q)),
    "tvd": 0.5 * sum(abs(x - y) for x, y in zip(P, Q, strict=True)),
    "skl": kl(P, mix(0.1, P, Q)),
    "srkl": kl(Q, mix(0.9, P, Q)),
    "sft": 0.0,
}


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_each_loss_matches_its_formula(name):
    mask = torch.ones(1, 1, dtype=torch.bool)
    value = kd_loss(logits_of(Q), logits_of(P), mask, LossSettings(name, jsd_beta=0.9, skew_alpha=0.1))
    assert value.item() == pytest.approx(HAND[name], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_identical_distributions_give_zero(name):
    logits = torch.randn(2, 5, 11)
    ones = torch.ones(2, 5, dtype=torch.bool)
    assert kd_loss(logits, logits.clone(), ones, LossSettings(name)).item() == pytest.approx(0, abs=1e-6)


def test_temperature_scaling_modes():
    student, teacher = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for name in ("fkl", "rkl", "tvd"):
        plain = kd_loss(student, teacher, mask, LossSettings(name, "none"), temperature=2.0)
        squared = kd_loss(student, teacher, mask, LossSettings(name, "t_squared"), temperature=2.0)
        release = kd_loss(student, teacher, mask, LossSettings(name, "srd_release"), temperature=2.0)
        assert squared.item() == pytest.approx(4 * plain.item(), rel=1e-6)
        # The SRD release scales fkl, jsd and srkl by T^2, and the others not at all.
        assert release.item() == pytest.approx((4 if name == "fkl" else 1) * plain.item(), rel=1e-6)
    assert (
        temperature_factor("srkl", 3.0, "srd_release") == 9.0 and temperature_factor("skl", 3.0, "srd_release") == 1.0
    )
    with pytest.raises(ValueError, match="temperature_scaling"):
        temperature_factor("fkl", 2.0, "cubic")


def test_temperature_softens_both_distributions():
    student, teacher = logits_of(Q), logits_of(P)
    mask = torch.ones(1, 1, dtype=torch.bool)
    p2, q2 = torch.softmax(teacher / 2, -1)[0, 0].tolist(), torch.softmax(student / 2, -1)[0, 0].tolist()
    value = kd_loss(student, teacher, mask, LossSettings("fkl", "none"), temperature=2.0)
    assert value.item() == pytest.approx(kl(p2, q2), rel=1e-5)


def test_mask_selects_tokens_and_all_masked_is_zero():
    student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = True
    fkl = LossSettings("fkl")
    full = kd_loss(student, teacher, torch.ones(2, 4, dtype=torch.bool), fkl)
    picked = kd_loss(student, teacher, mask, fkl)
    expected = (
        kd_loss(student[0:1, 1:2], teacher[0:1, 1:2], mask[0:1, 1:2], fkl)
        + kd_loss(student[1:2, 3:4], teacher[1:2, 3:4], mask[1:2, 3:4], fkl)
    ) / 2
    assert picked.item() == pytest.approx(expected.item(), rel=1e-5) and picked.item() != pytest.approx(full.item())
    nothing = kd_loss(student.requires_grad_(), teacher, torch.zeros(2, 4, dtype=torch.bool), fkl)
    assert nothing.item() == 0.0 and not torch.isnan(nothing)


def test_infinite_logits_are_masked_without_nan_gradients():
    student = torch.randn(1, 2, 6, requires_grad=True)
    teacher = torch.randn(1, 2, 6)
    teacher[0, 0, 2] = float("-inf")
    student.data[0, 1, 4] = float("inf")
    for name in sorted(KD_LOSSES):
        student.grad = None
        value = kd_loss(student, teacher, torch.ones(1, 2, dtype=torch.bool), LossSettings(name))
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all(), name


def test_fkl_gradient_equals_cross_entropy_form_gradient():
    teacher = torch.randn(3, 5, 13)
    student_a = torch.randn(3, 5, 13, requires_grad=True)
    student_b = student_a.detach().clone().requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    kd_loss(student_a, teacher, mask, LossSettings("fkl"), temperature=1.5).backward()
    p = torch.softmax(teacher / 1.5, -1)
    cross_entropy_form = -(p * torch.log_softmax(student_b / 1.5, -1)).sum(-1).mean() * 1.5**2
    cross_entropy_form.backward()
    torch.testing.assert_close(student_a.grad, student_b.grad, rtol=1e-5, atol=1e-7)


def test_training_sums_cut_padded_vocab_and_skip_prompt_tokens():
    vocab = 5
    student = torch.randn(1, 4, 8)  # head padded to 8 rows; the tokenizer has 5 tokens
    teacher = torch.randn(1, 4, 8)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1]])  # two response tokens
    fkl = LossSettings("fkl")
    ce_sum, kd_sum = dense_loss_sums(student, teacher, labels, vocab_size=vocab, stage=StageWeights(1.0, 1.0),
                                     settings=fkl)  # fmt: skip
    ce = torch.nn.functional.cross_entropy(student[0, 1:3, :vocab], labels[0, 2:], reduction="sum")
    assert ce_sum.item() == pytest.approx(ce.item(), rel=1e-6)
    kd = kd_loss(student[:, 1:3, :vocab], teacher[:, 1:3, :vocab], torch.ones(1, 2, dtype=torch.bool), fkl) * 2
    assert kd_sum.item() == pytest.approx(kd.item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_is_gkds_generalised_jsd_of_student_and_teacher(beta):
    """GKD's D_JSD(β)(S‖T) = β·KL(S‖M) + (1−β)·KL(T‖M), M = β·S + (1−β)·T (S student Q, T teacher P); at
    β = 0.5 the symmetric JSD. The on-policy modes use the registry's jsd as it is."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    value = kd_loss(logits_of(Q), logits_of(P), mask, LossSettings("jsd", jsd_beta=beta)).item()
    m = mix(beta, Q, P)
    assert value == pytest.approx(beta * kl(Q, m) + (1 - beta) * kl(P, m), rel=1e-5)
    if beta == 0.5:
        half = mix(0.5, P, Q)
        assert value == pytest.approx(0.5 * kl(P, half) + 0.5 * kl(Q, half), rel=1e-5)
