"""Knowledge-distillation losses: one registry of small per-token divergences.

With p = softmax(teacher_logits / T) and q = softmax(student_logits / T), each function maps log p and
log q (shape [..., vocab]) to a divergence per token (shape [...]). :func:`kd_loss` applies the
temperature, the temperature scaling and the response mask and returns the token mean.

All divergences are returned as divergences (``fkl`` is KL(p‖q), not the cross-entropy form −Σ p log q
that some releases use: the two differ by the teacher's entropy, a constant for the student, so their
gradients are identical). Vocabulary entries whose logit is ±inf in either model are masked out.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

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

# The SRD release multiplies only these losses by T² (its `srd_release` scaling mode).
_SRD_RELEASE_T_SQUARED = frozenset({"fkl", "jsd", "srkl"})


def temperature_factor(name: str, temperature: float, scaling: str) -> float:
    """The factor a KD loss is multiplied by: T² (``t_squared``), 1 (``none``), or the release's rule."""
    if scaling == "t_squared" or (scaling == "srd_release" and name in _SRD_RELEASE_T_SQUARED):
        return temperature**2
    if scaling in ("none", "srd_release"):
        return 1.0
    raise ValueError(f"unknown temperature_scaling {scaling!r}; use t_squared, none or srd_release")


def token_kd(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    temperature_scaling: str = "t_squared",
    jsd_beta: float = 0.9,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Per-token KD loss (shape [...]), scaled, in fp32. Training sums it over response tokens."""
    if name not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; choose from {sorted(KD_LOSSES)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student = student_logits.float()
    teacher = teacher_logits.float()
    # Masked entries get a finite, hugely negative logit: probability exactly 0 in both models, so they
    # add nothing to any divergence, and no inf - inf ever reaches a gradient.
    finite = torch.isfinite(student) & torch.isfinite(teacher)
    log_q = torch.log_softmax(torch.where(finite, student / temperature, _MASKED_LOGIT), dim=-1)
    log_p = torch.log_softmax(torch.where(finite, teacher / temperature, _MASKED_LOGIT), dim=-1)
    divergence = KD_LOSSES[name](log_p, log_q, jsd_beta=jsd_beta, skew_alpha=skew_alpha)
    return divergence * temperature_factor(name, temperature, temperature_scaling)


def kd_loss(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    temperature_scaling: str = "t_squared",
    jsd_beta: float = 0.9,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Token mean of the KD loss over ``mask`` (bool, True = response token); 0 when nothing is masked in."""
    per_token = token_kd(
        name,
        student_logits,
        teacher_logits,
        temperature=temperature,
        temperature_scaling=temperature_scaling,
        jsd_beta=jsd_beta,
        skew_alpha=skew_alpha,
    )
    mask = mask.bool()
    count = mask.sum()
    if count == 0:
        return per_token.sum() * 0.0
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / count
