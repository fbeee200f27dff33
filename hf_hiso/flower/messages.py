"""What travels between the HiSo `ServerApp` and `ClientApp`: seeds, learning rates and scalars, never parameters.

Downlink (message type `"train"`), one `ConfigRecord` named `"hiso"`:

* `round`, `seeds` (`tau` 64-bit seeds), `lr` (the round's learning rate);
* the catch-up history, for the rounds the client has missed: `catchup-rounds`, `catchup-seeds` (`n * tau`),
  `catchup-lrs` (`n`), `catchup-moved` (whether each round moved the model: a round without reports did not) and
  `catchup-scalars` (the averaged scalars of the rounds that moved, float32, `n_moved * tau * P`).

Uplink (the reply), a `ConfigRecord` `"hiso"` with `round`, `scalars` (float32, `tau * P`) and `loss` (the client's
loss at the round-start model, for the server's logs). One record, not a second `MetricRecord` for the loss: every
record costs Flower an object header and a 64-character object id (about 160 bytes a reply, measured). With
`verify_replicas`, the reply also carries a `fingerprint` of the client's synchronised replica (three float64
numbers), which the server compares with its own.

Scalars travel as raw float32 bytes (4 bytes each, as the ledger's wire format counts them) rather than as a list of
floats, which Flower would encode as float64.

Node discovery (message type `"query"`): the server asks a node it does not know yet which client it is; the reply
carries `partition-id` from the node's config (`flower-supernode --node-config "partition-id=0 num-partitions=3"`, or
set by the simulation runtime).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from ..federated.protocol import RoundRecord

RECORD = "hiso"
PARTITION_ID = "partition-id"


def scalars_to_bytes(scalars: torch.Tensor) -> bytes:
    return scalars.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes()


def scalars_from_bytes(data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    values = np.frombuffer(data, dtype="<f4")
    if values.size != int(np.prod(shape)):
        raise ValueError(f"Expected {int(np.prod(shape))} float32 scalars, got {values.size}.")
    return torch.from_numpy(values.copy()).reshape(shape)


@dataclass
class TrainInstruction:
    """The decoded downlink of one round for one client."""

    round_idx: int
    seeds: list[int]
    lr: float
    catchup: list[tuple[int, list[int], float, torch.Tensor | None]]
    # `"<generator>/<distribution>"` of the server's directions (`DirectionSource.name`); `None` if not sent.
    directions: str | None = None

    def history(self, group_lr_ratios: list[float]) -> list[RoundRecord]:
        """The catch-up rounds as `RoundRecord`s, each group's learning rate `lr * ratio` (HiSoTrainer's groups share
        one learning rate, so the ratios are 1)."""
        return [
            RoundRecord(r, seeds, scalars, [lr * ratio for ratio in group_lr_ratios])
            for r, seeds, lr, scalars in self.catchup
        ]


def encode_train(
    round_idx: int, seeds: list[int], lr: float, history: list[RoundRecord], directions: str | None = None
) -> RecordDict:
    """The downlink `RecordDict` of a round: its seeds and learning rate, the history the client must replay and,
    if given, the name of the directions the seeds stand for (`"counter/gaussian"`; clients refuse other ones).
    `history[i].lrs[0]` is taken as round `i`'s learning rate."""
    moved = [h.scalars is not None for h in history]
    stacked = [h.scalars for h in history if h.scalars is not None]
    config = ConfigRecord(
        {
            "round": int(round_idx),
            "seeds": [int(s) for s in seeds],
            "lr": float(lr),
            "catchup-rounds": [int(h.round_idx) for h in history],
            "catchup-seeds": [int(s) for h in history for s in h.seeds],
            "catchup-lrs": [float(h.lrs[0]) for h in history],
            "catchup-moved": moved,
            "catchup-scalars": scalars_to_bytes(torch.stack(stacked)) if stacked else b"",
        }
    )
    if directions is not None:
        config["directions"] = str(directions)
    return RecordDict({RECORD: config})


def decode_train(content: RecordDict, num_directions: int) -> TrainInstruction:
    config = content.config_records[RECORD]
    seeds = [int(s) for s in config["seeds"]]
    tau = len(seeds)
    rounds = [int(r) for r in config["catchup-rounds"]]
    moved = [bool(m) for m in config["catchup-moved"]]
    flat_seeds = [int(s) for s in config["catchup-seeds"]]
    if len(flat_seeds) != tau * len(rounds) or len(moved) != len(rounds):
        raise ValueError("Malformed catch-up history: the seeds or flags do not match the rounds.")
    n_moved = sum(moved)
    scalars = scalars_from_bytes(config["catchup-scalars"], (n_moved, tau, num_directions)) if n_moved else None
    catchup, row = [], 0
    for i, r in enumerate(rounds):
        record_scalars = None
        if moved[i]:
            record_scalars, row = scalars[row], row + 1
        catchup.append((r, flat_seeds[i * tau : (i + 1) * tau], float(config["catchup-lrs"][i]), record_scalars))
    directions = config.get("directions")
    return TrainInstruction(int(config["round"]), seeds, float(config["lr"]), catchup, directions)


def encode_reply(
    round_idx: int, scalars: torch.Tensor, loss: float, fingerprint: list[float] | None = None
) -> RecordDict:
    config = {"round": int(round_idx), "scalars": scalars_to_bytes(scalars), "loss": float(loss)}
    if fingerprint is not None:
        config["fingerprint"] = [float(v) for v in fingerprint]
    return RecordDict({RECORD: ConfigRecord(config)})


def decode_reply(content: RecordDict, local_steps: int, num_directions: int) -> tuple[int, torch.Tensor, dict]:
    """`(round, (tau, P) scalars, extras)`; extras hold `loss` and, if sent, `fingerprint`."""
    config = content.config_records[RECORD]
    scalars = scalars_from_bytes(config["scalars"], (local_steps, num_directions))
    extras: dict = {}
    if "loss" in config:
        extras["loss"] = float(config["loss"])
    if "fingerprint" in config:
        extras["fingerprint"] = [float(v) for v in config["fingerprint"]]
    return int(config["round"]), scalars, extras


def message_bytes(message: Message) -> dict[str, int]:
    """The bytes Flower serialises for `message`: every object of its tree (the message with its metadata, the
    `RecordDict`, each record) as `deflate()` encodes it for the SuperLink's object store, headers and object ids
    included. `content` counts the `RecordDict` and its records alone, without the message's metadata. Transport
    framing (gRPC, TLS) is not included."""
    objects = get_all_nested_objects(message)
    total = sum(len(obj.deflate()) for obj in objects.values())
    own = len(message.deflate())
    return {"message": total, "content": total - own}
