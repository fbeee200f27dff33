"""The HiSo `ClientApp`: a federation member that holds its data shard and a model replica, and sends only scalars.

Each `"train"` message carries the round's seeds and learning rate and the history of the rounds this client missed.
The client rebuilds the model and optimizer exactly as `HiSoTrainer` does (it builds a `HiSoTrainer`), restores the
replica it synchronised last time from the node's `Context`, replays the missed rounds (`protocol.replay`), stores
the synchronised replica back, runs `tau` local steps with the code `FederatedZOCallback` runs
([`~hf_hiso.callbacks.client_local_steps`]) and replies with its `(tau, P)` scalars.

What the node keeps between rounds (in `context.state`, local to the SuperNode, never sent): the trainable tensors of
`x_r`, the optimizer state (`H`), the round `r` it is synchronised to and the position of its batch stream.
"""

from __future__ import annotations

import copy
import io
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from transformers import TrainingArguments

from ..callbacks import ClientBatches, client_local_steps
from ..federated.partition import partition_dataset
from ..federated.protocol import replay
from ..hiso_trainer import HiSoTrainer
from ..zo_optimizer import HiSoOptimizer
from .messages import PARTITION_ID, RECORD, decode_train, encode_reply

logger = logging.getLogger(__name__)

STATE_RECORD = "hiso-client"

# Built trainers, per process, keyed by the client's token. Flower may hand a fresh copy of the ClientApp to every
# call (the simulation pickles it for each message), so an attribute would not survive between rounds.
_ENGINES: dict[str, _Engine] = {}


@dataclass
class _Engine:
    trainer: HiSoTrainer
    initial: dict[str, Any]
    lr_ratios: list[float]
    shards: dict[int, Any]


def replica_fingerprint(optimizer: HiSoOptimizer) -> list[float]:
    """Three float64 sums that identify a replica: of `x`, of `x ** 2` and of `H` (0 without a preconditioner)."""
    with torch.no_grad():
        s1 = sum(float(p.detach().double().sum()) for p in optimizer.params)
        s2 = sum(float(p.detach().double().square().sum()) for p in optimizer.params)
        hs = optimizer.hessian()
        s3 = sum(float(h.double().sum()) for h in hs) if hs is not None else 0.0
    return [s1, s2, s3]


def federated_shard(
    dataset: Any,
    client: int,
    num_clients: int,
    partition: str = "iid",
    *,
    dirichlet_alpha: float = 1.0,
    label_column: str | None = None,
    client_column: str | None = None,
    seed: int = 42,
) -> Any:
    """Client `client`'s shard of `dataset`, split exactly as [`FederatedZOCallback`] splits it (same defaults and
    seed), for simulations and tests where every node holds the whole data set."""
    if label_column is None and partition == "dirichlet":
        label_column = next((c for c in ("labels", "label") if c in dataset.column_names), "labels")
    shards = partition_dataset(
        dataset,
        num_clients,
        partition,
        dirichlet_alpha=dirichlet_alpha,
        label_column=label_column or "labels",
        client_column=client_column,
        seed=seed,
    )
    return shards[client]


class HiSoClient:
    r"""
    The client side of a HiSo federation on Flower.

    Args:
        model_fn: builds the model. Every party must get the same initial trainable parameters from it (load the same
            checkpoint; seed any freshly initialised head), since only updates travel.
        args ([`HiSoConfig`] or `TrainingArguments`): the same settings as the server's (zeroth-order settings, `seed`,
            `per_device_train_batch_size` = each client's batch).
        dataset_fn: `dataset_fn(context)` returns this node's training shard (a `datasets.Dataset`).
        client_id_fn: the client index the server knows this node by; default: `context.node_config["partition-id"]`.
        data_collator, processing_class: as for [`HiSoTrainer`].
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        args: TrainingArguments,
        dataset_fn: Callable[[Context], Any],
        *,
        client_id_fn: Callable[[Context], int] | None = None,
        data_collator: Any = None,
        processing_class: Any = None,
    ):
        self.model_fn = model_fn
        self.args = args
        self.dataset_fn = dataset_fn
        self.client_id_fn = client_id_fn or (lambda context: int(context.node_config[PARTITION_ID]))
        self.data_collator = data_collator
        self.processing_class = processing_class
        self.token = uuid.uuid4().hex

    # ---- the replica -------------------------------------------------------------------------------------------

    def _engine(self) -> _Engine:
        engine = _ENGINES.get(self.token)
        if engine is None:
            trainer = HiSoTrainer(
                model=self.model_fn(),
                args=self.args,
                data_collator=self.data_collator,
                processing_class=self.processing_class,
            )
            trainer.create_optimizer()
            opt = trainer.zo_optimizer
            if getattr(opt, "curvature", None) is not None:
                raise NotImplementedError("The curvature extension is not supported by the Flower apps yet.")
            base = self.args.learning_rate or 1.0
            engine = _Engine(
                trainer=trainer,
                initial=self._snapshot(opt, last_sync=0, batches=None),
                lr_ratios=[g["lr"] / base if self.args.learning_rate else 1.0 for g in opt.param_groups],
                shards={},
            )
            _ENGINES.clear()  # one model per process: a process may serve several simulated nodes in turn
            _ENGINES[self.token] = engine
        return engine

    @staticmethod
    def _snapshot(opt: HiSoOptimizer, last_sync: int, batches: dict | None) -> dict[str, Any]:
        return {
            "params": [p.detach().cpu().clone() for p in opt.params],
            # A deep copy: `state_dict()` returns the live preconditioner tensors, which replays update in place.
            "optimizer": copy.deepcopy(opt.state_dict()),
            "last_sync": last_sync,
            "batches": batches,
        }

    @staticmethod
    def _restore(opt: HiSoOptimizer, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, saved in zip(opt.params, state["params"], strict=True):
                p.copy_(saved.to(p.device))
        # `load_state_dict` may keep the given tensors; the snapshot must stay as it was.
        opt.load_state_dict(copy.deepcopy(state["optimizer"]))
        opt.pending = []

    @staticmethod
    def _load_state(context: Context) -> dict[str, Any] | None:
        record = context.state.config_records.get(STATE_RECORD)
        if record is None:
            return None
        return torch.load(io.BytesIO(record["blob"]), weights_only=True)

    @staticmethod
    def _save_state(context: Context, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        context.state.config_records[STATE_RECORD] = ConfigRecord({"blob": buffer.getvalue()})

    def _batches(self, engine: _Engine, context: Context, client: int, position: dict | None) -> ClientBatches:
        if client not in engine.shards:
            trainer = engine.trainer
            # The Trainer drops the columns the model's forward does not take before collating; so does the callback.
            shard = trainer._remove_unused_columns(self.dataset_fn(context), description="training")
            engine.shards[client] = shard
        batches = ClientBatches(
            engine.shards[client],
            engine.trainer.data_collator,
            self.args.per_device_train_batch_size,
            self.args.seed,
            client,
        )
        if position is not None:
            batches.load_state_dict(position)
        return batches

    # ---- message handlers ---------------------------------------------------------------------------------------

    def train(self, message: Message, context: Context) -> Message:
        """Catch up, store the synchronised replica, run the local steps, reply with the scalars."""
        engine = self._engine()
        trainer, opt = engine.trainer, engine.trainer.zo_optimizer
        client = self.client_id_fn(context)
        instruction = decode_train(message.content, opt.num_directions)
        if instruction.directions is not None and instruction.directions != opt.source.name:
            raise ValueError(
                f"The server's seeds stand for {instruction.directions!r} directions but client {client} draws "
                f"{opt.source.name!r}: set the same `zo_generator` and `zo_distribution` on the server and on every "
                "client."
            )
        state = self._load_state(context) or engine.initial
        self._restore(opt, state)
        last_sync = int(state["last_sync"])
        if last_sync > instruction.round_idx:
            raise RuntimeError(
                f"Client {client} is synchronised to round {last_sync} but was asked to train round "
                f"{instruction.round_idx}: a stale message."
            )
        # The server's record of what this client holds may lag behind (a reply that timed out after the client had
        # caught up), so rounds the client has already applied are skipped; the rest must follow on without a gap.
        history = [h for h in instruction.history(engine.lr_ratios) if h.round_idx >= last_sync]
        expected = list(range(last_sync, instruction.round_idx))
        if [h.round_idx for h in history] != expected:
            raise RuntimeError(
                f"Client {client} holds round {last_sync} and needs rounds {expected} to catch up, but the server "
                f"sent {[h.round_idx for h in history]}."
            )
        replay(opt, history)
        for group, ratio in zip(opt.param_groups, engine.lr_ratios, strict=True):
            group["lr"] = instruction.lr * ratio
        batches = self._batches(engine, context, client, state["batches"])
        synced = self._snapshot(opt, last_sync=instruction.round_idx, batches=None)
        fingerprint = replica_fingerprint(opt) if message.content.config_records[RECORD].get("verify") else None
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            scalars, loss = client_local_steps(trainer, model, batches, instruction.seeds)
        finally:
            model.train(was_training)
        # The local trajectory is discarded: the node keeps x_r and will rebuild x_{r+1} from the aggregate.
        synced["batches"] = batches.state_dict()
        self._restore(opt, synced)
        self._save_state(context, synced)
        return Message(encode_reply(instruction.round_idx, scalars, float(loss), fingerprint), reply_to=message)

    def query(self, message: Message, context: Context) -> Message:
        """Node discovery: which client (partition) this node is. Builds the model too, so that a node that cannot
        build it fails here, and the first round's timeout is not spent loading it."""
        self._engine()
        content = RecordDict({RECORD: ConfigRecord({PARTITION_ID: self.client_id_fn(context)})})
        return Message(content, reply_to=message)


# Clients built by a factory, per process: `(factory, run_id) -> HiSoClient`, so a process that serves several
# rounds (a simulation's Ray actor) builds its model once per run.
_CLIENTS: dict[tuple[str, int], HiSoClient] = {}


def make_client_app(client: HiSoClient | Callable[[Context], HiSoClient]) -> ClientApp:
    """A Flower `ClientApp` running `client` for `"train"` and `"query"` messages. `client` may be a factory,
    `client(context)`, that reads `context.run_config` (`[tool.flwr.app.config]`); its result is kept per run in the
    process."""
    app = ClientApp()

    def resolve(context: Context) -> HiSoClient:
        if isinstance(client, HiSoClient):
            return client
        key = (f"{getattr(client, '__module__', '')}.{getattr(client, '__qualname__', repr(client))}", context.run_id)
        if key not in _CLIENTS:
            _CLIENTS.clear()
            _CLIENTS[key] = client(context)
        return _CLIENTS[key]

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        return resolve(context).train(message, context)

    @app.query()
    def _query(message: Message, context: Context) -> Message:
        return resolve(context).query(message, context)

    return app
