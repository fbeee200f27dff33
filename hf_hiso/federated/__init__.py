"""Federated layer: client partitioning and communication accounting, independent of the Trainer, and the
federation's command-line arguments (`FederatedArguments`)."""

from .arguments import FederatedArguments
from .ledger import PAPER_BYTES_PER_SCALAR, CommunicationLedger, RoundCost, WireFormat
from .partition import DIRICHLET_MAX_DRAWS, STRATEGIES, label_distribution, partition_dataset, partition_indices

__all__ = [
    "DIRICHLET_MAX_DRAWS",
    "PAPER_BYTES_PER_SCALAR",
    "STRATEGIES",
    "CommunicationLedger",
    "FederatedArguments",
    "RoundCost",
    "WireFormat",
    "label_distribution",
    "partition_dataset",
    "partition_indices",
]
