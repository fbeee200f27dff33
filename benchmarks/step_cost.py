"""Cost of one HiSo zeroth-order step against its forward-pass floor, and peak memory against AdamW.

What it measures (packaged all-MiniLM-L6-v2 as `AutoModelForSequenceClassification`, 2 labels, batch 16, max length
32, real tweets from `hf_hiso.embedded.load_tweets_sentiment`, P = 5, forward difference, HiSo defaults otherwise):

1. **Step cost.** The work the Trainer does per optimizer step, `HiSoTrainer.training_step` + `optimizer.step()` +
   `lr_scheduler.step()`, divided by the time of the step's `P + 1` forward passes (the same `compute_loss` closure on
   the same batch, eval mode, no autograd) measured in the same process: the *floor*. Also the share of the step spent
   drawing random directions: the time of `iter_direction` over all trainable tensors for `P` directions, times the
   generations per step (3 without the direction cache: perturb, restore, update; 1 with it), over the step time.
   Full-parameter and LoRA (r = 8 on query/value, head as module to save), each with `zo_cache_directions` False and
   True. The measurements are interleaved (floor, no cache, cache, generation; order rotated every repetition) and
   every ratio is formed within one repetition, so slow phases of a shared machine hit numerator and denominator alike.
2. **Peak memory.** The peak RSS increase of `trainer.train()` (a few steps) of a `HiSoTrainer` over that of a stock
   `transformers.Trainer` with AdamW, same model and batch, each configuration in its own subprocess (Linux peak-RSS
   reset through `/proc/self/clear_refs` right before `train()`, then `VmHWM`). Also the analytical extra memory.

Run `python benchmarks/step_cost.py` (a few minutes on 2 idle CPU cores); `--quick` uses a tiny BERT built from a
config and random token ids (the smoke test); `--output-json PATH` writes every figure; `--threads N` sets
`torch.set_num_threads` (default: torch's own); `--baseline-estimators OLD.py` also times (and, for memory, runs) every
HiSo configuration with another version of `hf_hiso/zo_estimators.py`, for before/after figures from one process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

# `common` sets the offline environment (HF_HUB_OFFLINE, ...) before it imports any Hugging Face library, so it is
# imported before transformers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import mib, peak_rss_during, run_child, short_run_kwargs  # noqa: E402
from step_baselines import AdamWStep, MeZOStep  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_hiso import HiSoConfig, HiSoTrainer, zo_optimizer  # noqa: E402
from hf_hiso.zo_estimators import iter_direction  # noqa: E402

BATCH = 16
MAX_LENGTH = 32
NUM_DIRECTIONS = 5
SETUPS = ("full", "lora")
MEMORY_RUNS = (("adamw", False), ("hiso", False), ("hiso", True))


# ---- model and data ------------------------------------------------------------------------------------------------


def load_model(quick: bool, setup: str) -> torch.nn.Module:
    """MiniLM (or, with `quick`, a tiny BERT from a config) with a fresh 2-label head; `setup="lora"` wraps it in
    LoRA r = 8 on query/value with the head as module to save."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" load report is expected
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if quick:
        config = BertConfig(
            vocab_size=256,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=MAX_LENGTH,
            num_labels=2,
        )
        model = BertForSequenceClassification(config)
    else:
        from hf_hiso.embedded import minilm_path

        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    if setup == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        model = get_peft_model(model, lora)
    return model


def load_examples(quick: bool, n: int) -> dict[str, list]:
    """`n` examples, tokenized to `MAX_LENGTH`: real tweets for MiniLM, random token ids for the tiny model."""
    if quick:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, 256, (n, MAX_LENGTH), generator=g)
        return {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * MAX_LENGTH] * n,
            "labels": torch.randint(0, 2, (n,), generator=g).tolist(),
        }
    from transformers import AutoTokenizer

    from hf_hiso.embedded import load_tweets_sentiment, minilm_path

    train = load_tweets_sentiment(seed=0)["train"].select(range(n))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    enc = tokenizer(list(train["text"]), padding="max_length", truncation=True, max_length=MAX_LENGTH)
    return {**{k: list(v) for k, v in enc.items()}, "labels": list(train["label"])}


def batch_of(examples: dict[str, list], start: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v[start : start + BATCH]) for k, v in examples.items()}


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def hiso_config(output_dir: str, cache: bool, max_steps: int, **overrides: Any) -> HiSoConfig:
    return HiSoConfig(
        output_dir=output_dir,
        learning_rate=1e-6,  # the parameters' values do not change the cost; keep them near the start
        **short_run_kwargs(BATCH, max_steps),
        zo_num_directions=NUM_DIRECTIONS,
        zo_difference="forward",
        zo_cache_directions=cache,
        **overrides,
    )


# ---- 1. step cost ----------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def load_baseline(path: str) -> ModuleType:
    """Another version of `hf_hiso/zo_estimators.py` (e.g. `git show HEAD:hf_hiso/zo_estimators.py > old.py`), to time
    the current one against it in the same process."""
    spec = importlib.util.spec_from_file_location("baseline_zo_estimators", path)
    module = importlib.util.module_from_spec(spec)
    # Relative imports of the file (`from .zo_random import ...`) resolve in the installed package.
    module.__package__ = "hf_hiso"
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def estimators(module: ModuleType | None) -> Iterator[None]:
    """Runs `HiSoOptimizer` with the estimator functions of `module` (the baseline) instead of the current ones."""
    if module is None:
        yield
        return
    names = ("directional_scalars", "aggregated_directions")
    saved = {name: getattr(zo_optimizer, name) for name in names}
    try:
        for name in names:
            setattr(zo_optimizer, name, getattr(module, name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(zo_optimizer, name, fn)


OLD_GENERATOR = "cpu"  # the default generator of versions up to 0.1, timed beside the current default


def measure_cost(
    quick: bool, setup: str, reps: int, workdir: str, baseline: ModuleType | None = None
) -> dict[str, Any]:
    """Interleaved timings of the floor, the step without and with the direction cache (current default generator and
    the old one), direction generation, MeZO's own step, a stock AdamW step and, with a `baseline` estimator module,
    the HiSo steps with it."""
    model = load_model(quick, setup)
    batch = batch_of(load_examples(quick, BATCH))
    variants = [(False, None, None), (True, None, None), (False, None, OLD_GENERATOR), (True, None, OLD_GENERATOR)]
    variants += [(False, baseline, None), (True, baseline, None)] if baseline else []
    trainers = {}
    for cache, module, generator in variants:
        name = f"{setup}-{cache}-{module is None}-{generator}"
        overrides = {"zo_generator": generator} if generator else {}
        if module is not None and "counter" not in getattr(module, "GENERATORS", ()):
            overrides = {"zo_generator": OLD_GENERATOR}
        args = hiso_config(os.path.join(workdir, name), cache, max_steps=10_000, **overrides)
        trainer = HiSoTrainer(model=model, args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        if module is not None:
            trainer.zo_optimizer.source = module.DirectionSource(
                generator=trainer.zo_optimizer.source.generator, cache=cache
            )
        # Set by the Trainer's loop before each optimizer step; one micro-batch per step here.
        trainer.current_gradient_accumulation_steps = 1
        trainers[cache, module is not None, generator] = trainer
    opt = trainers[False, False, None].zo_optimizer
    params = opt.params

    def zo_step(trainer: HiSoTrainer, module: ModuleType | None = None) -> None:
        with estimators(module):
            trainer.training_step(model, batch)
            trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()

    floor_loss = trainers[False, False, None].zo_loss_fn(model, trainers[False, False, None]._prepare_inputs(batch))
    # The parameters' values do not change the cost: tiny learning rates keep them near the start.
    mezo = MeZOStep(model, floor_loss, lr=1e-12)
    adamw = AdamWStep(model, floor_loss, lr=1e-12)

    def floor() -> None:
        model.eval()
        with torch.no_grad():
            for _ in range(NUM_DIRECTIONS + 1):
                floor_loss()
        model.train()

    def generate(generator: str) -> None:
        # The random draws of P directions, without the preconditioner's scaling: what the cache saves.
        for index in range(NUM_DIRECTIONS):
            for _ in iter_direction(params, seed=12345, index=index, generator=generator):
                pass

    tasks = {
        "floor": floor,
        "step_nocache": lambda: zo_step(trainers[False, False, None]),
        "step_cache": lambda: zo_step(trainers[True, False, None]),
        "step_nocache_old_generator": lambda: zo_step(trainers[False, False, OLD_GENERATOR]),
        "step_cache_old_generator": lambda: zo_step(trainers[True, False, OLD_GENERATOR]),
        "generate": lambda: generate(opt.source.generator),
        "generate_old_generator": lambda: generate(OLD_GENERATOR),
        "mezo_step": mezo.step,
        "adamw_step": adamw.step,
    }
    if baseline is not None:
        tasks["step_nocache_baseline"] = lambda: zo_step(trainers[False, True, None], baseline)
        tasks["step_cache_baseline"] = lambda: zo_step(trainers[True, True, None], baseline)
    names = list(tasks)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps + 1):  # repetition 0 is the warm-up
        order = names[rep % len(names) :] + names[: rep % len(names)]
        sample = {name: timed(tasks[name]) for name in order}
        if rep > 0:
            for name in names:
                times[name].append(sample[name])
    out: dict[str, Any] = {"trainable": trainable_count(model), "seconds": {k: spread(v) for k, v in times.items()}}
    numbers = NUM_DIRECTIONS * trainable_count(model)
    for suffix in ("", "_old_generator"):
        out["ns_per_number" + suffix] = spread([g / numbers * 1e9 for g in times["generate" + suffix]])
        for cache, generations in ((False, 3), (True, 1)):
            key = ("step_cache" if cache else "step_nocache") + suffix
            steps, floors, gens = times[key], times["floor"], times["generate" + suffix]
            out[key] = {
                "over_floor": spread([s / f for s, f in zip(steps, floors, strict=True)]),
                "generation_share": spread([generations * g / s for g, s in zip(gens, steps, strict=True)]),
                "generations_per_direction": generations,
            }
    # MeZO's floor is its 2 forward passes, AdamW's its 1 forward pass (backward and update are its overhead).
    forward = [f / (NUM_DIRECTIONS + 1) for f in times["floor"]]
    out["mezo_step"] = {"over_floor": spread([m / (2 * f) for m, f in zip(times["mezo_step"], forward, strict=True)])}
    out["adamw_step"] = {"over_forward": spread([a / f for a, f in zip(times["adamw_step"], forward, strict=True)])}
    out["step_nocache"]["over_mezo"] = spread(
        [s / m for s, m in zip(times["step_nocache"], times["mezo_step"], strict=True)]
    )
    if baseline is not None:
        for key in ("step_nocache", "step_cache"):
            base = times[f"{key}_baseline"]
            out[f"{key}_baseline"] = {"over_floor": spread([b / f for b, f in zip(base, times["floor"], strict=True)])}
            out[key]["over_baseline"] = spread([s / b for s, b in zip(times[key], base, strict=True)])
    out["forward_s"] = spread([f / (NUM_DIRECTIONS + 1) for f in times["floor"]])
    return out


# ---- 2. peak memory --------------------------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Wall time from `on_step_begin` to `on_step_end`: the Trainer's own step, data loading excluded."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One `train()` of a few steps in this (fresh) process; returns the peak RSS increase in bytes."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    quick, setup, method, cache, steps = spec["quick"], spec["setup"], spec["method"], spec["cache"], spec["steps"]
    torch.set_num_threads(spec["threads"])
    if spec.get("baseline"):
        # This process runs only this configuration, so the baseline estimators can replace the current ones outright.
        module = load_baseline(spec["baseline"])
        for name in ("directional_scalars", "aggregated_directions", "DirectionSource"):
            setattr(zo_optimizer, name, getattr(module, name))
    model = load_model(quick, setup)
    data = Dataset.from_dict(load_examples(quick, BATCH * steps))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        if method == "adamw":
            args = TrainingArguments(
                output_dir=tmp, learning_rate=1e-5, optim="adamw_torch", **short_run_kwargs(BATCH, steps)
            )
            trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        else:
            args = hiso_config(tmp, cache, max_steps=steps)
            trainer = HiSoTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        memory = peak_rss_during(trainer.train)
    return {
        **spec,
        "trainable": trainable_count(model),
        **memory,
        "train_step_s": statistics.median(timer.seconds[1:] or timer.seconds),
    }


def measure_memory(quick: bool, setup: str, steps: int, baseline: str | None = None) -> dict[str, Any]:
    configs = [(method, cache, None) for method, cache in MEMORY_RUNS]
    if baseline:
        configs += [("hiso", cache, baseline) for cache in (False, True)]
    runs = {}
    for method, cache, base in configs:
        spec = {
            "quick": quick,
            "setup": setup,
            "method": method,
            "cache": cache,
            "steps": steps,
            "threads": torch.get_num_threads(),
            "baseline": base,
        }
        name = "adamw" if method == "adamw" else f"hiso_cache={cache}" + (" baseline" if base else "")
        runs[name] = run_child(__file__, "--memory-child", spec)
    adamw = runs["adamw"]["increase_bytes"]
    d = runs["adamw"]["trainable"]
    return {
        "runs": runs,
        "increase_over_adamw": {k: v["increase_bytes"] / adamw for k, v in runs.items() if k != "adamw"},
        "peak_over_adamw": {k: v["peak_bytes"] / runs["adamw"]["peak_bytes"] for k, v in runs.items()},
        "analytical_bytes": {
            "hiso_hessian": 4 * d,
            "hiso_scales": 0,  # H ** -0.5 is computed from H when read (hf_hiso.zo_estimators.InverseSqrt)
            "hiso_direction_cache": 4 * NUM_DIRECTIONS * d,
            "adamw_state_and_grads": 3 * 4 * d,
        },
    }


# ---- report ----------------------------------------------------------------------------------------------------


def fmt(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model from a config, 2 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions after the warm-up (default 7)")
    parser.add_argument("--memory-steps", type=int, default=None, help="train() steps per memory run (default 4)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)"
    )
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--baseline-estimators",
        default=None,
        help="path of another zo_estimators.py to time against the current one, interleaved in the same process",
    )
    parser.add_argument("--output-json", default=None, help="write all figures to this file")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 7)
    memory_steps = args.memory_steps or (2 if args.quick else 4)

    result: dict[str, Any] = {
        "model": "tiny BERT from config" if args.quick else "all-MiniLM-L6-v2 (hf_hiso.embedded.minilm_path)",
        "data": "random token ids" if args.quick else "tweets (hf_hiso.embedded.load_tweets_sentiment), train split",
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "num_directions": NUM_DIRECTIONS,
        "difference": "forward",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "reps": reps,
        "cost": {},
        "memory": {},
    }
    print(f"# {result['model']}, {result['data']}; batch {BATCH}, max length {MAX_LENGTH}, P = {NUM_DIRECTIONS}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} repetitions after a warm-up")
    baseline = load_baseline(args.baseline_estimators) if args.baseline_estimators else None
    result["baseline_estimators"] = args.baseline_estimators
    if not args.skip_cost:
        with tempfile.TemporaryDirectory() as workdir:
            for setup in args.setups:
                cost = result["cost"][setup] = measure_cost(args.quick, setup, reps, workdir, baseline)
                sec = cost["seconds"]
                print(f"\n## step cost, {setup} ({cost['trainable']:,} trainable), median [min, max]")
                print(f"forward pass            {fmt(cost['forward_s'], 3)} s")
                print(f"floor (P+1 forwards)    {fmt(sec['floor'], 3)} s")
                print(
                    f"P directions drawn      {fmt(sec['generate'], 3)} s ({fmt(cost['ns_per_number'])} ns a number); "
                    f"old generator {fmt(sec['generate_old_generator'], 3)} s "
                    f"({fmt(cost['ns_per_number_old_generator'])} ns)"
                )
                print(
                    f"MeZO's step (P = 1, central) {fmt(sec['mezo_step'], 3)} s, step / 2 forwards "
                    f"{fmt(cost['mezo_step']['over_floor'])}; HiSo no cache / MeZO "
                    f"{fmt(cost['step_nocache']['over_mezo'])}"
                )
                print(
                    f"AdamW step (fwd + bwd + step) {fmt(sec['adamw_step'], 3)} s, "
                    f"step / forward {fmt(cost['adamw_step']['over_forward'])}"
                )
                for key, label in (
                    ("step_nocache", "cache_directions=False"),
                    ("step_cache", "cache_directions=True"),
                    ("step_nocache_old_generator", f"  {OLD_GENERATOR!r}, no cache"),
                    ("step_cache_old_generator", f"  {OLD_GENERATOR!r}, cache"),
                ):
                    print(
                        f"{label:23s} step {fmt(sec[key], 3)} s, step / floor {fmt(cost[key]['over_floor'])}, "
                        f"generation share {fmt(cost[key]['generation_share'])}"
                    )
                    if baseline is not None and key + "_baseline" in sec:
                        print(
                            f"{'  baseline estimators':23s} step {fmt(sec[key + '_baseline'], 3)} s, step / floor "
                            f"{fmt(cost[key + '_baseline']['over_floor'])}; current / baseline "
                            f"{fmt(cost[key]['over_baseline'])}"
                        )
    if not args.skip_memory:
        for setup in args.setups:
            mem = result["memory"][setup] = measure_memory(args.quick, setup, memory_steps, args.baseline_estimators)
            runs = mem["runs"]
            trainable = runs["adamw"]["trainable"]
            print(f"\n## peak memory of train() ({memory_steps} steps), {setup} ({trainable:,} trainable)")
            for name, run in runs.items():
                ratio = "" if name == "adamw" else f"  increase / AdamW {mem['increase_over_adamw'][name]:.2f}"
                print(
                    f"{name:25s} peak RSS increase {mib(run['increase_bytes'])}  (peak {mib(run['peak_bytes'])}, "
                    f"peak / AdamW {mem['peak_over_adamw'][name]:.2f}){ratio}  train() step {run['train_step_s']:.3f}s"
                )
            ana = mem["analytical_bytes"]
            print(
                f"analytical: H {mib(ana['hiso_hessian'])}, H^-1/2 {mib(ana['hiso_scales'])}, direction cache "
                f"{mib(ana['hiso_direction_cache'])} (P x d x 4 B); AdamW moments + grads "
                f"{mib(ana['adamw_state_and_grads'])}"
            )
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.output_json}")
    return result


if __name__ == "__main__":
    main()
