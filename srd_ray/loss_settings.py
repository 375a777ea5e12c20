"""Which KD loss a job trains with, without torch: the names, the temperature scalings and
``LossSettings``. The spec validates against these (``srd validate`` imports no torch); the divergences
themselves are in ``srd_ray.distill.losses``, which checks that it implements exactly these names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# fkl / rkl: forward / reverse KL; jsd: generalized JSD (GKD); tvd: total variation; skl / srkl: skew KL /
# skew reverse KL (DistiLLM); sft: no KD term.
KD_LOSS_NAMES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl", "sft")
TEMPERATURE_SCALINGS = ("t_squared", "none", "srd_release")

# The SRD release multiplies only these losses by T² (its `srd_release` scaling mode).
_SRD_RELEASE_T_SQUARED = frozenset({"fkl", "jsd", "srkl"})


@dataclass(frozen=True)
class LossSettings:
    """Which divergence and its parameters. The spec's ``distill`` defaults are read from this class."""

    name: str = "fkl"
    temperature_scaling: str = "t_squared"
    jsd_beta: float = 0.9  # GKD's β: the student's weight in the JSD mixture
    skew_alpha: float = 0.1  # DistiLLM's α: the teacher's weight (skl) or student's (srkl) in the mixture

    def __post_init__(self) -> None:
        if self.name not in KD_LOSS_NAMES:
            raise ValueError(f"unknown KD loss {self.name!r}; choose from {sorted(KD_LOSS_NAMES)}")
        if self.temperature_scaling not in TEMPERATURE_SCALINGS:
            raise ValueError(
                f"unknown temperature_scaling {self.temperature_scaling!r}; use {', '.join(TEMPERATURE_SCALINGS)}"
            )

    def for_heldout(self) -> LossSettings:
        """The held-out metric: the same divergence (fkl for SFT runs) at T = 1 with no T² factor."""
        return LossSettings("fkl" if self.name == "sft" else self.name, "none", self.jsd_beta, self.skew_alpha)


DEFAULT_LOSS = LossSettings()


def mix(ce: Any, kd: Any, kd_weight: float) -> Any:
    """The training loss from its parts, ``(1 - kd_weight)·CE + kd_weight·KD`` (numbers or tensors): the one
    place the mix is written."""
    return (1 - kd_weight) * ce + kd_weight * kd


def temperature_factor(name: str, temperature: float, scaling: str) -> float:
    """The factor a KD loss is multiplied by: T² (``t_squared``), 1 (``none``), or the release's rule."""
    if scaling == "t_squared" or (scaling == "srd_release" and name in _SRD_RELEASE_T_SQUARED):
        return temperature**2
    if scaling in ("none", "srd_release"):
        return 1.0
    raise ValueError(f"unknown temperature_scaling {scaling!r}; use t_squared, none or srd_release")
