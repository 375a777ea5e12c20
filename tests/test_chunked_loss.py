"""The chunked, fused loss against the plain form on full logits: same values, same student gradients."""

from __future__ import annotations

import itertools

import pytest
import torch

from srd_ray.distill.losses import (
    IGNORE_INDEX,
    KD_LOSS_NAMES,
    TEMPERATURE_SCALINGS,
    DenseTeacher,
    Head,
    LossSettings,
    ScoredPositions,
    StageWeights,
    dense_loss_sums,
    distillation_loss,
    gather_scored,
)
from srd_ray.distill.step import DistillationModel
from srd_ray.models import final_hidden_states, load_model, output_head
from srd_ray.spec import ModelSpec

VOCAB, HEAD_ROWS, HIDDEN = 11, 13, 16  # a head padded past the tokenizer's 11 tokens


def labels_with_prompt_and_padding() -> torch.Tensor:
    torch.manual_seed(1)
    labels = torch.randint(0, VOCAB, (3, 9))
    labels[:, :3] = IGNORE_INDEX  # prompts
    labels[1, 6:] = IGNORE_INDEX  # a shorter row, right-padded
    labels[2, :5] = IGNORE_INDEX  # a longer prompt
    return labels


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize(
    ("name", "temperature", "scaling"), list(itertools.product(KD_LOSS_NAMES, (1.0, 2.0), TEMPERATURE_SCALINGS))
)
def test_chunked_equals_unchunked(name, temperature, scaling):
    torch.manual_seed(0)
    labels = labels_with_prompt_and_padding()
    hidden = torch.randn(3, 9, HIDDEN)
    weight = torch.randn(HEAD_ROWS, HIDDEN) * 0.5
    bias = torch.randn(HEAD_ROWS) * 0.1
    teacher_hidden, teacher_weight = torch.randn(3, 9, HIDDEN), torch.randn(HEAD_ROWS, HIDDEN) * 0.5
    stage, settings = StageWeights(kd_weight=0.7, temperature=temperature), LossSettings(name, scaling)
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())

    dense_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = dense_inputs
    ce, kd = dense_loss_sums(h @ w.T + b, teacher_hidden @ teacher_weight.T, labels, vocab_size=VOCAB, stage=stage,
                             settings=settings)  # fmt: skip
    expected = ((1 - stage.kd_weight) * ce + stage.kd_weight * kd) / tokens
    expected.backward()

    positions = ScoredPositions.of(labels)
    chunked_inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = chunked_inputs
    teacher = DenseTeacher(Head(teacher_weight, None, VOCAB), gather_scored(teacher_hidden, positions))
    sums = distillation_loss(
        gather_scored(h, positions), Head(w, b, VOCAB), teacher, positions.targets, stage=stage, settings=settings,
        num_items_in_batch=tokens, chunk_tokens=4,
    )  # fmt: skip
    sums.loss.backward()

    assert relative_error(sums.loss.detach(), expected.detach()) < 1e-5
    assert relative_error(sums.ce_sum, ce.detach()) < 1e-5 and relative_error(sums.kd_sum, kd.detach()) < 1e-5
    for chunked, dense in zip(chunked_inputs, dense_inputs, strict=True):
        assert relative_error(chunked.grad, dense.grad) < 1e-5
    assert torch.count_nonzero(chunked_inputs[1].grad[VOCAB:]) == 0, "padded head rows get no gradient"


def test_infinite_teacher_logits_stay_masked():
    """A teacher that rules tokens out (−inf logits) gives finite losses and gradients, in every loss."""
    torch.manual_seed(0)
    labels = labels_with_prompt_and_padding()
    positions = ScoredPositions.of(labels)
    teacher_bias = torch.zeros(HEAD_ROWS)
    teacher_bias[[2, 5]] = float("-inf")
    teacher = DenseTeacher(Head(torch.randn(HEAD_ROWS, HIDDEN), teacher_bias, VOCAB),
                           gather_scored(torch.randn(3, 9, HIDDEN), positions))  # fmt: skip
    for name in KD_LOSS_NAMES:
        hidden = torch.randn(3, 9, HIDDEN, requires_grad=True)
        weight = torch.randn(HEAD_ROWS, HIDDEN, requires_grad=True)
        sums = distillation_loss(
            gather_scored(hidden, positions), Head(weight, None, VOCAB), teacher, positions.targets,
            stage=StageWeights(1.0, 2.0), settings=LossSettings(name), num_items_in_batch=10, chunk_tokens=3,
        )  # fmt: skip
        sums.loss.backward()
        assert torch.isfinite(sums.loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_chunk_size_must_be_positive():
    positions = ScoredPositions.of(labels_with_prompt_and_padding())
    hidden = gather_scored(torch.randn(3, 9, HIDDEN), positions)
    with pytest.raises(ValueError, match="chunk_tokens"):
        distillation_loss(hidden, Head(torch.randn(VOCAB, HIDDEN), None, VOCAB), None, positions.targets,
                          stage=StageWeights(0.0, 1.0), settings=LossSettings("sft"), num_items_in_batch=1,
                          chunk_tokens=0)  # fmt: skip


def test_scored_positions_are_the_response_tokens():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, 9, 3]])
    positions = ScoredPositions.of(labels)
    # Row 0: positions 1, 2 predict tokens 5, 6. Row 1 (offset 5): positions 0..3 predict 7, 8, 9, 3.
    assert positions.index.tolist() == [1, 2, 5, 6, 7, 8]
    assert positions.targets.tolist() == [5, 6, 7, 8, 9, 3]


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_head_on_final_hidden_states_gives_the_models_logits(tiny_models, role):
    model = load_model(ModelSpec(path=tiny_models[role])).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7))
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits
        ours = output_head(model, model.config.vocab_size).logits(final_hidden_states(model, input_ids, mask))
    torch.testing.assert_close(ours, logits.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_distillation_model_matches_dense_loss_on_real_models(tiny_models, name):
    """Through the models: hidden states -> chunked loss gives the dense loss and the same gradient in
    every student weight (tied embeddings included)."""
    student = load_model(ModelSpec(path=tiny_models["student"]))
    teacher = load_model(ModelSpec(path=tiny_models["teacher"])).eval().requires_grad_(False)
    vocab = student.config.vocab_size
    torch.manual_seed(0)
    input_ids = torch.randint(0, vocab, (3, 12))
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX
    stage, settings = StageWeights(0.6, 2.0), LossSettings(name)
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())

    ce, kd = dense_loss_sums(student(input_ids=input_ids, attention_mask=mask).logits,
                             teacher(input_ids=input_ids, attention_mask=mask).logits, labels, vocab_size=vocab,
                             stage=stage, settings=settings)  # fmt: skip
    ((1 - stage.kd_weight) * ce + stage.kd_weight * kd).div(tokens).backward()
    dense_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    positions = ScoredPositions.of(labels)
    pair = DistillationModel(student, teacher, vocab)
    loss, _, _ = pair(input_ids, mask, positions.index, positions.targets, stage=stage, settings=settings,
                      num_items_in_batch=tokens, gradient_scale=1.0, chunk_tokens=5)  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(((1 - stage.kd_weight) * ce + stage.kd_weight * kd).item() / tokens, rel=1e-5)
    for n, p in student.named_parameters():
        assert relative_error(p.grad, dense_grads[n]) < 1e-5, n
