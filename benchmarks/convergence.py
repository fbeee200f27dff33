"""Convergence benchmark: HiSo vs DeComFL vs MeZO vs first-order FedAvg on the embedded tasks.

Model and trainable set (see BENCHMARKS.md for why): the packaged all-MiniLM-L6-v2 as
`BertForSequenceClassification`, encoder frozen, the head (pooler + classifier, or the classifier alone) trained. The
frozen encoder's `[CLS]` states are cached (`common.FrozenEncoderHead`; identical to the full model's forward up to
float32 rounding, checked by `--check-cache` and the slow test).

Methods, all on the same client splits, client batches, sampled clients and round seeds for a given run seed:

* `hiso`: `HiSoTrainer` + `FederatedZOCallback`, P = 5, forward difference, mu = 1e-3, preconditioner on.
* `decomfl`: the same with `zo_preconditioner=False` (H = I).
* `mezo`: centralized `HiSoTrainer` (no federation), P = 1, central difference, no preconditioner; one step per
  "round", batch 16, the Trainer's own data order. It communicates nothing, so it has no bytes curve.
* `block` (opt-in, mode `curvature`; not part of `full`): HiSo with the block curvature extension
  (`zo_curvature=True`, `docs/curvature.md`), central difference (2P + 1 passes per step, 2 scalars per direction
  uploaded and counted by the ledger), other settings as `hiso`.
* `energy` (opt-in, mode `curvature`): `zo_curvature_target="energy"` (block values inversely proportional to each
  block's gradient energy) learned on the first 100 rounds (`zo_curvature_steps=100`, central differences and the
  curvature scalar there), then plain forward-difference rounds with the learned block scale;
* `snr`, `snr4` (opt-in, mode `curvature`): `block` with `zo_curvature_target="snr"` (block values from the gradient
  signal per unit curvature); `snr4` estimates on a quarter of the rounds only (`zo_curvature_every=4`: forward
  differences and one scalar per direction on the other rounds).
* `fedavg`: first-order FedAvg: each sampled client loads the global head, runs `local_steps` AdamW steps (the
  Trainer's default optimizer and hyper-parameters, one AdamW state per client kept between its rounds, dropout on
  as in `Trainer.train`) on the same client batches, and the server averages the clients' parameters (uniform mean,
  as the ZO protocol averages scalars). Bytes: download plus upload of the trainable parameters per sampled client.

Each (task, federation, method, lr, seed) run writes one JSON under `--results-dir`; finished runs are skipped, so an
interrupted sweep resumes where it stopped. `--report` (also run at the end of a sweep) prints the tables and draws
the plots from whatever has finished.

    python benchmarks/convergence.py --mode short            # minutes: the smoke test
    nohup python benchmarks/convergence.py --mode full > benchmarks/results/full.log 2>&1 &
    python benchmarks/convergence.py --mode full --report    # tables and plots from the finished runs
    python benchmarks/convergence.py --mode curvature        # the curvature methods, into the full mode's results

`--mode curvature` runs the `block`, `snr`, `snr4` and `energy` methods on the full mode's grid, seeds and rounds,
paper federation only, into the full mode's results directory; its report (also appended to `--mode full --report` once
block runs exist) compares them with HiSo and DeComFL at each one's best lr: final accuracy, and rounds, bytes and
forward passes to DeComFL's best accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import (  # noqa: E402
    DOCS_DIR,
    RESULTS_DIR,
    EvalCallback,
    FrozenEncoderHead,
    accuracy,
    check_cached_head_matches_model,
    example_ids,
    features_dataset,
    load_features,
    lr_tag,
    machine,
    read_json,
    save_figure,
    write_json,
)
from transformers import PrinterCallback, default_data_collator  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_hiso import FederatedZOCallback, HiSoConfig, HiSoTrainer  # noqa: E402
from hf_hiso.callbacks import ClientBatches  # noqa: E402
from hf_hiso.federated.ledger import CommunicationLedger  # noqa: E402
from hf_hiso.federated.partition import partition_dataset  # noqa: E402
from hf_hiso.federated.protocol import FederatedServer  # noqa: E402
from hf_hiso.zo_optimizer import NonFiniteScalarError  # noqa: E402

ZO_METHODS = ("hiso", "decomfl", "mezo")
METHODS = (*ZO_METHODS, "fedavg")
FEDERATED = ("hiso", "decomfl", "fedavg")
# Opt-in: the block curvature extension (docs/curvature.md). Not in METHODS, so the full mode's sweep and report are
# those of the paper's methods whether or not block runs sit in the same results directory.
# The `HiSoConfig` fields of each curvature method (on top of HiSo's); every-step methods measure with central
# differences throughout, `snr4` with forward differences between its curvature steps.
CURVATURE_SETTINGS = {
    "block": {"zo_curvature": True, "zo_difference": "central"},
    "snr": {"zo_curvature": True, "zo_curvature_target": "snr", "zo_difference": "central"},
    "snr4": {"zo_curvature": True, "zo_curvature_target": "snr", "zo_curvature_every": 4},
    "energy": {"zo_curvature": True, "zo_curvature_target": "energy", "zo_curvature_steps": 100},
}
CURVATURE_METHODS = tuple(CURVATURE_SETTINGS)
# What the curvature report compares, at each one's best lr (the curvature methods that have runs).
CURVATURE_COMPARED = ("decomfl", "hiso", *CURVATURE_METHODS)
LABELS = {
    "hiso": "HiSo",
    "decomfl": "DeComFL",
    "mezo": "MeZO (central.)",
    "fedavg": "FedAvg (AdamW)",
    "block": "HiSo + block curv.",
    "snr": "block, snr target",
    "snr4": "snr, every 4th",
    "energy": "energy, first 100",
}
COLORS = {
    "hiso": "C3",
    "decomfl": "C0",
    "mezo": "C2",
    "fedavg": "C7",
    "block": "C1",
    "snr": "C4",
    "snr4": "C5",
    "energy": "C6",
}


@dataclass(frozen=True)
class Federation:
    name: str
    num_clients: int
    clients_per_round: int
    local_steps: int = 1
    dirichlet_alpha: float = 1.0


@dataclass
class Mode:
    """What a sweep runs. `zo_lrs` is one grid shared by every zeroth-order method (fairness: each method is then
    reported at its own best lr from the same grid); FedAvg, a first-order method, gets its own grid."""

    tasks: tuple[str, ...]
    federations: tuple[Federation, ...]
    rounds: dict[str, int]
    zo_lrs: tuple[float, ...]
    fedavg_lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    eval_every: int
    train_pooler: bool = True
    feature_limit: int | None = None
    batch_size: int = 16
    num_directions: int = 5
    zo_eps: float = 1e-3
    methods: tuple[str, ...] = METHODS
    extra: dict[str, Any] = field(default_factory=dict)


PAPER = Federation("paper", 6, 2)
LARGE = Federation("large", 30, 3)

MODES = {
    "short": Mode(
        tasks=("tweets_sentiment",),
        federations=(PAPER,),
        rounds={"tweets_sentiment": 40},
        zo_lrs=(3e-3, 3e-2),
        fedavg_lrs=(1e-2,),
        seeds=(0,),
        eval_every=10,
        feature_limit=512,
    ),
    "full": Mode(
        tasks=("tweets_sentiment", "bbc_news"),
        federations=(PAPER, LARGE),
        rounds={"tweets_sentiment": 1500, "bbc_news": 1500},
        zo_lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
        fedavg_lrs=(1e-3, 3e-3, 1e-2, 3e-2),
        seeds=(0, 1, 2),
        eval_every=25,
    ),
}
# The curvature extension on the full mode's grid, seeds and rounds, paper federation only; its runs go to the full
# mode's results directory (RESULTS_OF) so that they sit beside the HiSo and DeComFL runs they are compared with.
MODES["curvature"] = dataclasses.replace(MODES["full"], federations=(PAPER,), methods=CURVATURE_METHODS)
RESULTS_OF = {"curvature": "full"}


# ---- one run --------------------------------------------------------------------------------------------------------


def run_path(results_dir: Path, task: str, fed: str, method: str, lr: float, seed: int) -> Path:
    return results_dir / task / fed / f"{method}_lr{lr_tag(lr)}_s{seed}.json"


def ledger_totals(ledger: CommunicationLedger | None) -> dict[str, int]:
    if ledger is None:
        return {"bytes_total": 0, "paper_bytes": 0, "fedavg_bytes": 0}
    return {
        "bytes_total": ledger.bytes_total,
        "paper_bytes": ledger.paper_bytes_total,
        "fedavg_bytes": ledger.fedavg_bytes_total,
    }


def run_zo(
    feats: dict,
    mode: Mode,
    fed: Federation,
    method: str,
    lr: float,
    seed: int,
    rounds: int,
    zo_overrides: dict[str, Any] | None = None,
    keep_state: bool = False,
) -> dict[str, Any]:
    """HiSo / DeComFL through `HiSoTrainer` + `FederatedZOCallback`; MeZO through the centralized `HiSoTrainer`.

    `zo_overrides` changes `HiSoConfig`'s `zo_*` fields (the ablation); `keep_state` adds the trained `model` and the
    preconditioner tensors (`hessian_tensors`, name -> tensor) to the result (not JSON-able)."""
    model = FrozenEncoderHead.from_features(feats, seed, train_pooler=mode.train_pooler)
    train = features_dataset(feats)
    val_ids, val_labels = example_ids(feats, "validation"), feats["validation"]["labels"]
    mezo = method == "mezo"
    block = method in CURVATURE_METHODS
    with tempfile.TemporaryDirectory() as tmp:
        args = HiSoConfig(
            output_dir=tmp,
            per_device_train_batch_size=mode.batch_size,
            learning_rate=lr,
            lr_scheduler_type="constant",
            max_steps=rounds,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            zo_eps=mode.zo_eps,
            zo_num_directions=1 if mezo else mode.num_directions,
            zo_preconditioner=method == "hiso" or block,
            # Keeps each round's P directions (P x d floats, 3 MB here) instead of drawing them again for every
            # client, the restoration and the update: the same numbers, so the same run, at about half the CPU time.
            zo_cache_directions=True,
            **{"zo_difference": "central" if mezo else "forward", **CURVATURE_SETTINGS.get(method, {})},
            **(zo_overrides or {}),
        )
        fed_cb = None
        callbacks = []
        if not mezo:
            fed_cb = FederatedZOCallback(
                num_clients=fed.num_clients,
                clients_per_round=fed.clients_per_round,
                local_steps=fed.local_steps,
                partition="dirichlet",
                dirichlet_alpha=fed.dirichlet_alpha,
            )
            callbacks.append(fed_cb)
        evaluator = EvalCallback(
            val_ids, val_labels, mode.eval_every, lambda: ledger_totals(fed_cb.ledger if fed_cb else None)
        )
        callbacks.append(evaluator)
        trainer = HiSoTrainer(model=model, args=args, train_dataset=train, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # the figures go to the JSON, not to the log
        diverged = False
        try:
            trainer.train()
        except NonFiniteScalarError:
            diverged = True
        out = {
            "history": evaluator.history,
            "diverged": diverged or evaluator.diverged,
            "forward_passes": trainer.zo_forward_passes,
        }
        if fed_cb is not None:
            out["client_sizes"] = fed_cb.client_sizes
            out["ledger"] = fed_cb.ledger.summary()
        hs = trainer.zo_optimizer.hessian()
        if hs is not None:
            flat = torch.cat([h.flatten() for h in hs])
            out["hessian"] = {
                "mean": float(flat.mean()),
                "min": float(flat.min()),
                "max": float(flat.max()),
                "median": float(flat.median()),
            }
            if keep_state:
                # The Trainer groups parameters by weight decay, so the optimizer's order is not named_parameters'.
                names = {id(p): n for n, p in model.named_parameters()}
                out["hessian_tensors"] = {
                    names[id(p)]: h.detach().clone() for p, h in zip(trainer.zo_optimizer.params, hs, strict=True)
                }
        info = trainer.zo_optimizer.block_hessian()
        if info is not None:
            # The learned block curvature theta and preconditioner H_b of each tensor at the end of the run.
            names = {id(p): n for n, p in model.named_parameters()}
            out["block_curvature"] = {
                names[id(p)]: {k: float(info[k][b]) for k in ("theta", "gamma", "hessian") if k in info}
                for p, b in zip(trainer.zo_optimizer.params, info["block_of"].tolist(), strict=True)
            }
        if keep_state:
            out["model"] = model
    return out


def run_fedavg(feats: dict, mode: Mode, fed: Federation, lr: float, seed: int, rounds: int) -> dict[str, Any]:
    """First-order FedAvg on the same partition, client batch streams and client sampling as the ZO runs."""
    torch.manual_seed(seed)  # dropout (the global RNG drives it, as in Trainer.train)
    model = FrozenEncoderHead.from_features(feats, seed, train_pooler=mode.train_pooler)
    params = [p for p in model.parameters() if p.requires_grad]
    train = features_dataset(feats)
    val_ids, val_labels = example_ids(feats, "validation"), feats["validation"]["labels"]
    # The same calls FederatedZOCallback makes, with the same seed: same shards, same batch streams, same clients.
    shards = partition_dataset(
        train, fed.num_clients, "dirichlet", dirichlet_alpha=fed.dirichlet_alpha, label_column="labels", seed=seed
    )
    clients = [ClientBatches(s, default_data_collator, mode.batch_size, seed, c) for c, s in enumerate(shards)]
    server = FederatedServer(fed.num_clients, fed.clients_per_round, fed.local_steps, seed=seed)
    # The Trainer's default AdamW settings (betas 0.9/0.999, eps 1e-8, weight_decay 0); one state per client.
    optimizers = [torch.optim.AdamW(params, lr=lr, weight_decay=0.0) for _ in range(fed.num_clients)]
    d = sum(p.numel() for p in params)
    bytes_total = 0
    history = []

    def record(r: int) -> None:
        acc, loss = accuracy(model, val_ids, val_labels)
        history.append({"round": r, "accuracy": acc, "val_loss": loss, "bytes_total": bytes_total, "fedavg_bytes": 0})

    record(0)
    diverged = False
    for r in range(1, rounds + 1):
        plan = server.plan_round()
        start = [p.detach().clone() for p in params]
        local = []
        model.train()
        for c in plan.clients:
            with torch.no_grad():
                for p, s in zip(params, start, strict=True):
                    p.copy_(s)
            for _ in range(fed.local_steps):
                batch = clients[c].next_batch()
                loss = model(**batch).loss
                loss.backward()
                optimizers[c].step()
                optimizers[c].zero_grad(set_to_none=True)
            local.append([p.detach().clone() for p in params])
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(torch.stack([loc[i] for loc in local]).mean(0))
        server.commit_round(plan, None, [lr])
        bytes_total += 2 * len(plan.clients) * d * 4
        if r % mode.eval_every == 0 or r == rounds:
            record(r)
            if not math.isfinite(history[-1]["val_loss"]):
                diverged = True
                break
    for h in history:
        h["fedavg_bytes"] = h["bytes_total"]
    return {
        "history": history,
        "diverged": diverged,
        "client_sizes": [len(s) for s in shards],
        "forward_backward_passes": rounds * fed.clients_per_round * fed.local_steps,
    }


def planned_runs(mode: Mode) -> Iterator[tuple[str, Federation, str, float, int]]:
    """Every run of the sweep, seed-major so that a partial sweep already covers every task, federation and method."""
    central = Federation("central", 1, 1)
    for seed in mode.seeds:
        for task in mode.tasks:
            for fed in mode.federations:
                for method in mode.methods:
                    if method == "mezo":
                        continue
                    for lr in mode.fedavg_lrs if method == "fedavg" else mode.zo_lrs:
                        yield task, fed, method, lr, seed
            if "mezo" in mode.methods:
                for lr in mode.zo_lrs:
                    yield task, central, "mezo", lr, seed


_FEATURES: dict[tuple[str, int | None], dict] = {}


def _init_worker() -> None:
    # The trainable head is a few small matrix products: one thread per run is faster than two fighting over them,
    # and leaves the other core to a second worker (or to the other users of a shared machine).
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()


def execute_run(mode_name: str, mode: Mode, results_dir: Path, job: tuple[str, Federation, str, float, int]) -> str:
    """Runs one (task, federation, method, lr, seed) and writes its JSON; returns a one-line summary."""
    task, fed, method, lr, seed = job
    key = (task, mode.feature_limit)
    if key not in _FEATURES:
        _FEATURES[key] = load_features(task, limit=mode.feature_limit)
    feats = _FEATURES[key]
    rounds = mode.rounds[task]
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "fedavg":
        out = run_fedavg(feats, mode, fed, lr, seed, rounds)
    else:
        out = run_zo(feats, mode, fed, method, lr, seed, rounds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    head = FrozenEncoderHead(feats["pooler"], feats["num_labels"], 0, mode.train_pooler)
    record = {
        "task": task,
        "federation": asdict(fed),
        "method": method,
        "lr": lr,
        "seed": seed,
        "rounds": rounds,
        "mode": mode_name,
        "num_trainable": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "train_pooler": mode.train_pooler,
        "batch_size": mode.batch_size,
        "num_directions": 1 if method == "mezo" else mode.num_directions,
        "zo_eps": mode.zo_eps,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "machine": machine(),
        "final_accuracy": out["history"][-1]["accuracy"],
        **out,
    }
    write_json(run_path(results_dir, task, fed.name, method, lr, seed), record)
    return (
        f"{task} {fed.name} {method} lr={lr:g} seed={seed}: final acc {record['final_accuracy']:.4f}"
        f"{' DIVERGED' if record['diverged'] else ''} ({wall:.0f} s wall, {cpu:.0f} s cpu)"
    )


def _execute_job(payload: tuple) -> str:
    return execute_run(*payload)


def run_sweep(mode_name: str, mode: Mode, results_dir: Path, max_runs: int | None = None, workers: int = 1) -> None:
    runs = list(planned_runs(mode))
    todo = [r for r in runs if not run_path(results_dir, r[0], r[1].name, r[2], r[3], r[4]).exists()]
    print(
        f"[{mode_name}] {len(runs)} runs planned, {len(runs) - len(todo)} already done, {len(todo)} to do", flush=True
    )
    todo = todo[:max_runs] if max_runs else todo
    payloads = [(mode_name, mode, results_dir, job) for job in todo]
    t0 = time.perf_counter()
    if workers <= 1:
        _init_worker()
        results = map(_execute_job, payloads)
    else:
        import multiprocessing

        # spawn, not fork: a forked child inherits torch's thread pool state from the parent.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
        results = pool.imap_unordered(_execute_job, payloads)
    for n, line in enumerate(results):
        print(f"[{n + 1}/{len(todo)}, {time.perf_counter() - t0:.0f} s] {line}", flush=True)
    if workers > 1:
        pool.close()
        pool.join()


# ---- report ---------------------------------------------------------------------------------------------------------


def load_results(results_dir: Path) -> list[dict]:
    return [read_json(p) for p in sorted(results_dir.glob("*/*/*.json"))]


def tail_accuracy(run: dict, share: float = 0.1) -> float:
    """Mean validation accuracy over the last `share` of the rounds (less noisy than the last point alone); a diverged
    run scores 0."""
    if run["diverged"]:
        return 0.0
    hist = run["history"]
    last = hist[-1]["round"]
    tail = [h["accuracy"] for h in hist if h["round"] >= last * (1 - share)]
    return statistics.fmean(tail)


def first_reach(run: dict, target: float) -> tuple[int, int, int] | None:
    """(round, bytes, bytes in the paper's convention) of the first evaluation at or above `target`, or None."""
    for h in run["history"]:
        if h["accuracy"] >= target - 1e-12:
            return h["round"], h.get("bytes_total", 0), h.get("paper_bytes", 0)
    return None


def select_runs(
    runs: list[dict], task: str, federation: str, method: str, lr: float, seeds: list[int] | None = None
) -> list[dict]:
    """The finished runs of one (task, federation, method, lr), optionally of the given seeds only."""
    return [
        r
        for r in runs
        if r["task"] == task
        and r["federation"]["name"] == federation
        and r["method"] == method
        and r["lr"] == lr
        and (seeds is None or r["seed"] in seeds)
    ]


def mean_curve(runs: list[dict]) -> tuple[list[int], list[float]]:
    n = min(len(r["history"]) for r in runs)
    rounds = [h["round"] for h in runs[0]["history"][:n]]
    return rounds, [statistics.fmean(r["history"][i]["accuracy"] for r in runs) for i in range(n)]


THRESHOLD_SHARES = (0.5, 0.75, 0.9, 0.95, 1.0)


def threshold_rounds(
    decomfl: tuple[list[int], list[float]], hiso: tuple[list[int], list[float]]
) -> list[dict[str, Any]]:
    """Rounds for each seed-mean curve to reach accuracies a share of the way from the initial accuracy to DeComFL's
    final one (a steadier reading of "rounds to DeComFL's accuracy" than one noisy maximum)."""
    (r_dec, a_dec), (r_hiso, a_hiso) = decomfl, hiso
    rows = []
    for share in THRESHOLD_SHARES:
        target = a_dec[0] + share * (a_dec[-1] - a_dec[0])
        reach = {
            m: next((r for r, a in zip(rs, acc, strict=True) if a >= target - 1e-12), None)
            for m, (rs, acc) in (("decomfl", (r_dec, a_dec)), ("hiso", (r_hiso, a_hiso)))
        }
        speedup = reach["decomfl"] / reach["hiso"] if reach["decomfl"] and reach["hiso"] else None
        rows.append({"share": share, "accuracy": target, **reach, "speedup": speedup})
    return rows


def best_lrs(
    runs: list[dict], seeds: list[int], methods: tuple[str, ...] = METHODS
) -> dict[str, tuple[float, dict[float, float]]]:
    """Per method: the lr with the best mean tail accuracy over the seeds that every lr of the method finished, and
    the mean tail accuracy of each lr."""
    out = {}
    for method in methods:
        by_lr: dict[float, dict[int, dict]] = {}
        for r in runs:
            if r["method"] == method:
                by_lr.setdefault(r["lr"], {})[r["seed"]] = r
        if not by_lr:
            continue
        common = [s for s in seeds if all(s in v for v in by_lr.values())]
        if not common:
            continue
        scores = {lr: statistics.fmean(tail_accuracy(v[s]) for s in common) for lr, v in sorted(by_lr.items())}
        out[method] = (max(scores, key=scores.get), scores)
    return out


def summarize(results_dir: Path) -> dict[str, Any]:
    """The report's figures for each (task, federation): best lrs, final accuracies, the paper's rounds-to-target
    metric per seed and its speedup."""
    runs = load_results(results_dir)
    report: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        central = [r for r in runs if r["task"] == task and r["federation"]["name"] == "central"]
        for fed in sorted({r["federation"]["name"] for r in runs if r["task"] == task} - {"central"}):
            group = [r for r in runs if r["task"] == task and r["federation"]["name"] == fed] + central
            seeds = sorted({r["seed"] for r in group})
            best = best_lrs(group, seeds)
            entry: dict[str, Any] = {"best_lr": {m: v[0] for m, v in best.items()}, "lr_scores": {}}
            entry["lr_scores"] = {m: {f"{lr:g}": s for lr, s in v[1].items()} for m, v in best.items()}
            at_best = {m: {r["seed"]: r for r in group if r["method"] == m and r["lr"] == best[m][0]} for m in best}
            entry["final_accuracy"] = {
                m: {
                    "mean": statistics.fmean(r["final_accuracy"] for r in v.values()),
                    "by_seed": {s: r["final_accuracy"] for s, r in sorted(v.items())},
                }
                for m, v in at_best.items()
            }
            per_seed = []
            if "hiso" in at_best and "decomfl" in at_best:
                for s in sorted(set(at_best["hiso"]) & set(at_best["decomfl"])):
                    dec = at_best["decomfl"][s]
                    target = max(h["accuracy"] for h in dec["history"])
                    dec_round, dec_bytes, dec_paper = first_reach(dec, target)
                    row = {
                        "seed": s,
                        "target": target,
                        "decomfl_rounds": dec_round,
                        "decomfl_bytes": dec_bytes,
                        "decomfl_paper_bytes": dec_paper,
                    }
                    for m in ("hiso", "fedavg", "mezo"):
                        run = at_best.get(m, {}).get(s)
                        reach = first_reach(run, target) if run else None
                        row[f"{m}_rounds"] = reach[0] if reach else None
                        row[f"{m}_bytes"] = reach[1] if reach else None
                        row[f"{m}_paper_bytes"] = reach[2] if reach else None
                    row["speedup"] = dec_round / row["hiso_rounds"] if row["hiso_rounds"] else None
                    per_seed.append(row)
            entry["rounds_to_decomfl_best"] = per_seed
            speedups = [r["speedup"] for r in per_seed if r["speedup"] is not None]
            entry["speedup"] = {
                "reached": f"{len(speedups)}/{len(per_seed)}",
                "mean": statistics.fmean(speedups) if speedups else None,
                "median": statistics.median(speedups) if speedups else None,
                "min": min(speedups) if speedups else None,
                "max": max(speedups) if speedups else None,
            }
            # The same metric on the seed-mean curves (less sensitive to one lucky evaluation).
            if "hiso" in at_best and "decomfl" in at_best:
                seeds_both = sorted(set(at_best["hiso"]) & set(at_best["decomfl"]))
                r_dec, a_dec = mean_curve([at_best["decomfl"][s] for s in seeds_both])
                r_hiso, a_hiso = mean_curve([at_best["hiso"][s] for s in seeds_both])
                target = max(a_dec)
                dec_round = r_dec[a_dec.index(target)]
                hiso_round = next((r for r, a in zip(r_hiso, a_hiso, strict=True) if a >= target - 1e-12), None)
                by_lr = {}
                for lr in sorted({r["lr"] for r in group if r["method"] == "hiso"}):
                    runs_lr = [r for r in group if r["method"] == "hiso" and r["lr"] == lr and r["seed"] in seeds_both]
                    if len(runs_lr) == len(seeds_both):
                        r_l, a_l = mean_curve(runs_lr)
                        reach = next((r for r, a in zip(r_l, a_l, strict=True) if a >= target - 1e-12), None)
                        by_lr[f"{lr:g}"] = {"rounds": reach, "best": max(a_l)}
                entry["mean_curve"] = {
                    "hiso_by_lr": by_lr,
                    "seeds": seeds_both,
                    "decomfl_best": target,
                    "decomfl_rounds": dec_round,
                    "hiso_rounds": hiso_round,
                    "hiso_best": max(a_hiso),
                    "speedup": dec_round / hiso_round if hiso_round else None,
                    "thresholds": threshold_rounds((r_dec, a_dec), (r_hiso, a_hiso)),
                }
            entry["seeds"] = seeds
            report[f"{task}/{fed}"] = entry
    return report


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{b} B"


def print_report(report: dict[str, Any]) -> None:
    for key, e in report.items():
        print(f"\n=== {key} (seeds {e['seeds']}) ===")
        print("mean tail accuracy (last 10% of rounds) per lr; * = best:")
        for m, scores in e["lr_scores"].items():
            cells = "  ".join(f"{lr}:{s:.4f}{'*' if float(lr) == e['best_lr'][m] else ''}" for lr, s in scores.items())
            print(f"  {LABELS[m]:16s} {cells}")
        print("final accuracy at the best lr (mean; per seed):")
        for m, v in e["final_accuracy"].items():
            seeds = ", ".join(f"{a:.4f}" for a in v["by_seed"].values())
            print(f"  {LABELS[m]:16s} lr={e['best_lr'][m]:g}  {v['mean']:.4f}  ({seeds})")
        if e["rounds_to_decomfl_best"]:
            print("rounds (bytes) to reach DeComFL's best accuracy, per seed:")
            for r in e["rounds_to_decomfl_best"]:
                cells = "  ".join(
                    f"{LABELS[m]}: {r[f'{m}_rounds'] if r[f'{m}_rounds'] is not None else 'not reached'}"
                    f" ({fmt_bytes(r[f'{m}_bytes'])})"
                    for m in ("hiso", "fedavg")
                )
                sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
                paper = (
                    f"; paper convention: DeComFL {fmt_bytes(r['decomfl_paper_bytes'])}, HiSo "
                    f"{fmt_bytes(r['hiso_paper_bytes'])}"
                )
                print(
                    f"  seed {r['seed']}: target {r['target']:.4f}; DeComFL {r['decomfl_rounds']} "
                    f"({fmt_bytes(r['decomfl_bytes'])}); {cells}; speedup {sp}{paper}"
                )
            s = e["speedup"]
            if s["mean"] is not None:
                print(
                    f"  HiSo speedup: mean {s['mean']:.2f}x, median {s['median']:.2f}x, min {s['min']:.2f}x, "
                    f"max {s['max']:.2f}x (reached in {s['reached']} seeds)"
                )
            else:
                print(f"  HiSo never reached DeComFL's best accuracy ({s['reached']} seeds)")
        mc = e.get("mean_curve")
        if mc:
            hr = mc["hiso_rounds"] if mc["hiso_rounds"] is not None else "not reached"
            sp = f"{mc['speedup']:.2f}x" if mc["speedup"] else "-"
            print(
                f"on the seed-mean curves ({len(mc['seeds'])} seeds): DeComFL's best {mc['decomfl_best']:.4f} at "
                f"round {mc['decomfl_rounds']}; HiSo reaches it at round {hr} (its own best {mc['hiso_best']:.4f}); "
                f"speedup {sp}"
            )
            cells = ", ".join(
                f"lr {lr}: {v['rounds'] if v['rounds'] is not None else '-'} (best {v['best']:.4f})"
                for lr, v in mc["hiso_by_lr"].items()
            )
            print(
                f"  HiSo at every lr of the grid, rounds to that accuracy (not a fair pick, for reading only): {cells}"
            )
            print("  rounds to a share of the way from the initial accuracy to DeComFL's final one (seed means):")
            for t in mc.get("thresholds", []):
                sp = f"{t['speedup']:.2f}x" if t["speedup"] else "-"
                print(
                    f"    {t['share']:>4.0%} (acc {t['accuracy']:.4f}): DeComFL {t['decomfl'] or 'not reached'}, "
                    f"HiSo {t['hiso'] or 'not reached'}, speedup {sp}"
                )


def plot(results_dir: Path, report: dict[str, Any], docs_dir: Path, prefix: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = load_results(results_dir)
    paths = []
    for key, e in report.items():
        task, fed = key.split("/")
        fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
        for m, lr in e["best_lr"].items():
            fed_name = "central" if m == "mezo" else fed
            sel = select_runs(runs, task, fed_name, m, lr)
            if not sel:
                continue
            n = min(len(r["history"]) for r in sel)
            rounds = np.array([h["round"] for h in sel[0]["history"][:n]])
            acc = np.array([[h["accuracy"] for h in r["history"][:n]] for r in sel])
            label = f"{LABELS[m]} lr={lr:g} ({len(sel)} seeds)"
            ax_r.plot(rounds, acc.mean(0), color=COLORS[m], label=label)
            ax_r.fill_between(rounds, acc.min(0), acc.max(0), color=COLORS[m], alpha=0.15)
            if m != "mezo":
                b = np.array([h["bytes_total"] for h in sel[0]["history"][:n]], dtype=float)
                ok = b > 0
                ax_b.plot(b[ok], acc.mean(0)[ok], color=COLORS[m], label=label)
                ax_b.fill_between(b[ok], acc.min(0)[ok], acc.max(0)[ok], color=COLORS[m], alpha=0.15)
        ax_r.set_xlabel("communication rounds (MeZO: steps)")
        ax_r.set_ylabel("validation accuracy")
        ax_b.set_xscale("log")
        ax_b.set_xlabel("cumulative bytes, uplink + downlink (log)")
        for ax in (ax_r, ax_b):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        fig.suptitle(f"{task}, federation '{fed}': each method at its best lr (mean, band = min..max over seeds)")
        paths.append(save_figure(fig, docs_dir / f"{prefix}_{task}_{fed}.png"))
    return paths


# ---- curvature extension report -------------------------------------------------------------------------------------


def passes_per_round(run: dict) -> float:
    """Forward passes per round, all sampled clients together, averaged over the run (`2P + 1` per client on a
    curvature step, `P + 1` otherwise and for HiSo and DeComFL)."""
    return run["forward_passes"] / max(run["history"][-1]["round"], 1)


def curve_at_budget(run_curves: list[dict], budget: float) -> float | None:
    """Seed-mean accuracy at the last evaluation whose forward passes are within `budget`."""
    rounds, acc = mean_curve(run_curves)
    per_round = statistics.fmean(passes_per_round(r) for r in run_curves)
    within = [a for r, a in zip(rounds, acc, strict=True) if r * per_round <= budget + 1e-9]
    return within[-1] if within else None


def summarize_curvature(results_dir: Path) -> dict[str, Any]:
    """For each (task, federation) with `block` runs: the curvature methods that have runs, HiSo and DeComFL at each
    one's best lr (over the seeds that block has): final and tail accuracy, accuracy at equal forward passes (HiSo's
    and DeComFL's total), and per seed and on the seed-mean curves the rounds, ledger bytes and forward passes to
    DeComFL's best accuracy."""
    runs = [r for r in load_results(results_dir) if r["method"] in CURVATURE_COMPARED]
    report: dict[str, Any] = {}
    for task, fed in sorted({(r["task"], r["federation"]["name"]) for r in runs if r["method"] == "block"}):
        group = [r for r in runs if r["task"] == task and r["federation"]["name"] == fed]
        seeds = sorted({r["seed"] for r in group if r["method"] == "block"})
        compared = tuple(m for m in CURVATURE_COMPARED if any(r["method"] == m for r in group))
        best = best_lrs(group, seeds, compared)
        if set(best) != set(compared) or not {"decomfl", "hiso"} <= set(best):
            continue
        at_best = {m: {r["seed"]: r for r in group if r["method"] == m and r["lr"] == best[m][0]} for m in best}
        common = sorted(set.intersection(*(set(v) for v in at_best.values())) & set(seeds))
        if not common:
            continue
        entry: dict[str, Any] = {"seeds": common, "best_lr": {m: v[0] for m, v in best.items()}}
        entry["lr_scores"] = {m: {f"{lr:g}": sc for lr, sc in v[1].items()} for m, v in best.items()}
        entry["passes_per_round"] = {m: passes_per_round(at_best[m][common[0]]) for m in best}
        # Equal compute: HiSo's (and DeComFL's) whole run, in forward passes.
        budget = max(at_best["hiso"][s]["forward_passes"] for s in common)
        entry["equal_passes_budget"] = budget
        entry["methods"] = {}
        for m in compared:
            sel = [at_best[m][s] for s in common]
            entry["methods"][m] = {
                "final_accuracy": statistics.fmean(r["final_accuracy"] for r in sel),
                "final_by_seed": [r["final_accuracy"] for r in sel],
                "tail_accuracy": statistics.fmean(tail_accuracy(r) for r in sel),
                "accuracy_at_budget": curve_at_budget(sel, budget),
                "bytes_per_round": sel[0]["history"][-1]["bytes_total"] / max(sel[0]["history"][-1]["round"], 1),
                "diverged": sum(r["diverged"] for r in sel),
            }
        per_seed = []
        for s in common:
            dec = at_best["decomfl"][s]
            target = max(h["accuracy"] for h in dec["history"])
            row: dict[str, Any] = {"seed": s, "target": target}
            for m in compared:
                reach = first_reach(at_best[m][s], target)
                row[m] = (
                    None
                    if reach is None
                    else {
                        "rounds": reach[0],
                        "bytes": reach[1],
                        "passes": round(reach[0] * passes_per_round(at_best[m][s])),
                    }
                )
            per_seed.append(row)
        entry["to_decomfl_best"] = per_seed
        # The same on the seed-mean curves (less sensitive to one lucky evaluation).
        curves = {m: mean_curve([at_best[m][s] for s in common]) for m in compared}
        target = max(curves["decomfl"][1])
        mean_rows: dict[str, Any] = {"target": target}
        for m, (rounds, acc) in curves.items():
            r_hit = next((r for r, a in zip(rounds, acc, strict=True) if a >= target - 1e-12), None)
            if r_hit is None:
                mean_rows[m] = {"rounds": None, "best": max(acc)}
                continue
            hist = at_best[m][common[0]]["history"]
            bytes_hit = next(h["bytes_total"] for h in hist if h["round"] == r_hit)
            mean_rows[m] = {
                "rounds": r_hit,
                "bytes": bytes_hit,
                "passes": round(r_hit * entry["passes_per_round"][m]),
                "best": max(acc),
            }
        entry["mean_curve"] = mean_rows
        entry["block_curvature"] = {}
        for m in compared:
            block_state = [at_best[m][s].get("block_curvature") for s in common]
            if m in CURVATURE_METHODS and all(block_state):
                # Per tensor, the seeds' values at the end of the run (their spread is part of the result).
                entry["block_curvature"][m] = {
                    name: {k: [b[name][k] for b in block_state] for k in state}
                    for name, state in block_state[0].items()
                }
        report[f"{task}/{fed}"] = entry
    return report


def print_curvature_report(report: dict[str, Any]) -> None:
    def reach(cell: dict | None) -> str:
        if cell is None or cell["rounds"] is None:
            return "not reached" + (f" (best {cell['best']:.4f})" if cell else "")
        return f"{cell['rounds']} rounds, {fmt_bytes(cell['bytes'])}, {cell['passes']} passes"

    for key, e in report.items():
        print(f"\n=== curvature extension: {key} (seeds {e['seeds']}) ===")
        print("mean tail accuracy (last 10% of rounds) per lr; * = best:")
        for m, scores in e["lr_scores"].items():
            cells = "  ".join(
                f"{lr}:{sc:.4f}{'*' if float(lr) == e['best_lr'][m] else ''}" for lr, sc in scores.items()
            )
            print(f"  {LABELS[m]:19s} {cells}")
        budget = e["equal_passes_budget"]
        print(
            f"| method | best lr | final acc (mean; per seed) | acc at {budget:.0f} forward passes | passes / round "
            "| bytes / round | rounds, bytes, passes to DeComFL's best (seed-mean curve) |"
        )
        print("|---|---|---|---|---|---|---|")
        mc = e["mean_curve"]
        for m, v in e["methods"].items():
            per_seed = ", ".join(f"{a:.4f}" for a in v["final_by_seed"])
            at = "-" if v["accuracy_at_budget"] is None else f"{v['accuracy_at_budget']:.4f}"
            print(
                f"| {LABELS[m]} | {e['best_lr'][m]:g} | {v['final_accuracy']:.4f} ({per_seed}) | {at} | "
                f"{e['passes_per_round'][m]:.0f} | {v['bytes_per_round']:.1f} | {reach(mc[m])} |"
            )
        print(f"DeComFL's best on the seed-mean curve: {mc['target']:.4f}; per seed (target = DeComFL's best):")
        for row in e["to_decomfl_best"]:
            cells = "; ".join(f"{LABELS[m]}: {reach(row[m])}" for m in e["methods"])
            print(f"  seed {row['seed']}: target {row['target']:.4f}; {cells}")
        for m, state in e.get("block_curvature", {}).items():
            print(f"{LABELS[m]}: block state learned by the end of the run, per seed:")
            for n, v in state.items():
                cells = "; ".join(f"{k} ({', '.join(f'{x:.3g}' for x in xs)})" for k, xs in v.items())
                print(f"  {n:18s} {cells}")


def plot_curvature(results_dir: Path, report: dict[str, Any], docs_dir: Path) -> list[Path]:
    """Accuracy against rounds and against forward passes: DeComFL, HiSo and the curvature methods at their best
    lrs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_results(results_dir)
    paths = []
    for key, e in report.items():
        task, fed = key.split("/")
        fig, (ax_r, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
        for m in e["methods"]:
            lr = e["best_lr"][m]
            sel = select_runs(runs, task, fed, m, lr, seeds=e["seeds"])
            rounds, acc = mean_curve(sel)
            label = f"{LABELS[m]} lr={lr:g} ({len(sel)} seeds)"
            ax_r.plot(rounds, acc, color=COLORS[m], label=label)
            ax_p.plot([r * e["passes_per_round"][m] for r in rounds], acc, color=COLORS[m], label=label)
        for ax in (ax_r, ax_p):
            ax.axhline(e["mean_curve"]["target"], color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
            ax.set_ylabel("validation accuracy (seed mean)")
        ax_r.set_xlabel("communication rounds")
        ax_p.set_xlabel("forward passes (all sampled clients)")
        fig.suptitle(f"{task}, federation '{fed}': curvature extension vs HiSo vs DeComFL, best lr each")
        paths.append(save_figure(fig, docs_dir / f"curvature_convergence_{task}_{fed}.png"))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="short")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results/convergence/MODE")
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR, help="where the PNG plots go")
    parser.add_argument("--report", action="store_true", help="only print the report and draw the plots")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument("--workers", type=int, default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--check-cache", action="store_true", help="compare the cached head with the full model")
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=None, help="run only these lrs of the mode's zeroth-order grid"
    )
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    if args.lrs:
        unknown = sorted(set(args.lrs) - set(mode.zo_lrs))
        if unknown:
            parser.error(f"--lrs {unknown} not in the {args.mode} mode's grid {list(mode.zo_lrs)}")
        mode = dataclasses.replace(mode, zo_lrs=tuple(lr for lr in mode.zo_lrs if lr in args.lrs))
    results_dir = args.results_dir or RESULTS_DIR / "convergence" / RESULTS_OF.get(args.mode, args.mode)
    if args.check_cache:
        for task in mode.tasks:
            print(task, check_cached_head_matches_model(task, limit=mode.feature_limit))
        return
    print(f"machine: {machine()}")
    if not args.report:
        run_sweep(args.mode, mode, results_dir, args.max_runs, args.workers)
    if args.mode not in RESULTS_OF:
        report = summarize(results_dir)
        write_json(results_dir / "report.json", report)
        print_report(report)
        prefix = "convergence" if args.mode == "full" else f"convergence_{args.mode}"
        for p in plot(results_dir, report, args.docs_dir, prefix):
            print(f"plot: {p}")
    curvature = summarize_curvature(results_dir)
    if curvature:
        write_json(results_dir / "report_curvature.json", curvature)
        print_curvature_report(curvature)
        for p in plot_curvature(results_dir, curvature, args.docs_dir):
            print(f"plot: {p}")


if __name__ == "__main__":
    main()
