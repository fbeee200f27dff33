"""The HiSo federated protocol without the Trainer: round plans, aggregation, history and catch-up.

Used by `FederatedZOCallback` (in-process simulation) and by the Flower apps, so both run the same protocol
(ALGORITHM.md, section 3). Parties exchange only seeds and scalars:

* the server samples `m` of `M` clients and one seed per local step (`RoundPlan`);
* each sampled client replays the rounds it missed (`replay`), runs `tau` local steps from `x_r` and reports a
  `(tau, P)` tensor of directional scalars;
* the server aggregates them (`aggregate`), and every party applies `x_{r+1} = x_r - (lr / P) sum_k sum_p gbar z`
  followed by the preconditioner update; the round's `(seeds, gbar, lr)` joins the history (`RoundRecord`).

With the block curvature extension (`hf_hiso.curvature`) each client also reports a `(tau, P)` tensor of curvature
scalars; they are averaged like the slopes, kept in the record (`curvatures`) and replayed, since they drive the
preconditioner that every replica must rebuild.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..zo_estimators import step_seed
from ..zo_optimizer import HiSoOptimizer, PendingUpdate

AGGREGATIONS = ("mean", "median", "trimmed_mean")
HISTORY_RETENTION = ("needed", "all")


@dataclass
class RoundPlan:
    """What the server sends at the start of round `round_idx`: the sampled clients and one seed per local step."""

    round_idx: int
    clients: list[int]
    seeds: list[int]


@dataclass
class RoundRecord:
    """What every party needs to replay a round: its seeds, the aggregated scalars `(tau, P)` (`None` for a round in
    which no client reported: the model did not move) and the learning rate of each parameter group. The learning
    rate is a deterministic function of the round under the shared schedule, so it is not counted as traffic."""

    round_idx: int
    seeds: list[int]
    scalars: torch.Tensor | None
    lrs: list[float]
    # Averaged curvature scalars `(tau, P)` of the curvature extension (NaN rows: steps without curvature), or `None`.
    curvatures: torch.Tensor | None = None


@dataclass
class AggregationResult:
    scalars: torch.Tensor | None
    accepted: list[int]
    rejected: list[int] = field(default_factory=list)


def aggregate(reports: dict[int, torch.Tensor], method: str = "mean", trim_ratio: float = 0.1) -> AggregationResult:
    """Aggregates the clients' `(tau, P)` scalar reports coordinate-wise.

    Reports holding a NaN or infinite value are rejected (they never reach the model). `"mean"` is the protocol's
    `gbar = mean_i g_i`; `"median"` and `"trimmed_mean"` (dropping `floor(trim_ratio * n)` reports at each end, per
    coordinate) resist a few corrupted clients, since the scalars are all the server sees.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {method!r}")
    accepted = sorted(c for c, r in reports.items() if bool(torch.isfinite(r).all()))
    rejected = sorted(c for c in reports if c not in accepted)
    if not accepted:
        return AggregationResult(None, [], rejected)
    stacked = torch.stack([reports[c].double() for c in accepted])
    if method == "mean":
        out = stacked.mean(0)
    elif method == "median":
        # The lower median for an even count would bias; take the mean of the two middle values instead.
        out = stacked.quantile(0.5, dim=0)
    else:
        k = int(math.floor(trim_ratio * len(accepted)))
        ordered = stacked.sort(dim=0).values
        out = ordered[k : len(accepted) - k].mean(0)
    return AggregationResult(out.float(), accepted, rejected)


class FederatedServer:
    """The server's state: sampler, round counter, each client's last synchronised round and the history.

    `last_sync[c] = r` means client `c` holds `x_r`, the model at the start of round `r`; to take part in round
    `r' > r` it must replay rounds `r .. r' - 1`. A client that took part in round `r` discards its local trajectory
    and holds `x_r`, so it will need round `r`'s aggregate next time.
    """

    def __init__(
        self,
        num_clients: int,
        clients_per_round: int,
        local_steps: int = 1,
        seed: int = 0,
        history_retention: str = "needed",
    ):
        check_federation(num_clients, clients_per_round, local_steps)
        if history_retention not in HISTORY_RETENTION:
            raise ValueError(f"`history_retention` must be one of {HISTORY_RETENTION}, got {history_retention!r}")
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.local_steps = local_steps
        self.history_retention = history_retention
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.round_idx = 0
        self.last_sync = [0] * num_clients
        self.history: dict[int, RoundRecord] = {}

    def plan_round(self) -> RoundPlan:
        """Samples `m` clients uniformly without replacement; local step `k` of round `r` gets the seed
        `step_seed(seed, r * tau + k)`, the seed a centralized `HiSoOptimizer` with the same base seed uses for its
        step `r * tau + k` (so one client, one local step is centralized training exactly)."""
        clients = sorted(int(c) for c in self.rng.choice(self.num_clients, self.clients_per_round, replace=False))
        first = self.round_idx * self.local_steps
        seeds = [step_seed(self.seed, first + k) for k in range(self.local_steps)]
        return RoundPlan(self.round_idx, clients, seeds)

    def missed_rounds(self, client: int) -> list[int]:
        """The rounds `client` must replay before it can start the current round."""
        return list(range(self.last_sync[client], self.round_idx))

    def catch_up_payload(self, client: int) -> list[RoundRecord]:
        missing = [r for r in self.missed_rounds(client) if r not in self.history]
        if missing:
            raise RuntimeError(f"History of rounds {missing} was discarded but client {client} still needs it.")
        return [self.history[r] for r in self.missed_rounds(client)]

    def commit_round(
        self,
        plan: RoundPlan,
        scalars: torch.Tensor | None,
        lrs: Sequence[float],
        curvatures: torch.Tensor | None = None,
    ) -> RoundRecord:
        """Closes the round: appends it to the history, marks the sampled clients synchronised to `x_r` (they
        received the catch-up and the seeds) and discards history no client needs any more. `curvatures` are the
        averaged curvature scalars of the curvature extension."""
        record = RoundRecord(plan.round_idx, list(plan.seeds), scalars, [float(lr) for lr in lrs], curvatures)
        self.history[plan.round_idx] = record
        for c in plan.clients:
            self.last_sync[c] = plan.round_idx
        self.round_idx = plan.round_idx + 1
        if self.history_retention == "needed":
            oldest = min(self.last_sync)
            for r in [r for r in self.history if r < oldest]:
                del self.history[r]
        return record

    def state_dict(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "round_idx": self.round_idx,
            "last_sync": list(self.last_sync),
            "history": [
                {"round_idx": h.round_idx, "seeds": h.seeds, "scalars": h.scalars, "lrs": h.lrs}
                | ({} if h.curvatures is None else {"curvatures": h.curvatures})
                for h in self.history.values()
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.round_idx = state["round_idx"]
        self.last_sync = list(state["last_sync"])
        self.history = {h["round_idx"]: RoundRecord(**h) for h in state["history"]}


def check_federation(num_clients: int, clients_per_round: int, local_steps: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"`num_clients` must be an integer >= 1, got {num_clients!r}")
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int) or clients_per_round < 1:
        raise ValueError(f"`clients_per_round` must be an integer >= 1, got {clients_per_round!r}")
    if clients_per_round > num_clients:
        raise ValueError(
            f"`clients_per_round` ({clients_per_round}) must be <= `num_clients` ({num_clients}): clients are "
            "sampled without replacement."
        )
    if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
        raise ValueError(f"`local_steps` must be an integer >= 1, got {local_steps!r}")


def split_report(
    scalars: torch.Tensor, num_directions: int, curvature_steps: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Splits an aggregated report of the curvature extension, `(tau, 2P)` (slopes, then curvature scalars), into
    `(slopes, curvatures)`; rows of steps that measure no curvature (placeholders, not sent) become NaN. A `(tau, P)`
    report (no extension) is returned as `(scalars, None)`."""
    if scalars.shape[1] == num_directions:
        return scalars, None
    slopes, curvatures = scalars.split(num_directions, dim=1)
    curvatures = curvatures.clone()
    for k, measured in enumerate(curvature_steps):
        if not measured:
            curvatures[k] = float("nan")
    return slopes.contiguous(), curvatures


def round_updates(record: RoundRecord) -> list[PendingUpdate]:
    assert record.scalars is not None
    curv = record.curvatures
    return [
        PendingUpdate(seed, record.scalars[k].clone(), None if curv is None else curv[k].clone())
        for k, seed in enumerate(record.seeds)
    ]


@torch.no_grad()
def apply_round(optimizer: HiSoOptimizer, record: RoundRecord) -> None:
    """Applies one round's global update and preconditioner update, exactly as the server's optimizer step does."""
    if record.scalars is None:
        return
    for group, lr in zip(optimizer.param_groups, record.lrs, strict=True):
        group["lr"] = lr
    optimizer.apply_updates(round_updates(record), update_hessian=True)


def replay(optimizer: HiSoOptimizer, history: Sequence[RoundRecord]) -> None:
    """Catch-up: rebuilds the current model and preconditioner from a synchronised state by replaying `history`
    (seeds and averaged scalars only) in order. Restores the groups' learning rates afterwards."""
    saved = [g["lr"] for g in optimizer.param_groups]
    for record in history:
        apply_round(optimizer, record)
    for group, lr in zip(optimizer.param_groups, saved, strict=True):
        group["lr"] = lr
