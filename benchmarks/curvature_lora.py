"""ZO on a LoRA adapter plus classifier head (embedded tweets task): does the block curvature preconditioner learn the
per-block scales that a hand-set preconditioner needs?

Setup (as in ../shared/design/MEASURED.md): the packaged all-MiniLM-L6-v2 as `BertForSequenceClassification`, PEFT
LoRA r = 8 on query/value (PEFT's default init: A random, B = 0) plus the classifier head (74,498 trainable entries in
26 tensors), tweets sentiment (`hf_hiso.embedded`, 70 % negative), batch 16, max length 32, P = 5, mu = 1e-3,
centralized, plain PyTorch loop around `HiSoOptimizer.step(closure)`. Accuracy on a fixed 1,000-example validation
subset every `--eval-every` steps.

Methods:

* `plain`: `preconditioner=False` (DeComFL / MeZO's Gaussian ZO-SGD), forward difference (P + 1 = 6 passes / step);
* `hiso`: HiSo as specified, forward difference;
* `fixed`: `H` frozen at 100 on every LoRA tensor and 1 on the head (the hand-set scale of MEASURED.md);
* `head`: the head alone trainable (770 entries), plain ZO: the speed to match;
* `block`: `curvature=True` (learned block curvature, one block per tensor), central differences (2P + 1 = 11);
* `block4`: the same with `curvature_every=4` (a quarter of the steps central, 7.25 passes / step on average);
* `snr`: `block` with `curvature_target="snr"` (H_b proportional to theta_b / gamma_b, gamma_b the mean squared
  gradient per entry learned from the squared slopes: long directions where the signal per unit curvature is large);
* `snr4`: `snr` with `curvature_every=4` (forward differences and no new estimate on three steps in four);
* `energy`: `curvature_target="energy"` (H_b inversely proportional to the block's gradient energy `n_b gamma_b`,
  learned with masks and a weighted regression of the squared slopes); with `--curvature-steps N` `H` is learned on
  the first N steps and then kept (later steps: forward differences, 6 passes);
* `oracle`: the snr target's `H` (the same formula, floor and normalisation) from the *true* per-tensor values
  instead of the estimates: `gamma_b = ||grad_b||**2 / n_b` by backprop on the step's batch and `theta_b` by a
  Hutchinson estimate `v_b . (Hess v)_b / n_b` (Rademacher `v`, `Hess v` from a central difference of two
  gradients), both averaged with weight 0.9 on every `--oracle-every`-th step; forward differences (6 passes a step,
  the backprop passes are not counted). It separates the target from its estimation: what the snr target would do
  if the scalars identified `gamma` and `theta` exactly. `--oracle-target energy` uses the energy target's formula
  instead (`signal`: `1 / gamma_b` per entry), `--oracle-freeze N` keeps `H` fixed after step N.

`--warmup N` raises the lr linearly from lr / N to lr over the first N steps (what `warmup_steps` does in a Trainer):
it lets a large lr wait until `H` has formed (plain directions for the first `2B` curvature rows). `--blocks role`
puts the tensors whose names agree once the layer numbers are dropped into one block (6 blocks instead of 26);
`--spread W` sets `curvature_spread` (the block factors `a**2 ~ U[1 - W, 1 + W]`).

    python benchmarks/curvature_lora.py --method block --lr 0.1 --steps 300 \\
        --out benchmarks/results/curvature_lora/block_lr0.1.json
    python benchmarks/curvature_lora.py --report benchmarks/results/curvature_lora    # tables from the saved records
    python benchmarks/curvature_lora.py --seed-report DIR [DIR ...]    # mean over seeds of each configuration

The report takes each method at its best lr (best mean accuracy over the last two evaluations) and gives the accuracy
at equal steps and at equal forward passes (the passes plain ZO-SGD spends in the run's steps), and the steps and
passes each method needs to reach the head-alone run's final accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from hf_hiso import HiSoOptimizer  # noqa: E402
from hf_hiso.curvature import role_of  # noqa: E402

METHODS = ("plain", "hiso", "fixed", "head", "block", "block4", "snr", "snr4", "energy", "oracle")


class FixedPreconditionerOptimizer(HiSoOptimizer):
    """`HiSoOptimizer` whose `H` stays where it was set."""

    def apply_updates(self, updates, update_hessian: bool) -> None:
        super().apply_updates(updates, update_hessian=False)

    def set_block_hessian(self, hessian_of_tensor: list[float]) -> None:
        for p, h in zip(self.params, hessian_of_tensor, strict=True):
            self.state[p]["hessian"] = torch.full_like(p, h, dtype=torch.float32)
        self._scales = None


class Oracle:
    """The `H` of the snr target (or, with `target`, of `1 / gamma_b` or the energy target) per tensor from backprop:
    `gamma_b = ||grad_b||**2 / n_b` on the step's batch and `theta_b`
    from `samples` Hutchinson samples `v_b . (Hess v)_b / n_b`, `Hess v ~ (grad(x + e v) - grad(x - e v)) / 2e`, each
    an average with weight `decay` on the old value; `H` then moves as the library's does (at most a factor
    `MAX_STEP` per update toward the target, then normalised)."""

    def __init__(
        self,
        opt: FixedPreconditionerOptimizer,
        seed: int,
        target: str = "snr",
        decay: float = 0.9,
        eps: float = 1e-3,
        samples: int = 4,
    ):
        from hf_hiso.curvature import BlockCurvature

        self.opt, self.decay, self.eps = opt, decay, eps
        self.rule = BlockCurvature.for_params(opt.params, opt.param_groups, target="snr")
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.samples, self.target = samples, target
        self.gamma = self.theta = None
        self.hessian = torch.ones(self.rule.num_blocks, dtype=torch.float64)

    def _grads(self, loss_fn) -> list[torch.Tensor]:
        with torch.enable_grad():
            return list(torch.autograd.grad(loss_fn(), self.opt.params))

    def update(self, loss_fn) -> None:
        params = self.opt.params
        sizes = self.rule.block_sizes
        gamma = torch.tensor([float(g.double().square().sum()) for g in self._grads(loss_fn)], dtype=torch.float64)
        theta = torch.zeros(len(params), dtype=torch.float64)
        for _ in range(self.samples):
            vs = [(torch.randint(0, 2, p.shape, generator=self.gen) * 2 - 1).to(p.dtype) for p in params]
            with torch.no_grad():
                for p, v in zip(params, vs, strict=True):
                    p.add_(v, alpha=self.eps)
            plus = self._grads(loss_fn)
            with torch.no_grad():
                for p, v in zip(params, vs, strict=True):
                    p.add_(v, alpha=-2 * self.eps)
            minus = self._grads(loss_fn)
            with torch.no_grad():
                for p, v in zip(params, vs, strict=True):
                    p.add_(v, alpha=self.eps)
            quad = [float((v.double() * (a - b).double()).sum()) for v, a, b in zip(vs, plus, minus, strict=True)]
            theta += torch.tensor(quad, dtype=torch.float64) / (2 * self.eps * self.samples)
        gamma, theta = gamma / sizes, theta / sizes
        if self.gamma is None:
            self.gamma, self.theta = gamma, theta
        else:
            self.gamma = self.decay * self.gamma + (1 - self.decay) * gamma
            self.theta = self.decay * self.theta + (1 - self.decay) * theta
        if self.target in ("signal", "energy"):
            # H_b proportional to 1 / gamma_b (per entry) or 1 / (n_b gamma_b) (the block's whole gradient energy),
            # floored, with the snr target's normalisation.
            n = self.rule.block_sizes
            weight = self.gamma.clamp_min(0.0) * (n if self.target == "energy" else 1.0)
            floor = self.rule.floor * float((n * weight).sum() / n.sum())
            target = self.rule.normalise(1.0 / weight.clamp_min(floor), self.theta)
        else:
            target = self.rule.snr_preconditioner(self.theta, self.gamma)
        if target is not None:
            from hf_hiso.curvature import MAX_STEP

            moved = torch.minimum(torch.maximum(target, self.hessian / MAX_STEP), self.hessian * MAX_STEP)
            self.hessian = self.rule.normalise(moved, self.theta)
            self.opt.set_block_hessian(self.hessian.tolist())

    def summary(self, model) -> dict[str, float]:
        if self.gamma is None:
            return {}
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        h = [float(self.opt.state[p]["hessian"].flatten()[0]) for p in self.opt.params]
        return kind_summary(names, {"theta": self.theta.tolist(), "gamma": self.gamma.tolist(), "H": h})


def load(max_length: int, val_size: int, seed: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from hf_hiso.embedded import load_tweets_sentiment, minilm_path

    data = load_tweets_sentiment(seed=0)
    tok = AutoTokenizer.from_pretrained(minilm_path())

    def encode(split, n=None):
        ds = data[split] if n is None else data[split].select(range(n))
        enc = tok(list(ds["text"]), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return {**enc, "labels": torch.tensor(list(ds["label"]))}

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)  # the new head's init (script, not library: the global RNG is ours here)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    return model, encode("train"), encode("validation", val_size)


def trainable_model(model, method: str):
    if method == "head":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier."))
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS")).eval()


def make_optimizer(
    method: str,
    model,
    lr: float,
    seed: int,
    floor: float | None = None,
    blocks: str = "tensor",
    spread: float | None = None,
    curvature_steps: int = 0,
) -> HiSoOptimizer:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    common = {"lr": lr, "zo_eps": 1e-3, "num_directions": 5, "seed": seed}
    if method in ("plain", "head"):
        return HiSoOptimizer(params, preconditioner=False, **common)
    if method == "hiso":
        return HiSoOptimizer(params, **common)
    if method == "oracle":
        return FixedPreconditionerOptimizer(params, **common)
    if method == "fixed":
        opt = FixedPreconditionerOptimizer(params, **common)
        for n, p in named:
            opt.state[p]["hessian"] = torch.full_like(p, 100.0 if "lora_" in n else 1.0, dtype=torch.float32)
        opt._scales = None
        return opt
    extra = {} if floor is None else {"curvature_floor": floor}
    if spread is not None:
        extra["curvature_spread"] = spread
    if method in ("snr", "snr4"):
        extra["curvature_target"] = "snr"
    if method == "energy":
        extra["curvature_target"] = "energy"
    if curvature_steps:
        extra["curvature_steps"] = curvature_steps
    every = 4 if method in ("block4", "snr4") else 1
    if blocks == "role":
        extra["curvature_blocks"] = [role_of(n) for n, _ in named]  # what zo_curvature_blocks="role" builds
    return HiSoOptimizer(params, curvature=True, curvature_every=every, **common, **extra)


@torch.no_grad()
def accuracy(model, val, batch_size: int = 250) -> float:
    correct = 0
    n = val["labels"].shape[0]
    for i in range(0, n, batch_size):
        batch = {k: v[i : i + batch_size] for k, v in val.items() if k != "labels"}
        correct += int((model(**batch).logits.argmax(-1) == val["labels"][i : i + batch_size]).sum())
    return correct / n


def kind_summary(names: list[str], per_tensor: dict[str, list[float]]) -> dict[str, float]:
    """Means of per-tensor values (`{"theta": [...], "H": [...]}`) over the LoRA A, LoRA B, head weight and head bias
    tensors (`H_lora_A`, ...), and `H_min_lora`, the shortest LoRA `H`: the block that can blow up first."""
    out: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        kind = "lora_A" if "lora_A" in name else "lora_B" if "lora_B" in name else "head"
        kind += "_bias" if kind == "head" and name.endswith("bias") else ""
        for key, values in per_tensor.items():
            out.setdefault(f"{key}_{kind}", []).append(values[i])
    summary = {k: sum(v) / len(v) for k, v in out.items()}
    lora = [h for name, h in zip(names, per_tensor.get("H", []), strict=False) if "lora_" in name]
    if lora:
        summary["H_min_lora"] = min(lora)
    return summary


def block_summary(model, opt: HiSoOptimizer) -> dict[str, float]:
    """[`kind_summary`] of the learned curvature theta (and gamma) and of the preconditioner H."""
    info = opt.block_hessian()
    if info is None:
        return {}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    blocks = info["block_of"].tolist()
    keys = ("theta", "gamma", "hessian") if "gamma" in info else ("theta", "hessian")
    per_tensor = {"H" if k == "hessian" else k: [float(info[k][b]) for b in blocks] for k in keys}
    return kind_summary(names, per_tensor)


def score(record: dict) -> float:
    """Mean accuracy over the last two evaluations (one evaluation is noisy on 1,000 examples)."""
    return sum(e["accuracy"] for e in record["evals"][-2:]) / len(record["evals"][-2:])


def lr_label(record: dict) -> str:
    """`0.1`, `0.1w30` for a run with a 30-step warm-up, `0.1w30/role` with role blocks, `.../spread1` with a
    `curvature_spread` other than the default 0.75, `.../steps50` with `curvature_steps=50`, and for the oracle its
    target and freeze step (`0.1/energy/freeze50`)."""
    warmup = record.get("warmup", 0)
    label = f"{record['lr']:g}" + (f"w{warmup}" if warmup else "")
    label += "/role" if record.get("blocks") == "role" else ""
    label += "/trainer" if record.get("trainer") else ""
    spread = record.get("curvature", {}).get("spread", 0.75)
    label += f"/spread{spread:g}" if spread != 0.75 and record["method"] != "energy" else ""
    steps = record.get("curvature", {}).get("steps", 0)
    label += f"/steps{steps}" if steps else ""
    if record["method"] == "oracle":
        label += f"/{record.get('oracle_target', 'snr')}"
        label += f"/freeze{record['oracle_freeze']}" if record.get("oracle_freeze") else ""
    return label


def accuracy_within(record: dict, key: str, budget: float) -> float | None:
    """Accuracy at the last evaluation with `key` (steps or passes) within `budget`."""
    within = [e["accuracy"] for e in record["evals"] if e[key] <= budget]
    return within[-1] if within else None


def report(results_dir: Path) -> dict:
    """Prints the tables from the records under `results_dir` and returns them."""
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    print("accuracy after the last step, per lr (mean of the last two evaluations; * = best):")
    best = {}
    for method in METHODS:
        runs = sorted(by_method.get(method, []), key=lambda r: r["lr"])
        if not runs:
            continue
        best[method] = max(runs, key=score)
        cells = "  ".join(f"{lr_label(r)}:{score(r):.3f}{'*' if r is best[method] else ''}" for r in runs)
        print(f"  {method:7s} {cells}")
    if not best:
        return {}
    steps = max(e["step"] for r in best.values() for e in r["evals"])
    checkpoints = sorted({e["step"] for r in best.values() for e in r["evals"] if e["step"] > 0})
    budget = 6 * steps  # what plain ZO-SGD (P + 1 = 6 passes a step) spends in the run's steps
    target = score(best["head"]) if "head" in best else None
    print(
        "\n| method | lr | trainable | passes / step | "
        + " | ".join(f"acc @ step {c}" for c in checkpoints)
        + f" | acc @ {budget} passes | steps (passes) to head's {target if target is None else round(target, 3)} |"
    )
    print("|---|---|---|---|" + "---|" * len(checkpoints) + "---|---|")
    table = {}
    for method, r in best.items():
        last = r["evals"][-1]
        per_step = last["passes"] / max(last["step"], 1)
        at_steps = [accuracy_within(r, "step", c) for c in checkpoints]
        at_budget = accuracy_within(r, "passes", budget)
        hit = None if target is None else next((e for e in r["evals"] if e["accuracy"] >= target - 1e-12), None)
        reach = "not reached" if hit is None else f"{hit['step']} ({hit['passes']})"
        curv = {k: v for k, v in last.items() if k.startswith(("theta_", "gamma_", "H_"))}
        table[method] = {
            "lr": r["lr"],
            "at_steps": dict(zip(checkpoints, at_steps, strict=True)),
            "at_budget": at_budget,
            "reach_head": None if hit is None else {"step": hit["step"], "passes": hit["passes"]},
            "final_curvature": curv,
        }
        cells = " | ".join("-" if a is None else f"{a:.3f}" for a in at_steps)
        print(
            f"| {method} | {lr_label(r)} | {r['trainable']} | {per_step:.2f} | {cells} | "
            f"{'-' if at_budget is None else f'{at_budget:.3f}'} | {reach} |"
        )
    for method, r in best.items():
        curv = table[method]["final_curvature"]
        if curv:
            print(
                f"{method} lr {lr_label(r)}, end of run: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(curv.items()))
            )
    return table


def seed_report(dirs: list[Path]) -> dict:
    """Prints, for each configuration (method and `lr_label`) found in the records under `dirs`, the accuracy at each
    evaluation step as the mean over its seeds (per seed in brackets), the passes at the last step, and the first
    step at which the seed-mean curve reaches the head-alone run's seed-mean at its last step. Returns the table."""
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for d in dirs:
        for path in sorted(d.glob("*.json")):
            r = json.loads(path.read_text())
            if "evals" not in r or not r["evals"] or r["evals"][-1]["step"] < 300:
                continue  # a report file or a stopped run
            # Older records do not hold their seed: it is in the file name (`_s1`), seed 0 without one.
            found = re.search(r"_s(\d+)(?:_|\.json$)", path.name)
            seed = r.get("seed", int(found.group(1)) if found else 0)
            runs.setdefault((r["method"], lr_label(r)), {})[seed] = r
    table = {}
    for key, by_seed in sorted(runs.items()):
        seeds = sorted(by_seed)
        steps = [e["step"] for e in by_seed[seeds[0]]["evals"]]
        per_step = {}
        for i, step in enumerate(steps):
            accs = [by_seed[s]["evals"][i]["accuracy"] for s in seeds if len(by_seed[s]["evals"]) > i]
            per_step[step] = {"mean": sum(accs) / len(accs), "seeds": accs}
        passes = sum(by_seed[s]["evals"][-1]["passes"] for s in seeds) / len(seeds)
        table[key] = {"seeds": seeds, "accuracy": per_step, "passes": passes}
    head = next((v for (m, _), v in table.items() if m == "head" and len(v["seeds"]) > 1), None)
    target = None if head is None else head["accuracy"][max(head["accuracy"])]["mean"]
    print(f"seed-mean accuracy (per seed in brackets); target: head alone's seed mean at its last step = {target}")
    for (method, label), row in table.items():
        cells = "  ".join(
            f"{step}:{v['mean']:.3f}[{'/'.join(f'{a:.3f}' for a in v['seeds'])}]"
            for step, v in row["accuracy"].items()
            if step > 0
        )
        hits = [st for st, v in row["accuracy"].items() if target is not None and v["mean"] >= target]
        reach = hits[0] if hits else None
        row["reach_head"] = reach
        print(f"  {method:7s} {label:24s} seeds {row['seeds']} passes {row['passes']:.0f}  {cells}  reach {reach}")
    return {f"{m} {lbl}": v for (m, lbl), v in table.items()}


def run_trainer(args, model, train, val) -> dict:
    """The `energy` run through the product path: `HiSoTrainer` with `HiSoConfig` fields only (role blocks built by
    the trainer, `lr_scheduler_type="constant_with_warmup"`, the Trainer's own data order and evaluation with
    `build_compute_metrics`). Returns the record (evaluations every `--eval-every` steps)."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_hiso import HiSoConfig, HiSoTrainer
    from hf_hiso.metrics import build_compute_metrics

    record = {"method": args.method, "lr": args.lr, "warmup": args.warmup, "seed": args.seed, "trainer": True}
    record |= {"blocks": args.blocks, "evals": []}

    class Record(TrainerCallback):
        def on_evaluate(self, _args, state, control, metrics=None, **kwargs):
            entry = {"step": state.global_step, "passes": trainer.zo_forward_passes}
            entry |= {"accuracy": metrics["eval_accuracy"], "seconds": time.time() - t0}
            entry |= block_summary(model, trainer.zo_optimizer)
            record["evals"].append(entry)
            print(json.dumps(entry), flush=True)

    with tempfile.TemporaryDirectory() as out:
        config = HiSoConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=250,
            learning_rate=args.lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=args.warmup,
            eval_strategy="steps",
            eval_steps=args.eval_every,
            save_strategy="no",
            report_to="none",
            seed=args.seed,
            use_cpu=True,
            zo_num_directions=5,
            zo_eps=1e-3,
            zo_curvature=True,
            zo_curvature_target="energy",
            zo_curvature_blocks=args.blocks,
            zo_curvature_steps=args.curvature_steps,
        )
        trainer = HiSoTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_dict({k: v.tolist() for k, v in train.items()}),
            eval_dataset=Dataset.from_dict({k: v.tolist() for k, v in val.items()}),
            compute_metrics=build_compute_metrics(None, 2, backend="scikit-learn"),
            callbacks=[Record()],
        )
        t0 = time.time()
        trainer.train()
    est = trainer.zo_optimizer.curvature
    record["trainable"] = sum(p.numel() for p in trainer.zo_optimizer.params)
    record["curvature"] = {"floor": est.floor, "spread": est.spread, "every": est.every, "forget": est.forget}
    record["curvature"] |= {"target": est.target, "steps": est.steps, "blocks": est.num_blocks}
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=None, help="print the tables from the records in this folder")
    parser.add_argument("--seed-report", type=Path, nargs="+", default=None, help="mean over seeds per configuration")
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=0, help="linear lr warm-up over this many steps")
    parser.add_argument(
        "--blocks", choices=("tensor", "role"), default="tensor", help="curvature blocks: per tensor, or per role"
    )
    parser.add_argument("--spread", type=float, default=None, help="curvature_spread (default: the library's)")
    parser.add_argument("--floor", type=float, default=None, help="curvature_floor (default: the library's)")
    parser.add_argument(
        "--curvature-steps", type=int, default=0, help="curvature_steps: learn H on the first N curvature steps only"
    )
    parser.add_argument("--oracle-every", type=int, default=5, help="steps between the oracle's backprop updates")
    parser.add_argument(
        "--oracle-target",
        choices=("snr", "signal", "energy"),
        default="snr",
        help="the oracle's rule: the snr target (gamma / theta), gradient energy per entry (H_b ~ 1 / gamma_b) or per "
        "block (H_b ~ 1 / (n_b gamma_b))",
    )
    parser.add_argument("--oracle-freeze", type=int, default=0, help="the oracle's H stays fixed after this step")
    parser.add_argument(
        "--trainer", action="store_true", help="`energy` only: run through HiSoTrainer + HiSoConfig (the product path)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the run's record")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is about 5x faster than 2 on a busy 2-core machine)"
    )
    args = parser.parse_args(argv)
    if args.report is not None:
        return report(args.report)
    if args.seed_report is not None:
        return seed_report(args.seed_report)
    if args.method is None or args.lr is None:
        parser.error("--method and --lr are required (or --report DIR)")
    torch.set_num_threads(args.threads)

    model, train, val = load(args.max_length, args.val_size, args.seed)
    model = trainable_model(model, args.method)
    if args.trainer:
        if args.method != "energy":
            parser.error("--trainer runs the `energy` method only")
        record = run_trainer(args, model, train, val)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=1))
        return record
    opt = make_optimizer(
        args.method, model, args.lr, args.seed, args.floor, args.blocks, args.spread, args.curvature_steps
    )
    d = sum(p.numel() for p in opt.params)
    est = opt.curvature
    settings = (
        ""
        if est is None
        else f", {est.num_blocks} curvature blocks, floor {est.floor:g} spread {est.spread:g} every {est.every}"
    )
    print(
        f"# {args.method} lr {args.lr:g}: {d} trainable entries in {len(opt.params)} tensors, "
        f"{torch.get_num_threads()} threads{settings}",
        flush=True,
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_train = train["labels"].shape[0]
    record = {"method": args.method, "lr": args.lr, "warmup": args.warmup, "seed": args.seed, "trainable": d}
    record |= {"blocks": args.blocks, "evals": []}
    if est is not None:
        record["curvature"] = {"floor": est.floor, "spread": est.spread, "every": est.every, "forget": est.forget}
        record["curvature"] |= {"target": est.target, "steps": est.steps}
    oracle = Oracle(opt, args.seed, args.oracle_target) if args.method == "oracle" else None
    if oracle is not None:
        record["oracle_every"], record["oracle_target"] = args.oracle_every, args.oracle_target
        record["oracle_freeze"] = args.oracle_freeze
    passes, losses, t0 = 0, [], time.time()

    def evaluate(step: int) -> None:
        acc = accuracy(model, val)
        entry = {"step": step, "passes": passes, "accuracy": acc, "seconds": time.time() - t0}
        entry["train_loss"] = sum(losses[-50:]) / max(len(losses[-50:]), 1) if losses else None
        entry |= block_summary(model, opt) if oracle is None else oracle.summary(model)
        record["evals"].append(entry)
        print(json.dumps(entry), flush=True)

    evaluate(0)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, n_train, (args.batch_size,), generator=gen)
        batch = {k: v[idx] for k, v in train.items()}
        if args.warmup:
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, step / args.warmup)
        frozen = args.oracle_freeze and step > args.oracle_freeze
        if oracle is not None and (step - 1) % args.oracle_every == 0 and not frozen:
            oracle.update(lambda batch=batch: model(**batch).loss)
        loss = opt.step(lambda batch=batch: model(**batch).loss)
        passes += opt.last_forward_passes
        losses.append(float(loss))
        if step % args.eval_every == 0:
            evaluate(step)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))
    return record


if __name__ == "__main__":
    main()
    sys.exit(0)
