r"""A seeded subset of the trainable tensors per direction (block-coordinate zeroth-order steps, as in MeZO-BCD and
LeZO), rescaled so that the estimator keeps its mean.

The trainable tensors form `B` blocks (one per tensor, or one per parameter group). Direction `p` of the step with
seed `s` perturbs `k = max(1, round(fraction * B))` blocks drawn without replacement by a generator seeded from
`(s, p)` alone, with factor `sqrt(B / k)` on the chosen blocks and `0` elsewhere:

    z_{p,i} = f_{p,i} u_{p,i},      f_{p,i} = sqrt(B / k) [block(i) chosen for p]

Each block is chosen with probability `k / B`, so `E[z z^T] = I`: the step's expectation is that of the whole
direction. Every party draws the same blocks from the seed, so nothing more is sent. The forward passes per step are
unchanged; the directions are shorter to apply (a cost not yet exploited: unchosen tensors are still drawn).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..estimators import EstimatorConfig, ZOEstimator, register_estimator
from ..zo_estimators import direction_seed

BLOCKINGS = ("tensor", "group")
# Separates the block draw's seed from the direction's own (which seeds the generator of u_p).
_SALT = 0x5B5E7


@dataclasses.dataclass
class SubsetConfig(EstimatorConfig):
    """Args:
    fraction: share of the blocks each direction perturbs, in (0, 1].
    blocks: `"tensor"` (one block per trainable tensor), `"group"` (per parameter group) or a block id per tensor.
    """

    fraction: float = 0.25
    blocks: str | Sequence[Any] = "tensor"

    def check(self, bad: Callable[[str, str, object], ValueError]) -> None:
        if isinstance(self.fraction, bool) or not (
            isinstance(self.fraction, int | float) and 0.0 < self.fraction <= 1.0
        ):
            raise bad("fraction", "a number in (0, 1]", self.fraction)
        if isinstance(self.blocks, str) and self.blocks not in BLOCKINGS:
            raise bad("blocks", f"one of {BLOCKINGS} or a block id per trainable tensor", self.blocks)


@register_estimator("subset")
class SubsetEstimator(ZOEstimator):
    """A seeded subset of blocks per direction, rescaled by `sqrt(B / k)` (see the module docstring)."""

    config_class = SubsetConfig

    def bind(self, params: list[torch.Tensor], param_groups: list[dict]) -> None:
        blocks = self.config.blocks
        if blocks == "tensor":
            ids: list[Any] = list(range(len(params)))
        elif blocks == "group":
            ids = [g for g, group in enumerate(param_groups) for _ in group["params"]]
        else:
            ids = list(blocks)
            if len(ids) != len(params):
                raise ValueError(
                    f"`estimator_kwargs['blocks']` has {len(ids)} entries for {len(params)} trainable tensors."
                )
        order: dict[Any, int] = {}
        self.block_of = [order.setdefault(b, len(order)) for b in ids]
        self.num_blocks = len(order)
        self.num_chosen = max(1, round(self.config.fraction * self.num_blocks))

    def chosen_blocks(self, seed: int, index: int) -> list[int]:
        """The blocks direction `index` of the step with seed `seed` perturbs (sorted)."""
        gen = torch.Generator().manual_seed(direction_seed(seed ^ _SALT, index))
        return sorted(torch.randperm(self.num_blocks, generator=gen)[: self.num_chosen].tolist())

    def direction_factors(self, state: dict[str, Any], seed: int, num_directions: int) -> list[list[float]]:
        scale = math.sqrt(self.num_blocks / self.num_chosen)
        rows = []
        for index in range(num_directions):
            chosen = set(self.chosen_blocks(seed, index))
            rows.append([scale if b in chosen else 0.0 for b in self.block_of])
        return rows
