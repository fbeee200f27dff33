"""`HiSoStrategy`: the server side of a HiSo federation as a Flower `Strategy`.

The strategy owns the federated module's `FederatedServer` (sampler, seeds, each client's synchronisation point, the
history) and `CommunicationLedger`, and Flower's own `Strategy.start` loop drives the rounds: `configure_train`
plans a round and sends every sampled client only its seeds, the round's learning rate and the rounds it missed;
`aggregate_train` averages the `(tau, P)` scalars that came back (`protocol.aggregate`), closes the round and counts
its bytes, both as the ledger's wire format declares them and as Flower serialised them. No `ArrayRecord` is ever
sent: the `arrays` that `Strategy.start` threads through the rounds stay empty.

A client that does not answer within `start(timeout=...)` (down, disconnected, slow) is left out of the round, which
proceeds with the others. The server only marks clients that replied as synchronised, so a client that comes back is
sent every round since the last one it is known to hold; it skips those it had already applied (a reply lost after
it caught up) and replays the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.result import Result
from torch import nn
from transformers import TrainingArguments, get_scheduler

from ..federated.ledger import CommunicationLedger, WireFormat
from ..federated.protocol import AGGREGATIONS, FederatedServer, RoundPlan, RoundRecord, aggregate, apply_round
from ..hiso_config import ZOArguments
from .messages import PARTITION_ID, RECORD, decode_reply, encode_train, message_bytes

logger = logging.getLogger(__name__)


def round_learning_rates(args: TrainingArguments, num_rounds: int) -> list[float]:
    """The learning rate of each round under `args`' schedule: what `HiSoTrainer`'s scheduler gives at step `r` of a
    `max_steps = num_rounds` run (one Trainer step is one round), computed from the same `get_scheduler` call."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=dummy,
        num_warmup_steps=args.get_warmup_steps(num_rounds),
        num_training_steps=num_rounds,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        raise ValueError(
            f"`lr_scheduler_type={args.lr_scheduler_type!r}` is not a function of the step alone; the HiSo Flower "
            "server needs one (e.g. 'linear', 'cosine', 'constant', 'constant_with_warmup')."
        )
    # LambdaLR computes `base_lr * lambda(step)`; the same product gives the same float as the Trainer's scheduler.
    return [args.learning_rate * lambdas[0](r) for r in range(num_rounds)]


@dataclass
class _OpenRound:
    plan: RoundPlan
    lr: float
    sent: dict[int, int]  # node id -> client
    missed: dict[int, int]  # client -> rounds it had to catch up on
    absent: list[int]
    bytes_downlink: int
    expected_fingerprint: list[float] | None = None
    fingerprints: dict[int, list[float]] = field(default_factory=dict)


class HiSoStrategy(Strategy):
    r"""
    HiSo's federated protocol (ALGORITHM.md, section 3) as a Flower strategy whose messages carry only seeds, learning
    rates and scalars.

    Args:
        args ([`HiSoConfig`] or `TrainingArguments`): the federation's settings, the same object the clients use:
            `learning_rate` and its schedule (`lr_scheduler_type`, warm-up) over `num_rounds`, `seed` (sampler and
            seeds, as in [`FederatedZOCallback`]) and the zeroth-order settings (`zo_num_directions`).
        num_rounds: rounds to run (the schedule's length).
        num_clients, clients_per_round, local_steps, aggregation, trim_ratio, wire_format, history_retention: as for
            [`FederatedZOCallback`].
        seed: the server's seed (default `args.seed`).
        replica_model: optional model (built like the clients') that the server keeps up to date from the
            aggregates: the trained model at the end, and the reference for `verify_replicas`.
        num_trainable_params: `d` for the ledger's FedAvg comparison; taken from `replica_model` when given.
        verify_replicas: ask every client for a fingerprint of the replica it holds at the round start (24 more
            bytes up) and count mismatches with the server's replica and between clients.
        min_available_nodes: nodes to wait for before the first round (default `num_clients`).
        node_wait_timeout: seconds to wait for them; the run starts with those connected by then.
        query_timeout: seconds to wait for a new node to say which client it is.
    """

    def __init__(
        self,
        args: TrainingArguments,
        num_rounds: int,
        num_clients: int = 6,
        clients_per_round: int = 2,
        local_steps: int = 1,
        *,
        aggregation: str = "mean",
        trim_ratio: float = 0.1,
        seed: int | None = None,
        wire_format: WireFormat | None = None,
        history_retention: str = "needed",
        replica_model: nn.Module | None = None,
        num_trainable_params: int | None = None,
        verify_replicas: bool = False,
        min_available_nodes: int | None = None,
        node_wait_timeout: float = 600.0,
        query_timeout: float = 120.0,
    ):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}")
        if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"`num_rounds` must be an integer >= 1, got {num_rounds!r}")
        self.args = args
        self.num_rounds = num_rounds
        self.aggregation = aggregation
        self.trim_ratio = trim_ratio
        self.verify_replicas = verify_replicas
        self.min_available_nodes = num_clients if min_available_nodes is None else min_available_nodes
        self.node_wait_timeout = node_wait_timeout
        self.query_timeout = query_timeout
        zo_args = ZOArguments.from_args(args)
        self.num_directions = zo_args.zo_num_directions
        # Sent with every round: a client drawing other directions would apply updates that are not the server's.
        self.directions = f"{zo_args.zo_generator}/{zo_args.zo_distribution}"
        self.server = FederatedServer(
            num_clients,
            clients_per_round,
            local_steps,
            seed=args.seed if seed is None else seed,
            history_retention=history_retention,
        )
        self.learning_rates = round_learning_rates(args, num_rounds)
        self.replica = None
        self.replica_lr_ratios: list[float] = []
        if replica_model is not None:
            from ..hiso_trainer import HiSoTrainer

            self.replica = HiSoTrainer(model=replica_model, args=args)
            self.replica.create_optimizer()
            if getattr(self.replica.zo_optimizer, "curvature", None) is not None:
                raise NotImplementedError("The curvature extension is not supported by the Flower apps yet.")
            base = args.learning_rate
            self.replica_lr_ratios = [g["lr"] / base if base else 1.0 for g in self.replica.zo_optimizer.param_groups]
            num_trainable_params = sum(p.numel() for p in self.replica.zo_optimizer.params)
        if num_trainable_params is None:
            logger.warning("HiSoStrategy: `num_trainable_params` unknown, the ledger's FedAvg comparison will be 0.")
        self.ledger = CommunicationLedger(
            num_trainable_params=num_trainable_params or 0,
            num_directions=self.num_directions,
            local_steps=local_steps,
            wire=wire_format or WireFormat(),
        )
        self.client_nodes: dict[int, int] = {}
        self.flower_bytes = {"downlink": 0, "uplink": 0, "discovery": 0}
        self.round_metrics: list[dict[str, float]] = []
        self.replica_mismatches = 0
        self.failed_replies = 0
        self.losses: list[float] = []
        self._open: _OpenRound | None = None
        self._waited = False

    @property
    def local_steps(self) -> int:
        return self.server.local_steps

    @property
    def replica_optimizer(self):
        return None if self.replica is None else self.replica.zo_optimizer

    def run(self, grid: Grid, timeout: float = 3600.0) -> Result:
        """`Strategy.start` with no arrays: `num_rounds` rounds, each waiting at most `timeout` seconds for replies."""
        return self.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=self.num_rounds, timeout=timeout)

    # ---- nodes ---------------------------------------------------------------------------------------------------

    def _discover(self, grid: Grid) -> None:
        """Maps connected nodes to client indices, asking each new node once which partition it holds."""
        if not self._waited:
            deadline = time.monotonic() + self.node_wait_timeout
            while len(list(grid.get_node_ids())) < self.min_available_nodes and time.monotonic() < deadline:
                time.sleep(0.5)
            self._waited = True
        connected = set(grid.get_node_ids())
        self.client_nodes = {c: n for c, n in self.client_nodes.items() if n in connected}
        known = set(self.client_nodes.values())
        queries = [
            Message(RecordDict({RECORD: ConfigRecord({"query": PARTITION_ID})}), dst_node_id=n, message_type="query")
            for n in sorted(connected - known)
        ]
        if not queries:
            return
        self.flower_bytes["discovery"] += sum(message_bytes(m)["message"] for m in queries)
        for reply in grid.send_and_receive(queries, timeout=self.query_timeout):
            self.flower_bytes["discovery"] += message_bytes(reply)["message"]
            if reply.has_error() or RECORD not in reply.content.config_records:
                continue
            client = int(reply.content.config_records[RECORD][PARTITION_ID])
            if 0 <= client < self.server.num_clients:
                self.client_nodes[client] = reply.metadata.src_node_id
            else:
                logger.warning(f"Node {reply.metadata.src_node_id} claims client {client}, outside the federation.")

    # ---- training rounds -------------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Plans round `server_round - 1` and builds one message per sampled, connected client: the round's seeds and
        learning rate, and the history of the rounds that client has missed. `arrays` are not sent."""
        self._discover(grid)
        plan = self.server.plan_round()
        lr = self.learning_rates[plan.round_idx]
        messages, sent, missed, absent = [], {}, {}, []
        for client in plan.clients:
            node = self.client_nodes.get(client)
            if node is None:
                absent.append(client)
                continue
            history = self.server.catch_up_payload(client)
            content = encode_train(plan.round_idx, plan.seeds, lr, history, directions=self.directions)
            if self.verify_replicas:
                content.config_records[RECORD]["verify"] = True
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(plan.round_idx))
            )
            sent[node], missed[client] = client, len(history)
        if absent:
            logger.warning(f"Round {plan.round_idx}: sampled clients {absent} are not connected; left out.")
        expected = None
        if self.verify_replicas and self.replica is not None:
            from .client_app import replica_fingerprint

            expected = replica_fingerprint(self.replica.zo_optimizer)
        self._open = _OpenRound(
            plan, lr, sent, missed, absent, sum(message_bytes(m)["message"] for m in messages), expected
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Averages the scalars that came back in time, closes the round (history, synchronisation points, the
        server's replica) and records its bytes. Returns no arrays: the model never travels."""
        current, self._open = self._open, None
        plan, tau, P = current.plan, self.local_steps, self.num_directions
        reports: dict[int, torch.Tensor] = {}
        losses: dict[int, float] = {}
        bytes_uplink = 0
        for reply in replies:
            bytes_uplink += message_bytes(reply)["message"]
            client = current.sent.get(reply.metadata.src_node_id)
            if client is None:
                continue
            if reply.has_error():
                self.failed_replies += 1
                logger.warning(f"Round {plan.round_idx}: client {client} failed: {reply.error.reason}")
                continue
            try:
                round_idx, scalars, extras = decode_reply(reply.content, tau, P)
            except (KeyError, ValueError) as err:
                self.failed_replies += 1
                logger.warning(f"Round {plan.round_idx}: unreadable reply from client {client}: {err}")
                continue
            if round_idx != plan.round_idx:
                continue
            reports[client] = scalars
            if "loss" in extras:
                losses[client] = extras["loss"]
            if "fingerprint" in extras:
                current.fingerprints[client] = extras["fingerprint"]
        self._check_fingerprints(current)
        result = aggregate(reports, self.aggregation, self.trim_ratio)
        if result.rejected:
            logger.warning(f"Round {plan.round_idx}: rejected non-finite scalars from clients {result.rejected}.")
        reported = sorted(reports)
        dropped = sorted(c for c in current.sent.values() if c not in reports)
        # Only clients that replied are known to hold x_r; the others are sent their catch-up again next time.
        self.server.commit_round(RoundPlan(plan.round_idx, reported, plan.seeds), result.scalars, [current.lr])
        if self.replica is not None:
            lrs = [current.lr * ratio for ratio in self.replica_lr_ratios]
            apply_round(self.replica.zo_optimizer, RoundRecord(plan.round_idx, plan.seeds, result.scalars, lrs))
        cost = self.ledger.record_round(plan.round_idx, reported, current.missed, dropped=dropped)
        self.flower_bytes["downlink"] += current.bytes_downlink
        self.flower_bytes["uplink"] += bytes_uplink
        kept = [losses[c] for c in result.accepted if c in losses]
        loss = sum(kept) / len(kept) if kept else float("nan")
        self.losses.append(loss)
        metrics = {
            "round": plan.round_idx,
            "loss": loss,
            "lr": current.lr,
            "reported": len(reported),
            "dropped": len(dropped),
            "absent": len(current.absent),
            "rejected": len(result.rejected),
            "ledger_bytes_uplink": cost.bytes_uplink,
            "ledger_bytes_downlink": cost.bytes_downlink,
            "flower_bytes_uplink": bytes_uplink,
            "flower_bytes_downlink": current.bytes_downlink,
            "fedavg_bytes": cost.fedavg_bytes,
        }
        self.round_metrics.append(metrics)
        return None, MetricRecord({k: float(v) if isinstance(v, float) else int(v) for k, v in metrics.items()})

    def _check_fingerprints(self, current: _OpenRound) -> None:
        prints = current.fingerprints
        reference = current.expected_fingerprint
        if reference is None and prints:
            reference = next(iter(prints.values()))
        for client, fp in prints.items():
            if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(fp, reference, strict=True)):
                self.replica_mismatches += 1
                logger.warning(f"Round {current.plan.round_idx}: client {client}'s replica differs from the server's.")

    # ---- no evaluation rounds: the model never travels ------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        s = self.server
        logger.info(
            f"HiSoStrategy: {s.num_clients} clients, {s.clients_per_round} per round, {s.local_steps} local steps, "
            f"P={self.num_directions}, {self.num_rounds} rounds, aggregation={self.aggregation}"
        )

    def communication_summary(self) -> dict[str, Any]:
        """The ledger's totals beside the bytes Flower serialised (messages with their metadata)."""
        return {
            **self.ledger.summary(),
            "flower_bytes_downlink": self.flower_bytes["downlink"],
            "flower_bytes_uplink": self.flower_bytes["uplink"],
            "flower_bytes_total": self.flower_bytes["downlink"] + self.flower_bytes["uplink"],
            "flower_bytes_discovery": self.flower_bytes["discovery"],
            "failed_replies": self.failed_replies,
            "replica_mismatches": self.replica_mismatches,
        }
