"""HiSo on Flower: the ServerApp/ClientApp pair against the in-process FederatedZOCallback.

Fast tests drive `HiSoStrategy` through Flower's own `Strategy.start` loop with `LocalGrid`, a synchronous `Grid` that
serialises every message as Flower does (deflate, inflate) and hands it to the real `ClientApp` with one persistent
`Context` per node; it can take nodes offline, make them silent (a timeout) or lose their replies. Slow tests run the
same apps in Flower's simulation runtime (`flwr.simulation.run_simulation`, Ray actors), with a client that answers
after the round's timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import pytest
import torch
from conftest import hiso_args, tiny_bert, toy_dataset
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from hf_hiso import FederatedZOCallback, HiSoTrainer
from hf_hiso.federated.protocol import replay
from hf_hiso.flower import (
    HiSoClient,
    HiSoStrategy,
    decode_train,
    encode_train,
    federated_shard,
    make_client_app,
    make_server_app,
)

NUM_CLIENTS, PER_ROUND, TAU, P, ROUNDS, N = 3, 2, 2, 3, 5, 48


def over_the_wire(message: Message) -> Message:
    """A copy of `message` rebuilt from the bytes Flower would push to the object store."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    copy = inflate_object_from_contents(message.object_id, contents)
    copy.metadata.__dict__["_message_id"] = message.object_id
    return copy


class LocalGrid(Grid):
    """Delivers each message to the `ClientApp` in this process, synchronously.

    `fault(client, round_idx)` may return `"offline"` (the node is not connected that round), `"silent"` (it receives
    nothing and never answers: the server's timeout) or `"lossy"` (it trains and stores its state, but the reply is
    lost).
    """

    def __init__(self, client_app, num_nodes: int, fault: Callable[[int, int], str | None] | None = None):
        self.app = client_app
        self.fault = fault or (lambda client, round_idx: None)
        # Node ids deliberately not in partition order: the server must ask who is who.
        self.nodes = {7000 - 11 * i: i for i in range(num_nodes)}
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": client, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node, client in self.nodes.items()
        }
        # Strategy.start makes two calls per round (train, then an empty evaluate); discovery queries come before.
        self.round_calls = 0
        self.train_calls: list[tuple[int, int]] = []

    def set_run(self, run) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    @property
    def round_idx(self) -> int:
        return self.round_calls // 2

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, c in self.nodes.items() if self.fault(c, self.round_idx) != "offline"]

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = []
        is_query = any(m.metadata.message_type == "query" for m in messages)
        is_train = any(m.metadata.message_type == "train" for m in messages)
        for message in messages:
            node = message.metadata.dst_node_id
            client = self.nodes[node]
            fault = self.fault(client, self.round_idx) if is_train else None
            if fault == "silent":
                continue
            try:
                reply = self.app(over_the_wire(message), self.contexts[node])
            except Exception as err:  # as the runtime does: the server gets an error reply
                reply = Message(Error(code=0, reason=repr(err)), reply_to=message)
            if is_train:
                self.train_calls.append((client, self.round_idx))
            if fault != "lossy":
                replies.append(over_the_wire(reply))
        if not is_query:
            self.round_calls += 1
        return replies


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on 2 shared cores: several threads per forward pass make it about ten times slower under load."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def task_identity():
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def settings(tmp_path, name: str, **overrides):
    kwargs = {"max_steps": ROUNDS, "zo_num_directions": P, "per_device_train_batch_size": 4, **overrides}
    return hiso_args(tmp_path / name, **kwargs)


def shard_fn(data, num_clients=NUM_CLIENTS, seed=0):
    return lambda context: federated_shard(data, int(context.node_config["partition-id"]), num_clients, seed=seed)


def flower_federation(
    tmp_path, data, num_clients=NUM_CLIENTS, per_round=PER_ROUND, fault=None, rounds=ROUNDS, zo=None, **kw
):
    args = settings(tmp_path, "flower", max_steps=rounds, **(zo or {}))
    client = HiSoClient(tiny_bert, args, shard_fn(data, num_clients))
    strategy = HiSoStrategy(
        args, rounds, num_clients, per_round, TAU, replica_model=tiny_bert(), verify_replicas=True, **kw
    )
    grid = LocalGrid(make_client_app(client), num_clients, fault)
    strategy.run(grid, timeout=5.0)
    return strategy, grid


def callback_federation(tmp_path, data, num_clients=NUM_CLIENTS, per_round=PER_ROUND, zo=None):
    callback = FederatedZOCallback(num_clients, per_round, TAU, partition="iid")
    trainer = HiSoTrainer(
        model=tiny_bert(), args=settings(tmp_path, "callback", **(zo or {})), train_dataset=data, callbacks=[callback]
    )
    trainer.train()
    return trainer, callback


def assert_same_model(strategy, trainer):
    ours, theirs = strategy.replica_optimizer, trainer.zo_optimizer
    for a, b in zip(ours.params, theirs.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    assert (ours.hessian() is None) == (theirs.hessian() is None)
    for a, b in zip(ours.hessian() or [], theirs.hessian() or [], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_flower_federation_equals_callback(tmp_path):
    data = toy_dataset(N)
    trainer, callback = callback_federation(tmp_path, data)
    strategy, grid = flower_federation(tmp_path, data)
    start = [p.detach() for p in tiny_bert().parameters()]
    assert any(not torch.equal(a, b.detach()) for a, b in zip(start, trainer.model.parameters(), strict=True))
    assert_same_model(strategy, trainer)
    assert strategy.replica_mismatches == 0 and strategy.failed_replies == 0
    # Same plan, same bytes by the ledger's count.
    assert strategy.ledger.summary() == callback.ledger.summary()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert strategy.losses == pytest.approx(logged, rel=1e-5)
    # Flower's serialised messages: scalars, seeds and catch-up, plus Flower's own framing; never a parameter.
    summary = strategy.communication_summary()
    d = summary["num_trainable_params"]
    assert summary["flower_bytes_uplink"] > summary["bytes_uplink"]
    assert summary["flower_bytes_total"] < summary["fedavg_bytes"] / 5
    assert all(m["flower_bytes_uplink"] < 4 * d for m in strategy.round_metrics)


@pytest.mark.parametrize(
    "zo",
    [
        {"zo_estimator": "normalized", "zo_preconditioner": False},
        {"zo_estimator": "subset", "zo_estimator_kwargs": {"fraction": 0.3}, "zo_distribution": "rademacher"},
    ],
)
def test_flower_federation_with_an_estimator_equals_callback(tmp_path, zo):
    """The experimental estimators' state is rebuilt by the Flower server's replica and every client exactly."""
    data = toy_dataset(N)
    trainer, callback = callback_federation(tmp_path, data, zo=zo)
    strategy, _ = flower_federation(tmp_path, data, zo=zo)
    assert strategy.replica_optimizer.estimator.name == zo["zo_estimator"]
    assert_same_model(strategy, trainer)
    assert strategy.replica_optimizer.state["estimator"] == trainer.zo_optimizer.state["estimator"]
    assert strategy.replica_mismatches == 0 and strategy.failed_replies == 0
    assert strategy.ledger.summary() == callback.ledger.summary()


def test_messages_carry_seeds_lrs_and_scalars_only(tmp_path):
    strategy, grid = flower_federation(tmp_path, toy_dataset(N), rounds=3)
    history = [strategy.server.history[r] for r in sorted(strategy.server.history)]
    content = encode_train(3, [11, 12], 0.5, history)
    config = content.config_records["hiso"]
    assert set(config.keys()) == {
        "round",
        "seeds",
        "lr",
        "catchup-rounds",
        "catchup-seeds",
        "catchup-lrs",
        "catchup-moved",
        "catchup-scalars",
    }
    assert not content.array_records
    assert len(config["catchup-scalars"]) == 4 * TAU * P * len(history)
    decoded = decode_train(content, P)
    for (r, seeds, lr, scalars), h in zip(decoded.catchup, history, strict=True):
        assert (r, seeds, lr) == (h.round_idx, h.seeds, h.lrs[0])
        assert torch.equal(scalars, h.scalars)
    assert decoded.directions is None
    named = decode_train(encode_train(3, [11, 12], 0.5, history, directions="counter/gaussian"), P)
    assert named.directions == "counter/gaussian"


def test_client_refuses_seeds_of_other_directions(tmp_path, caplog):
    """The server names its directions in every round; a client drawing others fails its round instead of applying
    updates that are not the server's."""
    data = toy_dataset(N)
    server_args = settings(tmp_path, "server", max_steps=1)
    client = HiSoClient(tiny_bert, settings(tmp_path, "client", max_steps=1, zo_generator="cpu"), shard_fn(data))
    strategy = HiSoStrategy(server_args, 1, NUM_CLIENTS, PER_ROUND, TAU, replica_model=tiny_bert())
    assert strategy.directions == "counter/gaussian"
    grid = LocalGrid(make_client_app(client), NUM_CLIENTS)
    with caplog.at_level("WARNING"):
        strategy.run(grid, timeout=5.0)
    assert strategy.failed_replies == PER_ROUND
    assert "draws 'cpu/gaussian'" in caplog.text


def test_returning_client_catches_up_from_history(tmp_path):
    """Client 1 is offline in rounds 1-3 and comes back: it replays the rounds it missed, then holds the server's
    model."""

    def fault(client, round_idx):
        return "offline" if client == 1 and 1 <= round_idx <= 3 else None

    strategy, grid = flower_federation(
        tmp_path, toy_dataset(N), per_round=3, fault=fault, rounds=6, history_retention="all"
    )
    assert [r for c, r in grid.train_calls if c == 1] == [0, 4, 5]
    assert [m["absent"] for m in strategy.round_metrics] == [0, 1, 1, 1, 0, 0]
    # Round 4: client 1 was sent rounds 0..3, replayed them, and its replica matched the server's (fingerprints).
    assert strategy.replica_mismatches == 0 and strategy.failed_replies == 0
    assert strategy.round_metrics[4]["ledger_bytes_downlink"] > strategy.round_metrics[5]["ledger_bytes_downlink"]
    # The server's replica is what the history alone rebuilds from the initial model.
    rebuilt = HiSoTrainer(model=tiny_bert(), args=settings(tmp_path, "rebuilt", max_steps=6))
    rebuilt.create_optimizer()
    opt = rebuilt.zo_optimizer
    history = [strategy.server.history[r] for r in sorted(strategy.server.history)]
    expanded = [type(h)(h.round_idx, h.seeds, h.scalars, h.lrs * len(opt.param_groups)) for h in history]
    replay(opt, expanded)
    for a, b in zip(opt.params, strategy.replica_optimizer.params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def test_silent_client_times_out_and_round_proceeds(tmp_path):
    """Client 2 never answers in round 1 and its reply is lost in round 3 (after it caught up): both rounds proceed
    without it, and it rejoins in sync."""

    def fault(client, round_idx):
        if client == 2 and round_idx == 1:
            return "silent"
        if client == 2 and round_idx == 3:
            return "lossy"
        return None

    strategy, grid = flower_federation(tmp_path, toy_dataset(N), per_round=3, fault=fault, rounds=6)
    assert [m["reported"] for m in strategy.round_metrics] == [3, 2, 3, 2, 3, 3]
    assert [m["dropped"] for m in strategy.round_metrics] == [0, 1, 0, 1, 0, 0]
    assert strategy.replica_mismatches == 0 and strategy.failed_replies == 0
    assert strategy.server.round_idx == 6
    # The ledger counts the silent client's downlink but no uplink.
    assert strategy.round_metrics[1]["ledger_bytes_uplink"] == 2 * TAU * P * 4


def test_server_does_not_hang_when_no_client_answers(tmp_path):
    strategy, _ = flower_federation(tmp_path, toy_dataset(N), fault=lambda c, r: "silent" if r == 2 else None)
    assert strategy.round_metrics[2]["reported"] == 0
    assert strategy.server.round_idx == ROUNDS and strategy.replica_mismatches == 0


# ---- Flower's simulation runtime (Ray) ------------------------------------------------------------------------


def simulate(server_app, client_app, backend_cpus: int = 2) -> None:
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": backend_cpus, "include_dashboard": False, "log_to_driver": False},
        },
    )


class SlowClient(HiSoClient):
    """Answers round 2 only after `delay` seconds (longer than the server's timeout) when it is client 1."""

    delay = 0.0

    def train(self, message, context):
        if self.client_id_fn(context) == 1 and int(message.content.config_records["hiso"]["round"]) == 2:
            time.sleep(self.delay)
        return super().train(message, context)


@pytest.mark.slow
def test_simulation_equals_callback(tmp_path):
    data = toy_dataset(N)
    trainer, callback = callback_federation(tmp_path, data)
    args = settings(tmp_path, "sim")
    client = HiSoClient(tiny_bert, args, shard_fn(data))
    finished = {}

    def strategy_fn(context):
        return HiSoStrategy(args, ROUNDS, NUM_CLIENTS, PER_ROUND, TAU, replica_model=tiny_bert(), verify_replicas=True)

    server_app = make_server_app(strategy_fn, timeout=120.0, on_finish=lambda s, r, c: finished.update(strategy=s))
    simulate(server_app, make_client_app(client))
    strategy = finished["strategy"]
    assert_same_model(strategy, trainer)
    assert strategy.replica_mismatches == 0 and strategy.failed_replies == 0
    assert strategy.ledger.summary() == callback.ledger.summary()
    summary = strategy.communication_summary()
    assert summary["flower_bytes_total"] > summary["bytes_total"]


@pytest.mark.slow
def test_simulation_late_client_is_dropped_then_catches_up(tmp_path):
    data = toy_dataset(N)
    args = settings(tmp_path, "sim", max_steps=6)
    timeout = 10.0
    client = SlowClient(tiny_bert, args, shard_fn(data))
    client.delay = 1.5 * timeout
    finished = {}

    def strategy_fn(context):
        return HiSoStrategy(args, 6, NUM_CLIENTS, NUM_CLIENTS, TAU, replica_model=tiny_bert(), verify_replicas=True)

    server_app = make_server_app(strategy_fn, timeout=timeout, on_finish=lambda s, r, c: finished.update(strategy=s))
    started = time.monotonic()
    simulate(server_app, make_client_app(client))
    strategy = finished["strategy"]
    assert strategy.server.round_idx == 6
    assert strategy.round_metrics[2]["dropped"] == 1 and strategy.round_metrics[2]["reported"] == 2
    # It came back: it reported in later rounds, with a replica equal to the server's.
    assert sum(m["reported"] for m in strategy.round_metrics[3:]) > 2 * 3
    assert strategy.replica_mismatches == 0
    assert time.monotonic() - started < 600
