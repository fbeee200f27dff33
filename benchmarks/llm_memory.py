"""Peak memory of a HiSo step on SmolLM2-135M against a first-order `Trainer` step with AdamW.

Each configuration runs `trainer.train()` for a few steps in its own fresh subprocess, on the same model and batches
(the embedded SmolLM2-135M, tweets phrased as `"Tweet: {text}\\nSentiment:"` + label word, batch 16, at most 48 tokens,
the label-word loss). The peak RSS is reset right before `train()` (Linux `/proc/self/clear_refs`, then `VmHWM`), so
model loading does not hide the training peak. Reported per configuration: RSS with the model loaded, peak RSS during
`train()`, and the increase; then HiSo's peak and increase over AdamW's.

Configurations (full-parameter, 134.5 M trainable, unless named):
* `adamw`: `transformers.Trainer`, `optim="adamw_torch"`: gradients + two moment buffers (3 x 4 bytes per parameter)
  and the activations kept for backward.
* `hiso`: `HiSoTrainer`, P = 2, the preconditioner on: `H` and `H ** -0.5` (2 x 4 bytes per parameter); forward
  passes without autograd, directions regenerated tensor by tensor (one tensor-sized buffer).
* `zo_no_preconditioner`: `HiSoTrainer` with `zo_preconditioner=False` (DeComFL / MeZO memory: the model alone).
* `adamw_lora`, `hiso_lora`: LoRA r = 8 on q/v (0.46 M trainable), frozen base model.

Run `python benchmarks/llm_memory.py` (a few minutes on 2 CPU cores); `--quick` uses a tiny Llama built from a config
(the smoke test); `--output-json PATH` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# `common` sets the offline environment (HF_HUB_OFFLINE, ...) before it imports any Hugging Face library, so it is
# imported before transformers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import mib, peak_rss_during, run_child, short_run_kwargs, write_json  # noqa: E402

BATCH = 16
MAX_LENGTH = 48
NUM_DIRECTIONS = 2
CONFIGS = ("adamw", "hiso", "zo_no_preconditioner", "adamw_lora", "hiso_lora")
TEMPLATE = "Tweet: {text}\nSentiment:"
LABEL_WORDS = (" negative", " positive")


def _model_and_data(quick: bool, n: int):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_hiso.prompting import PromptTemplate, encode_label_words, tokenize_prompts

    if quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_prompting import tiny_llama, tiny_tokenizer, toy_texts

        tokenizer, model = tiny_tokenizer(), tiny_llama()
        template = PromptTemplate("Review: {text} . Sentiment:", LABEL_WORDS)
        raw = toy_texts(n)
    else:
        from hf_hiso.embedded import load_tweets_sentiment, smollm2_path

        path = smollm2_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        template = PromptTemplate(TEMPLATE, LABEL_WORDS)
        raw = load_tweets_sentiment()["train"].shuffle(seed=0).select(range(n))
        raw = Dataset.from_dict({"text": raw["text"], "label": raw["label"]})
    ids = encode_label_words(tokenizer, template.label_words)
    kwargs = {"tokenizer": tokenizer, "template": template, "label_word_ids": ids, "max_length": MAX_LENGTH}
    data = raw.map(tokenize_prompts, batched=True, fn_kwargs=kwargs, remove_columns=["text"])
    return model, tokenizer, data


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One `train()` of a few steps in this (fresh) process."""
    from transformers import Trainer, TrainingArguments

    from hf_hiso import HiSoConfig, HiSoTrainer
    from hf_hiso.prompting import LabelWordCollator

    torch.set_num_threads(spec["threads"])
    config, steps = spec["config"], spec["steps"]
    model, tokenizer, data = _model_and_data(spec["quick"], BATCH * steps)
    if config.endswith("_lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0))
    common = short_run_kwargs(BATCH, steps)
    collator = LabelWordCollator(tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        if config.startswith("adamw"):
            args = TrainingArguments(output_dir=tmp, learning_rate=1e-5, optim="adamw_torch", **common)
            trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
        else:
            args = HiSoConfig(
                output_dir=tmp,
                learning_rate=1e-6,
                zo_num_directions=NUM_DIRECTIONS,
                zo_preconditioner=config != "zo_no_preconditioner",
                **common,
            )
            trainer = HiSoTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
        t0 = time.perf_counter()
        memory = peak_rss_during(trainer.train)
        seconds = time.perf_counter() - t0
    return {
        **spec,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        **memory,
        "train_seconds": seconds,
    }


def run_config(config: str, quick: bool, steps: int, threads: int) -> dict[str, Any]:
    spec = {"config": config, "quick": quick, "steps": steps, "threads": threads}
    return run_child(__file__, "--child", spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny Llama from a config (smoke test)")
    parser.add_argument("--steps", type=int, default=2, help="Trainer steps per configuration")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}

    runs = {}
    for config in args.configs:
        runs[config] = run_config(config, args.quick, args.steps, args.threads)
        r = runs[config]
        print(
            f"{config:22s} trainable {r['trainable']:>11,d}  model loaded {mib(r['rss_before_bytes'])}  peak "
            f"{mib(r['peak_bytes'])}  increase {mib(r['increase_bytes'])}  ({r['train_seconds']:.0f} s for "
            f"{args.steps} steps)",
            flush=True,
        )
    ratios = {}
    for hiso, adamw in (
        ("hiso", "adamw"),
        ("zo_no_preconditioner", "adamw"),
        ("hiso_lora", "adamw_lora"),
    ):
        if hiso in runs and adamw in runs:
            ratios[f"{hiso}/{adamw}"] = {
                "peak": runs[hiso]["peak_bytes"] / runs[adamw]["peak_bytes"],
                "increase": runs[hiso]["increase_bytes"] / runs[adamw]["increase_bytes"],
            }
            print(
                f"{hiso}/{adamw}: peak RSS ratio {ratios[f'{hiso}/{adamw}']['peak']:.3f}, increase over the loaded "
                f"model ratio {ratios[f'{hiso}/{adamw}']['increase']:.3f}"
            )
    d = next(iter(runs.values()))["parameters"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{args.threads} threads",
        "batch": BATCH,
        "max_length": MAX_LENGTH,
        "num_directions": NUM_DIRECTIONS,
        "steps": args.steps,
        "runs": runs,
        "ratios": ratios,
        "analytical_bytes_full": {
            "parameters": 4 * d,
            "adamw_grads_and_moments": 3 * 4 * d,
            "hiso_hessian_and_scales": 2 * 4 * d,
        },
    }
    print(f"machine: {result['machine']}")
    if args.output_json:
        write_json(args.output_json, result)
    return result


if __name__ == "__main__":
    main()
