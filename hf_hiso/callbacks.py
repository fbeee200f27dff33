"""`FederatedZOCallback`: HiSo's federated protocol simulated inside the ordinary Trainer loop.

One Trainer step is one communication round, so `max_steps`, `logging_steps`, `eval_steps` and `save_steps` count
rounds. The clients share the Trainer's single model replica: a client runs its local steps from the round-start
parameters, its trajectory is undone, and only its `(tau, P)` scalars are kept, which is all a real client would
send. The aggregated scalars are queued in the optimizer, whose ordinary `step()` then applies the global update and
the preconditioner update. Every byte that would travel is counted in a `CommunicationLedger`.

Under several processes (`accelerate launch`, `torchrun`) a round's clients are shared out among the processes, and
one all-reduce of the reports gives every process the whole round, so all of them apply the same update and the run
gives the same model, logs and ledger as one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.utils import logging

from .checkpointing import FEDERATED_STATE_NAME, CheckpointError, safe_torch_load
from .federated.ledger import CommunicationLedger, WireFormat
from .federated.partition import partition_dataset
from .federated.protocol import (
    AGGREGATIONS,
    FederatedServer,
    RoundPlan,
    aggregate,
    check_federation,
    split_report,
)
from .zo_optimizer import PendingUpdate

if TYPE_CHECKING:
    from .hiso_trainer import HiSoTrainer

logger = logging.get_logger(__name__)

PARTITIONS = ("iid", "dirichlet", "column")


class ClientBatches:
    """A client's endless, seeded stream of mini-batches over its shard.

    The order of epoch `e` is a permutation drawn from `(seed, client, e)` alone, so the position `(epoch, offset)`
    is the whole state: a resumed run continues with exactly the batches it would have seen.
    """

    def __init__(self, dataset: Any, collate_fn: Any, batch_size: int, seed: int, client: int):
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.seed = seed
        self.client = client
        self.epoch = 0
        self.offset = 0
        self._order: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.client, self.epoch])
            self._order = rng.permutation(len(self.dataset))
        return self._order

    def next_batch(self) -> dict[str, Any]:
        order = self._permutation()
        idx = order[self.offset : self.offset + self.batch_size]
        self._advance()
        return self.collate_fn([self.dataset[int(i)] for i in idx])

    def skip(self, num_batches: int) -> None:
        """Moves past the next `num_batches` batches without reading or collating them: the position `next_batch`
        would leave. A process skips the batches of a client that another process ran, so that every process holds
        every client's position (checkpoints, and the client's next round wherever it runs)."""
        for _ in range(num_batches):
            self._advance()

    def _advance(self) -> None:
        self.offset += self.batch_size
        if self.offset >= len(self.dataset):
            self.epoch, self.offset, self._order = self.epoch + 1, 0, None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset, self._order = state["epoch"], state["offset"], None


def client_local_steps(
    trainer: HiSoTrainer,
    model: torch.nn.Module,
    batches: ClientBatches,
    seeds: Sequence[int],
    record: Callable[[torch.Tensor, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A client's part of a round: `len(seeds)` local HiSo steps from the current parameters on its next batches,
    with `H` fixed. Returns the `(tau, P)` directional scalars (all the client uploads) and its loss at the
    round-start model. The parameters are left at the end of the local trajectory (`x` after `tau - 1` local
    updates); the caller restores or discards them. Shared by [`FederatedZOCallback`] and the Flower client
    (`hf_hiso.flower`), so both run the same code.

    Each step's slopes and forward passes go to `record(slopes, forward_passes)`, by default `trainer.zo_record`
    (the `zo/*` training metrics).

    With the curvature extension the report is `(tau, 2P)`: slopes, then curvature scalars (zeros on steps that
    measure no curvature, which are not sent)."""
    record = trainer.zo_record if record is None else record
    opt = trainer.zo_optimizer
    with_curvature = opt.curvature is not None
    scalars = torch.empty(len(seeds), opt.num_directions * (2 if with_curvature else 1))
    loss_at_start = None
    for k, seed in enumerate(seeds):
        batch = trainer._prepare_inputs(batches.next_batch())
        loss0, slopes, curvatures = opt.measure(trainer.zo_loss_fn(model, batch), seed)
        loss_at_start = loss0 if loss_at_start is None else loss_at_start
        scalars[k, : opt.num_directions] = slopes
        if with_curvature:
            measured = opt.curvature.is_curvature_step(seed, opt.state["curvature"])
            scalars[k, opt.num_directions :] = curvatures if measured else 0.0
        record(slopes, trainer.zo_passes_per_step())
        if k < len(seeds) - 1:
            # H is fixed inside a round: local steps move x only.
            opt.apply_updates([PendingUpdate(seed, slopes)], update_hessian=False)
    return scalars, loss_at_start


class FederatedZOCallback(TrainerCallback):
    r"""
    Turns a [`HiSoTrainer`] run into a simulated HiSo federation (ALGORITHM.md, sections 3 and 4).

    Each Trainer step is one round: sample `clients_per_round` of `num_clients` clients and one seed per local step;
    each sampled client catches up on the rounds it missed, runs `local_steps` HiSo steps on its own batches from the
    round-start model and reports its `local_steps x P` scalars; the server averages them and applies
    `x_{r+1} = x_r - (lr / P) sum_k sum_p gbar_{k,p} z_{k,p}`, then the preconditioner update.

    Args:
        num_clients: `M`, the number of clients the training set is split into.
        clients_per_round: `m <= M`, clients sampled (without replacement) per round.
        local_steps: `tau`, local ZO steps per client and round.
        partition: `"iid"`, `"dirichlet"` (label skew) or `"column"` (a column names each example's client).
        dirichlet_alpha: concentration of the label skew (the paper uses 1.0; smaller is more skewed).
        label_column: label column for `"dirichlet"`; `None` picks `"labels"` or `"label"`.
        client_column: the column naming clients, for `"column"`.
        drop_rate: probability that a sampled client fails to report (simulated faults).
        aggregation: `"mean"` (the protocol), `"median"` or `"trimmed_mean"` over the clients' scalars.
        trim_ratio: share trimmed at each end by `"trimmed_mean"`.
        seed: seed of the server's sampler, the client batches and the fault simulation (default: `args.seed`).
        wire_format: bytes per scalar, seed and parameter, for the ledger.
        history_retention: `"needed"` keeps a round until every client has caught up past it; `"all"` keeps the
            whole history (to rebuild a replica from the initial weights).

    Several processes (`accelerate launch --multi_gpu`, `torchrun`) share the work of a round: the `j`-th reporting
    client of the round runs on process `j % world_size`, the others skip its batches, and one all-reduce (a sum
    over a zero-filled table with one row per reporting client: its loss, forward passes and `tau x P` scalars)
    gives every process every report. All processes then aggregate the same reports and apply the same update
    (seeds, the sampler and the fault simulation are shared; directions are drawn on CPU by default), so the model,
    `H`, the logs, the ledger and the checkpoints equal those of one process (bit for bit on the same hardware and
    thread count). Set `max_steps` or `num_train_epochs` as in one process: the Trainer's own batches only pace the
    rounds and are not sharded. On a machine without GPUs, set `use_cpu=True`, or the launched processes do not
    form a group (refused with an error).

    Each client starts from a copy of the round-start parameters (one copy of the trainable tensors per round; not
    needed, and not made, for one client, one local step and one process). That copy is the simulation's memory cost
    over centralized HiSo: the size of the trainable parameters (0.3 MiB for a LoRA adapter, 87 MiB for the full
    MiniLM, 4 bytes a parameter in float32); a full fine-tune of a model near the memory limit should train adapters
    or simulate one client per round with `local_steps=1` in one process.
    """

    # Written by `HiSoTrainer` into every checkpoint, before the Trainer marks it complete and rotates old ones.
    zo_checkpoint_files = (FEDERATED_STATE_NAME,)

    def __init__(
        self,
        num_clients: int = 6,
        clients_per_round: int = 2,
        local_steps: int = 1,
        partition: str = "dirichlet",
        dirichlet_alpha: float = 1.0,
        label_column: str | None = None,
        client_column: str | None = None,
        drop_rate: float = 0.0,
        aggregation: str = "mean",
        trim_ratio: float = 0.1,
        seed: int | None = None,
        wire_format: WireFormat | None = None,
        history_retention: str = "needed",
    ):
        check_federation(num_clients, clients_per_round, local_steps)
        if partition not in PARTITIONS:
            raise ValueError(f"`partition` must be one of {PARTITIONS}, got {partition!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"`aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}")
        if partition == "dirichlet" and not (
            isinstance(dirichlet_alpha, int | float) and 0 < dirichlet_alpha < float("inf")
        ):
            raise ValueError(f"`dirichlet_alpha` must be a finite number > 0, got {dirichlet_alpha!r}")
        if partition == "column" and not client_column:
            raise ValueError(
                "`client_column` must name the column that holds each example's client for partition='column'"
            )
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float) or not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"`drop_rate` must be a number in [0, 1), got {drop_rate!r}")
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"`trim_ratio` must be in [0, 0.5), got {trim_ratio!r}")
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.local_steps = local_steps
        self.partition = partition
        self.dirichlet_alpha = dirichlet_alpha
        self.label_column = label_column
        self.client_column = client_column
        self.drop_rate = drop_rate
        self.aggregation = aggregation
        self.trim_ratio = trim_ratio
        self.seed = seed
        self.wire_format = wire_format or WireFormat()
        self.history_retention = history_retention
        self.trainer: HiSoTrainer | None = None
        self.server: FederatedServer | None = None
        self.ledger: CommunicationLedger | None = None
        self.clients: list[ClientBatches] = []
        self.client_sizes: list[int] = []
        self.rejected_reports = 0
        self.dropped_reports = 0
        self.empty_rounds = 0
        self._fault_rng: np.random.Generator | None = None
        self._client_passes = 0

    # ---- wiring into the trainer ---------------------------------------------------------------------------------

    def attach(self, trainer: HiSoTrainer) -> None:
        """Called by `HiSoTrainer` when the callback is added: the round replaces the centralized step."""
        args = trainer.args
        if args.gradient_accumulation_steps != 1:
            raise ValueError(
                "`gradient_accumulation_steps` must be 1 with FederatedZOCallback: one Trainer step is one round; "
                "raise `per_device_train_batch_size` (each client's batch) instead."
            )
        # Launched processes that did not join one group are refused by `HiSoTrainer` itself (`check_process_group`).
        if args.world_size > self.clients_per_round:
            logger.warning(
                f"{args.world_size} processes share {self.clients_per_round} clients per round: "
                f"{args.world_size - self.clients_per_round} of them wait in every round (raise `clients_per_round` "
                "or use fewer processes)."
            )
        self.trainer = trainer
        trainer.zo_round_runner = self.run_round
        trainer.zo_log_providers.append(self.log_dict)

    def _setup(self, trainer: HiSoTrainer) -> None:
        args = trainer.args
        seed = args.seed if self.seed is None else self.seed
        dataset = trainer.train_dataset
        if dataset is None:
            raise ValueError("FederatedZOCallback needs the trainer's `train_dataset` to split into clients.")
        label_column = self.label_column
        if label_column is None and self.partition == "dirichlet":
            label_column = next((c for c in ("labels", "label") if c in dataset.column_names), "labels")
        shards = partition_dataset(
            dataset,
            self.num_clients,
            self.partition,
            dirichlet_alpha=self.dirichlet_alpha,
            label_column=label_column or "labels",
            client_column=self.client_column,
            seed=seed,
        )
        # The Trainer drops the columns the model's forward does not take before collating; do the same per client.
        shards = [trainer._remove_unused_columns(s, description="training") for s in shards]
        self.client_sizes = [len(s) for s in shards]
        bs = args.per_device_train_batch_size
        self.clients = [ClientBatches(s, trainer.data_collator, bs, seed, c) for c, s in enumerate(shards)]
        self.server = FederatedServer(
            self.num_clients,
            self.clients_per_round,
            self.local_steps,
            seed=seed,
            history_retention=self.history_retention,
        )
        opt = trainer.zo_optimizer
        self.ledger = CommunicationLedger(
            num_trainable_params=sum(p.numel() for p in opt.params),
            num_directions=opt.num_directions,
            local_steps=self.local_steps,
            wire=self.wire_format,
            # The curvature extension uploads a second-difference scalar beside each slope.
            scalars_per_direction=1 if opt.curvature is None else 2,
        )
        self._fault_rng = np.random.default_rng([seed, 0xFA017])
        # Under several processes `HiSoTrainer` averages the queued scalars over processes (data parallelism). Here
        # every process queues the same aggregate (`run_round` gathers all reports first): a mean over processes
        # would cost a collective per round and, for three or more processes, could round the identical values.
        opt.scalar_reduce = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("FederatedZOCallback must be used with HiSoTrainer (pass it in `callbacks=`).")
        self._setup(self.trainer)
        resume = getattr(self.trainer, "zo_resume_from", None)
        if resume:
            path = os.path.join(resume, FEDERATED_STATE_NAME)
            what = "it holds the federation (round, history, client positions, ledger) of the run to resume."
            self.load_state_dict(safe_torch_load(path, what), source=path)

    def on_train_end(self, args, state, control, **kwargs):
        if self.ledger is not None and self.ledger.rounds:
            s = self.ledger.summary()
            logger.info(
                f"Federated HiSo: {s['rounds']} rounds, {s['bytes_uplink']} B uplink, "
                f"{s['bytes_downlink']} B downlink; FedAvg would have moved {s['fedavg_bytes']} B "
                f"({self.ledger.saving_factor:.3g}x more)."
            )

    # ---- one round ---------------------------------------------------------------------------------------------

    def client_report(self, trainer: HiSoTrainer, model: torch.nn.Module, client: int, plan: RoundPlan):
        """Runs `client`'s local steps from the current (round-start) parameters ([`client_local_steps`]); returns its
        `(tau, P)` scalars and its loss at the round-start model. The caller restores the parameters. Only the forward
        passes are counted here: `run_round` records every client's reported slopes once all reports are in."""
        return client_local_steps(trainer, model, self.clients[client], plan.seeds, record=self._count_passes)

    def _count_passes(self, slopes: torch.Tensor, forward_passes: int) -> None:
        self._client_passes += forward_passes

    def run_round(self, trainer: HiSoTrainer, model: torch.nn.Module, inputs: Any) -> torch.Tensor:
        """Replaces `HiSoTrainer.training_step`: one whole round (the Trainer's own batch is not used)."""
        opt = trainer.zo_optimizer
        plan = self.server.plan_round()
        missed = {c: len(self.server.missed_rounds(c)) for c in plan.clients}
        # Faults are drawn in the plan's order from a generator every process holds in the same state, so all
        # processes agree on who reports.
        dropped = [c for c in plan.clients if self.drop_rate and self._fault_rng.random() < self.drop_rate]
        reporting = [c for c in plan.clients if c not in dropped]
        world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
        mine = set(reporting[rank::world])
        tau, width = len(plan.seeds), opt.num_directions * (1 if opt.curvature is None else 2)
        # One row per reporting client: ran (1), loss at x_r, forward passes, then its (tau, width) scalars. Only the
        # process that ran the client fills its row, so a sum over processes assembles the table (x + 0 == x, and a
        # NaN stays NaN, so a bad report still reaches `aggregate` and is rejected there).
        table = torch.zeros(len(reporting), 3 + tau * width, dtype=torch.float64)
        # In the simulation the shared replica already holds x_r, so catching up costs bytes (counted) but no
        # compute; `protocol.replay` is what a real client runs, and the replica test checks it gives x_r.
        # Every client starts from exactly x_r, and the update is applied to exactly x_r: a measurement's in-place
        # `x + mu z - mu z` is not exact to the last bit, so without this copy one client's rounding would reach
        # the next client, and replicas that ran different numbers of clients would drift apart. (One client, one
        # local step, one process: nothing follows the measurement but the update, as in centralized HiSo.)
        restore = self.local_steps > 1 or self.clients_per_round > 1 or world > 1
        start = [p.detach().clone() for p in opt.params] if restore and mine else None
        was_training = model.training
        model.eval()
        try:
            for row, c in enumerate(reporting):
                if c not in mine:
                    self.clients[c].skip(tau)  # another process runs c: one batch per local step
                    continue
                self._client_passes = 0
                scalars, loss = self.client_report(trainer, model, c, plan)
                table[row, 0] = 1.0
                table[row, 1] = float(loss)
                table[row, 2] = self._client_passes
                table[row, 3:] = scalars.detach().double().flatten()
                if start is not None:
                    with torch.no_grad():
                        for p, s in zip(opt.params, start, strict=True):
                            p.copy_(s)
        finally:
            model.train(was_training)
        if world > 1 and reporting:
            table = self._gather_reports(trainer, table, plan.round_idx)
        reports = {c: table[row, 3:].float().view(tau, width) for row, c in enumerate(reporting)}
        # The `zo/*` metrics count every client's work and reported slopes, in the plan's order, on every process:
        # the logs do not depend on which process ran whom.
        for row, c in enumerate(reporting):
            trainer.zo_forward_passes += int(table[row, 2])
            for k in range(tau):
                trainer.zo_record(reports[c][k, : opt.num_directions], forward_passes=0)
        losses = {c: table[row, 1].float() for row, c in enumerate(reporting)}
        result = aggregate(reports, self.aggregation, self.trim_ratio)
        if result.rejected:
            logger.warning(
                f"Round {plan.round_idx}: rejected non-finite scalars from clients {result.rejected}; they do not "
                "reach the model."
            )
        self.rejected_reports += len(result.rejected)
        self.dropped_reports += len(dropped)
        if result.scalars is None:
            self.empty_rounds += 1
            logger.warning(f"Round {plan.round_idx}: no client reported usable scalars; the model does not move.")
        # Which local steps measured curvature (a function of the seeds): they alone carry the curvature scalars.
        measured = (
            None
            if opt.curvature is None
            else [opt.curvature.is_curvature_step(seed, opt.state["curvature"]) for seed in plan.seeds]
        )
        slopes, curvatures = result.scalars, None
        if result.scalars is not None and measured is not None:
            slopes, curvatures = split_report(result.scalars, opt.num_directions, measured)
        if slopes is not None:
            for k, seed in enumerate(plan.seeds):
                opt.accumulate(seed, slopes[k], None if curvatures is None else curvatures[k])
        self.server.commit_round(plan, slopes, [g["lr"] for g in opt.param_groups], curvatures)
        self.ledger.record_round(
            plan.round_idx,
            sorted(reports),
            missed,
            dropped=dropped,
            curvature_steps=None if measured is None else sum(measured),
        )
        kept = [losses[c] for c in result.accepted]
        loss = torch.stack(kept).mean() if kept else torch.tensor(float("nan"))
        return loss.detach().to(trainer.args.device)

    @staticmethod
    def _gather_reports(trainer: HiSoTrainer, table: torch.Tensor, round_idx: int) -> torch.Tensor:
        """Sums the processes' partial report tables (one all-reduce) and checks that each row was filled once."""
        acc = trainer.accelerator
        table = acc.reduce(table.to(acc.device), reduction="sum").cpu()
        if not torch.equal(table[:, 0], torch.ones_like(table[:, 0])):
            raise RuntimeError(
                f"Round {round_idx}: the processes disagree on which process runs which client (rows filled "
                f"{table[:, 0].tolist()} times, expected once each); their federations have diverged."
            )
        return table

    # ---- logging, summary, checkpoints ---------------------------------------------------------------------------

    def log_dict(self) -> dict[str, float]:
        if self.ledger is None:
            return {}
        logs = self.ledger.log_dict(prefix="fed/")
        logs["fed/rejected_reports"] = self.rejected_reports
        logs["fed/dropped_reports"] = self.dropped_reports
        logs["fed/empty_rounds"] = self.empty_rounds
        return logs

    def federation_summary(self) -> dict[str, Any]:
        """Settings and totals of the federation, JSON-able (for model cards and reports)."""
        out = {
            "num_clients": self.num_clients,
            "clients_per_round": self.clients_per_round,
            "local_steps": self.local_steps,
            "partition": self.partition,
            "dirichlet_alpha": self.dirichlet_alpha if self.partition == "dirichlet" else None,
            "aggregation": self.aggregation,
            "drop_rate": self.drop_rate,
            "client_sizes": list(self.client_sizes),
            "rejected_reports": self.rejected_reports,
            "dropped_reports": self.dropped_reports,
        }
        if self.ledger is not None:
            out.update(self.ledger.summary())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "server": self.server.state_dict(),
            "ledger": self.ledger.state_dict(),
            "clients": [c.state_dict() for c in self.clients],
            "fault_rng": self._fault_rng.bit_generator.state,
            "counters": {
                "rejected_reports": self.rejected_reports,
                "dropped_reports": self.dropped_reports,
                "empty_rounds": self.empty_rounds,
            },
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the federated state") -> None:
        saved_clients = len(state["clients"])
        if saved_clients != self.num_clients:
            raise CheckpointError(
                f"{source} was written by a federation of {saved_clients} clients, but `num_clients` is "
                f"{self.num_clients}: resume with the run's own federation settings."
            )
        self.server.load_state_dict(state["server"])
        self.ledger.load_state_dict(state["ledger"])
        for client, s in zip(self.clients, state["clients"], strict=True):
            client.load_state_dict(s)
        self._fault_rng.bit_generator.state = state["fault_rng"]
        for k, v in state["counters"].items():
            setattr(self, k, v)
