"""How the energy target's regression weights its rows: a simulation with the block sizes and gradient energies of
LoRA + head (`docs/curvature.md`, "The energy target").

Six role blocks as in `benchmarks/curvature_lora.py --blocks role` (four LoRA roles of 18,432 entries, the classifier
weight of 768 and bias of 2) with the true gradient energies measured at the start (LoRA 1e-6 to 6e-5, head 0.12,
bias 0.08), 50 curvature steps of P = 5 masked directions with Gaussian slopes, the library's regression, target,
trust region and normalisation (`BlockCurvature`), and a choice of row weights: `1 / max(pred, c max pred)**k`
(`k = 0`: unweighted). `--batch-spread s` multiplies each step's energies by a log-normal factor (sigma `s`, mean 1)
per block, as the gradient of one minibatch differs from the next. A run is *bad* if the smallest LoRA `H` is less
than 10 times the head's (the adapter's directions are not much shorter than the head's) or the head's `H` exceeds 3.

`--irls K` compares one-pass weights (each row weighted once, from the estimate before its step: the library's first
version) with the library's fit as committed, iteratively reweighted least squares over the kept rows
(`BlockCurvature.update` itself, with `IRLS_ROUNDS = K`).

    python benchmarks/energy_weights.py --runs 20
    python benchmarks/energy_weights.py --runs 60 --irls 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hiso import curvature  # noqa: E402
from hf_hiso.curvature import MAX_STEP, BlockCurvature  # noqa: E402

SIZES = [18432] * 4 + [768, 2]
ENERGY = [1e-6, 3e-6, 1e-6, 6e-5, 0.12, 0.08]
THETA = [5e-6] * 4 + [1.6e-3, 0.26]
WEIGHTINGS = ((1.0, 0), (1e-3, 2), (1e-2, 2), (1e-1, 2), (1e-3, 1), (1e-2, 1))


def simulate(
    floor: float,
    power: int,
    seed: int,
    steps: int = 50,
    batch_spread: float = 0.0,
    p: int = 5,
    irls: int = 0,
):
    """Returns (smallest LoRA H / head H, head H, bias H / head H) after `steps` curvature steps: one-pass weights
    `1 / max(pred, floor max pred)**power`, or with `irls > 0` the library's own update (`IRLS_ROUNDS = irls`)."""
    n = torch.tensor(SIZES, dtype=torch.float64)
    blocks = len(SIZES)
    gamma0 = torch.tensor(ENERGY, dtype=torch.float64) / n
    theta = torch.tensor(THETA, dtype=torch.float64)
    est = BlockCurvature(list(range(blocks)), SIZES, target="energy")
    state = est.init_state()
    gen = torch.Generator().manual_seed(seed)
    gram = torch.zeros(blocks, blocks, dtype=torch.float64)
    moment = torch.zeros(blocks, dtype=torch.float64)
    rows, estimate = 0.0, None
    for t in range(1, steps + 1):
        noise = torch.randn(blocks, generator=gen, dtype=torch.float64)
        gamma = gamma0 * torch.exp(batch_spread * noise - batch_spread**2 / 2)
        a2 = (torch.rand(p, blocks, generator=gen, dtype=torch.float64) < 0.5).double() * 2
        chi = n * (1 + (2 / n).sqrt() * torch.randn(p, blocks, generator=gen, dtype=torch.float64)).clamp_min(0.01)
        x = a2 * chi / state["hessian"]
        dots = torch.randn(p, blocks, generator=gen, dtype=torch.float64) * (gamma * chi).sqrt()
        slopes = (a2.sqrt() / state["hessian"].sqrt() * dots).sum(1)
        if irls:
            saved, curvature.IRLS_ROUNDS = curvature.IRLS_ROUNDS, irls
            try:
                est.update(state, x, x @ theta, slopes)
            finally:
                curvature.IRLS_ROUNDS = saved
            continue
        weights = torch.ones(p, dtype=torch.float64)
        if estimate is not None and power:
            predicted = x @ estimate.clamp_min(0.0)
            top = float(predicted.max())
            if top > 0:
                weights = predicted.clamp_min(floor * top).pow(-float(power))
        gram = 0.99 * gram + (x * weights[:, None]).T @ x
        moment = 0.99 * moment + (x * weights[:, None]).T @ slopes.square()
        rows = 0.99 * rows + p
        estimate = est.solve(gram, moment, est.prior * 0.99**t / rows)
        if t * p >= 2 * blocks:
            target = est.energy_preconditioner(theta, estimate)
            if target is not None:
                old = state["hessian"]
                moved = torch.minimum(torch.maximum(target, old / MAX_STEP), old * MAX_STEP)
                state["hessian"] = est.normalise(moved, theta)
    h = state["hessian"]
    return float(h[:4].min() / h[4]), float(h[4]), float(h[5] / h[4])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--irls", type=int, default=0, help="compare one-pass weights with the library's refit")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.irls:
        one_pass = {"floor": 1e-2, "power": 2}
        refit = {**one_pass, "irls": args.irls}
        variants = [("one-pass weights, floor 0.01", one_pass), (f"library, IRLS {args.irls}", refit)]
    else:
        label = "1 / max(pred, {:g} max)**{}"
        variants = [
            ("unweighted" if power == 0 else label.format(floor, power), {"floor": floor, "power": power})
            for floor, power in WEIGHTINGS
        ]
    for spread in (0.0, 1.0):
        for label, kw in variants:
            results = [simulate(seed=seed, batch_spread=spread, **kw) for seed in range(args.runs)]
            bad = sum(1 for ratio, head, _ in results if ratio < 10 or head > 3)
            ratios = sorted(r for r, _, _ in results)
            print(
                f"batch spread {spread:g}, {label:28s}: bad {bad}/{args.runs}; smallest LoRA/head H ratio: lowest "
                f"{[round(r, 1) for r in ratios[:3]]}, median {ratios[len(ratios) // 2]:.0f}"
            )


if __name__ == "__main__":
    main()
