"""Tiny models and data built from configs: no Hub download anywhere in the test suite."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from hf_hiso import HiSoConfig  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads make them ~10x slower.
torch.set_num_threads(1)

VOCAB = 64


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def toy_dataset(n: int = 32, seq_len: int = 8, seed: int = 0) -> Dataset:
    """Token sequences whose label is whether token 1 appears: learnable by a tiny model."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (n, seq_len), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    ids[labels == 1, 0] = 1
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq_len] * n, "labels": labels.tolist()}
    )


@pytest.fixture
def tiny_model():
    return tiny_bert()


@pytest.fixture
def toy_data():
    return toy_dataset()


def hiso_args(tmp_path, **overrides) -> HiSoConfig:
    defaults = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-2,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    defaults.update(overrides)
    return HiSoConfig(**defaults)
