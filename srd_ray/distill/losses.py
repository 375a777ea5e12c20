"""Distillation losses: the divergence registry, and the one memory-bounded loss training calls.

**Divergences.** With p = softmax(teacher_logits / T) and q = softmax(student_logits / T), each registered
function maps log p and log q (shape [..., vocab]) to a divergence per token (shape [...]). All are true
divergences (``fkl`` is KL(p‖q), not the cross-entropy form −Σ p log q some releases use: the two differ by
the teacher's entropy, a constant for the student, so their gradients are identical). Vocabulary entries
whose logit is ±inf in either model are masked out.

**The training loss** (:func:`distillation_loss`) is ``(1 − β)·CE + β·KD_T`` summed over response tokens and
divided by the optimizer step's response-token count (``num_items_in_batch``, as TRL does). It never builds
a ``[batch, seq, vocab]`` tensor: it takes the final hidden states at response positions only, and walks
them in chunks of ``chunk_tokens`` rows. Each chunk's logits are made from the hidden states through the LM
head, in fp32 only inside the chunk; the student's gradient with respect to hidden states and head weights
is computed right there (as Liger-Kernel's fused-linear losses do), so no chunk's logits are kept for the
backward pass. Peak memory is a few ``[chunk_tokens, vocab]`` fp32 tensors whatever the batch.

:func:`dense_loss_sums` is the plain unchunked form on full logits: the reference tests and benchmarks
compare the chunked loss against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from srd_ray.loss_settings import (  # noqa: F401 (re-exported: callers import the settings from here too)
    DEFAULT_LOSS,
    KD_LOSS_NAMES,
    TEMPERATURE_SCALINGS,
    LossSettings,
    mix,
    temperature_factor,
)
from srd_ray.tokens import (  # noqa: F401 (re-exported)
    IGNORE_INDEX,
    Head,
    ScoredPositions,
    gather_scored,
    tempered_tail,
)

TokenDivergence = Callable[..., torch.Tensor]

_MASKED_LOGIT = -1e9


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ a (log a − log b) over the last axis, with 0·log 0 = 0."""
    a = log_a.exp()
    # Select before multiplying: 0 · (−inf) would give NaN values and NaN gradients.
    difference = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))
    return (a * difference).sum(dim=-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a·a + (1 − weight_a)·b), computed stably in log space."""
    log_wa = math.log(weight_a) if weight_a > 0 else -math.inf
    log_wb = math.log(1 - weight_a) if weight_a < 1 else -math.inf
    return torch.logaddexp(log_a + log_wa, log_b + log_wb)


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, **_: float) -> torch.Tensor:
    """fkl: KL(p‖q) = Σ p (log p − log q). Mean-seeking: the student covers all of the teacher's mass."""
    return _kl(log_p, log_q)


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, **_: float) -> torch.Tensor:
    """rkl: KL(q‖p) = Σ q (log q − log p). Mode-seeking, as in MiniLLM."""
    return _kl(log_q, log_p)


def jensen_shannon(log_p: torch.Tensor, log_q: torch.Tensor, *, jsd_beta: float, **_: float) -> torch.Tensor:
    """jsd: m = (1−β)·p + β·q; β·KL(q‖m) + (1−β)·KL(p‖m)  (β = ``jsd_beta``, GKD's generalised JSD)."""
    log_m = _log_mixture(log_p, log_q, 1 - jsd_beta)
    return jsd_beta * _kl(log_q, log_m) + (1 - jsd_beta) * _kl(log_p, log_m)


def total_variation(log_p: torch.Tensor, log_q: torch.Tensor, **_: float) -> torch.Tensor:
    """tvd: ½ Σ |p − q|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)


def skew_kl(log_p: torch.Tensor, log_q: torch.Tensor, *, skew_alpha: float, **_: float) -> torch.Tensor:
    """skl: m = α·p + (1−α)·q; KL(p‖m)  (α = ``skew_alpha``, DistiLLM's skew KL)."""
    return _kl(log_p, _log_mixture(log_p, log_q, skew_alpha))


def skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, *, skew_alpha: float, **_: float) -> torch.Tensor:
    """srkl: m = (1−α)·p + α·q; KL(q‖m)  (DistiLLM's skew reverse KL)."""
    return _kl(log_q, _log_mixture(log_p, log_q, 1 - skew_alpha))


def no_distillation(log_p: torch.Tensor, log_q: torch.Tensor, **_: float) -> torch.Tensor:
    """sft: no KD term; training is cross-entropy on the references only."""
    # Zero, but still attached to the student's graph so callers can always call backward().
    return log_q[..., 0] * 0.0


KD_LOSSES: dict[str, TokenDivergence] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jensen_shannon,
    "tvd": total_variation,
    "skl": skew_kl,
    "srkl": skew_reverse_kl,
    "sft": no_distillation,
}
# The settings (names, scalings, LossSettings) live in a torch-free module: the spec reads them.
if tuple(KD_LOSSES) != KD_LOSS_NAMES:
    raise RuntimeError(f"KD_LOSSES {tuple(KD_LOSSES)} and loss_settings.KD_LOSS_NAMES {KD_LOSS_NAMES} differ")


def token_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, settings: LossSettings, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token KD loss (shape [...]), scaled, in fp32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = student_logits.float()
    teacher = teacher_logits.float()
    # Masked entries get a finite, hugely negative logit: probability exactly 0 in both models, so they
    # add nothing to any divergence, and no inf - inf ever reaches a gradient.
    finite = torch.isfinite(student) & torch.isfinite(teacher)
    log_q = torch.log_softmax(torch.where(finite, student / temperature, _MASKED_LOGIT), dim=-1)
    log_p = torch.log_softmax(torch.where(finite, teacher / temperature, _MASKED_LOGIT), dim=-1)
    divergence = KD_LOSSES[settings.name](log_p, log_q, jsd_beta=settings.jsd_beta, skew_alpha=settings.skew_alpha)
    return divergence * temperature_factor(settings.name, temperature, settings.temperature_scaling)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Token mean of the KD loss over ``mask`` (bool, True = response token); 0 when nothing is masked in."""
    per_token = token_kd(student_logits, teacher_logits, settings, temperature)
    mask = mask.bool()
    count = mask.sum()
    if count == 0:
        return per_token.sum() * 0.0
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / count


# --------------------------------------------------------------------------------------------------------
# What is scored: response positions


# --------------------------------------------------------------------------------------------------------
# The chunked, fused loss


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's where it is on (mixed precision), else the tensor's own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


@dataclass(frozen=True)
class StageWeights:
    """One stage's mix: ``(1 − kd_weight)·CE + kd_weight·KD_T``."""

    kd_weight: float
    temperature: float


@dataclass
class LossSums:
    """What one micro-batch contributed. ``loss`` is differentiable and already normalised; the sums are
    detached, on the device, for logging (no host sync until a log step asks for them)."""

    loss: torch.Tensor
    ce_sum: torch.Tensor
    kd_sum: torch.Tensor


def _chunk_sums(
    student_logits: torch.Tensor,
    teacher: Teacher | None,
    rows: slice,
    targets: torch.Tensor,
    stage: StageWeights,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    # CE as logsumexp minus the target's logit: autograd keeps no [chunk, vocab] log-softmax for it.
    target_logits = student_logits.gather(1, targets[:, None]).squeeze(1)
    ce = (torch.logsumexp(student_logits, dim=-1) - target_logits).sum()
    if teacher is None:
        return ce, ce.new_zeros(())
    return ce, teacher.kd(student_logits, rows, settings, stage.temperature).sum()


@dataclass(frozen=True)
class _LossJob:
    head: Head
    teacher: Teacher | None
    targets: torch.Tensor
    stage: StageWeights
    settings: LossSettings
    chunk_tokens: int
    scale: float  # gradient_scale / num_items_in_batch


def _fused_forward(hidden, weight, bias, job: _LossJob, wants_grad: list[bool]):
    """The chunk loop: loss totals, and the student's gradients where ``wants_grad`` asks for them."""
    compute = job.head.in_dtype(compute_dtype(weight))
    vocab, dtype = job.head.vocab_size, compute.weight.dtype
    # These gradients are not yet multiplied by fp16's loss scale (that comes in the backward pass), so in
    # fp16 small ones would flush to zero: compute them in fp32 there. bf16 has fp32's range.
    grad_dtype = torch.float32 if dtype == torch.float16 else dtype
    # The head as the hidden-state gradient needs it, cast once per micro-batch (fp16: one fp32 copy, not
    # one per chunk; otherwise no copy at all).
    head_for_grad = compute.weight[:vocab].to(grad_dtype)
    grad_hidden = torch.zeros_like(hidden) if wants_grad[0] else None
    # Head gradients accumulate over chunks: keep them in fp32 whatever the weight's dtype.
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if wants_grad[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if wants_grad[2] else None
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kd_total = hidden.new_zeros((), dtype=torch.float32)
    ce_factor, kd_factor = (1 - job.stage.kd_weight) * job.scale, job.stage.kd_weight * job.scale
    # Dtypes are explicit below; autocast would recast the whole head weight in every chunk.
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.size(0), job.chunk_tokens):
            rows = slice(start, start + job.chunk_tokens)
            h = hidden[rows].detach().to(dtype)
            with torch.enable_grad():
                raw = compute.raw_logits(h).requires_grad_(any(wants_grad))
                ce, kd = _chunk_sums(compute.finish(raw), job.teacher, rows, job.targets[rows], job.stage, job.settings)
                weighted = ce_factor * ce + kd_factor * kd
            if any(wants_grad):
                (grad_raw,) = torch.autograd.grad(weighted, raw)
                grad_raw = grad_raw.to(grad_dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_raw @ head_for_grad
                if grad_weight is not None:
                    _accumulate(grad_weight[:vocab], grad_raw, h.to(grad_dtype))
                if grad_bias is not None:
                    grad_bias[:vocab] += grad_raw.float().sum(0)
            ce_total += ce.detach()
            kd_total += kd.detach()
    return (ce_total, kd_total), (grad_hidden, grad_weight, grad_bias)


def _accumulate(grad_weight: torch.Tensor, grad_raw: torch.Tensor, h: torch.Tensor) -> None:
    """``grad_weight += grad_rawᵀ h`` into the fp32 accumulator. fp32 inputs (fp32 and fp16-mixed) add in
    place, with no [vocab, hidden] temporary; bf16 ones make one bf16 product (half an fp32 copy), added in."""
    if grad_raw.dtype == torch.float32:
        grad_weight.addmm_(grad_raw.T, h)
    else:
        grad_weight += grad_raw.T @ h


class _FusedHeadLoss(torch.autograd.Function):
    """The chunk loop as an autograd node: the gradients computed in the forward pass are handed back in
    the backward pass, scaled by the incoming gradient. No logits are saved between the two."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, job):
        wants_grad = [t is not None and t.requires_grad for t in (hidden, weight, bias)]
        (ce_total, kd_total), grads = _fused_forward(hidden, weight, bias, job, wants_grad)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.dtypes = [t.dtype if t is not None else None for t in (hidden, weight, bias)]
        ctx.wants_grad = wants_grad
        ctx.mark_non_differentiable(ce_total, kd_total)
        return mix(ce_total, kd_total, job.stage.kd_weight) * job.scale, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        saved = iter(ctx.saved_tensors)
        # In place: this node runs its backward once, and a head-sized copy is worth saving.
        grads = [
            next(saved).mul_(grad_loss).to(dtype) if wanted else None
            for wanted, dtype in zip(ctx.wants_grad, ctx.dtypes, strict=True)
        ]
        return *grads, None


class Teacher(Protocol):
    """What the loss needs from a teacher: the KD term per scored position of a chunk."""

    def kd(self, student_logits: torch.Tensor, rows: slice, settings: LossSettings, temperature: float) -> torch.Tensor:
        """Per-token KD loss [chunk] between the student's logits and the teacher at scored ``rows``."""


@dataclass(frozen=True)
class DenseTeacher:
    """The teacher model's logits for scored positions, made chunk by chunk from its final hidden states."""

    head: Head
    hidden: torch.Tensor  # [n, teacher hidden], no grad

    def logits(self, rows: slice) -> torch.Tensor:
        return self.head.logits(self.hidden[rows])

    def kd(self, student_logits: torch.Tensor, rows: slice, settings: LossSettings, temperature: float) -> torch.Tensor:
        return token_kd(student_logits, self.logits(rows), settings, temperature)


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's stored top-k signal at scored positions (``teacher_signal`` stage): per position the
    k most likely ids, their log-probabilities at T = 1, the log-mass of all other tokens and, for each
    of ``tail_temperatures``, the log of their tempered mass Σ_tail p^(1/T).

    Both distributions are restricted to k + 1 buckets: the teacher's k ids and one tail bucket. The
    student's buckets are exact (gathered from its full softmax at temperature T; its tail is everything
    else). The teacher's are exact at T = 1, and at any T whose tempered tail was stored: the top-k
    log-probs re-temper exactly (relative to each other) and the tail bucket is the stored tempered mass.
    What remains approximate is only the bucketing: within the tail, the student is matched in total mass,
    not token by token. At a T with nothing stored (or vLLM's extrapolated values) the tempered tail mass
    is extrapolated (:func:`tempered_tail`); treating the tail as one outcome instead would understate its
    tempered mass many times over at T = 2 (``bench/teacher_signal.py`` measures each)."""

    ids: torch.Tensor  # long [n, k]
    logprobs: torch.Tensor  # float32 [n, k], most likely first
    tail: torch.Tensor  # float32 [n]
    tempered_tails: torch.Tensor | None = None  # float32 [n, len(tail_temperatures)]
    tail_temperatures: tuple[float, ...] = ()

    def to(self, device: torch.device) -> SparseTeacher:
        moved = [t.to(device, non_blocking=True) for t in (self.ids, self.logprobs, self.tail)]
        tempered = None if self.tempered_tails is None else self.tempered_tails.to(device, non_blocking=True)
        return SparseTeacher(*moved, tempered, self.tail_temperatures)

    def kd(self, student_logits: torch.Tensor, rows: slice, settings: LossSettings, temperature: float) -> torch.Tensor:
        ids, logprobs = self.ids[rows], self.logprobs[rows]
        student = student_logits.float() / temperature
        log_q = torch.log_softmax(torch.where(torch.isfinite(student), student, _MASKED_LOGIT), dim=-1)
        student_tail = torch.logsumexp(log_q.scatter(1, ids, float("-inf")), dim=-1)
        # Adaptive k pads a token's ids with its first id at teacher log-prob -inf: the scatter above is the
        # same for a repeated id, and token_kd drops a bucket that is -inf in the teacher from both sides.
        student_buckets = torch.cat([log_q.gather(1, ids), student_tail[:, None]], dim=-1)
        teacher_tail = self.tempered_tail(rows, student_logits.size(-1), temperature)
        teacher_buckets = torch.cat([logprobs / temperature, teacher_tail[:, None]], dim=-1)
        # Both are log-probabilities over the buckets up to normalisation, which token_kd's softmax does (it
        # also masks buckets that are -inf in either, such as an empty tail).
        per_token = token_kd(student_buckets, teacher_buckets, settings, temperature=1.0)
        return per_token * temperature_factor(settings.name, temperature, settings.temperature_scaling)

    def tempered_tail(self, rows: slice, vocab_size: int, temperature: float) -> torch.Tensor:
        """log Σ_tail p^(1/T): stored when the teacher pass had this T, else extrapolated."""
        if temperature == 1.0:
            return self.tail[rows]
        stored = [i for i, t in enumerate(self.tail_temperatures) if math.isclose(t, temperature)]
        if stored and self.tempered_tails is not None:
            return self.tempered_tails[rows, stored[0]]
        return tempered_tail(self.logprobs[rows], self.tail[rows], vocab_size, temperature)


def distillation_loss(
    student_hidden: torch.Tensor,
    student_head: Head,
    teacher: Teacher | None,
    targets: torch.Tensor,
    *,
    stage: StageWeights,
    settings: LossSettings,
    num_items_in_batch: float,
    chunk_tokens: int,
    gradient_scale: float = 1.0,
) -> LossSums:
    """``((1 − β)·CE + β·KD_T) / num_items_in_batch`` over the scored rows, in chunks.

    ``student_hidden`` [n, hidden] are the student's final hidden states at the scored positions and
    ``targets`` [n] the tokens they predict; ``num_items_in_batch`` is the response-token count of the whole
    optimizer step (all micro-batches, all workers), so gradient accumulation and data parallelism give the
    gradient of one global token mean. ``gradient_scale`` multiplies the loss for backward (data-parallel
    wrappers average gradients over workers; the worker count here turns that back into a sum). The KD term
    is dropped (and no teacher logits are made) when ``teacher`` is None or ``stage.kd_weight`` is 0."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    if teacher is not None and stage.kd_weight == 0:
        teacher = None
    job = _LossJob(
        student_head, teacher, targets, stage, settings, chunk_tokens, gradient_scale / max(num_items_in_batch, 1)
    )
    inputs = (student_hidden, student_head.weight, student_head.bias)
    if torch.is_grad_enabled():
        loss, ce_sum, kd_sum = _FusedHeadLoss.apply(*inputs, job)
        return LossSums(loss=loss, ce_sum=ce_sum, kd_sum=kd_sum)
    (ce_sum, kd_sum), _ = _fused_forward(*inputs, job, wants_grad=[False, False, False])
    loss = mix(ce_sum, kd_sum, stage.kd_weight) * job.scale
    return LossSums(loss=loss, ce_sum=ce_sum, kd_sum=kd_sum)


def dense_loss_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    stage: StageWeights,
    settings: LossSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (CE sum, KD sum) over response tokens from full ``[batch, seq, head rows]`` logits, as
    training computed them before chunking. Tests and benchmarks compare :func:`distillation_loss` to it."""
    student_logits, labels = student_logits[:, :-1, :vocab_size].float(), labels[:, 1:]
    mask = labels != IGNORE_INDEX
    ce = F.cross_entropy(
        student_logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if teacher_logits is None or stage.kd_weight == 0:
        return ce, ce.new_zeros(())
    per_token = token_kd(student_logits, teacher_logits[:, :-1, :vocab_size], settings, stage.temperature)
    return ce, torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
