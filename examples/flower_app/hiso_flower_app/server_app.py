"""The ServerApp: the SuperLink runs it; it owns the round plan, aggregation, history and ledger."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from flwr.app import Context

from hf_hiso.flower import HiSoStrategy, make_server_app

from .task import collator, load_splits, make_args, make_model, tokenize

logger = logging.getLogger(__name__)


def build_strategy(context: Context, config: dict | None = None) -> HiSoStrategy:
    config = context.run_config if config is None else config
    args = make_args(config)
    return HiSoStrategy(
        args,
        int(config["num-server-rounds"]),
        int(config["num-clients"]),
        int(config["clients-per-round"]),
        int(config["local-steps"]),
        replica_model=make_model(args.seed),
        verify_replicas=bool(config["verify-replicas"]),
    )


@torch.no_grad()
def accuracy(model, config: dict) -> float:
    data = tokenize(load_splits(int(config["seed"]))["validation"], int(config["max-length"]))
    data = data.remove_columns([c for c in data.column_names if c not in ("input_ids", "attention_mask", "label")])
    collate, correct = collator(), 0
    model.eval()
    for start in range(0, len(data), 256):
        batch = collate([data[i] for i in range(start, min(start + 256, len(data)))])
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


def finish(strategy: HiSoStrategy, result, context: Context, config: dict | None = None) -> None:
    config = context.run_config if config is None else config
    out = str(config["output-dir"])
    os.makedirs(out, exist_ok=True)
    model = strategy.replica.model
    summary = strategy.communication_summary()
    summary["validation_accuracy"] = accuracy(model, config)
    summary["losses"] = [float(x) for x in np.asarray(strategy.losses)]
    model.save_pretrained(out)
    with open(os.path.join(out, "federation_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info(f"HiSo federation finished: {json.dumps({k: v for k, v in summary.items() if k != 'losses'})}")


app = make_server_app(
    build_strategy, timeout=lambda context: float(context.run_config["round-timeout"]), on_finish=finish
)
