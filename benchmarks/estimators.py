"""Estimator benchmark: DeComFL, HiSo and the experimental estimators in the paper's federation, on the cheap
task-aligned formulation (cached frozen mean-pooled MiniLM features, a head initialised from the label names:
`benchmarks/estimator_features.py`).

Federation: 6 clients, 2 sampled per round, Dirichlet(1) label split, one local step, batch 16, P = 5 directions,
forward differences (P + 1 = 6 forward passes per client and round, the same for every method), mu = 1e-3, constant
lr. Each method runs on one shared lr grid over 3 seeds; it is reported at its own best lr (highest mean accuracy
over the last 10 % of the evaluations, averaged over seeds). The library's own protocol does the rounds
(`FederatedServer.plan_round` samples clients and seeds, `aggregate` averages the scalars, `HiSoOptimizer` measures
and applies them); one optimizer serves every party, which the tests show is exact (replicas equal the server).

    PYTHONPATH=. python -m benchmarks.estimators --run      # the grid (skips finished runs), then the report
    PYTHONPATH=. python -m benchmarks.estimators            # the report and the plot from finished runs
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from benchmarks.common import DOCS_DIR, RESULTS_DIR, lr_tag, read_json, save_figure, write_json
from benchmarks.estimator_features import LabelHead, load_mean_features
from hf_hiso import HiSoOptimizer
from hf_hiso.callbacks import ClientBatches
from hf_hiso.federated.partition import partition_indices
from hf_hiso.federated.protocol import FederatedServer, aggregate

OUT = RESULTS_DIR / "estimators"
TASKS = ("tweets_sentiment", "bbc_news")
METHODS: dict[str, dict[str, Any]] = {
    "decomfl": {"preconditioner": False},
    "hiso": {"preconditioner": True},
    "normalized": {"preconditioner": False, "estimator": "normalized"},
    "rademacher": {"preconditioner": False, "distribution": "rademacher"},
    "subset": {"preconditioner": False, "estimator": "subset", "estimator_kwargs": {"fraction": 0.5}},
    "normalized_rademacher": {"preconditioner": False, "estimator": "normalized", "distribution": "rademacher"},
    "normalized_hiso": {"preconditioner": True, "estimator": "normalized"},
}
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = (0, 1, 2)
ROUNDS, EVAL_EVERY, BATCH, P, CLIENTS, PER_ROUND = 1000, 20, 16, 5, 6, 2
PASSES_PER_ROUND = PER_ROUND * (P + 1)


def evaluate(head: LabelHead, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        pred = head(x).argmax(-1)
    return float((pred == y).float().mean()), float(f1_score(y.numpy(), pred.numpy(), average="macro"))


def run(feats: dict[str, Any], method: str, lr: float, seed: int) -> dict[str, Any]:
    """One federated run; returns its accuracy and macro-F1 curves (round 0 included)."""
    x, y = feats["train"]["x"], feats["train"]["labels"]
    xv, yv = feats["validation"]["x"], feats["validation"]["labels"]
    head = LabelHead(feats["label_emb"])
    opt = HiSoOptimizer(head.parameters(), lr=lr, num_directions=P, seed=seed, skip_nonfinite=True, **METHODS[method])
    shards = partition_indices(len(y), CLIENTS, "dirichlet", labels=y.tolist(), dirichlet_alpha=1.0, seed=seed)
    clients = [ClientBatches(torch.tensor(s), torch.stack, BATCH, seed, c) for c, s in enumerate(shards)]
    server = FederatedServer(CLIENTS, PER_ROUND, 1, seed=seed, history_retention="needed")
    curve = {"round": [0], "accuracy": [], "macro_f1": []}
    acc, f1 = evaluate(head, xv, yv)
    curve["accuracy"].append(acc)
    curve["macro_f1"].append(f1)
    t0 = time.perf_counter()
    for r in range(1, ROUNDS + 1):
        plan = server.plan_round()
        reports = {}
        for c in plan.clients:
            idx = clients[c].next_batch()
            loss_fn = lambda idx=idx: torch.nn.functional.cross_entropy(head(x[idx]), y[idx])  # noqa: E731
            reports[c] = opt.measure(loss_fn, plan.seeds[0])[1].unsqueeze(0)
        result = aggregate(reports)
        if result.scalars is not None:
            opt.accumulate(plan.seeds[0], result.scalars[0])
            opt.step()
        server.commit_round(plan, result.scalars, [lr])
        if r % EVAL_EVERY == 0:
            finite = all(bool(torch.isfinite(p).all()) for p in head.parameters())
            acc, f1 = evaluate(head, xv, yv) if finite else (float("nan"), float("nan"))
            curve["round"].append(r)
            curve["accuracy"].append(acc)
            curve["macro_f1"].append(f1)
            if not finite:
                break
    curve["seconds"] = time.perf_counter() - t0
    curve["skipped_steps"] = opt.state["hiso"]["skipped_steps"]
    return curve


def run_grid(methods: list[str], tasks: list[str]) -> None:
    for task in tasks:
        feats = load_mean_features(task)
        for method, lr, seed in itertools.product(methods, LRS, SEEDS):
            path = OUT / "grid" / f"{task}_{method}_lr{lr_tag(lr)}_s{seed}.json"
            if path.exists():
                continue
            curve = run(feats, method, lr, seed)
            write_json(path, {"task": task, "method": method, "lr": lr, "seed": seed, **curve})
            print(f"{task} {method} lr={lr:g} seed={seed}: acc {curve['accuracy'][-1]:.3f} ({curve['seconds']:.1f}s)")


def linear_probe(task: str) -> dict[str, float]:
    """Logistic regression on the frozen features (C chosen on the validation split from 1, 10, 100)."""
    feats = load_mean_features(task)
    best = {"accuracy": 0.0}
    for c in (1.0, 10.0, 100.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(feats["train"]["x"].numpy(), feats["train"]["labels"].numpy())
        pred = clf.predict(feats["validation"]["x"].numpy())
        yv = feats["validation"]["labels"].numpy()
        acc = float((pred == yv).mean())
        if acc > best["accuracy"]:
            best = {"accuracy": acc, "macro_f1": float(f1_score(yv, pred, average="macro")), "C": c}
    return best


def tail(values: list[float], share: float = 0.1) -> float:
    k = max(1, int(round(share * (len(values) - 1))))
    vals = [v if v == v else 0.0 for v in values[-k:]]  # NaN (diverged) counts as 0
    return statistics.fmean(vals)


def mean_curve(runs: list[dict], key: str) -> np.ndarray:
    n = min(len(r[key]) for r in runs)
    return np.nanmean(np.array([r[key][:n] for r in runs], dtype=float), axis=0)


def first_round(runs: list[dict], target: float) -> int | None:
    curve = mean_curve(runs, "accuracy")
    hits = np.nonzero(curve >= target - 1e-9)[0]
    return None if len(hits) == 0 else int(runs[0]["round"][hits[0]])


def summarize() -> dict[str, Any]:
    runs = [read_json(p) for p in sorted((OUT / "grid").glob("*.json"))]
    report: dict[str, Any] = {}
    for task in TASKS:
        rows: dict[str, Any] = {}
        for method in METHODS:
            by_lr = {}
            for lr in LRS:
                group = [r for r in runs if r["task"] == task and r["method"] == method and r["lr"] == lr]
                if len(group) == len(SEEDS) and all(len(r["round"]) == ROUNDS // EVAL_EVERY + 1 for r in group):
                    by_lr[lr] = group
            if not by_lr:
                continue
            scores = {lr: statistics.fmean(tail(r["accuracy"]) for r in g) for lr, g in by_lr.items()}
            lr = max(scores, key=scores.get)
            g = by_lr[lr]
            rows[method] = {
                "lr": lr,
                "final_accuracy": scores[lr],
                "final_accuracy_seeds": [tail(r["accuracy"]) for r in g],
                "final_macro_f1": statistics.fmean(tail(r["macro_f1"]) for r in g),
                "start_accuracy": g[0]["accuracy"][0],
                "runs": g,
            }
        if "decomfl" in rows:
            target = rows["decomfl"]["final_accuracy"]
            base = first_round(rows["decomfl"]["runs"], target)
            for row in rows.values():
                reach = first_round(row["runs"], target)
                row["rounds_to_decomfl_final"] = reach
                row["passes_to_decomfl_final"] = None if reach is None else reach * PASSES_PER_ROUND
                row["round_ratio_vs_decomfl"] = None if reach is None or not base else reach / base
        report[task] = {"methods": rows, "probe": linear_probe(task)}
    return report


def print_report(report: dict[str, Any]) -> None:
    for task, rep in report.items():
        probe = rep["probe"]
        print(f"\n{task}: linear probe {probe['accuracy']:.3f} / macro-F1 {probe['macro_f1']:.3f} (C={probe['C']:g})")
        print(
            "| method | best lr | start acc | final acc (3 seeds) | final macro-F1 | rounds to DeComFL's final "
            "| forward passes | vs DeComFL |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for method, row in rep["methods"].items():
            seeds = " ".join(f"{a:.3f}" for a in row["final_accuracy_seeds"])
            reach, ratio = row.get("rounds_to_decomfl_final"), row.get("round_ratio_vs_decomfl")
            print(
                f"| {method} | {row['lr']:g} | {row['start_accuracy']:.3f} | {row['final_accuracy']:.3f} ({seeds}) | "
                f"{row['final_macro_f1']:.3f} | {reach if reach is not None else 'not reached'} | "
                f"{row.get('passes_to_decomfl_final') or '-'} | {f'{ratio:.2f}x' if ratio else '-'} |"
            )


def plot(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(report), figsize=(6 * len(report), 8), squeeze=False)
    for col, (task, rep) in enumerate(report.items()):
        for row_idx, (key, label) in enumerate((("accuracy", "accuracy"), ("macro_f1", "macro-F1"))):
            ax = axes[row_idx][col]
            for method, row in rep["methods"].items():
                rounds = np.array(row["runs"][0]["round"][: len(mean_curve(row["runs"], key))])
                ax.plot(rounds * PASSES_PER_ROUND, mean_curve(row["runs"], key), label=f"{method} (lr {row['lr']:g})")
            ax.axhline(rep["probe"][key], color="k", ls="--", lw=1, label="linear probe (first order)")
            ax.set_title(f"{task}: {label}, mean of 3 seeds")
            ax.set_xlabel(f"forward passes (rounds x {PASSES_PER_ROUND})")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="run the missing grid runs first")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.run:
        run_grid(args.methods, args.tasks)
    report = summarize()
    print_report(report)
    slim = {}
    for task, rep in report.items():
        methods = {m: {k: v for k, v in row.items() if k != "runs"} for m, row in rep["methods"].items()}
        slim[task] = {"probe": rep["probe"], "methods": methods}
    write_json(OUT / "summary.json", slim)
    print("plot:", plot(report, DOCS_DIR / "estimators.png"))


if __name__ == "__main__":
    main()
