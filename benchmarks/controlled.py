"""Controlled problem: badly conditioned least squares with a known diagonal curvature.

    f(x) = 1 / (2 n) * ||A x - b||^2,   A = G diag(s),   G^T G = n I   (G: Gaussian rows, whitened by a QR step)

so the Hessian of the full-data loss is exactly `diag(s^2)`, with `s_j^2` log-spaced from 1 down to `1 / kappa`. The
optimum `x*` is chosen with `s_j x*_j = 1` so every coordinate holds the same share of the initial suboptimality (a
method must make progress along the flat directions too, not only the steep ones); `b = A x* + noise` (sigma 0.1), and
`f* = f(x_ls)` is computed exactly. Each step samples a mini-batch of rows (stochastic ZO, as in fine-tuning).

Methods (centralized, i.e. the `M = m = 1, tau = 1` case of the protocol; `HiSoOptimizer.step(closure)`, P = 5,
forward difference, mu = 1e-3):

* `plain`: `preconditioner=False` (DeComFL / MeZO's Gaussian ZO-SGD);
* `hiso`: the specified preconditioner (beta 0.95, eps 1e-8);
* `oracle`: the preconditioner frozen at the true curvature `H = diag(s^2)` (what a perfect curvature estimate
  would give: the reference for how much a diagonal preconditioner *can* help here).

Each method at its own best lr from one shared grid; reported: steps to reach `f - f* <= target * (f(x0) - f*)`
(median over seeds), and for HiSo the correlation of its learned `H` with the true diagonal.

    python benchmarks/controlled.py            # about 10 minutes of one core
    python benchmarks/controlled.py --quick    # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DOCS_DIR, RESULTS_DIR, lr_tag, machine, read_json, save_figure, write_json  # noqa: E402

from hf_hiso import HiSoOptimizer  # noqa: E402

METHODS = ("plain", "hiso", "oracle")
LABELS = {"plain": "no preconditioner (DeComFL)", "hiso": "HiSo (learned H)", "oracle": "true H = diag(s^2)"}


class FixedPreconditionerOptimizer(HiSoOptimizer):
    """`HiSoOptimizer` whose `H` stays where it was set (the oracle reference): the update never touches it."""

    def apply_updates(self, updates, update_hessian: bool) -> None:
        super().apply_updates(updates, update_hessian=False)


def make_problem(dim: int, kappa: float, n: int, seed: int, noise: float = 0.1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    g = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(g)  # orthonormal columns: q^T q = I
    g = q * math.sqrt(n)
    curv = torch.logspace(0, -math.log10(kappa), dim, dtype=torch.float64)  # s_j^2, from 1 down to 1 / kappa
    s = curv.sqrt()
    a = g * s
    x_star = 1.0 / s
    b = a @ x_star + noise * torch.randn(n, generator=gen, dtype=torch.float64)
    x_ls = torch.linalg.lstsq(a, b).solution
    f_star = 0.5 * float(((a @ x_ls - b) ** 2).mean())
    f0 = 0.5 * float((b**2).mean())
    return {"a": a.float(), "b": b.float(), "curvature": curv.float(), "f_star": f_star, "f0": f0}


def run(
    problem: dict, method: str, lr: float, seed: int, max_steps: int, batch: int, target: float, dim: int
) -> dict[str, Any]:
    a, b = problem["a"], problem["b"]
    n = a.shape[0]
    x = torch.nn.Parameter(torch.zeros(dim))
    cls = FixedPreconditionerOptimizer if method == "oracle" else HiSoOptimizer
    opt = cls([x], lr=lr, num_directions=5, zo_eps=1e-3, preconditioner=method != "plain", seed=seed)
    if method == "oracle":
        opt.state[x]["hessian"] = problem["curvature"].clone()
    gen = torch.Generator().manual_seed(seed)
    f_star, gap0 = problem["f_star"], problem["f0"] - problem["f_star"]

    @torch.no_grad()
    def full_gap() -> float:
        return 0.5 * float(((a @ x - b) ** 2).mean()) - f_star

    reached, gaps = None, []
    check_every = 10
    for step in range(1, max_steps + 1):
        idx = torch.randint(0, n, (batch,), generator=gen)
        ab, bb = a[idx], b[idx]
        opt.step(lambda ab=ab, bb=bb: 0.5 * ((ab @ x - bb) ** 2).mean())
        if step % check_every == 0:
            gap = full_gap()
            gaps.append((step, gap / gap0))
            if not math.isfinite(gap) or gap > 1e3 * gap0:
                return {"reached": None, "diverged": True, "curve": gaps}
            if gap <= target * gap0:
                reached = step
                break
    out: dict[str, Any] = {"reached": reached, "diverged": False, "curve": gaps[:: max(1, len(gaps) // 200)]}
    if method == "hiso":
        h = opt.state[x]["hessian"].double()
        c = problem["curvature"].double()
        out["hessian_vs_curvature"] = {
            # Undefined when the true curvature is constant (kappa = 1).
            "pearson_log": float(np.corrcoef(h.log().numpy(), c.log().numpy())[0, 1]) if c.std() > 0 else None,
            "h_mean": float(h.mean()),
            "h_max_over_min": float(h.max() / h.min()),
            "true_max_over_min": float(c.max() / c.min()),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 64 x 32 products: threads only add overhead
    if args.quick:
        dim, kappas, lrs, seeds, max_steps = 8, (1.0, 100.0), (0.03, 0.1, 0.3), (0,), 600
    else:
        dim, kappas, seeds, max_steps = 32, (1.0, 10.0, 100.0, 1000.0), (0, 1, 2), 10_000
        lrs = tuple(10.0 ** (k / 4) for k in range(-8, 3))  # 0.01 .. 3.16, quarter-decade (1.78x) steps
    target, batch, n = 0.05, 64, 4096
    results_dir = args.results_dir or RESULTS_DIR / "controlled" / ("quick" if args.quick else "full")
    print(f"machine: {machine()}; dim {dim}, batch {batch}, n {n}, target gap {target} of the initial gap")
    print(f"lr grid {[f'{lr:.3g}' for lr in lrs]}, seeds {seeds}, at most {max_steps} steps")
    for kappa in kappas:
        for seed in seeds:
            problem = make_problem(dim, kappa, n, seed)
            for method in METHODS:
                for lr in lrs:
                    path = results_dir / f"k{kappa:g}" / f"{method}_lr{lr_tag(lr)}_s{seed}.json"
                    if path.exists():
                        continue
                    t0 = time.perf_counter()
                    out = run(problem, method, lr, seed, max_steps, batch, target, dim)
                    write_json(
                        path,
                        {
                            "kappa": kappa,
                            "method": method,
                            "lr": lr,
                            "seed": seed,
                            "dim": dim,
                            "max_steps": max_steps,
                            "target": target,
                            "seconds": time.perf_counter() - t0,
                            **out,
                        },
                    )
                    print(
                        f"  kappa {kappa:g} seed {seed} {method:6s} lr {lr:<7.3g} reached {out['reached']} "
                        f"{'diverged' if out['diverged'] else ''}",
                        flush=True,
                    )
    report = summarize(results_dir, kappas, lrs, seeds, max_steps)
    write_json(results_dir / "report.json", report)
    plot(results_dir, report, args.docs_dir / ("controlled_quick.png" if args.quick else "controlled.png"))


def summarize(results_dir: Path, kappas, lrs, seeds, max_steps: int) -> dict[str, Any]:
    """Best lr per (kappa, method): the lr whose median steps-to-target over seeds is smallest (unreached counts as
    infinity), printed with the spread over seeds."""
    report: dict[str, Any] = {}
    print(f"\nsteps to reach the target (median over seeds [min..max]; '>{max_steps}' = not reached), best lr:")
    for kappa in kappas:
        entry = {}
        for method in METHODS:
            best = None
            for lr in lrs:
                runs = [read_json(results_dir / f"k{kappa:g}" / f"{method}_lr{lr_tag(lr)}_s{s}.json") for s in seeds]
                steps = [r["reached"] if r["reached"] is not None else math.inf for r in runs]
                med = statistics.median(steps)
                if best is None or med < best["median"]:
                    best = {"lr": lr, "median": med, "steps": steps, "runs": runs}
            row = {"lr": best["lr"], "median_steps": best["median"], "steps_by_seed": best["steps"]}
            hvc = [r["hessian_vs_curvature"] for r in best["runs"] if "hessian_vs_curvature" in r]
            if hvc:
                row["hessian_vs_curvature"] = {
                    k: statistics.fmean(h[k] for h in hvc) if hvc[0][k] is not None else None for k in hvc[0]
                }
            entry[method] = row
        plain = entry["plain"]["median_steps"]
        for method in METHODS:
            row = entry[method]
            row["speedup_vs_plain"] = plain / row["median_steps"] if math.isfinite(row["median_steps"]) else 0.0
            shown = [str(s) if math.isfinite(s) else f">{max_steps}" for s in row["steps_by_seed"]]
            extra = ""
            if "hessian_vs_curvature" in row:
                h = row["hessian_vs_curvature"]
                corr = "n/a" if h["pearson_log"] is None else f"{h['pearson_log']:+.2f}"
                extra = (
                    f"; corr(log H, log true curvature) {corr}, H max/min {h['h_max_over_min']:.3g}"
                    f" (true {h['true_max_over_min']:.3g}), mean H {h['h_mean']:.3g}"
                )
            med = row["median_steps"]
            print(
                f"  kappa {kappa:>6g}  {LABELS[method]:28s} lr {row['lr']:<8.3g} "
                f"{(f'{med:g}' if math.isfinite(med) else f'>{max_steps}'):>7s} [{', '.join(shown)}]  "
                f"x{row['speedup_vs_plain']:.2f} vs plain{extra}"
            )
        report[f"{kappa:g}"] = {
            m: {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in r.items()}
            for m, r in entry.items()
        }
        for m in report[f"{kappa:g}"].values():
            m["steps_by_seed"] = [s if math.isfinite(s) else None for s in m["steps_by_seed"]]
    return report


def plot(results_dir: Path, report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kappas = list(report)
    fig, axes = plt.subplots(1, len(kappas), figsize=(4 * len(kappas), 3.4), squeeze=False)
    for ax, kappa in zip(axes[0], kappas, strict=True):
        for method, color in zip(METHODS, ("C0", "C3", "C2"), strict=True):
            lr = report[kappa][method]["lr"]
            for seed_file in sorted((results_dir / f"k{kappa}").glob(f"{method}_lr{lr_tag(lr)}_s*.json")):
                r = read_json(seed_file)
                if r["curve"]:
                    steps, gaps = zip(*r["curve"], strict=True)
                    label = f"{LABELS[method]} lr={lr:.3g}" if seed_file.name.endswith("_s0.json") else None
                    ax.plot(steps, gaps, color=color, alpha=0.7, label=label)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.axhline(read_json(next((results_dir / f"k{kappa}").glob("*.json")))["target"], color="k", lw=0.5, ls="--")
        ax.set_title(f"condition number {kappa}")
        ax.set_xlabel("steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("(f - f*) / (f(x0) - f*)")
    axes[0][0].legend(fontsize=7)
    print(f"plot: {save_figure(fig, path)}")


if __name__ == "__main__":
    main()
