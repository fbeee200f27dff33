"""Communication ledger: the bytes a federated HiSo run puts on the wire, and what FedAvg would have sent instead.

Symbols: `d` trainable parameters, `P` directions per step, `tau` local steps per round, `S` scalars per direction
(1 for HiSo; 2 for the curvature extension, which also uploads a second-difference scalar), `b_s`, `b_seed`, `b_p`
the bytes of a scalar, a seed and a parameter in the declared [`WireFormat`]. Per round, for every sampled client
`i` that has missed `m_i` rounds since it was last synchronised:

    uplink_i   = tau * P * S * b_s                                   (only if the client reports)
    downlink_i = tau * b_seed + m_i * (tau * b_seed + tau * P * S * b_s)

The downlink is the round's seeds plus, for each missed round, that round's seeds and averaged scalars. Replaying a
missed round rebuilds `x` from the averaged slopes alone, but with `S = 2` the replicas' curvature state is also
driven by the averaged curvature scalars, so those travel too: catch-up scalars are multiplied by `S` as well.

With `zo_curvature_every > 1` only the curvature steps carry the second scalar (every party knows from the seed
which steps those are): a round with `k` curvature steps among its `tau` counts `P * (tau + (S - 1) * k)` scalars
instead of `tau * P * S`, on the uplink, in the paper's convention and in the catch-up of every client that missed
it (`record_round(..., curvature_steps=k)`; the ledger keeps the count of each such round for those catch-ups).

A client that is sampled but drops out (`dropped`) has received its downlink and uploads nothing.

Two comparison figures are kept for the same rounds:

* FedAvg: each sampled client downloads and each reporting client uploads the trainable parameters, `d * b_p` each
  way, i.e. `2 * d * b_p` per client and round when nobody drops out.
* The paper's convention (HiSo, ICLR 2026 tables): `tau * P * S` float32 scalars each way per sampled client and
  round, seeds and catch-up not counted; 40 bytes per client and round for `P = 5, tau = 1`. It always uses 4 bytes
  per scalar, whatever the wire format, so figures stay comparable with the paper.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# The paper's tables count float32 scalars regardless of how a deployment encodes them.
PAPER_BYTES_PER_SCALAR = 4

_STATE_VERSION = 1

__all__ = ["PAPER_BYTES_PER_SCALAR", "CommunicationLedger", "RoundCost", "WireFormat"]


def _is_int(value: object) -> bool:
    # bool is an int subclass; a flag passed as a count is a bug, not a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True)
class WireFormat:
    """How values are encoded on the wire.

    Args:
        bytes_per_scalar: bytes of one directional scalar (4 for float32).
        bytes_per_seed: bytes of one step seed (8 for a 64-bit seed).
        bytes_per_param: bytes of one model parameter in the FedAvg comparison (4 for float32).
    """

    bytes_per_scalar: int = 4
    bytes_per_seed: int = 8
    bytes_per_param: int = 4

    def __post_init__(self) -> None:
        for name in ("bytes_per_scalar", "bytes_per_seed", "bytes_per_param"):
            _check_int(name, getattr(self, name), 0)


@dataclass(frozen=True)
class RoundCost:
    """Bytes of one communication round, summed over its sampled clients.

    Args:
        round_idx: the round's index.
        num_sampled: clients sampled (they all receive the downlink).
        num_reported: sampled clients that uploaded their scalars.
        bytes_uplink: `num_reported * tau * P * S * b_s`.
        bytes_downlink: `sum_i (tau * b_seed + m_i * (tau * b_seed + tau * P * S * b_s))` over sampled clients.
        bytes_catchup: the part of `bytes_downlink` spent on missed rounds, `sum_i m_i * (...)`.
        fedavg_bytes: `(num_sampled + num_reported) * d * b_p`.
        paper_bytes: `(num_sampled + num_reported) * tau * P * S * 4`.
    """

    round_idx: int
    num_sampled: int
    num_reported: int
    bytes_uplink: int
    bytes_downlink: int
    bytes_catchup: int
    fedavg_bytes: int
    paper_bytes: int

    @property
    def bytes_total(self) -> int:
        """`bytes_uplink + bytes_downlink`."""
        return self.bytes_uplink + self.bytes_downlink

    def to_dict(self) -> dict[str, int]:
        """Plain, JSON-able copy including `bytes_total`."""
        return {**asdict(self), "bytes_total": self.bytes_total}


@dataclass
class CommunicationLedger:
    """Counts the bytes of a federated zeroth-order run round by round (formulas in the module docstring).

    Totals are exact Python integers; [`~CommunicationLedger.state_dict`] stores them so a resumed run continues
    them exactly.

    Args:
        num_trainable_params: `d`, used only for the FedAvg comparison.
        num_directions: `P`, directions per local step.
        local_steps: `tau`, local steps per round.
        wire: the [`WireFormat`].
        scalars_per_direction: `S`, scalars uploaded per direction (2 for the curvature extension).
    """

    num_trainable_params: int
    num_directions: int
    local_steps: int
    wire: WireFormat = field(default_factory=WireFormat)
    scalars_per_direction: int = 1

    # Per-client scalars of the rounds recorded with fewer than `tau` curvature steps (round -> count), for the
    # catch-up downlinks of the clients that missed them; other rounds count `scalars_per_round`.
    round_scalars: dict[int, int] = field(default_factory=dict, init=False)
    rounds: int = field(default=0, init=False)
    clients_sampled: int = field(default=0, init=False)
    clients_reported: int = field(default=0, init=False)
    bytes_uplink_total: int = field(default=0, init=False)
    bytes_downlink_total: int = field(default=0, init=False)
    bytes_catchup_total: int = field(default=0, init=False)
    fedavg_bytes_total: int = field(default=0, init=False)
    paper_bytes_total: int = field(default=0, init=False)
    last_round: RoundCost | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check_int("num_trainable_params", self.num_trainable_params, 0)
        _check_int("num_directions", self.num_directions, 1)
        _check_int("local_steps", self.local_steps, 1)
        _check_int("scalars_per_direction", self.scalars_per_direction, 1)
        if not isinstance(self.wire, WireFormat):
            raise ValueError(f"`wire` must be a WireFormat, got {type(self.wire).__name__}.")

    # Per-client figures: the formulas of the module docstring, in one place.

    @property
    def scalars_per_round(self) -> int:
        """`tau * P * S`: scalars one client uploads per round (and the averaged scalars of one round)."""
        return self.local_steps * self.num_directions * self.scalars_per_direction

    def scalars_in_round(self, curvature_steps: int | None = None) -> int:
        """`P * (tau + (S - 1) * k)` with `k` curvature steps among the round's `tau` (`None`: all of them, which is
        `scalars_per_round`)."""
        if curvature_steps is None:
            return self.scalars_per_round
        return self.num_directions * (self.local_steps + (self.scalars_per_direction - 1) * curvature_steps)

    @property
    def uplink_bytes_per_client(self) -> int:
        """`tau * P * S * b_s`."""
        return self.scalars_per_round * self.wire.bytes_per_scalar

    @property
    def seed_bytes_per_round(self) -> int:
        """`tau * b_seed`: the seeds of one round."""
        return self.local_steps * self.wire.bytes_per_seed

    @property
    def catchup_bytes_per_missed_round(self) -> int:
        """`tau * b_seed + tau * P * S * b_s`: replaying one missed round."""
        return self.seed_bytes_per_round + self.uplink_bytes_per_client

    @property
    def fedavg_bytes_per_client(self) -> int:
        """`2 * d * b_p`: FedAvg's download plus upload of the trainable parameters."""
        return 2 * self.num_trainable_params * self.wire.bytes_per_param

    @property
    def paper_bytes_per_client(self) -> int:
        """`2 * tau * P * S * 4`: the paper's count per client and round (40 for `P = 5, tau = 1`)."""
        return 2 * self.scalars_per_round * PAPER_BYTES_PER_SCALAR

    # Totals.

    @property
    def bytes_total(self) -> int:
        """Cumulative uplink plus downlink."""
        return self.bytes_uplink_total + self.bytes_downlink_total

    @property
    def saving_factor(self) -> float:
        """`fedavg_bytes_total / bytes_total`; 0.0 until a byte has been counted."""
        return self.fedavg_bytes_total / self.bytes_total if self.bytes_total else 0.0

    @property
    def last_round_idx(self) -> int | None:
        return None if self.last_round is None else self.last_round.round_idx

    def record_round(
        self,
        round_idx: int,
        participants: Sequence[Hashable],
        missed_rounds: Mapping[Hashable, int] | None = None,
        *,
        dropped: Sequence[Hashable] = (),
        curvature_steps: int | None = None,
    ) -> RoundCost:
        """Adds one round to the ledger.

        Args:
            round_idx: the round's index; must exceed the previously recorded one, so a resumed run cannot count a
                round twice.
            participants: sampled clients that reported (they receive the downlink and upload).
            missed_rounds: per client, `m_i`, the number of past rounds it must replay before this one (rounds since
                it was last synchronised). Clients absent from it missed none; entries of clients not sampled in
                this round are ignored, so the caller may pass its state for all clients.
            dropped: sampled clients that received the downlink but did not upload.
            curvature_steps: with `S > 1`, how many of the round's `tau` local steps carry all `S` scalars per
                direction (the curvature extension's curvature steps; the others carry one). `None`: all of them.

        Returns:
            [`RoundCost`]: this round's figures (also kept as `last_round`).
        """
        _check_int("round_idx", round_idx, 0)
        if self.last_round is not None and round_idx <= self.last_round.round_idx:
            raise ValueError(
                f"`round_idx` must increase from round to round: got {round_idx} after {self.last_round.round_idx}."
            )
        participants, dropped = list(participants), list(dropped)
        for name, clients in (("participants", participants), ("dropped", dropped)):
            if len(set(clients)) != len(clients):
                raise ValueError(f"`{name}` lists a client more than once: {clients}.")
        overlap = set(participants) & set(dropped)
        if overlap:
            raise ValueError(f"Clients {sorted(overlap, key=repr)} are in both `participants` and `dropped`.")
        if curvature_steps is not None and (
            not _is_int(curvature_steps) or not 0 <= curvature_steps <= self.local_steps
        ):
            raise ValueError(
                f"`curvature_steps` must be an integer in [0, local_steps={self.local_steps}], "
                f"got {curvature_steps!r}."
            )
        missed_rounds = dict(missed_rounds or {})
        for client, missed in missed_rounds.items():
            if not _is_int(missed) or missed < 0:
                raise ValueError(f"`missed_rounds[{client!r}]` must be an integer >= 0, got {missed!r}.")

        sampled = participants + dropped
        num_sampled, num_reported = len(sampled), len(participants)
        scalars = self.scalars_in_round(curvature_steps)
        bytes_catchup = sum(self._catchup_bytes(round_idx, missed_rounds.get(client, 0)) for client in sampled)
        cost = RoundCost(
            round_idx=int(round_idx),
            num_sampled=num_sampled,
            num_reported=num_reported,
            bytes_uplink=num_reported * scalars * self.wire.bytes_per_scalar,
            bytes_downlink=num_sampled * self.seed_bytes_per_round + bytes_catchup,
            bytes_catchup=bytes_catchup,
            # Per direction of travel, so a dropped client counts FedAvg's download but not its upload.
            fedavg_bytes=(num_sampled + num_reported) * self.num_trainable_params * self.wire.bytes_per_param,
            paper_bytes=(num_sampled + num_reported) * scalars * PAPER_BYTES_PER_SCALAR,
        )
        if scalars != self.scalars_per_round:
            self.round_scalars[int(round_idx)] = scalars

        self.rounds += 1
        self.clients_sampled += num_sampled
        self.clients_reported += num_reported
        self.bytes_uplink_total += cost.bytes_uplink
        self.bytes_downlink_total += cost.bytes_downlink
        self.bytes_catchup_total += cost.bytes_catchup
        self.fedavg_bytes_total += cost.fedavg_bytes
        self.paper_bytes_total += cost.paper_bytes
        self.last_round = cost
        return cost

    def _catchup_bytes(self, round_idx: int, missed: int) -> int:
        """Bytes of replaying the `missed` rounds just before `round_idx`."""
        bytes_total = missed * self.catchup_bytes_per_missed_round
        if self.round_scalars:
            fewer = sum(
                self.scalars_per_round - self.round_scalars.get(r, self.scalars_per_round)
                for r in range(round_idx - missed, round_idx)
            )
            bytes_total -= fewer * self.wire.bytes_per_scalar
        return bytes_total

    def log_dict(self, prefix: str = "fed/") -> dict[str, float]:
        """Figures for `Trainer.log`: the last round's and the cumulative ones, keys namespaced by `prefix`.

        `{prefix}round` is the number of rounds recorded so far; per-round keys are 0 before the first round.
        """
        last = self.last_round
        figures = {
            "round": self.rounds,
            "bytes_uplink_round": last.bytes_uplink if last else 0,
            "bytes_uplink_total": self.bytes_uplink_total,
            "bytes_downlink_round": last.bytes_downlink if last else 0,
            "bytes_downlink_total": self.bytes_downlink_total,
            "bytes_round": last.bytes_total if last else 0,
            "bytes_total": self.bytes_total,
            "fedavg_bytes_round": last.fedavg_bytes if last else 0,
            "fedavg_bytes_total": self.fedavg_bytes_total,
            "paper_bytes_round": last.paper_bytes if last else 0,
            "paper_bytes_total": self.paper_bytes_total,
            "saving_factor": self.saving_factor,
        }
        return {f"{prefix}{key}": float(value) for key, value in figures.items()}

    def summary(self) -> dict[str, Any]:
        """Plain, JSON-able summary for model cards and result files."""
        return {
            "wire_format": asdict(self.wire),
            "num_trainable_params": self.num_trainable_params,
            "num_directions": self.num_directions,
            "local_steps": self.local_steps,
            "scalars_per_direction": self.scalars_per_direction,
            "rounds": self.rounds,
            "clients_sampled": self.clients_sampled,
            "clients_reported": self.clients_reported,
            "bytes_uplink": self.bytes_uplink_total,
            "bytes_downlink": self.bytes_downlink_total,
            "bytes_catchup": self.bytes_catchup_total,
            "bytes_total": self.bytes_total,
            "fedavg_bytes": self.fedavg_bytes_total,
            "paper_bytes": self.paper_bytes_total,
            "paper_bytes_per_client_round": self.paper_bytes_per_client,
            "fedavg_bytes_per_client_round": self.fedavg_bytes_per_client,
            "saving_factor": self.saving_factor,
        }

    def _config(self) -> dict[str, Any]:
        return {
            "num_trainable_params": self.num_trainable_params,
            "num_directions": self.num_directions,
            "local_steps": self.local_steps,
            "scalars_per_direction": self.scalars_per_direction,
            "wire": asdict(self.wire),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (configuration and exact integer totals) for checkpoints."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "totals": {
                "rounds": self.rounds,
                "clients_sampled": self.clients_sampled,
                "clients_reported": self.clients_reported,
                "bytes_uplink_total": self.bytes_uplink_total,
                "bytes_downlink_total": self.bytes_downlink_total,
                "bytes_catchup_total": self.bytes_catchup_total,
                "fedavg_bytes_total": self.fedavg_bytes_total,
                "paper_bytes_total": self.paper_bytes_total,
            },
            "last_round": None if self.last_round is None else asdict(self.last_round),
            # JSON object keys are strings.
            "round_scalars": {str(r): n for r, n in self.round_scalars.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the totals saved by [`~CommunicationLedger.state_dict`].

        Raises:
            ValueError: if the saved configuration differs from this ledger's (continuing totals counted with another
                `P`, `tau`, `d` or wire format would mix two different accounts).
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"Unsupported ledger state version {state.get('version')!r}; expected {_STATE_VERSION}.")
        saved, current = dict(state["config"]), self._config()
        mismatched = sorted(key for key in current if saved.get(key) != current[key])
        if mismatched:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current[k]!r}" for k in mismatched)
            raise ValueError(f"The saved ledger was counted with another configuration ({details}).")
        totals = state["totals"]
        for name in (
            "rounds",
            "clients_sampled",
            "clients_reported",
            "bytes_uplink_total",
            "bytes_downlink_total",
            "bytes_catchup_total",
            "fedavg_bytes_total",
            "paper_bytes_total",
        ):
            setattr(self, name, int(totals[name]))
        last = state.get("last_round")
        self.last_round = None if last is None else RoundCost(**{k: int(v) for k, v in last.items()})
        self.round_scalars = {int(r): int(n) for r, n in state.get("round_scalars", {}).items()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> CommunicationLedger:
        """Builds a ledger with the saved configuration and totals."""
        config = state["config"]
        ledger = cls(
            num_trainable_params=config["num_trainable_params"],
            num_directions=config["num_directions"],
            local_steps=config["local_steps"],
            wire=WireFormat(**config["wire"]),
            scalars_per_direction=config["scalars_per_direction"],
        )
        ledger.load_state_dict(state)
        return ledger
