r"""A normalised zeroth-order step: the coefficients are the slopes divided by their running RMS.

With the step's averaged slopes `g` (`P` scalars every party has), a second moment kept as an exponential moving
average over steps and corrected for its start like Adam's:

    m_t = beta * m_{t-1} + (1 - beta) * mean_p(g_p ** 2),       m_0 = 0
    c_p = g_p / (sqrt(m_t / (1 - beta ** t)) + eps)

and the optimizer applies `x <- x - (lr / P) sum_p c_p z_p`. Since `E[g_p ** 2] ~ ||grad||**2` for Gaussian or
Rademacher directions, `c` has unit scale and each entry of `x` moves by about `lr / sqrt(P)` per step, whatever the
loss's scale: the learning rate means what it means for Adam (one scalar second moment as in MEAZO, arXiv
2605.03869; `beta = 0` divides by the RMS of the step's own `P` scalars, close to FZOO's normalisation by the spread
of the batch of perturbed losses, arXiv 2506.09034).

`m` and `t` live in `optimizer.state["estimator"]` and change only on the global update of a step or round (the
averaged scalars), so replicas, catch-up and resume rebuild them exactly. A client's local step inside a round uses
`m` with its own slopes folded in, without storing it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from ..estimators import EstimatorConfig, ZOEstimator, register_estimator


@dataclasses.dataclass
class NormalizedConfig(EstimatorConfig):
    """Args:
    beta: weight of the old second moment, in [0, 1) (0: the step's own scalars only).
    eps: added to the RMS, >= 0 (guards a step whose scalars are all zero).
    """

    beta: float = 0.9
    eps: float = 1e-12

    def check(self, bad: Callable[[str, str, object], ValueError]) -> None:
        if isinstance(self.beta, bool) or not (isinstance(self.beta, int | float) and 0.0 <= self.beta < 1.0):
            raise bad("beta", "a number in [0, 1)", self.beta)
        if isinstance(self.eps, bool) or not (
            isinstance(self.eps, int | float) and math.isfinite(self.eps) and self.eps >= 0
        ):
            raise bad("eps", "a finite number >= 0", self.eps)


@register_estimator("normalized")
class NormalizedEstimator(ZOEstimator):
    """Slopes divided by the bias-corrected RMS of the averaged slopes over steps (see the module docstring)."""

    config_class = NormalizedConfig

    def init_state(self) -> dict[str, Any]:
        return {"second_moment": 0.0, "count": 0}

    def coefficients(self, state: dict[str, Any], slopes: torch.Tensor, update_state: bool) -> torch.Tensor:
        beta = float(self.config.beta)
        # Python floats in float64: every party computes the same numbers from the same scalars.
        moment = beta * state["second_moment"] + (1.0 - beta) * float(slopes.double().square().mean())
        count = state["count"] + 1
        if update_state:
            state["second_moment"], state["count"] = moment, count
        rms = math.sqrt(moment / (1.0 - beta**count))
        return slopes / (rms + self.config.eps) if rms + self.config.eps > 0 else torch.zeros_like(slopes)
