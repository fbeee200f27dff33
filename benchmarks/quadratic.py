"""Known-curvature benchmark: does a preconditioner learned from scalars find the curvature, and does it pay?

    f(x) = 1/2 * sum_i h_i x_i**2,   d = 1000 as 10 parameter tensors of 100,   x0 ~ N(0, I)   (float64)

Problems (the true diagonal `h` is known):

* `coordinate`: `h` log-spaced over 1e-2..1e2 across all 1000 coordinates, in random order, so every tensor holds
  the whole spread (block means are nearly equal: nothing to learn per block).
* `coordinate_sorted`: the same `h`, sorted, so tensor `t` holds the `t`-th tenth of the spread (a 2.5x spread inside
  each block, as in networks where curvature clusters by tensor but is not constant within one).
* `block`: 10 blocks of 100 with block curvature log-spaced over 1e-2..1e2 (constant within a block).

Methods, all `HiSoOptimizer.step(closure)`, P = 5, mu = 1e-3, centralized:

* `plain`: `preconditioner=False` (DeComFL / MeZO's Gaussian ZO-SGD), forward difference (P + 1 passes);
* `hiso`: HiSo as specified (beta 0.95, eps 1e-8), forward difference;
* `oracle`: `H` frozen at the true diagonal (normalised to mean 1), forward difference;
* `oracle_block`: `H` frozen at the true block means (what a perfect block estimate gives), forward difference;
* `block`: `curvature=True` (hf_hiso.curvature, defaults): central differences on every step (2P + 1 passes);
* `block_noscale`: the same without the random block factors (`curvature_spread=0`);
* `block_every4`: `curvature_every=4`: a quarter of the steps central, the others forward;
* `block_floor1e-2`: `curvature_floor=1e-2` (ten times the default floor);
* `block_snr`: `curvature_target="snr"` (H_b proportional to theta_b / gamma_b, gamma_b learned from the squared
  slopes; not in the default run's table unless asked for with `--methods`).

Each method runs at its own best learning rate from a factor-2 grid (searched from the top down, stopping once two
smaller rates are worse). Reported: steps (and forward passes) to reach `f <= target * f(x0)` (at most `max_steps`),
else the best loss ratio reached; for `hiso`, the correlation of `log H` with `log h` over coordinates; for the
learned block methods, the correlation of `log theta` with the log of the true block means and the mean absolute
error of `log10 theta` (decades), after 100 steps and at the end; and `f / f(x0)` after as many forward passes as
plain ZO-SGD spends in `max_steps` steps (`6 * max_steps`), for the comparison at equal compute.

A second part measures the estimate alone (lr = 0) on 10 blocks of 10,000 entries with a 0.1x..1.9x curvature spread
inside each block, for several half-widths `w` of the random block factors: are the factors needed?

    python benchmarks/quadratic.py            # about 11 minutes on one core of a shared 2-core machine
    python benchmarks/quadratic.py --quick    # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_hiso import HiSoOptimizer

DOCS_DIR = Path(__file__).resolve().parents[1] / "docs"
PROBLEMS = ("coordinate", "coordinate_sorted", "block")
METHODS = (
    "plain",
    "hiso",
    "oracle",
    "oracle_block",
    "block",
    "block_noscale",
    "block_every4",
    "block_floor1e-2",
    "block_snr",
)
LEARNED = ("block", "block_noscale", "block_every4", "block_floor1e-2", "block_snr")
VARIANTS = {
    "block_noscale": {"curvature_spread": 0.0},
    "block_every4": {"curvature_every": 4},
    "block_floor1e-2": {"curvature_floor": 1e-2},
    "block_snr": {"curvature_target": "snr"},
}


class FixedPreconditionerOptimizer(HiSoOptimizer):
    """`HiSoOptimizer` whose `H` stays where it was set (the oracle references)."""

    def apply_updates(self, updates, update_hessian: bool) -> None:
        super().apply_updates(updates, update_hessian=False)


def make_problem(name: str, dim: int, blocks: int, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    size = dim // blocks
    if name == "block":
        h = torch.logspace(-2, 2, blocks, dtype=torch.float64).repeat_interleave(size)
    else:
        h = torch.logspace(-2, 2, dim, dtype=torch.float64)
        if name == "coordinate":
            h = h[torch.randperm(dim, generator=gen)]
    x0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    return {"h": h.view(blocks, size), "x0": x0.view(blocks, size)}


def make_optimizer(method: str, params: list[torch.Tensor], h: torch.Tensor, lr: float, seed: int) -> HiSoOptimizer:
    common = {"lr": lr, "zo_eps": 1e-3, "num_directions": 5, "seed": seed, "cache_directions": True}
    if method == "plain":
        return HiSoOptimizer(params, preconditioner=False, **common)
    if method == "hiso":
        return HiSoOptimizer(params, **common)
    if method in ("oracle", "oracle_block"):
        opt = FixedPreconditionerOptimizer(params, **common)
        target = h if method == "oracle" else h.mean(1, keepdim=True).expand_as(h)
        target = target / target.mean()
        for p, row in zip(params, target, strict=True):
            opt.state[p]["hessian"] = row.float().clone()
        opt._scales = None
        return opt
    return HiSoOptimizer(params, curvature=True, difference="forward", **common, **VARIANTS.get(method, {}))


def log_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().clamp_min(1e-12).log10().flatten()
    b = b.double().clamp_min(1e-12).log10().flatten()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def learned_curvature(method: str, opt: HiSoOptimizer, h: torch.Tensor) -> dict[str, float]:
    if method == "hiso":
        est = torch.stack([opt.state[p]["hessian"].double() for p in opt.params])
        return {"corr": log_corr(est, h)}
    if method in LEARNED:
        theta = opt.block_hessian()["theta"]
        true = h.mean(1)
        if torch.isnan(theta).any():
            return {"corr": float("nan"), "err_decades": float("nan")}
        err = (theta.clamp_min(1e-12).log10() - true.log10()).abs().mean()
        return {"corr": log_corr(theta, true), "err_decades": float(err), "theta": theta.tolist()}
    return {}


def run(problem: dict[str, Any], method: str, lr: float, max_steps: int, target: float, seed: int) -> dict[str, Any]:
    h = problem["h"]
    params = [torch.nn.Parameter(row.clone()) for row in problem["x0"]]
    opt = make_optimizer(method, params, h, lr, seed)

    def loss() -> torch.Tensor:
        return sum(0.5 * (hb * p * p).sum() for hb, p in zip(h, params, strict=True))

    with torch.no_grad():
        f0 = float(loss())
    curve, passes_curve, passes, reached, early = [1.0], [0], 0, None, None
    best = 1.0
    for step in range(1, max_steps + 1):
        opt.step(loss)
        passes += opt.last_forward_passes
        with torch.no_grad():
            ratio = float(loss()) / f0
        if step % 10 == 0:
            curve.append(ratio)
            passes_curve.append(passes)
        if step == 100:
            early = learned_curvature(method, opt, h)
        best = min(best, ratio) if math.isfinite(ratio) else best
        if not math.isfinite(ratio) or ratio > 1e2:
            return {"lr": lr, "diverged": True, "steps": None, "best_ratio": best, "curve": curve, "passes_curve": []}
        if ratio <= target:
            reached = step
            break
    return {
        "lr": lr,
        "diverged": False,
        "steps": reached,
        "passes": passes if reached else None,
        "final_ratio": ratio,
        "best_ratio": best,
        "curve": curve,
        "passes_curve": passes_curve,
        "learned_100": early,
        "learned_end": learned_curvature(method, opt, h),
    }


def score(result: dict[str, Any]) -> tuple[float, float]:
    if result["diverged"]:
        return (math.inf, math.inf)
    return (result["steps"] or math.inf, result["final_ratio"])


def sweep(problem, method, lrs, max_steps, target, seed, log) -> dict[str, Any]:
    """From the largest rate down; stop once two rates in a row are worse than the best (after a stable one)."""
    best, worse = None, 0
    tried = []
    for lr in sorted(lrs, reverse=True):
        res = run(problem, method, lr, max_steps, target, seed)
        tried.append({k: res[k] for k in ("lr", "diverged", "steps") if k in res} | {"best_ratio": res["best_ratio"]})
        log(
            f"    {method:<14} lr {lr:.3g}: "
            + ("diverged" if res["diverged"] else f"steps {res['steps']}, ratio {res['final_ratio']:.3g}")
        )
        if best is None or score(res) < score(best):
            best, worse = res, 0
        elif not best["diverged"]:
            worse += 1
            if worse >= 2:
                break
    best["tried"] = tried
    return best


def fmt_result(res: dict[str, Any], max_steps: int) -> str:
    if res["diverged"]:
        return "diverged"
    if res["steps"] is None:
        return f"not reached ({res['final_ratio']:.1e})"
    return f"{res['steps']} ({res['passes']} passes)"


def at_passes(res: dict[str, Any], budget: int, target: float) -> str:
    """`f / f(x0)` after `budget` forward passes (the last point recorded within it)."""
    if res["diverged"]:
        return "diverged"
    if res["steps"] is not None and res["passes"] <= budget:
        return f"<= {target:g} (reached at {res['passes']})"
    within = [r for r, n in zip(res["curve"], res["passes_curve"], strict=True) if n <= budget]
    return f"{within[-1]:.1e}"


def fmt_learned(res: dict[str, Any], method: str) -> str:
    end, early = res.get("learned_end") or {}, res.get("learned_100") or {}
    if method == "hiso":
        return f"corr {end.get('corr', float('nan')):.2f}"
    if method in LEARNED:
        e100 = early.get("corr", float("nan"))
        return (
            f"corr {end['corr']:.3f}, err {end['err_decades']:.2f} dec "
            f"(step 100: corr {e100:.2f}, err {early.get('err_decades', float('nan')):.2f})"
        )
    return ""


def plot(results, problems, methods, path: Path, target: float, est: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(problems) + 1
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8), squeeze=False)
    for j, name in enumerate(problems):
        for method in methods:
            res = results[name][method]
            if res["diverged"]:
                continue
            label = f"{method} (lr {res['lr']:.2g})"
            axes[0, j].semilogy([10 * i for i in range(len(res["curve"]))], res["curve"], label=label)
            axes[1, j].semilogy(res["passes_curve"], res["curve"], label=label)
        for i, xlabel in enumerate(("step", "forward passes")):
            axes[i, j].axhline(target, color="grey", lw=0.8, ls=":")
            axes[i, j].set_xlabel(xlabel)
            axes[i, j].set_title(f"{name}: f / f(x0), best lr each")
        axes[0, j].legend(fontsize=6)
    ax = axes[0, -1]
    if "block" in results and "block" in results["block"]:
        theta = results["block"]["block"]["learned_end"].get("theta")
        if theta:
            true = torch.logspace(-2, 2, len(theta)).tolist()
            ax.loglog(true, [max(t, 1e-12) for t in theta], "o", label="learned theta_b (end of run)")
            ax.loglog(true, true, "k--", lw=0.8, label="truth")
            ax.set_xlabel("true block curvature")
            ax.set_ylabel("learned block curvature")
            ax.legend(fontsize=7)
            ax.set_title("`block` problem: curvature from scalars")
    ax = axes[1, -1]
    if est:
        for spread, rows in est.items():
            steps = sorted(rows)
            ax.semilogy(steps, [rows[s]["err_decades"] for s in steps], "o-", label=f"w = {spread:g}")
        ax.set_xlabel("step (lr = 0)")
        ax.set_ylabel("mean |log10 theta - log10 truth|")
        ax.set_title("estimate alone, 10 blocks of 10,000")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def estimation(seed: int, spreads: list[float], checkpoints: list[int], blocks: int = 10, size: int = 10_000):
    """Estimation only (lr = 0): 10 blocks of 10,000 entries, block curvature log-spaced over 1e-2..1e2 and a 0.1x to
    1.9x spread of the curvature inside each block (so the second differences carry noise beyond the block model).
    Error of the learned `theta` against the true block means, by the half-width `w` of the random block factors."""
    gen = torch.Generator().manual_seed(seed + 7)
    base = torch.logspace(-2, 2, blocks, dtype=torch.float64)
    hs = [t * (0.1 + 1.8 * torch.rand(size, generator=gen, dtype=torch.float64)) for t in base]
    true = torch.stack([h.mean() for h in hs])
    out = {}
    for spread in spreads:
        params = [torch.nn.Parameter(torch.randn(size, generator=gen, dtype=torch.float64)) for _ in range(blocks)]
        opt = HiSoOptimizer(
            params, lr=0.0, num_directions=5, seed=seed, curvature=True, curvature_spread=spread, cache_directions=True
        )

        def loss(params=params) -> torch.Tensor:
            return sum(0.5 * (h * p * p).sum() for h, p in zip(hs, params, strict=True))

        rows = {}
        for step in range(1, max(checkpoints) + 1):
            opt.step(loss)
            if step in checkpoints:
                theta = opt.block_hessian()["theta"]
                err = float((theta.clamp_min(1e-12).log10() - true.log10()).abs().mean())
                rows[step] = {"corr": log_corr(theta, true), "err_decades": err}
        out[spread] = rows
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: block problem, 2 methods, 200 steps")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--target", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--methods", nargs="*", default=[m for m in METHODS if m != "block_snr"], choices=METHODS)
    parser.add_argument("--plot", type=Path, default=DOCS_DIR / "curvature_quadratic.png")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    dim, blocks = 1000, 10
    # ZO-SGD is stable up to about lr ~ P / tr(H) (tr(H) = 1,700 to 17,000 here); the grid spans well around it.
    lrs = [8e-3 * 2.0**-k for k in range(0, 13)]
    problems, methods, max_steps = args.problems, args.methods, args.max_steps
    if args.quick:
        problems, methods, max_steps = ["block"], ["plain", "block"], 200
        lrs = [1e-3 * 2.0**-k for k in range(1, 3)]
    print(
        f"# quadratic benchmark: d = {dim} as {blocks} tensors, P = 5, mu = 1e-3, target {args.target:g} of f(x0), "
        f"max {max_steps} steps, seed {args.seed}"
    )
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    results: dict[str, dict[str, Any]] = {}
    start = time.time()
    for name in problems:
        problem = make_problem(name, dim, blocks, args.seed)
        results[name] = {}
        print(f"## {name}", flush=True)
        for method in methods:
            results[name][method] = sweep(
                problem, method, lrs, max_steps, args.target, args.seed, lambda s: print(s, flush=True)
            )
    print(f"\n# {time.time() - start:.0f} s\n")
    budget = 6 * max_steps
    header = (
        "| problem | method | best lr | steps to target (forward passes) | "
        f"f / f(x0) after {budget} passes | learned curvature vs truth |"
    )
    print(header)
    print("|---|---|---|---|---|---|")
    for name in problems:
        for method in methods:
            res = results[name][method]
            print(
                f"| {name} | {method} | {res['lr']:.3g} | {fmt_result(res, max_steps)} | "
                f"{at_passes(res, budget, args.target)} | {fmt_learned(res, method)} |"
            )
    est = None
    if not args.quick:
        checkpoints = [10, 20, 50, 100, 200]
        est = estimation(args.seed, [0.0, 0.25, 0.75, 1.0], checkpoints)
        print("\n## estimation only: 10 blocks of 10,000, in-block curvature spread 0.1x..1.9x, lr = 0\n")
        print("| block factor half-width w | " + " | ".join(f"after {c} steps" for c in checkpoints) + " |")
        print("|---|" + "---|" * len(checkpoints))
        for spread, rows in est.items():
            cells = [f"corr {rows[c]['corr']:.3f}, err {rows[c]['err_decades']:.3f} dec" for c in checkpoints]
            print(f"| {spread:g} | " + " | ".join(cells) + " |")
        results["estimation"] = {str(k): v for k, v in est.items()}
    plot(results, problems, methods, args.plot, args.target, est)
    print(f"\nplot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
