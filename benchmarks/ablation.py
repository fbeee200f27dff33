"""Ablation of HiSo's preconditioner settings, and what the learned preconditioner looks like.

Part 1, settings (tweets sentiment, the paper's federation: 6 clients, 2 sampled, Dirichlet alpha = 1, P = 5; the
convergence benchmark's model and trainable set; HiSo's lr fixed, by default to its best lr in the convergence
report): smoothing beta 0.9 / 0.95 / 0.99, damping eps 0 / 1e-8 (default) / 1e-4, local steps tau = 1 / 2 / 5 with
H updated from the last or from all local steps, and DeComFL (no preconditioner) at the same lr and taus as the
reference. One JSON per (variant, seed) run, resumable.

Part 2, the learned H against curvature:

* on the head (the trainable set above): H after the base run, per entry, against the exact diagonal of the loss's
  Hessian at the final parameters on 2,048 training examples (closed form, checked against autograd
  Hessian-vector products on random entries);
* on the full MiniLM model (`--full-model`): H after a short centralized HiSo run, per tensor (mean H), against the
  per-tensor mean |diagonal| from Hutchinson with exact HVPs on 64 tweets (`attn_implementation="eager"`: the SDPA
  kernel has no double backward on CPU).

    python benchmarks/ablation.py --mode full [--full-model]      # ~30 min on 2 cores (+ ~10 min full model)
    python benchmarks/ablation.py --mode short                    # a minute (smoke test)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import DOCS_DIR, RESULTS_DIR, FrozenEncoderHead, load_features, machine, read_json, save_figure, write_json  # noqa: E402
from convergence import MODES, PAPER, Federation, run_zo, tail_accuracy  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

TASK = "tweets_sentiment"

# name -> (method, federation local steps, zo overrides)
VARIANTS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "base (beta 0.95, eps 1e-8, tau 1)": ("hiso", 1, {}),
    "beta 0.9": ("hiso", 1, {"zo_hessian_smooth": 0.9}),
    "beta 0.99": ("hiso", 1, {"zo_hessian_smooth": 0.99}),
    "eps 0 (no damping)": ("hiso", 1, {"zo_hessian_damping": 0.0}),
    "eps 1e-4": ("hiso", 1, {"zo_hessian_damping": 1e-4}),
    "tau 2, H from last step": ("hiso", 2, {}),
    "tau 2, H from all steps": ("hiso", 2, {"zo_hessian_update": "all_local_steps"}),
    "tau 5, H from last step": ("hiso", 5, {}),
    "tau 5, H from all steps": ("hiso", 5, {"zo_hessian_update": "all_local_steps"}),
    "DeComFL, tau 1": ("decomfl", 1, {}),
    "DeComFL, tau 2": ("decomfl", 2, {}),
    "DeComFL, tau 5": ("decomfl", 5, {}),
}

SETTINGS = {
    "short": {
        "rounds": 40,
        "seeds": (0,),
        "variants": ("base (beta 0.95, eps 1e-8, tau 1)", "tau 2, H from all steps", "DeComFL, tau 1"),
    },
    "full": {"rounds": 1000, "seeds": (0, 1, 2), "variants": tuple(VARIANTS)},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def default_lr(mode: str) -> float:
    report = RESULTS_DIR / "convergence" / mode / "report.json"
    if report.exists():
        best = read_json(report).get(f"{TASK}/paper", {}).get("best_lr", {})
        if "hiso" in best:
            return float(best["hiso"])
    return 0.3


# ---- part 2: H against curvature ------------------------------------------------------------------------------------


def hutchinson_diag(loss_fn, params: list[torch.Tensor], samples: int, seed: int) -> list[torch.Tensor]:
    """E[v * (Hess v)] with Rademacher v: an unbiased estimate of the Hessian diagonal, from exact HVPs."""
    gen = torch.Generator().manual_seed(seed)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    est = [torch.zeros_like(p) for p in params]
    for _ in range(samples):
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype) for p in params]
        hvps = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        for e, v, hv in zip(est, vs, hvps, strict=True):
            e.add_(v * hv / samples)
    return est


@torch.no_grad()
def head_hessian_diag(model: FrozenEncoderHead, cls: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact diagonal of the Hessian of the mean cross-entropy w.r.t. every head entry (eval mode), in closed form.

    With `z = W x + b`, `h = tanh(z)`, `p = softmax(C h + c)`, `s = 1 - h^2` and, per example,
    `M_aa = sum_k C_ka^2 p_k - (sum_k C_ka p_k)^2`, `g = C^T (p - y)`:

        d2L/dC_ka^2 = h_a^2 p_k (1 - p_k),   d2L/dc_k^2 = p_k (1 - p_k),
        d2L/dz_a^2 = s_a^2 M_aa - 2 h_a s_a g_a,   d2L/dW_ab^2 = d2L/dz_a^2 x_b^2,   d2L/db_a^2 = d2L/dz_a^2,

    each averaged over the examples. `check_head_diag` compares entries with autograd Hessian-vector products.
    """
    cw, cb = model.classifier.weight, model.classifier.bias
    h = torch.tanh(model.pooler(cls))
    p = torch.softmax(h @ cw.T + cb, -1)
    y = torch.nn.functional.one_hot(labels, p.shape[1]).to(p.dtype)
    n = cls.shape[0]
    pq = p * (1 - p)
    m = p @ cw.square() - (p @ cw).square()
    g = (p - y) @ cw
    s = 1 - h.square()
    dz = s.square() * m - 2 * h * s * g
    return {
        "pooler.weight": dz.T @ cls.square() / n,
        "pooler.bias": dz.mean(0),
        "classifier.weight": pq.T @ h.square() / n,
        "classifier.bias": pq.mean(0),
    }


def check_head_diag(
    model: FrozenEncoderHead, cls: torch.Tensor, labels: torch.Tensor, diag: dict[str, torch.Tensor], per_tensor: int
) -> float:
    """Largest relative error of `diag` against `e_i^T Hess e_i` from autograd on `per_tensor` random entries of each
    head tensor."""
    named = dict(model.named_parameters())
    names = list(diag)
    params = [named[k] for k in names]
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        grads = torch.autograd.grad(model(features=cls, labels=labels).loss, params, create_graph=True)
        worst = 0.0
        for t, (name, param) in enumerate(zip(names, params, strict=True)):
            for i in torch.randint(0, param.numel(), (per_tensor,), generator=gen).tolist():
                basis = [torch.zeros_like(q) for q in params]
                basis[t].view(-1)[i] = 1.0
                hv = torch.autograd.grad(grads, params, grad_outputs=basis, retain_graph=True)[t].reshape(-1)[i]
                ref = float(hv)
                worst = max(worst, abs(float(diag[name].reshape(-1)[i]) - ref) / max(abs(ref), 1e-12))
    return worst


def log_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().abs().clamp_min(1e-30).log(), b.double().abs().clamp_min(1e-30).log()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def spread(t: torch.Tensor) -> dict[str, float]:
    t = t.double().flatten()
    # numpy: torch.quantile refuses inputs above 16 M entries (the full MiniLM has 22.7 M).
    q = np.quantile(t.numpy(), [0.01, 0.5, 0.99])
    return {
        "min": float(t.min()),
        "p1": float(q[0]),
        "median": float(q[1]),
        "p99": float(q[2]),
        "max": float(t.max()),
        "max_over_min": float(t.max() / t.min()) if t.min() > 0 else float("inf"),
    }


def head_preconditioner_look(out: dict, feats: dict, seed: int) -> dict[str, Any]:
    """The base run's H on the head against the exact Hessian diagonal of the loss at the final head (2,048 training
    examples), per entry."""
    model: FrozenEncoderHead = out["model"].eval()
    hs = out["hessian_tensors"]
    gen = torch.Generator().manual_seed(seed)
    train = feats["train"]
    idx = torch.randperm(len(train["labels"]), generator=gen)[:2048]
    cls, labels = train["cls"][idx], train["labels"][idx]
    exact = head_hessian_diag(model, cls, labels)
    result: dict[str, Any] = {
        "examples": len(idx),
        "diag_check_max_rel_error": check_head_diag(model, cls, labels, exact, per_tensor=3),
    }
    result["tensors"] = {}
    for name, h in hs.items():
        e = exact[name].flatten()
        result["tensors"][name] = {
            "numel": h.numel(),
            "H": spread(h),
            "exact_abs_diag": spread(e.abs() + 1e-30),
            # Too few entries for a correlation to mean anything in the 2-entry bias.
            "corr_log_H_vs_log_exact": log_corr(h.flatten(), e) if h.numel() >= 10 else None,
        }
    all_h = torch.cat([h.flatten() for h in hs.values()])
    all_e = torch.cat([exact[n].flatten() for n in hs])
    result["corr_log_H_vs_log_exact_all"] = log_corr(all_h, all_e)
    sample = torch.randperm(all_h.numel(), generator=gen)[:4000]
    tensor_of = torch.cat([torch.full((h.numel(),), i) for i, h in enumerate(hs.values())])
    result["scatter"] = {
        "names": list(hs),
        "tensor": tensor_of[sample].tolist(),
        "H": all_h[sample].tolist(),
        "exact_diag": all_e[sample].tolist(),
    }
    return result


def full_model_look(steps: int, lr: float, samples: int, seed: int) -> dict[str, Any]:
    """Centralized HiSo on the full MiniLM for `steps` steps (batch 16, len 32), then per-tensor mean H against the
    per-tensor mean |Hessian diagonal| (Hutchinson, exact HVPs, 64 tweets)."""
    from common import TASKS, load_minilm, tokenize

    from hf_hiso import HiSoOptimizer
    from hf_hiso.embedded import load_embedded_task

    data = load_embedded_task(TASK, seed=0, test_size=TASKS[TASK]["test_size"])["train"].shuffle(seed=seed)
    model = load_minilm(2, attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.02)
        model.classifier.bias.zero_()
    named = [(n, p) for n, p in model.named_parameters()]
    opt = HiSoOptimizer([p for _, p in named], lr=lr, num_directions=5, zo_eps=1e-3, seed=seed)
    t0 = time.perf_counter()
    losses = []
    for step in range(steps):
        rows = data.select(range(step * 16, (step + 1) * 16))
        tokens = tokenize(list(rows["text"]), 32)
        labels = torch.tensor(list(rows["label"]))
        with torch.no_grad():
            loss = opt.step(lambda tokens=tokens, labels=labels: model(**tokens, labels=labels).loss)
        losses.append(float(loss))
    train_s = time.perf_counter() - t0
    rows = data.select(range(steps * 16, steps * 16 + 64))
    tokens, labels = tokenize(list(rows["text"]), 32), torch.tensor(list(rows["label"]))
    t0 = time.perf_counter()
    with torch.enable_grad():
        hutch = hutchinson_diag(lambda: model(**tokens, labels=labels).loss, [p for _, p in named], samples, seed)
    hutch_s = time.perf_counter() - t0
    hs = opt.hessian()
    per_tensor = []
    for (n, _), h, c in zip(named, hs, hutch, strict=True):
        per_tensor.append(
            {
                "name": n,
                "numel": h.numel(),
                "mean_H": float(h.mean()),
                "H_p1": float(h.quantile(0.01)) if h.numel() < 2**24 else float("nan"),
                "mean_abs_diag": float(c.abs().mean()),
            }
        )
    mean_h = torch.tensor([r["mean_H"] for r in per_tensor])
    mean_c = torch.tensor([r["mean_abs_diag"] for r in per_tensor])
    flat_h = torch.cat([h.flatten() for h in hs])
    return {
        "steps": steps,
        "lr": lr,
        "train_seconds": train_s,
        "hutchinson_seconds": hutch_s,
        "hutchinson_samples": samples,
        "loss_first_last": [losses[0], statistics.fmean(losses[-10:])],
        "per_tensor": per_tensor,
        "corr_log_meanH_vs_log_curvature": log_corr(mean_h, mean_c),
        "H_all_entries": spread(flat_h),
        "meanH_max_over_min_across_tensors": float(mean_h.max() / mean_h.min()),
        "curvature_max_over_min_across_tensors": float(mean_c.max() / mean_c.clamp_min(1e-30).min()),
    }


# ---- driver ---------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(SETTINGS), default="short")
    parser.add_argument(
        "--lr", type=float, default=None, help="HiSo's lr (default: its best in the convergence report)"
    )
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR)
    parser.add_argument("--full-model", action="store_true", help="also the full-MiniLM preconditioner look")
    parser.add_argument("--full-model-steps", type=int, default=60)
    parser.add_argument("--full-model-lr", type=float, default=1e-5)
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="run only these of the mode's seeds")
    parser.add_argument("--report", action="store_true", help="only print the report and draw the plot")
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # small products: a second thread only adds overhead on a shared machine
    settings = SETTINGS[args.mode]
    conv_mode = MODES[args.mode]
    lr = args.lr if args.lr is not None else default_lr(args.mode)
    results_dir = args.results_dir or RESULTS_DIR / "ablation" / args.mode
    feats = load_features(TASK, limit=conv_mode.feature_limit)
    print(
        f"machine: {machine()}; {TASK}, federation 6/2 Dirichlet 1, lr {lr:g}, {settings['rounds']} rounds, "
        f"seeds {settings['seeds']}"
    )
    look = None
    for seed in () if args.report else (settings["seeds"] if args.seeds is None else args.seeds):
        for name in settings["variants"]:
            method, tau, overrides = VARIANTS[name]
            path = results_dir / f"{slug(name)}_lr{lr:g}_s{seed}.json"
            base = name.startswith("base") and seed == settings["seeds"][0]
            if path.exists() and not (base and not (results_dir / "preconditioner_head.json").exists()):
                continue
            fed = Federation(PAPER.name, PAPER.num_clients, PAPER.clients_per_round, local_steps=tau)
            t0 = time.perf_counter()
            out = run_zo(feats, conv_mode, fed, method, lr, seed, settings["rounds"], overrides, keep_state=base)
            if base:
                look = head_preconditioner_look(out, feats, seed)
                write_json(results_dir / "preconditioner_head.json", look)
            out.pop("model", None)
            out.pop("hessian_tensors", None)
            record = {
                "variant": name,
                "method": method,
                "local_steps": tau,
                "overrides": overrides,
                "lr": lr,
                "seed": seed,
                "rounds": settings["rounds"],
                "wall_seconds": time.perf_counter() - t0,
                "final_accuracy": out["history"][-1]["accuracy"],
                **out,
            }
            write_json(path, record)
            print(
                f"  {name:34s} seed {seed}: final acc {record['final_accuracy']:.4f} ({record['wall_seconds']:.0f} s)",
                flush=True,
            )
    report = summarize(results_dir, settings, lr)
    if args.full_model:
        path = results_dir / "preconditioner_full_model.json"
        if not path.exists() and not args.report:
            print(f"full-model look: {args.full_model_steps} HiSo steps at lr {args.full_model_lr:g} ...", flush=True)
            write_json(path, full_model_look(args.full_model_steps, args.full_model_lr, samples=8, seed=0))
    print_looks(results_dir)
    plot(
        results_dir,
        report,
        settings,
        lr,
        args.docs_dir / ("ablation.png" if args.mode == "full" else f"ablation_{args.mode}.png"),
    )


def summarize(results_dir: Path, settings: dict, lr: float) -> dict[str, Any]:
    print("\nvariant                             final acc mean [per seed]   tail acc (last 10%)  rounds to 0.80")
    report = {}
    for name in settings["variants"]:
        runs = [results_dir / f"{slug(name)}_lr{lr:g}_s{s}.json" for s in settings["seeds"]]
        runs = [read_json(p) for p in runs if p.exists()]
        if not runs:
            continue
        finals = [r["final_accuracy"] for r in runs]
        tails = [tail_accuracy(r) for r in runs]
        reach = [next((h["round"] for h in r["history"] if h["accuracy"] >= 0.80), None) for r in runs]
        hs = [r.get("hessian", {}).get("mean") for r in runs]
        report[name] = {"final": finals, "tail": tails, "rounds_to_0.80": reach, "hessian_mean": hs}
        shown = ", ".join(str(x) if x is not None else "-" for x in reach)
        hmean = f"  mean H {statistics.fmean(hs):.3g}" if all(h is not None for h in hs) else ""
        print(
            f"  {name:34s} {statistics.fmean(finals):.4f} [{', '.join(f'{f:.4f}' for f in finals)}]  "
            f"{statistics.fmean(tails):.4f}   [{shown}]{hmean}"
        )
    write_json(results_dir / "report.json", report)
    return report


def print_looks(results_dir: Path) -> None:
    head = results_dir / "preconditioner_head.json"
    if head.exists():
        look = read_json(head)
        print(
            f"\nlearned H on the head (base run, seed 0) vs the exact Hessian diagonal at the final head "
            f"({look['examples']} examples; closed form, max rel. error vs autograd HVPs "
            f"{look['diag_check_max_rel_error']:.1e}):"
        )
        for n, row in look["tensors"].items():
            corr = row["corr_log_H_vs_log_exact"]
            print(
                f"  {n:18s} ({row['numel']:>6d} entries): H {row['H']['min']:.3g}..{row['H']['max']:.3g} "
                f"(median {row['H']['median']:.3g}, p99/p1 {row['H']['p99'] / row['H']['p1']:.3g}); |exact diag| "
                f"median {row['exact_abs_diag']['median']:.2e}, p99/p1 "
                f"{row['exact_abs_diag']['p99'] / row['exact_abs_diag']['p1']:.3g}; corr(log H, log |diag|) "
                + ("n/a" if corr is None else f"{corr:+.2f}")
            )
        print(f"  all head entries: corr(log H, log |diag|) {look['corr_log_H_vs_log_exact_all']:+.2f}")
    full = results_dir / "preconditioner_full_model.json"
    if full.exists():
        f = read_json(full)
        print(
            f"\nfull MiniLM, {f['steps']} centralized HiSo steps at lr {f['lr']:g} ({f['train_seconds']:.0f} s), "
            f"Hutchinson {f['hutchinson_samples']} samples ({f['hutchinson_seconds']:.0f} s):"
        )
        print(
            f"  per-tensor mean H spans {f['meanH_max_over_min_across_tensors']:.3g}x across the tensors; the "
            f"per-tensor mean |Hessian diagonal| spans {f['curvature_max_over_min_across_tensors']:.3g}x; "
            f"corr(log mean H, log mean |diag|) over tensors {f['corr_log_meanH_vs_log_curvature']:+.2f}"
        )
        h = f["H_all_entries"]
        print(
            f"  H over all entries: min {h['min']:.3g}, p1 {h['p1']:.3g}, median {h['median']:.3g}, "
            f"p99 {h['p99']:.3g}, max {h['max']:.3g}"
        )


def plot(results_dir: Path, report: dict, settings: dict, lr: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = results_dir / "preconditioner_head.json"
    full = results_dir / "preconditioner_full_model.json"
    panels = 1 + head.exists() + full.exists()
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    for i, name in enumerate(report):
        runs = [
            read_json(p) for s in settings["seeds"] if (p := results_dir / f"{slug(name)}_lr{lr:g}_s{s}.json").exists()
        ]
        n = min(len(r["history"]) for r in runs)
        rounds = [h["round"] for h in runs[0]["history"][:n]]
        acc = np.array([[h["accuracy"] for h in r["history"][:n]] for r in runs]).mean(0)
        style = "--" if name.startswith("DeComFL") else "-"
        ax.plot(rounds, acc, style, color=f"C{i % 10}", label=name, lw=1.2)
    ax.set_xlabel("rounds")
    ax.set_ylabel("validation accuracy (mean over seeds)")
    ax.set_title(f"tweets, 6 clients / 2 sampled, lr {lr:g}")
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3)
    k = 1
    if head.exists():
        sc = read_json(head)["scatter"]
        ax = axes[0][k]
        tensor = np.array(sc["tensor"])
        for t, name in enumerate(sc["names"]):
            sel = tensor == t
            if sel.any():
                ax.loglog(
                    np.abs(np.array(sc["exact_diag"])[sel]) + 1e-12, np.array(sc["H"])[sel], ".", ms=2, label=name
                )
        ax.set_xlabel("|exact Hessian diagonal| (2,048 examples)")
        ax.set_ylabel("learned H")
        ax.set_title("head: learned H vs curvature, per entry (sample)")
        ax.legend(fontsize=7, markerscale=4)
        ax.grid(alpha=0.3)
        k += 1
    if full.exists():
        f = read_json(full)
        ax = axes[0][k]
        x = [max(r["mean_abs_diag"], 1e-14) for r in f["per_tensor"]]
        y = [r["mean_H"] for r in f["per_tensor"]]
        ax.loglog(x, y, "o", ms=3)
        ax.set_xlabel("per-tensor mean |Hessian diagonal| (Hutchinson)")
        ax.set_ylabel("per-tensor mean learned H")
        ax.set_title(f"full MiniLM after {f['steps']} HiSo steps, {len(x)} tensors")
        ax.grid(alpha=0.3)
    print(f"plot: {save_figure(fig, path)}")


if __name__ == "__main__":
    main()
