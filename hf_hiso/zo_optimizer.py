"""`HiSoOptimizer`: a zeroth-order optimizer with HiSo's scalar-learned diagonal preconditioner.

The optimizer never reads `.grad`. A step is split in two, so that the usual training loop (micro-batches, gradient
accumulation, LR schedulers, distributed reduction) keeps its shape:

1. `measure(loss_fn)` evaluates the loss at `x` and along the step's directions and returns the directional
   scalars; `accumulate(seed, scalars)` queues them (micro-batches of one step are summed, like gradients).
2. `step()` applies the queued update `x <- x - (lr / P) * sum_p g_p z_p` with each group's current `lr`, then
   updates the preconditioner `H <- beta * H + (1 - beta) * (v ** 2 + eps)` with `v = (1 / P) * sum_p g_p z_p`.

The preconditioner (`state[param]["hessian"]`) and the step counter (`state["hiso"]`) live in `optimizer.state`, so
`state_dict()` checkpoints them without custom code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .curvature import (
    BlockCurvature,
    block_aggregated_directions,
    block_directional_scalars,
    check_curvature_settings,
)
from .estimators import ZOEstimator, resolve_estimator
from .zo_estimators import (
    DIFFERENCES,
    DISTRIBUTIONS,
    GENERATORS,
    DirectionSource,
    InverseSqrt,
    aggregated_directions,
    directional_scalars,
    step_seed,
)

# With `skip_nonfinite=True`, this many skipped steps in a row stop the run: the model cannot recover by itself.
MAX_CONSECUTIVE_SKIPS = 20
# The smallest perturbation radius accepted: float32 losses resolve about 1e-7 relative changes.
MIN_ZO_EPS = 1e-8
logger = logging.getLogger(__name__)

HESSIAN_UPDATES = ("last_local_step", "all_local_steps")
# `cache_directions="auto"` caches when a step's P directions fit in this many bytes: every adapter and full models up
# to ~50 M trainable parameters at P = 5 (BENCHMARKS.md, "Step cost and memory"), never a full LLM.
CACHE_AUTO_BYTES = 1 << 30
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_cache_setting(value: bool | str, name: str = "cache_directions") -> bool | str:
    """`True`, `False` or `"auto"` from a bool or its command-line spelling; a `ValueError` naming `name` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        low = value.strip().lower()
        if low == "auto":
            return "auto"
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
    raise ValueError(f"`{name}` must be 'auto', True or False, got {value!r}")


@dataclass
class PendingUpdate:
    """Scalars measured for one (local) step, waiting to be applied: `seed` and the summed scalars `(P,)`."""

    seed: int
    slopes: torch.Tensor
    curvatures: torch.Tensor | None = None


class NonFiniteScalarError(FloatingPointError):
    """Raised when a directional scalar is NaN or infinite; the parameters are left untouched."""


class HiSoOptimizer(torch.optim.Optimizer):
    r"""Zeroth-order SGD with HiSo's diagonal preconditioner (Li et al., ICLR 2026).

    With step seed `s`, directions `u_p` (`E[u u^T] = I`) that are a function of `(s, p)` only, and
    `z_p = u_p / sqrt(H)`:

        g_p = (f(x + mu z_p) - f(x)) / mu                      (forward difference, P + 1 forward passes)
        x  <- x - (lr / P) * sum_p g_p z_p
        H  <- beta * H + (1 - beta) * (v ** 2 + eps),   v = (1 / P) * sum_p g_p z_p

    With `preconditioner=False`, `H` stays `I`: plain Gaussian ZO-SGD (DeComFL; with `P = 1` and central differences,
    MeZO).

    Args:
        params: trainable parameters or parameter groups (each group may set `lr` and `weight_decay`).
        lr: learning rate `eta`.
        weight_decay: decoupled weight decay, `x <- x - lr * weight_decay * x` per applied step.
        zo_eps: perturbation radius `mu`.
        num_directions: directions per step `P`.
        difference: `"forward"` or `"central"`.
        preconditioner: learn `H` (HiSo) or keep `H = I` (DeComFL / MeZO).
        hessian_smooth: `beta`, the weight of the old `H`.
        hessian_damping: `eps` added to `v ** 2`.
        hessian_update: `"last_local_step"` (the paper) or `"all_local_steps"` when a step queues several local steps.
        generator: `"counter"` (default: a counter-based generator computed on each tensor's device, the same numbers
            on every device and thread count), `"cpu"` (torch's CPU generator, the default of versions up to 0.1) or
            `"device"` (each device's torch generator, device-specific numbers); see `hf_hiso.zo_estimators`. Kept in
            the optimizer state: a checkpoint written with another generator is refused on load.
        cache_directions: keep the step's directions in memory (`P * d` values) instead of regenerating them for the
            perturbation, the restoration and the update; `"auto"` caches when they take at most `CACHE_AUTO_BYTES`
            (1 GiB). The directions, and so the results, are the same either way.
        seed: base seed of the centralized step seeds `s_t = step_seed(seed, t)`.
        skip_nonfinite: skip (and count) a step whose scalars are not finite instead of raising.
        curvature: replace HiSo's diagonal `H` by the block curvature preconditioner learned from second-difference
            scalars (`hf_hiso.curvature`, an extension; off by default). Curvature steps are measured with central
            differences and report one curvature scalar per direction beside the slope.
        curvature_blocks: `"tensor"` (one block per trainable tensor), `"group"` (per parameter group), a mapping
            from each trainable parameter to a block key (`hf_hiso.curvature.role_blocks(model)`: one block per role,
            what `zo_curvature_blocks="role"` builds in [`HiSoTrainer`]) or a block id per tensor.
        curvature_every, curvature_forget, curvature_floor, curvature_spread, curvature_prior, curvature_target,
            curvature_steps: see [`~hf_hiso.curvature.BlockCurvature`] (`every`, ..., `target`, `steps`).
        distribution: `"gaussian"` (`u_p ~ N(0, I)`, the paper) or `"rademacher"` (independent +-1 entries: every
            direction has norm `sqrt(d)`; `E[u u^T] = I` as well, so the estimator keeps its mean).
        estimator: how directions are chosen and scalars become update coefficients ([`~hf_hiso.estimators`]): a
            registered name (`"default"`: HiSo / DeComFL as above; `"normalized"`, `"subset"`: experimental, in
            `hf_hiso.experimental`), a [`~hf_hiso.estimators.ZOEstimator`] subclass or an instance.
        estimator_kwargs: settings of a named estimator (a dict or a JSON object string).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        zo_eps: float = 1e-3,
        num_directions: int = 5,
        difference: str = "forward",
        preconditioner: bool = True,
        hessian_smooth: float = 0.95,
        hessian_damping: float = 1e-8,
        hessian_update: str = "last_local_step",
        generator: str = "counter",
        distribution: str = "gaussian",
        cache_directions: bool | str = "auto",
        seed: int = 42,
        skip_nonfinite: bool = False,
        curvature: bool = False,
        curvature_blocks: str | Sequence[Any] | Mapping[torch.Tensor, Any] = "tensor",
        curvature_every: int = 1,
        curvature_forget: float = 0.99,
        curvature_floor: float = 1e-3,
        curvature_spread: float = 0.75,
        curvature_prior: float = 0.1,
        curvature_target: str = "curvature",
        curvature_steps: int = 0,
        estimator: str | ZOEstimator | type[ZOEstimator] | None = None,
        estimator_kwargs: Mapping[str, Any] | str | None = None,
    ):
        check_zo_settings(
            zo_eps=zo_eps,
            num_directions=num_directions,
            difference=difference,
            hessian_smooth=hessian_smooth,
            hessian_damping=hessian_damping,
            hessian_update=hessian_update,
            generator=generator,
            distribution=distribution,
        )
        curvature_kwargs = {
            "every": curvature_every,
            "forget": curvature_forget,
            "floor": curvature_floor,
            "spread": curvature_spread,
            "prior": curvature_prior,
            "target": curvature_target,
            "steps": curvature_steps,
        }
        if curvature:
            check_curvature_settings(**curvature_kwargs)
        check_step_settings(lr, weight_decay, prefix="optimizer")
        self.estimator = resolve_estimator(estimator, estimator_kwargs)
        if curvature and type(self.estimator) is not ZOEstimator:
            raise ValueError(
                f"`estimator` must be 'default' with the curvature extension (`curvature=True`), got "
                f"{self.estimator.name!r}: the block curvature preconditioner sets the directions itself."
            )
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        if not any(group["params"] for group in self.param_groups):
            raise ValueError(
                "HiSoOptimizer got no trainable parameters (no tensor with `requires_grad=True`): unfreeze the part "
                "to train, or add an adapter (PEFT) before training."
            )
        self.zo_eps = zo_eps
        self.num_directions = num_directions
        self.difference = difference
        self.preconditioner = preconditioner
        self.hessian_smooth = hessian_smooth
        self.hessian_damping = hessian_damping
        self.hessian_update = hessian_update
        self.skip_nonfinite = skip_nonfinite
        cache_directions = parse_cache_setting(cache_directions)
        if cache_directions == "auto":
            cache_directions = self.direction_cache_bytes() <= CACHE_AUTO_BYTES
        self.source = DirectionSource(generator=generator, cache=cache_directions, distribution=distribution)
        self.pending: list[PendingUpdate] = []
        # Hook for data parallelism: maps the stacked pending scalars to their mean over processes.
        self.scalar_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._scales: InverseSqrt | None = None
        # `forward_passes` is the trainer's count of loss evaluations (kept here so that checkpoints hold it).
        self.state["hiso"] = {
            "step": 0,
            "seed": int(seed),
            "skipped_steps": 0,
            "forward_passes": 0,
            "directions": self.source.name,
        }
        # The estimator's state: a function of the averaged scalars applied so far (checkpointed, replayed).
        self.estimator.bind(self.params, self.param_groups)
        self.state["estimator"] = {"name": self.estimator.name, **self.estimator.init_state()}
        self.last_loss: float | None = None
        self.last_slopes: torch.Tensor | None = None
        # Loss evaluations of the last `measure` (P + 1 or 2P + 1; varies by step with the curvature extension).
        self.last_forward_passes: int | None = None
        self.curvature: BlockCurvature | None = None
        if curvature:
            self.curvature = BlockCurvature.for_params(
                self.params, self.param_groups, curvature_blocks, **curvature_kwargs
            )
            self.state["curvature"] = self.curvature.init_state()

    # ---- parameters and preconditioner -------------------------------------------------------------------------

    @property
    def params(self) -> list[torch.Tensor]:
        """The trainable tensors in direction order: param groups in order, then each group's tensors in order."""
        return [p for group in self.param_groups for p in group["params"]]

    def direction_cache_bytes(self) -> int:
        """Memory the direction cache takes: `P` directions of every trainable tensor, in the tensors' dtype."""
        return self.num_directions * sum(t.numel() * t.element_size() for t in self.params)

    @property
    def cache_directions(self) -> bool:
        """Whether this optimizer caches its directions (`"auto"` resolved at construction)."""
        return self.source.cache

    @property
    def global_step(self) -> int:
        return self.state["hiso"]["step"]

    def current_seed(self) -> int:
        """Seed of the next centralized step, a function of the base seed and the step counter only."""
        return step_seed(self.state["hiso"]["seed"], self.state["hiso"]["step"])

    def hessian(self) -> list[torch.Tensor] | None:
        """`H` per tensor (created lazily as ones), or `None` without HiSo's diagonal preconditioner (off, or
        replaced by the block curvature one: see `block_hessian`)."""
        if not self.preconditioner or self.curvature is not None:
            return None
        out = []
        for p in self.params:
            st = self.state[p]
            if "hessian" not in st:
                st["hessian"] = torch.ones_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            out.append(st["hessian"])
        return out

    def scales(self) -> list[torch.Tensor] | None:
        """`H ** -0.5` per tensor in the parameters' dtype: computed from `H` when read (an [`InverseSqrt`]), not kept
        beside it."""
        if self.curvature is not None:
            base = self.state["curvature"]["hessian"].rsqrt()
            return [base[b].to(p.dtype) for b, p in zip(self.curvature.block_of, self.params, strict=True)]
        if not self.preconditioner:
            return None
        if self._scales is None:
            self._scales = InverseSqrt(self.hessian(), [p.dtype for p in self.params])
        return self._scales

    def block_hessian(self) -> dict[str, torch.Tensor] | None:
        """With `curvature=True`: copies of the learned block curvature `theta`, the mean squared gradient per entry
        `gamma` and the preconditioner `H_b` (one value per block), plus the block of each tensor; `None` otherwise."""
        if self.curvature is None:
            return None
        state = self.state["curvature"]
        return {
            "theta": state["theta"].clone(),
            "gamma": state["gamma"].clone(),
            "hessian": state["hessian"].clone(),
            "block_of": torch.tensor(self.curvature.block_of),
        }

    def hessian_stats(self) -> dict[str, float]:
        if self.curvature is not None:
            return self.curvature.stats(self.state["curvature"])
        hs = self.hessian()
        if hs is None:
            return {}
        n = sum(h.numel() for h in hs)
        return {
            "hessian_mean": sum(float(h.sum()) for h in hs) / n,
            "hessian_min": min(float(h.min()) for h in hs),
            "hessian_max": max(float(h.max()) for h in hs),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        check_directions(state_dict.get("state", {}).get("hiso", {}), self.source.name)
        super().load_state_dict(state_dict)
        # A new dict: torch keeps non-parameter state by reference (state from before the key existed gains it).
        self.state["hiso"] = {**self.state["hiso"], "directions": self.source.name}
        self._load_estimator_state()
        if self.curvature is not None:
            if "curvature" not in self.state:
                raise ValueError("The checkpoint holds no curvature state, but this optimizer has `curvature=True`.")
            # An own copy: torch keeps non-parameter state by reference, and the source may go on training.
            self.state["curvature"] = {
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.state["curvature"].items()
            }
            self.curvature.check_state(self.state["curvature"])
        self._scales = None
        self.source.clear()

    def _check_groups(self) -> None:
        # A scheduler or a user can set any value in a group; a non-finite one would write NaN into every parameter.
        # Checked before the parameters are touched (the measurement perturbs them too).
        for group in self.param_groups:
            check_step_settings(group["lr"], group["weight_decay"], prefix="optimizer")

    def _load_estimator_state(self) -> None:
        est = self.state.get("estimator")
        if est is None and type(self.estimator) is ZOEstimator:
            # A checkpoint written before estimators existed: HiSo / DeComFL have no estimator state.
            est = {"name": self.estimator.name}
        if est is None or est.get("name") != self.estimator.name:
            found = None if est is None else est.get("name")
            raise ValueError(
                f"The checkpoint was written with estimator {found!r}, but this optimizer uses "
                f"{self.estimator.name!r} (`estimator`): resume with the same estimator."
            )
        # An own copy: torch keeps non-parameter state by reference, and the source may go on training.
        self.state["estimator"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in est.items()}

    # ---- the two halves of a step --------------------------------------------------------------------------------

    @torch.no_grad()
    def measure(
        self, loss_fn: Callable[[], torch.Tensor], seed: int | None = None, loss0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Directional scalars at the current parameters along the directions of `seed` (default: the current step's
        seed). The parameters are perturbed in place and restored. Returns `(f(x), slopes, curvatures)`."""
        seed = self.current_seed() if seed is None else seed
        self._check_groups()
        if self.curvature is not None:
            return self._measure_blocks(loss_fn, seed, loss0)
        factors = self.estimator.direction_factors(self.state["estimator"], seed, self.num_directions)
        if factors is not None:
            return self._measure_factors(loss_fn, seed, factors, loss0)
        per_direction = 1 if self.difference == "forward" else 2
        self.last_forward_passes = per_direction * self.num_directions + (1 if loss0 is None else 0)
        return directional_scalars(
            loss_fn,
            self.params,
            seed,
            self.num_directions,
            self.zo_eps,
            scales=self.scales(),
            difference=self.difference,
            source=self.source,
            loss0=loss0,
        )

    def _measure_factors(
        self, loss_fn: Callable[[], torch.Tensor], seed: int, factors: list[list[float]], loss0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The estimator's per-direction factors times H ** -0.5 (floats alone without HiSo's preconditioner).
        base = self.scales()
        scales = factors if base is None else [[b * f for b, f in zip(base, row, strict=True)] for row in factors]
        central = self.difference == "central"
        loss0, slopes, curvatures, passes = block_directional_scalars(
            loss_fn, self.params, seed, scales, self.zo_eps, central, self.source, loss0=loss0
        )
        self.last_forward_passes = passes
        return loss0, slopes, curvatures

    def _measure_blocks(
        self, loss_fn: Callable[[], torch.Tensor], seed: int, loss0: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Curvature steps need f(x - mu z) for the second difference, whatever `difference` says; other steps keep
        # the configured difference and report no curvature.
        est = self.curvature
        curvature_step = est.is_curvature_step(seed, self.state["curvature"])
        central = curvature_step or self.difference == "central"
        scales = est.direction_scales(self.state["curvature"], seed, self.num_directions)
        loss0, slopes, curvatures, passes = block_directional_scalars(
            loss_fn, self.params, seed, scales, self.zo_eps, central, self.source, loss0=loss0
        )
        self.last_forward_passes = passes
        if not curvature_step:
            curvatures = torch.full_like(curvatures, float("nan"))
        return loss0, slopes, curvatures

    def accumulate(self, seed: int, slopes: torch.Tensor, curvatures: torch.Tensor | None = None) -> None:
        """Queues scalars for `step()`. Consecutive calls with the same seed are summed (gradient accumulation: the
        caller scales each micro-batch's loss so that the sum is the full batch's)."""
        slopes = slopes.detach().float().cpu()
        curvatures = None if curvatures is None else curvatures.detach().float().cpu()
        if self.pending and self.pending[-1].seed == seed:
            last = self.pending[-1]
            last.slopes = last.slopes + slopes
            if curvatures is not None and last.curvatures is not None:
                last.curvatures = last.curvatures + curvatures
        else:
            self.pending.append(PendingUpdate(seed, slopes, curvatures))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Applies the queued update(s) with each group's `lr` and updates `H`.

        With a `closure` (plain PyTorch use, nothing queued) the step measures the scalars itself:
        `loss = optimizer.step(lambda: loss_fn(model(x), y))`.
        """
        loss = None
        if closure is not None and not self.pending:
            seed = self.current_seed()
            loss, slopes, curvatures = self.measure(closure, seed)
            self.accumulate(seed, slopes, curvatures)
        if not self.pending:
            self.last_slopes = None
            return loss
        pending, self.pending = self.pending, []
        if self.scalar_reduce is not None:
            stacked = self.scalar_reduce(torch.stack([u.slopes for u in pending]))
            for u, row in zip(pending, stacked, strict=True):
                u.slopes = row.float().cpu()
            if self.curvature is not None:
                # Curvature scalars are averaged over processes like the slopes (NaN where not measured).
                nan = torch.full((self.num_directions,), float("nan"))
                curv = [nan if u.curvatures is None else u.curvatures for u in pending]
                for u, row in zip(pending, self.scalar_reduce(torch.stack(curv)), strict=True):
                    u.curvatures = row.float().cpu()
        self._check_groups()
        # The step's scalars as the update uses them (whole batch, averaged over processes), finite or not.
        self.last_slopes = torch.stack([u.slopes for u in pending])
        if not all(bool(torch.isfinite(u.slopes).all()) for u in pending):
            hiso = self.state["hiso"]
            hiso["skipped_steps"] += 1
            hiso["consecutive_skips"] = hiso.get("consecutive_skips", 0) + 1
            if self.skip_nonfinite and hiso["consecutive_skips"] >= MAX_CONSECUTIVE_SKIPS:
                raise NonFiniteScalarError(
                    f"The last {hiso['consecutive_skips']} steps (up to step {self.global_step}) all had non-finite "
                    "directional scalars and were skipped: the parameters are at a point where the loss is NaN or "
                    "infinite (an earlier update was too large, or the data is broken), so training cannot go on. "
                    "Lower `learning_rate` or `zo_eps`, or resume from an earlier checkpoint."
                )
            if self.skip_nonfinite:
                logger.warning(
                    f"Step {self.global_step} skipped: non-finite directional scalar (the parameters are unchanged; "
                    f"{hiso['skipped_steps']} skipped so far)."
                )
            if not self.skip_nonfinite:
                slopes = [u.slopes.tolist() for u in pending]
                hint = "Lower `learning_rate` or `zo_eps`, check the data, or set `zo_skip_nonfinite=True`."
                raise NonFiniteScalarError(
                    f"Non-finite directional scalar at step {self.global_step} (slopes {slopes}): the loss is NaN or "
                    f"infinite at or near the current parameters. The parameters were left unchanged. {hint}"
                )
            self.state["hiso"]["step"] += 1
            return loss
        self.state["hiso"]["consecutive_skips"] = 0
        self.apply_updates(pending, update_hessian=True)
        self.state["hiso"]["step"] += 1
        return loss

    @torch.no_grad()
    def apply_updates(self, updates: Sequence[PendingUpdate], update_hessian: bool) -> None:
        """`x <- x - lr * v_k` for each update `k` in order (all with the same `H`), then, if asked, the `H` rule on
        the last (or every) `v_k`. Clients of a federated round call this with `update_hessian=False`."""
        if not updates:
            return
        if self.curvature is not None:
            self._apply_block_updates(updates, update_hessian)
            return
        params = self.params
        scales = self.scales()
        lrs = [group["lr"] for group in self.param_groups for _ in group["params"]]
        wds = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        streams = [self._update_stream(u, scales, update_hessian) for u in updates]
        hs = self.hessian() if (update_hessian and self.preconditioner) else None
        beta, eps = self.hessian_smooth, self.hessian_damping
        for i, p in enumerate(params):
            vs = [next(stream) for stream in streams]
            for v in vs:
                if wds[i]:
                    p.mul_(1.0 - lrs[i] * wds[i])
                p.add_(v, alpha=-lrs[i])
            if hs is not None:
                targets = vs if self.hessian_update == "all_local_steps" else vs[-1:]
                for v in targets:
                    hs[i].mul_(beta).add_(v.float().square().add_(eps), alpha=1.0 - beta)
        if hs is not None:
            self._scales = None

    def _update_stream(
        self, update: PendingUpdate, scales: list[torch.Tensor] | None, update_state: bool
    ) -> Iterator[torch.Tensor]:
        """`v = (1 / P) sum_p c_p z_p` tensor by tensor, with the estimator's coefficients `c` and direction factors
        (the factors first: they are those the scalars were measured with, before the state update)."""
        state = self.state["estimator"]
        factors = self.estimator.direction_factors(state, update.seed, len(update.slopes))
        coeffs = self.estimator.coefficients(state, update.slopes, update_state)
        if factors is None:
            return aggregated_directions(self.params, update.seed, coeffs, scales=scales, source=self.source)
        stream = block_aggregated_directions(self.params, update.seed, coeffs, factors, self.source)
        if scales is None:
            return stream
        return (v.mul_(s) for v, s in zip(stream, scales, strict=True))

    @torch.no_grad()
    def _apply_block_updates(self, updates: Sequence[PendingUpdate], update_hessian: bool) -> None:
        """`apply_updates` with the block curvature preconditioner: each step's directions carry its own
        per-direction block factors, and, if asked, every curvature step of `updates` adds its rows to the
        regression (with the features gathered while the directions are regenerated for the update)."""
        est, state = self.curvature, self.state["curvature"]
        params = self.params
        lrs = [group["lr"] for group in self.param_groups for _ in group["params"]]
        wds = [group["weight_decay"] for group in self.param_groups for _ in group["params"]]
        norms: list[torch.Tensor | None] = []
        streams = []
        for u in updates:
            learn = update_hessian and est.is_curvature_step(u.seed, state) and u.curvatures is not None
            norms.append(torch.zeros(len(u.slopes), len(params), dtype=torch.float64) if learn else None)
            scales = est.direction_scales(state, u.seed, len(u.slopes))
            streams.append(block_aggregated_directions(params, u.seed, u.slopes, scales, self.source, norms[-1]))
        for i, p in enumerate(params):
            for stream in streams:
                v = next(stream)
                if wds[i]:
                    p.mul_(1.0 - lrs[i] * wds[i])
                p.add_(v, alpha=-lrs[i])
        # The features use H before this update (the one the directions were measured with), so they are computed
        # for every step first; H changes only after all of them.
        rows = [
            (est.features(state, u.seed, n), u.curvatures, u.slopes)
            for u, n in zip(updates, norms, strict=True)
            if n is not None
        ]
        for features, curvatures, slopes in rows:
            est.update(state, features, curvatures, slopes)
        if rows:
            self._scales = None


def check_step_settings(lr: object, weight_decay: object, prefix: str = "") -> None:
    """Raises a `ValueError` naming the field unless `lr` is a finite number >= 0 and `weight_decay` a finite number
    >= 0 (`prefix`: `""` for `TrainingArguments`' `learning_rate`; the optimizer's own names otherwise)."""
    lr_name = "learning_rate" if prefix == "" else "lr"

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    if not (number(lr) and lr >= 0):
        raise ValueError(f"`{lr_name}` must be a finite number >= 0, got {lr!r}")
    if not (number(weight_decay) and weight_decay >= 0):
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}")


def check_directions(saved: Mapping[str, Any], current: str) -> None:
    """Refuses optimizer state measured with other directions than `current` (`"<generator>/<distribution>"`): its
    `H` and any replay of its seeds would not match. State without the key predates the counter generator and was
    drawn with `"cpu"` (the default then) or `"device"`, with Gaussian directions."""
    name = saved.get("directions")
    if name is None:
        if current in ("cpu/gaussian", "device/gaussian"):
            return
        raise ValueError(
            "This optimizer state was written by a version whose directions came from torch's generators (`generator="
            f"'cpu'`, the default then, or 'device'), but this optimizer draws {current!r}. Resume it with "
            "`zo_generator='cpu'` (or the generator it was trained with) and `zo_distribution='gaussian'`."
        )
    if name != current:
        gen, dist = name.split("/")
        raise ValueError(
            f"This optimizer state was measured with {name!r} directions, but this optimizer draws {current!r}. "
            f"Resume it with `zo_generator={gen!r}` and `zo_distribution={dist!r}`."
        )


def check_zo_settings(
    *,
    zo_eps: float,
    num_directions: int,
    difference: str,
    hessian_smooth: float,
    hessian_damping: float,
    hessian_update: str,
    generator: str,
    distribution: str = "gaussian",
    prefix: str = "",
) -> None:
    """Raises a `ValueError` naming the field and the allowed values for the first invalid ZO setting. `prefix`
    is the config's field prefix (`"zo_"` in `HiSoConfig`)."""

    def bad(name: str, allowed: str, value: object) -> ValueError:
        return ValueError(f"`{prefix}{name}` must be {allowed}, got {value!r}")

    if isinstance(zo_eps, bool) or not (isinstance(zo_eps, int | float) and math.isfinite(zo_eps) and 0 < zo_eps <= 1):
        # Above 1 the finite difference is no local slope (1e300 overflows); far below the loss's float resolution
        # every scalar is 0 and nothing trains.
        raise ValueError(f"`zo_eps` must be a number in (0, 1] (the perturbation radius), got {zo_eps!r}")
    if zo_eps < MIN_ZO_EPS:
        raise ValueError(
            f"`zo_eps` must be at least {MIN_ZO_EPS:g}: below it float32 losses do not change along a direction and "
            f"every scalar is 0, got {zo_eps!r}"
        )
    if isinstance(num_directions, bool) or not isinstance(num_directions, int) or not 1 <= num_directions <= 4096:
        raise bad("num_directions", "an integer in [1, 4096] (each direction costs a forward pass)", num_directions)
    if difference not in DIFFERENCES:
        raise bad("difference", f"one of {DIFFERENCES}", difference)
    if not (isinstance(hessian_smooth, int | float) and 0.0 <= hessian_smooth < 1.0):
        raise bad("hessian_smooth", "in [0, 1) (the weight of the old preconditioner)", hessian_smooth)
    if not (isinstance(hessian_damping, int | float) and math.isfinite(hessian_damping) and hessian_damping >= 0):
        raise bad("hessian_damping", "a finite number >= 0", hessian_damping)
    if hessian_update not in HESSIAN_UPDATES:
        raise bad("hessian_update", f"one of {HESSIAN_UPDATES}", hessian_update)
    if generator not in GENERATORS:
        raise bad("generator", f"one of {GENERATORS}", generator)
    if distribution not in DISTRIBUTIONS:
        raise bad("distribution", f"one of {DISTRIBUTIONS}", distribution)
