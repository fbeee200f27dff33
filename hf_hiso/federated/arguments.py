"""`FederatedArguments`: the settings of a simulated HiSo federation as command-line arguments.

A dataclass for `transformers.HfArgumentParser`, parsed beside `HiSoConfig`, that builds the
[`~hf_hiso.FederatedZOCallback`] it describes, so a training script needs no federation code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .protocol import AGGREGATIONS

if TYPE_CHECKING:
    from ..callbacks import FederatedZOCallback

# The partitions that need no more than these arguments ("column" also needs the column that names the clients).
PARTITION_CHOICES = ("dirichlet", "iid")


@dataclass
class FederatedArguments:
    r"""
    The federation of a [`HiSoTrainer`] run, as arguments of a script: `M` clients, `m` sampled per round, `tau` local
    steps, how the training set is split, simulated faults and the server's aggregation. `num_clients=0` means
    centralized training: [`~FederatedArguments.build_callback`] then returns `None`.

    ```python
    from transformers import HfArgumentParser

    from hf_hiso import HiSoConfig, HiSoTrainer
    from hf_hiso.federated import FederatedArguments

    fed_args, training_args = HfArgumentParser((FederatedArguments, HiSoConfig)).parse_args_into_dataclasses()
    callback = fed_args.build_callback(label_column="label")  # None with --num_clients 0
    callbacks = [callback] if callback is not None else []
    trainer = HiSoTrainer(model=model, args=training_args, train_dataset=train, callbacks=callbacks)
    ```

    Args:
        num_clients: `M`, the clients the training set is split into; 0 trains centrally (no federation).
        clients_per_round: `m <= M`, clients sampled (without replacement) per round.
        local_steps: `tau`, local ZO steps per client and round.
        partition: `"dirichlet"` (label skew) or `"iid"`.
        dirichlet_alpha: concentration of the label skew (the paper uses 1.0; smaller is more skewed).
        drop_rate: probability that a sampled client fails to report (simulated faults).
        aggregation: `"mean"` (the protocol), `"median"` or `"trimmed_mean"` over the clients' scalars.

    The values are checked on construction (so `HfArgumentParser` fails before any training), by the rules of
    [`FederatedZOCallback`] itself; when no federation is asked for (`enabled` is False), only `num_clients` and
    `partition` are.
    """

    num_clients: int = field(
        default=6, metadata={"help": "Clients M the training set is split into; 0: centralized training."}
    )
    clients_per_round: int = field(default=2, metadata={"help": "Clients m sampled per round."})
    local_steps: int = field(default=1, metadata={"help": "Local ZO steps tau per client and round."})
    partition: str = field(
        default="dirichlet",
        metadata={"help": "How the data is split: dirichlet (label skew), iid.", "choices": list(PARTITION_CHOICES)},
    )
    dirichlet_alpha: float = field(default=1.0, metadata={"help": "Label-skew concentration (smaller: more skew)."})
    drop_rate: float = field(default=0.0, metadata={"help": "Probability that a sampled client fails to report."})
    aggregation: str = field(
        default="mean",
        metadata={"help": "Aggregation of the clients' scalars.", "choices": list(AGGREGATIONS)},
    )

    def __post_init__(self) -> None:
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, int) or self.num_clients < 0:
            raise ValueError(
                f"`num_clients` must be an integer >= 0 (0: centralized training), got {self.num_clients!r}"
            )
        if self.partition not in PARTITION_CHOICES:
            raise ValueError(f"`partition` must be one of {PARTITION_CHOICES}, got {self.partition!r}")
        # The callback's own checks (counts, alpha, drop rate, aggregation), so the two can never disagree; building
        # it is cheap: it holds settings until a trainer attaches it.
        self.build_callback()

    @property
    def enabled(self) -> bool:
        """Whether these arguments ask for a federation (`num_clients > 0`). A script with a switch of its own (say
        `--federated`) overrides this property in a subclass."""
        return self.num_clients > 0

    def build_callback(self, **kwargs: Any) -> FederatedZOCallback | None:
        """
        The [`FederatedZOCallback`] of these settings, or `None` when no federation is asked for (`enabled` is False).

        Args:
            kwargs: further arguments of [`FederatedZOCallback`] that are not command-line settings, e.g.
                `label_column`, `seed`, `wire_format`, `trim_ratio`.
        """
        if not self.enabled:
            return None
        # Imported here: hf_hiso.callbacks imports this package.
        from ..callbacks import FederatedZOCallback

        return FederatedZOCallback(
            num_clients=self.num_clients,
            clients_per_round=self.clients_per_round,
            local_steps=self.local_steps,
            partition=self.partition,
            dirichlet_alpha=self.dirichlet_alpha,
            drop_rate=self.drop_rate,
            aggregation=self.aggregation,
            **kwargs,
        )
