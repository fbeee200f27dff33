"""The steps `step_cost.py` sets beside a HiSo step on the same model and batch: MeZO's own step and a stock AdamW
step.

* [`MeZOStep`]: MeZO's step as MeZO's trainer implements it (Malladi et al. 2023, `trainer.py`:
  `zo_perturb_parameters`, `zo_step`, `zo_update`): a seed from the global NumPy RNG, `torch.manual_seed(seed)`
  before every regeneration of the direction (perturb +, perturb -, restore and update: four generations),
  `torch.normal` per tensor,
  `param.data = param.data + scaling * z * eps` (a new tensor per parameter, as MeZO writes it), `P = 1`, central
  difference (2 forward passes), weight decay except on biases and layer norms.
* [`AdamWStep`]: what a stock `Trainer` does per step with AdamW: forward in train mode, backward, `optimizer.step()`,
  `zero_grad(set_to_none=True)`.

Both touch the global RNG (MeZO's does by design); they are benchmark code, never library code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class MeZOStep:
    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[], torch.Tensor],
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.lr, self.eps, self.weight_decay = lr, eps, weight_decay
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        np.random.seed(seed)

    def _perturb(self, seed: int, scaling: float) -> None:
        torch.manual_seed(seed)
        for _, p in self.named:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scaling * z * self.eps

    def _forward(self) -> torch.Tensor:
        self.model.eval()
        with torch.inference_mode():
            return self.loss_fn().detach()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        seed = np.random.randint(1_000_000_000)
        self._perturb(seed, 1)
        loss1 = self._forward()
        self._perturb(seed, -2)
        loss2 = self._forward()
        projected_grad = ((loss1 - loss2) / (2 * self.eps)).item()
        self._perturb(seed, 1)
        torch.manual_seed(seed)
        for name, p in self.named:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            if "bias" not in name and "layer_norm" not in name and "layernorm" not in name:
                p.data = p.data - self.lr * (projected_grad * z + self.weight_decay * p.data)
            else:
                p.data = p.data - self.lr * (projected_grad * z)
        return loss1


class AdamWStep:
    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], lr: float):
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step(self) -> torch.Tensor:
        self.model.train()
        loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
