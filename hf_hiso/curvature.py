r"""A block-wise curvature preconditioner learned from second-difference scalars (an extension beside HiSo).

HiSo's preconditioner (ALGORITHM.md, section 2) is built from the squared aggregated update and does not track the
curvature (section 6). This module learns one curvature value per *block* of parameters (by default one block per
trainable tensor) from scalars that every party already holds, so communication stays dimension-free. Symbols as in
ALGORITHM.md; `B` blocks, block `b` holding `n_b` entries, `H_b` its preconditioner value.

On a *curvature step* (every step with `every = 1`; a seed-chosen share `1 / every` otherwise) the step is measured
with a central difference and each direction gets random per-block factors from its seed:

    a_{p,b}**2 ~ U[1 - w, 1 + w]          (private generator seeded by (s, p); mean 1, so E[z z^T] is unchanged)
    z_p  = a_{p,b} u_{p,b} / sqrt(H_b)     (u_p ~ N(0, I) exactly as in HiSo)
    c_p  = (f(x + mu z_p) + f(x - mu z_p) - 2 f(x)) / mu**2    ~   z_p^T Hess z_p

and every client reports `c_p` beside the slope `g_p` (one more scalar per direction). Given the features
`x_{p,b} = ||z_{p,b}||**2`, which any party computes from the seed alone (the `u`'s are regenerated for the update
anyway), the averaged `c_p` obey the linear model

    E[c_p | z_p] = sum_b theta_b x_{p,b}  (+ off-diagonal and within-block terms of mean zero),

where `theta_b = tr(Hess_bb) / n_b` is block `b`'s mean diagonal curvature. The factors `a` make the blocks'
contributions vary independently from one direction to the next; without them each `x_{p,b}` fluctuates only by the
chi-square spread `sqrt(2 / n_b)` (0.03 for a 2,000-entry tensor) and the regression is nearly rank one. `theta` is
the solution of a recursive least-squares problem with forgetting `lambda`, shrunk toward the pooled curvature
`theta_bar` (the fit of `c_p ~ theta_bar * ||z_p||**2`, well determined after a few rows):

    R <- lambda R + sum_p x_p x_p^T,   r <- lambda r + sum_p x_p cbar_p,   N <- lambda N + P   (rows, discounted)
    theta = (R + k diag(R))^{-1} (r + k diag(R) theta_bar 1),   k = rho lambda^t / N,   theta_bar = 1^T r / 1^T R 1

(`t` curvature steps so far: the prior counts as `rho` pseudo-rows per block that are forgotten like data, so it
steadies the first, under-determined steps and then fades). `H` stays `I` until the regression holds `2B` rows; then
its target is the positive part of `theta`, floored and normalised so that its mean over entries is 1 (as at the
start), which keeps `sum_b n_b theta_b / H_b`, the trace that limits ZO-SGD's stable learning rate, at its value for
plain directions:

    m = sum_b n_b theta_b^+ / d,     T_b = max(theta_b^+, floor * m) / (sum_b n_b max(theta_b^+, floor * m) / d),

and `H` moves toward `T` by at most a factor `MAX_STEP = 2` per block and curvature step (a trust region; the mean is
then restored), so that one poor early estimate cannot stretch a block's directions by `1 / sqrt(floor)` at once.

With `target="snr"` (opt-in) `H` follows the gradient signal per unit curvature instead. The same features give
`E[g_p**2 | z_p] = sum_b gamma_b x_{p,b}` (`gamma_b = ||grad_b||**2 / n_b`, cross terms of mean zero), so a second
moment `r_g <- lambda r_g + sum_p x_p gbar_p**2` solved with the same `R` and shrinkage gives `gamma`. ZO-SGD's
expected decrease at its best lr is `G / 2T` with `G = sum_b n_b gamma_b / H_b` and `T = sum_b n_b theta_b / H_b`, so
blocks with a large `gamma_b / theta_b` deserve long directions:

    w_b = gamma_b^+ / max(theta_b^+, floor * m),   H_b ~ 1 / max(w_b, floor * mean_n(w)),

scaled so that `T` (with `theta` floored as above) equals its value for plain directions, which keeps the stable
learning rate of plain directions (mean 1 over entries would let `T` grow by up to `1 / floor`), with the same trust
region. The second moment is kept with every target (it is cheap and lets one resume with another).

With `target="energy"` (opt-in) `H_b` follows each block's whole gradient energy `n_b gamma_b` alone:

    H_b ~ 1 / max(n_b gamma_b^+, floor * max_c n_c gamma_c^+),

scaled as for `"snr"`. Blocks whose gradient is a small share of the total get short directions whatever their
curvature: what a LoRA adapter at its `B = 0` start needs (its blocks are flat *and* nearly gradient-free, so the snr
ratio of the two does not separate them from the head; `docs/curvature.md`). To tell a block with a thousandth of
the energy from one with a hundredth, this target uses its own design: *masks* instead of uniform factors (`a**2 = 2`
or `0` with probability 1/2 each, still mean 1), so that some directions leave out the blocks that dominate the
slope, and a weighted regression for `gamma` (a squared slope is `E[g**2 | z]` times a chi-square(1) variable, so its
variance is `2 E[g**2 | z]**2`: each row gets the weight `forget**age / max(x_p . gamma^+, 0.01 max_p x_p .
gamma^+)**2`, refitted by iteratively reweighted least squares over the kept rows on every curvature step, five rounds
from the unweighted fit). The rows that leave out the
head then weigh most and measure the adapter's energy alone. With `steps = N > 0`, `H` is learned on
the first `N` curvature steps only and then kept: later steps are plain steps with the learned block scale (no
factors, the configured difference, no curvature scalars). Learning it throughout lets a feedback loop in: the random
walk of a block with short directions raises its gradient energy, which lengthens its directions.

`R`, `r`, `r_g`, `theta`, `gamma` and `H` (a `B x B` matrix and five `B`-vectors) are built from seeds and averaged
scalars only, in float64 and in a fixed order, so every replica holds the same state without it being sent. They live
in `optimizer.state["curvature"]` and are checkpointed with the optimizer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .zo_estimators import DirectionSource, direction_seed, perturb_

# Domain separation: the seed hashes below must not coincide with the direction seeds of `zo_estimators`.
_STEP_TAG = 0xC0B1C0B1
_FACTOR_TAG = 0xB10CFAC7

BLOCKINGS = ("tensor", "group", "role")
# What sets the block values of H: the learned curvature alone, the signal per unit curvature (gamma / theta), or the
# block's gradient energy alone (n_b gamma_b).
TARGETS = ("curvature", "snr", "energy")
# Largest factor by which a block's H may change in one curvature step.
MAX_STEP = 2.0
# The energy target's row weights 1 / predicted**2 are floored at this share of the step's largest prediction, so no
# row weighs more than 1 / ENERGY_WEIGHT_FLOOR**2 times another: with 1e-3 (1e6 times) a few rows with a small
# prediction and a batch whose gradient happens to be large throw the estimate off (`benchmarks/energy_weights.py`).
ENERGY_WEIGHT_FLOOR = 1e-2
# Rounds of solve-and-reweight in the energy target's fit of `gamma` (the first is unweighted). Reweighting each row
# once, from the estimate before its step, left a quarter of the simulated LoRA + head runs with a wrong H; five rounds
# over the kept rows, none of 60 (`benchmarks/energy_weights.py --irls 5`).
IRLS_ROUNDS = 5


def check_curvature_settings(
    *,
    every: int,
    forget: float,
    floor: float,
    spread: float,
    prior: float,
    target: str = "curvature",
    steps: int = 0,
    prefix: str = "curvature_",
) -> None:
    """Raises a `ValueError` naming the field (with `prefix`, e.g. `"zo_curvature_"`) and the allowed values."""

    def bad(name: str, allowed: str, value: object) -> ValueError:
        return ValueError(f"`{prefix}{name}` must be {allowed}, got {value!r}")

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise bad("every", "an integer >= 1 (estimate on every k-th step)", every)
    if not (number(forget) and 0.0 < forget <= 1.0):
        raise bad("forget", "in (0, 1] (the weight of the old regression data per curvature step)", forget)
    if not (number(floor) and 0.0 < floor <= 1.0):
        raise bad("floor", "in (0, 1] (the smallest block value relative to the mean curvature)", floor)
    if not (number(spread) and 0.0 <= spread <= 1.0):
        raise bad("spread", "in [0, 1] (half-width of the block factors a**2 ~ U[1 - w, 1 + w])", spread)
    if not (number(prior) and prior > 0.0):
        raise bad("prior", "a finite number > 0 (the weight of the shrinkage toward the pooled curvature)", prior)
    if target not in TARGETS:
        raise bad("target", f"one of {TARGETS} (what sets the block values of H)", target)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise bad("steps", "an integer >= 0 (learn H on this many curvature steps, then keep it; 0: always)", steps)


def role_of(name: str) -> str:
    """A parameter's role: its name without the layer numbers (`encoder.layer.3.attention.self.query.lora_A.weight`
    -> `encoder.layer.attention.self.query.lora_A.weight`), so the same tensor of every layer shares a block."""
    return re.sub(r"\.\d+(?=\.|$)", "", name)


def role_blocks(model: torch.nn.Module) -> dict[torch.Tensor, str]:
    """`curvature_blocks` for one block per role (see [`role_of`]): a mapping from each trainable parameter to its
    role, for `HiSoOptimizer(..., curvature_blocks=role_blocks(model))`. [`HiSoTrainer`] builds it itself for
    `zo_curvature_blocks="role"`."""
    return {p: role_of(n) for n, p in model.named_parameters() if p.requires_grad}


def block_index(
    params: Sequence[torch.Tensor],
    param_groups: Sequence[dict],
    blocks: str | Sequence[Any] | Mapping[torch.Tensor, Any],
) -> list[int]:
    """The block of each trainable tensor, in optimizer order: one block per tensor (`"tensor"`), per parameter group
    (`"group"`), a block key per parameter (a mapping such as [`role_blocks`] gives) or an explicit sequence of block
    ids; keys and ids are renumbered `0..B-1` in order of first appearance."""
    if isinstance(blocks, str):
        if blocks == "tensor":
            return list(range(len(params)))
        if blocks == "group":
            return [g for g, group in enumerate(param_groups) for _ in group["params"]]
        if blocks == "role":
            raise ValueError(
                '`curvature_blocks="role"` needs the parameter names: HiSoTrainer supplies them; with HiSoOptimizer '
                "pass `curvature_blocks=hf_hiso.curvature.role_blocks(model)`."
            )
        raise ValueError(f"`curvature_blocks` must be one of {BLOCKINGS} or a sequence of block ids, got {blocks!r}")
    if isinstance(blocks, Mapping):
        missing = sum(1 for p in params if p not in blocks)
        if missing:
            raise ValueError(f"`curvature_blocks` has no block for {missing} of the {len(params)} trainable tensors.")
        blocks = [blocks[p] for p in params]
    ids = list(blocks)
    if len(ids) != len(params):
        raise ValueError(f"`curvature_blocks` has {len(ids)} entries for {len(params)} trainable tensors.")
    order: dict[Any, int] = {}
    return [order.setdefault(b, len(order)) for b in ids]


class BlockCurvature:
    r"""
    Configuration and update rules of the block curvature preconditioner; the state itself is a plain dict (see
    [`~BlockCurvature.init_state`]) kept in `optimizer.state["curvature"]`.

    Args:
        block_of: block id of each trainable tensor, in optimizer order (ids `0..B-1`).
        block_sizes: `n_b`, entries per block.
        every: estimate on a seed-chosen share `1 / every` of the steps (`1`: every step). Other steps use the
            optimizer's own difference (forward: `P + 1` passes instead of `2P + 1`) and plain directions.
        forget: `lambda`, weight of the old regression data per curvature step (memory about `P / (1 - lambda)` rows).
        floor: smallest `theta_b` used, relative to the entry-weighted mean of `theta^+`.
        spread: `w`, half-width of the block factors `a**2 ~ U[1 - w, 1 + w]` (0 turns them off); the `"energy"`
            target uses masks instead (`a**2 = 0` or `2`) and ignores it.
        prior: `rho`, weight of the shrinkage of `theta` toward the pooled curvature, in pseudo-rows per block.
        target: `"curvature"` (`H_b` proportional to `theta_b`), `"snr"` (`H_b` proportional to `theta_b / gamma_b`,
            long directions for the blocks with the most gradient signal per unit curvature) or `"energy"` (`H_b`
            inversely proportional to the block's gradient energy `n_b gamma_b`); see the module docstring.
        steps: learn `H` on this many curvature steps, then keep it and take plain steps with it (`0`: learn on every
            curvature step).
    """

    def __init__(
        self,
        block_of: Sequence[int],
        block_sizes: Sequence[int],
        *,
        every: int = 1,
        forget: float = 0.99,
        floor: float = 1e-3,
        spread: float = 0.75,
        prior: float = 0.1,
        target: str = "curvature",
        steps: int = 0,
    ):
        check_curvature_settings(
            every=every, forget=forget, floor=floor, spread=spread, prior=prior, target=target, steps=steps
        )
        self.block_of = list(block_of)
        self.num_blocks = len(block_sizes)
        if sorted(set(self.block_of)) != list(range(self.num_blocks)):
            raise ValueError("`block_of` must use every block id 0..B-1 at least once.")
        self.block_sizes = torch.tensor([float(n) for n in block_sizes], dtype=torch.float64)
        self.every = every
        self.forget = forget
        self.floor = floor
        self.spread = spread
        self.prior = prior
        self.target = target
        self.steps = steps
        self._factors_key: tuple[int, int] | None = None
        self._factors = torch.ones(0, 0, dtype=torch.float64)

    @classmethod
    def for_params(
        cls, params: Sequence[torch.Tensor], param_groups: Sequence[dict], blocks: str | Sequence[int] = "tensor", **kw
    ) -> BlockCurvature:
        block_of = block_index(params, param_groups, blocks)
        sizes = [0] * (max(block_of) + 1 if block_of else 0)
        for b, p in zip(block_of, params, strict=True):
            sizes[b] += p.numel()
        return cls(block_of, sizes, **kw)

    # ---- state ----------------------------------------------------------------------------------------------------

    def init_state(self) -> dict[str, Any]:
        """`gram` (`R`, `B x B`), `moment` (`r`), `moment_grad` (`r_g`, the moment of the squared slopes),
        the `"energy"` target's kept rows `rows_x`, `rows_y` (squared slopes) and `rows_update` (the curvature step
        of each), `theta` and `gamma` (NaN until the first estimate), `hessian` (`H_b`, ones),
        `weight` (`N`, discounted rows), `rows` (rows used), `updates` (curvature steps used) and `skipped_rows`
        (non-finite `c`)."""
        b = self.num_blocks
        return {
            "gram": torch.zeros(b, b, dtype=torch.float64),
            "moment": torch.zeros(b, dtype=torch.float64),
            "moment_grad": torch.zeros(b, dtype=torch.float64),
            "rows_x": torch.zeros(0, b, dtype=torch.float64),
            "rows_y": torch.zeros(0, dtype=torch.float64),
            "rows_update": torch.zeros(0, dtype=torch.float64),
            "theta": torch.full((b,), float("nan"), dtype=torch.float64),
            "gamma": torch.full((b,), float("nan"), dtype=torch.float64),
            "hessian": torch.ones(b, dtype=torch.float64),
            "block_sizes": self.block_sizes.clone(),
            "weight": 0.0,
            "rows": 0,
            "updates": 0,
            "skipped_rows": 0,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        if state["gram"].shape != (self.num_blocks, self.num_blocks) or not torch.equal(
            state["block_sizes"], self.block_sizes
        ):
            raise ValueError(
                "The saved curvature state was built for other blocks (block sizes "
                f"{state['block_sizes'].tolist()}, now {self.block_sizes.tolist()})."
            )
        if "moment_grad" not in state:
            if self.target != "curvature":
                raise ValueError(
                    "The saved curvature state holds no gradient moment (`moment_grad`, saved before "
                    f'`curvature_target` existed): it cannot resume with `curvature_target="{self.target}"`.'
                )
            # A checkpoint from before the gradient moment: the curvature target does not use it.
            state["moment_grad"] = torch.zeros(self.num_blocks, dtype=torch.float64)
            state["gamma"] = torch.full((self.num_blocks,), float("nan"), dtype=torch.float64)
        if "rows_x" not in state:
            if self.target == "energy":
                raise ValueError(
                    "The saved curvature state holds no regression rows (`rows_x`, saved before the energy target "
                    'existed): it cannot resume with `curvature_target="energy"`.'
                )
            # The other targets do not use the rows.
            state["rows_x"] = torch.zeros(0, self.num_blocks, dtype=torch.float64)
            state["rows_y"] = torch.zeros(0, dtype=torch.float64)
            state["rows_update"] = torch.zeros(0, dtype=torch.float64)

    # ---- what every party derives from a seed ---------------------------------------------------------------------

    def learning(self, state: dict[str, Any] | None) -> bool:
        """Whether `H` is still being learned: always with `steps = 0`, else until `steps` curvature steps have been
        used (`state["updates"]`, the same on every replica). Without a state: the schedule of the seeds alone."""
        return state is None or not self.steps or state["updates"] < self.steps

    def is_curvature_step(self, seed: int, state: dict[str, Any] | None = None) -> bool:
        """Whether the step with this seed measures and uses curvature scalars: a function of the seed (and, with
        `steps > 0`, of the curvature state, which every replica holds identically), so the measuring client, the
        server and every replica agree without being told."""
        return self.learning(state) and (self.every == 1 or direction_seed(seed, _STEP_TAG) % self.every == 0)

    def block_factors(self, seed: int, num_directions: int, state: dict[str, Any] | None = None) -> torch.Tensor:
        """`a_{p,b}` of shape `(P, B)`, float64: `a**2 ~ U[1 - w, 1 + w]` (masks `a**2 = 2 * Bernoulli(1/2)` with the
        `"energy"` target) from a private generator seeded by `(seed, p)`; ones on steps that are not curvature steps
        or with `spread = 0` (other targets)."""
        if (self.spread == 0.0 and self.target != "energy") or not self.is_curvature_step(seed, state):
            return torch.ones(num_directions, self.num_blocks, dtype=torch.float64)
        key = (seed, num_directions)
        if self._factors_key == key:
            # A step asks for its factors up to three times (measure, update, features).
            return self._factors
        rows = []
        for p in range(num_directions):
            gen = torch.Generator().manual_seed(direction_seed(direction_seed(seed, p), _FACTOR_TAG))
            uniform = torch.rand(self.num_blocks, generator=gen, dtype=torch.float64)
            if self.target == "energy":
                rows.append((uniform < 0.5).double() * math.sqrt(2.0))
            else:
                rows.append((1.0 + self.spread * (2.0 * uniform - 1.0)).sqrt())
        self._factors_key, self._factors = key, torch.stack(rows)
        return self._factors

    def direction_scales(self, state: dict[str, Any], seed: int, num_directions: int) -> list[list[float]]:
        """Per direction and tensor, the factor that turns `u_p` into `z_p`: `a_{p,b(i)} / sqrt(H_{b(i)})`."""
        base = state["hessian"].rsqrt()
        factors = self.block_factors(seed, num_directions, state) * base
        return [[float(row[b]) for b in self.block_of] for row in factors]

    def features(self, state: dict[str, Any], seed: int, tensor_sq_norms: torch.Tensor) -> torch.Tensor:
        """`x_{p,b} = ||z_{p,b}||**2` (shape `(P, B)`) from `||u_{p,i}||**2` per direction and tensor."""
        factors = self.block_factors(seed, tensor_sq_norms.shape[0], state).square() / state["hessian"]
        per_block = torch.zeros(tensor_sq_norms.shape[0], self.num_blocks, dtype=torch.float64)
        per_block.index_add_(1, torch.tensor(self.block_of), tensor_sq_norms.double())
        return factors * per_block

    # ---- learning -------------------------------------------------------------------------------------------------

    def update(
        self,
        state: dict[str, Any],
        features: torch.Tensor,
        curvatures: torch.Tensor,
        slopes: torch.Tensor | None = None,
    ) -> None:
        """Adds one curvature step's rows (features `(P, B)`, averaged `c` `(P,)` and, if given, averaged slopes
        `(P,)`) with forgetting, re-solves `theta` (and `gamma` from the squared slopes) and sets `H`. Rows with a
        non-finite `c` or slope are skipped (and counted): every party skips the same ones. `slopes` are required
        with the `"snr"` and `"energy"` targets."""
        if slopes is None and self.target != "curvature":
            raise ValueError(f'`curvature_target="{self.target}"` needs the averaged slopes in `update`.')
        c = curvatures.double()
        keep = torch.isfinite(c) & torch.isfinite(features).all(1)
        if slopes is not None:
            keep &= torch.isfinite(slopes.double())
        state["skipped_rows"] += int((~keep).sum())
        if not bool(keep.any()):
            return
        x, c = features[keep], c[keep]
        # New tensors rather than in-place updates: a `state_dict()` taken earlier must not change under it.
        state["gram"] = self.forget * state["gram"] + x.T @ x
        state["moment"] = self.forget * state["moment"] + x.T @ c
        if slopes is not None:
            # E[g_p**2 | z_p] = sum_b gamma_b x_{p,b}: the same features as for the curvature.
            squares = slopes.double()[keep].square()
            state["moment_grad"] = self.forget * state["moment_grad"] + x.T @ squares
            if self.target == "energy":
                # The rows themselves are kept (a learning phase holds at most `steps * P` of them): `gamma` is
                # refitted below by iteratively reweighted least squares over all of them.
                state["rows_x"] = torch.cat([state["rows_x"], x])
                state["rows_y"] = torch.cat([state["rows_y"], squares])
                state["rows_update"] = torch.cat([state["rows_update"], torch.full((len(c),), state["updates"] + 1.0)])
        state["weight"] = self.forget * state["weight"] + len(c)
        state["rows"] += len(c)
        state["updates"] += 1
        ridge = self.prior * self.forget ** state["updates"] / state["weight"]
        theta = self.solve(state["gram"], state["moment"], ridge)
        state["theta"] = theta
        if slopes is not None and self.target == "energy":
            state["gamma"] = self.refit_energy(state, ridge)
        elif slopes is not None:
            state["gamma"] = self.solve(state["gram"], state["moment_grad"], ridge)
        if self.target == "snr":
            target = self.snr_preconditioner(theta, state["gamma"])
        elif self.target == "energy":
            target = self.energy_preconditioner(theta, state["gamma"])
        else:
            target = self.preconditioner(theta)
        if target is None:
            return
        # Before 2B rows the estimate is mostly prior and noise: keep plain directions.
        if state["rows"] < 2 * self.num_blocks:
            return
        # A trust region: each block's H moves by at most a factor MAX_STEP per curvature step (then the mean is
        # restored), so one poor early estimate cannot stretch a block's directions 30x before more rows arrive.
        old = state["hessian"]
        moved = torch.minimum(torch.maximum(target, old / MAX_STEP), old * MAX_STEP)
        state["hessian"] = self.normalise(moved, theta)

    def refit_energy(self, state: dict[str, Any], ridge: float) -> torch.Tensor:
        """`gamma` for the `"energy"` target: iteratively reweighted least squares over the kept rows (`IRLS_ROUNDS`
        rounds of solve and reweight, weights `forget**age * row_weights`), starting from the unweighted fit. Rows
        whose forgetting weight has fallen below `1e-4` are dropped."""
        age = state["updates"] - state["rows_update"]
        decay = torch.full_like(age, self.forget).pow(age)
        keep = decay >= 1e-4
        if not bool(keep.all()):
            for key in ("rows_x", "rows_y", "rows_update"):
                state[key] = state[key][keep]
            decay = decay[keep]
        x, y = state["rows_x"], state["rows_y"]
        weighted = x * decay[:, None]
        gamma = self.solve(weighted.T @ x, weighted.T @ y, ridge)
        for _ in range(IRLS_ROUNDS - 1):
            weighted = x * (decay * self.row_weights(gamma, x))[:, None]
            gamma = self.solve(weighted.T @ x, weighted.T @ y, ridge)
        return gamma

    @staticmethod
    def row_weights(gamma: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Weights of the `"energy"` target's rows: `1 / max(x_p . gamma^+, c max_p x_p . gamma^+)**2` (`c =
        ENERGY_WEIGHT_FLOOR`), the inverse variance of a squared slope up to a constant, from an estimate of `gamma`;
        ones without an estimate."""
        predicted = features @ gamma.clamp_min(0.0)
        top = float(predicted.max()) if predicted.numel() else 0.0
        if not top > 0.0 or not math.isfinite(top):
            return torch.ones(features.shape[0], dtype=torch.float64)
        return predicted.clamp_min(ENERGY_WEIGHT_FLOOR * top).pow(-2.0)

    def normalise(self, hessian: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Rescales `H`: to mean 1 over entries (`target="curvature"`, where that also keeps the trace below), or
        (`"snr"`, `"energy"`) so that `sum_b n_b theta_b / H_b`, with `theta` floored as in the target, equals its
        value for plain directions: that trace limits ZO-SGD's stable learning rate, so a learning rate that suits
        plain directions suits these too. (Mean 1 over entries would let it grow by up to `1 / floor` as `H` shrinks
        on a stiff block with a large gradient: the quadratic benchmark diverged at every learning rate.)"""
        n = self.block_sizes
        if self.target != "curvature":
            positive = theta.clamp_min(0.0)
            floored = positive.clamp_min(self.floor * float((n * positive).sum() / n.sum()))
            return hessian * float((n * floored / hessian).sum() / (n * floored).sum())
        return hessian / float((n * hessian).sum() / n.sum())

    def solve(self, gram: torch.Tensor, moment: torch.Tensor, ridge: float) -> torch.Tensor:
        """`theta = (R + k diag(R))^{-1} (r + k diag(R) theta_bar 1)` with `k = ridge`, solved after a Jacobi scaling
        so that blocks of very different sizes are treated alike."""
        ones = torch.ones_like(moment)
        pooled = float(ones @ moment) / float(ones @ gram @ ones)
        diag = gram.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
        s = diag.rsqrt()
        lhs = s[:, None] * gram * s[None, :] + ridge * torch.eye(len(moment), dtype=torch.float64)
        rhs = s * (moment + ridge * diag * pooled)
        return s * torch.linalg.solve(lhs, rhs)

    def preconditioner(self, theta: torch.Tensor) -> torch.Tensor | None:
        """`H_b` from `theta`: positive part, floored at `floor` times the entry-weighted mean, normalised to mean 1
        over entries, which is the scaling that keeps `sum_b n_b theta_b / H_b` (the trace that limits ZO-SGD's stable
        learning rate) equal to that of plain directions. `None` (keep the current `H`) when no block has positive
        curvature."""
        n = self.block_sizes
        positive = theta.clamp_min(0.0)
        mean = float((n * positive).sum() / n.sum())
        if not mean > 0.0 or not math.isfinite(mean):
            return None
        floored = positive.clamp_min(self.floor * mean)
        return floored / float((n * floored).sum() / n.sum())

    def snr_preconditioner(self, theta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor | None:
        """`H_b` for `target="snr"`: `1 / w_b` with `w_b = gamma_b^+ / max(theta_b^+, floor * m)` (`m` the
        entry-weighted mean of `theta^+`), `w` floored at `floor` times its entry-weighted mean, scaled so that
        `sum_b n_b theta_b / H_b` is that of plain directions (see [`~BlockCurvature.normalise`]). `None` (keep the
        current `H`) when no block has positive curvature or gradient signal."""
        n = self.block_sizes
        positive = theta.clamp_min(0.0)
        mean = float((n * positive).sum() / n.sum())
        if not mean > 0.0 or not math.isfinite(mean):
            return None
        weight = gamma.clamp_min(0.0) / positive.clamp_min(self.floor * mean)
        mean_weight = float((n * weight).sum() / n.sum())
        if not mean_weight > 0.0 or not math.isfinite(mean_weight):
            return None
        return self.normalise(1.0 / weight.clamp_min(self.floor * mean_weight), theta)

    def energy_preconditioner(self, theta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor | None:
        """`H_b` for `target="energy"`: `1 / e_b` with `e_b = n_b gamma_b^+` (block `b`'s gradient energy), floored at
        `floor` times the largest, scaled as for `"snr"` (see [`~BlockCurvature.normalise`]). `None` (keep the current
        `H`) when no block has positive curvature or gradient energy."""
        n = self.block_sizes
        if not float((n * theta.clamp_min(0.0)).sum()) > 0.0:
            return None
        energy = n * gamma.clamp_min(0.0)
        top = float(energy.max())
        if not top > 0.0 or not math.isfinite(top):
            return None
        return self.normalise(1.0 / energy.clamp_min(self.floor * top), theta)

    def stats(self, state: dict[str, Any]) -> dict[str, float]:
        h, n = state["hessian"], self.block_sizes
        return {
            "hessian_mean": float((n * h).sum() / n.sum()),
            "hessian_min": float(h.min()),
            "hessian_max": float(h.max()),
            "curvature_rows": float(state["rows"]),
        }


# ---- measurement and update with per-direction, per-tensor scales ------------------------------------------------


@torch.no_grad()
def block_directional_scalars(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    seed: int,
    direction_scales: Sequence[Sequence[float]],
    zo_eps: float,
    central: bool,
    source: DirectionSource,
    loss0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Like `zo_estimators.directional_scalars`, with `z_p = direction_scales[p][i] * u_{p,i}` tensor by tensor.

    Returns `(f(x), slopes, curvatures, forward_passes)`; `curvatures` is NaN unless `central`.
    """
    num_directions = len(direction_scales)
    passes = 0
    if loss0 is None:
        loss0 = loss_fn()
        passes += 1
    loss0 = loss0.detach()
    f0 = loss0.double()
    slopes = torch.empty(num_directions, dtype=torch.float32)
    curvatures = torch.full((num_directions,), float("nan"), dtype=torch.float32)
    for index, scales in enumerate(direction_scales):
        perturb_(params, source, seed, index, zo_eps, scales)
        loss_plus = loss_fn().detach().double()
        passes += 1
        if not central:
            perturb_(params, source, seed, index, -zo_eps, scales)
            slopes[index] = ((loss_plus - f0) / zo_eps).cpu()
            continue
        perturb_(params, source, seed, index, -2.0 * zo_eps, scales)
        loss_minus = loss_fn().detach().double()
        passes += 1
        perturb_(params, source, seed, index, zo_eps, scales)
        slopes[index] = ((loss_plus - loss_minus) / (2.0 * zo_eps)).cpu()
        curvatures[index] = ((loss_plus + loss_minus - 2.0 * f0) / zo_eps**2).cpu()
    return loss0, slopes, curvatures, passes


@torch.no_grad()
def block_aggregated_directions(
    params: Sequence[torch.Tensor],
    seed: int,
    coefficients: torch.Tensor,
    direction_scales: Sequence[Sequence[float]],
    source: DirectionSource,
    sq_norms: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Yields, tensor by tensor, `v = (1 / P) * sum_p coefficients[p] * z_p` with `z_{p,i} = direction_scales[p][i]
    * u_{p,i}`. If `sq_norms` (`(P, n_tensors)`, float64) is given, fills it with `||u_{p,i}||**2` on the way: the
    features of the regression cost no extra generation of directions."""
    num_directions = len(coefficients)
    coeffs = [float(c) / num_directions for c in coefficients]
    streams = [source.direction(params, seed, index, None) for index in range(num_directions)]
    for i in range(len(params)):
        v = None
        for index, (stream, c) in enumerate(zip(streams, coeffs, strict=True)):
            u = next(stream)
            if sq_norms is not None:
                sq_norms[index, i] = float(torch.linalg.vector_norm(u, dtype=torch.float64)) ** 2
            alpha = c * direction_scales[index][i]
            if v is None:
                # A cached direction must not be scaled in place: it is reused by later micro-batches.
                v = u * alpha if source.cache else u.mul_(alpha)
            else:
                v.add_(u, alpha=alpha)
        yield v
