"""Token-level pieces every layer shares (a leaf: it imports torch and nothing of ours): the label that
marks unscored positions, the positions a batch is scored at, an LM head as the losses and engines read it,
and the tempered tail mass of a top-k distribution."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels on prompt and padding positions: never scored


@dataclass(frozen=True)
class ScoredPositions:
    """The positions a batch is scored at: hidden state ``index`` (flat over [batch, seq]) predicts token
    ``targets``. Only response tokens are scored; prompt and padding positions never reach the head."""

    index: torch.Tensor  # long [n]
    targets: torch.Tensor  # long [n]

    @classmethod
    def of(cls, labels: torch.Tensor) -> ScoredPositions:
        """From right-shifted labels (IGNORE_INDEX on prompt and padding). Computed on the CPU tensors a
        batch is built from: selecting with a boolean mask on the GPU would stall on a host sync."""
        following = labels[:, 1:]  # position t predicts token t + 1
        rows, columns = (following != IGNORE_INDEX).nonzero(as_tuple=True)
        return cls(index=rows * labels.size(1) + columns, targets=following[rows, columns])

    def to(self, device: torch.device) -> ScoredPositions:
        return ScoredPositions(self.index.to(device, non_blocking=True), self.targets.to(device, non_blocking=True))


def gather_scored(hidden: torch.Tensor, positions: ScoredPositions) -> torch.Tensor:
    """[batch, seq, hidden] -> [n, hidden] at the scored positions."""
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, positions.index)


@dataclass(frozen=True)
class Head:
    """An LM head as the loss needs it: logits = softcap(scale · (h Wᵀ + b)), cut to the tokenizer's
    ``vocab_size`` rows (padded heads carry no real tokens)."""

    weight: torch.Tensor  # [head rows, hidden]
    bias: torch.Tensor | None
    vocab_size: int
    scale: float = 1.0  # e.g. Cohere's logit_scale
    softcap: float | None = None  # e.g. Gemma 2's final_logit_softcapping

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """h Wᵀ + b over the tokenizer's rows: the matmul in the weight's dtype, the result in fp32."""
        weight = self.weight[: self.vocab_size]
        bias = None if self.bias is None else self.bias[: self.vocab_size]
        return F.linear(hidden.to(weight.dtype), weight, bias).float()

    def finish(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw fp32 logits -> the model's logits (its scale and soft cap, if any)."""
        logits = raw * self.scale if self.scale != 1.0 else raw
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.finish(self.raw_logits(hidden))

    def in_dtype(self, dtype: torch.dtype) -> Head:
        """The head with its weights detached and cast once (per micro-batch, not per chunk) to the compute
        dtype: the loss computes their gradients itself."""
        bias = None if self.bias is None else self.bias.detach().to(dtype)
        return replace(self, weight=self.weight.detach().to(dtype), bias=bias)


def tempered_tail(top_logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int, temperature: float) -> torch.Tensor:
    """log Σ_tail p_j^(1/T) (unnormalised, like the re-tempered top-k) from the top-k log-probs and the
    tail's log-mass at T = 1: fit log p = a − α log r on ranks 1..k, spread the tail mass over ranks
    k+1..V with that slope (the sum taken as an integral), then temper. Exact at T = 1 (returns ``tail``)."""
    k = top_logprobs.size(-1)
    if temperature == 1.0 or k >= vocab_size:
        return tail / temperature
    log_rank = torch.log(torch.arange(1, k + 1, device=tail.device, dtype=torch.float64))
    centred = log_rank - log_rank.mean()
    y = top_logprobs.double()
    slope = ((y - y.mean(-1, keepdim=True)) * centred).sum(-1) / (centred**2).sum()
    alpha = (-slope).clamp(min=0.0)
    low, high = math.log(k + 0.5), math.log(vocab_size + 0.5)
    tempered = tail.double() / temperature + _log_power_integral(alpha / temperature, low, high)
    tempered = tempered - _log_power_integral(alpha, low, high) / temperature
    return torch.where(torch.isfinite(tail), tempered.float(), tail)


def _log_power_integral(beta: torch.Tensor, log_low: float, log_high: float) -> torch.Tensor:
    """log ∫ x^−β dx from e^log_low to e^log_high, elementwise over β (the β = 1 limit is log(high/low))."""
    one = 1 - beta
    near_one = one.abs() < 1e-4
    one = torch.where(near_one, torch.full_like(one, 1e-4), one)
    ends = torch.stack([one * log_high, one * log_low])
    top, bottom = ends.max(0).values, ends.min(0).values
    value = top + torch.log1p(-torch.exp(bottom - top)) - torch.log(one.abs())
    return torch.where(near_one, torch.full_like(value, math.log(log_high - log_low)), value)
