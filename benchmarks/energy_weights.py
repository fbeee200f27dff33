"""How the energy target's regression weights its rows: a simulation with the block sizes and gradient energies of
LoRA + head (`docs/curvature.md`, "The energy target").

Six role blocks as in `benchmarks/curvature_lora.py --blocks role` (four LoRA roles of 18,432 entries, the classifier
weight of 768 and bias of 2) with the true gradient energies measured at the start (LoRA 1e-6 to 6e-5, head 0.12,
bias 0.08), 50 curvature steps of P = 5 masked directions with Gaussian slopes, the library's regression, target,
trust region and normalisation (`BlockCurvature`), and a choice of row weights: `1 / max(pred, c max pred)**k`
(`k = 0`: unweighted). `--batch-spread s` multiplies each step's energies by a log-normal factor (sigma `s`, mean 1)
per block, as the gradient of one minibatch differs from the next. A run is *bad* if the smallest LoRA `H` is less
than 10 times the head's (the adapter's directions are not much shorter than the head's) or the head's `H` exceeds 3.

`--irls K` compares the library's one-pass weights (each row weighted once, from the estimate before its step) with
iteratively reweighted least squares over all the rows kept so far (K rounds of solve and reweight at every step, the
rows forgotten as in the library): what storing the learning phase's rows (at most `zo_curvature_steps * P`) would
buy.

    python benchmarks/energy_weights.py --runs 20
    python benchmarks/energy_weights.py --runs 60 --irls 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_hiso.curvature import MAX_STEP, BlockCurvature  # noqa: E402

SIZES = [18432] * 4 + [768, 2]
ENERGY = [1e-6, 3e-6, 1e-6, 6e-5, 0.12, 0.08]
THETA = [5e-6] * 4 + [1.6e-3, 0.26]
WEIGHTINGS = ((1.0, 0), (1e-3, 2), (1e-2, 2), (1e-1, 2), (1e-3, 1), (1e-2, 1))


def simulate(floor: float, power: int, seed: int, steps: int = 50, batch_spread: float = 0.0, p: int = 5):
    """Returns (smallest LoRA H / head H, head H, bias H / head H) after `steps` curvature steps."""
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


def simulate_irls(
    seed: int, iterations: int, floor: float = 1e-2, steps: int = 50, batch_spread: float = 0.0, p: int = 5
):
    """`simulate` with iteratively reweighted least squares over all rows so far (forgetting 0.99 per step) instead of
    the one-pass weights; `iterations = 1` is the unweighted fit."""
    n = torch.tensor(SIZES, dtype=torch.float64)
    blocks = len(SIZES)
    gamma0 = torch.tensor(ENERGY, dtype=torch.float64) / n
    theta = torch.tensor(THETA, dtype=torch.float64)
    est = BlockCurvature(list(range(blocks)), SIZES, target="energy")
    state = est.init_state()
    gen = torch.Generator().manual_seed(seed)
    xs, ys, born = [], [], []
    for t in range(1, steps + 1):
        noise = torch.randn(blocks, generator=gen, dtype=torch.float64)
        gamma = gamma0 * torch.exp(batch_spread * noise - batch_spread**2 / 2)
        a2 = (torch.rand(p, blocks, generator=gen, dtype=torch.float64) < 0.5).double() * 2
        chi = n * (1 + (2 / n).sqrt() * torch.randn(p, blocks, generator=gen, dtype=torch.float64)).clamp_min(0.01)
        x = a2 * chi / state["hessian"]
        dots = torch.randn(p, blocks, generator=gen, dtype=torch.float64) * (gamma * chi).sqrt()
        slopes = (a2.sqrt() / state["hessian"].sqrt() * dots).sum(1)
        xs.append(x)
        ys.append(slopes.square())
        born += [t] * p
        x_all, y_all = torch.cat(xs), torch.cat(ys)
        age = torch.tensor([0.99 ** (t - b) for b in born], dtype=torch.float64)
        weights, estimate = age, None
        for _ in range(iterations):
            gram = (x_all * weights[:, None]).T @ x_all
            estimate = est.solve(gram, (x_all * weights[:, None]).T @ y_all, est.prior * 0.99**t / float(age.sum()))
            predicted = x_all @ estimate.clamp_min(0.0)
            top = float(predicted.max())
            if not top > 0:
                break
            weights = age * predicted.clamp_min(floor * top).pow(-2.0)
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
    parser.add_argument("--irls", type=int, default=0, help="also: iteratively reweighted fits with this many rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for spread in (0.0, 1.0):
        if args.irls:
            for label, runs in (
                ("one-pass weights (library)", [simulate(1e-2, 2, s, batch_spread=spread) for s in range(args.runs)]),
                (
                    f"IRLS, {args.irls} rounds",
                    [simulate_irls(s, args.irls, batch_spread=spread) for s in range(args.runs)],
                ),
            ):
                bad = sum(1 for ratio, head, _ in runs if ratio < 10 or head > 3)
                ratios = sorted(r for r, _, _ in runs)
                print(
                    f"batch spread {spread:g}, {label:28s}: bad {bad}/{args.runs}; smallest LoRA/head H ratio: "
                    f"lowest {[round(r, 1) for r in ratios[:3]]}, median {ratios[len(ratios) // 2]:.0f}"
                )
            continue
        for floor, power in WEIGHTINGS:
            results = [simulate(floor, power, seed, batch_spread=spread) for seed in range(args.runs)]
            bad = sum(1 for ratio, head, _ in results if ratio < 10 or head > 3)
            ratios = sorted(r for r, _, _ in results)
            label = "unweighted" if power == 0 else f"1 / max(pred, {floor:g} max)**{power}"
            print(
                f"batch spread {spread:g}, {label:28s}: bad {bad}/{args.runs}; smallest LoRA/head H ratio: lowest "
                f"{[round(r, 1) for r in ratios[:3]]}, median {ratios[len(ratios) // 2]:.0f}"
            )


if __name__ == "__main__":
    main()
