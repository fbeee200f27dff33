"""hf_hiso: HiSo (Hessian-informed federated zeroth-order optimization) for the Hugging Face Trainer."""

from .callbacks import FederatedZOCallback
from .hiso_config import HiSoConfig, ZOArguments
from .hiso_trainer import HiSoTrainer
from .zo_optimizer import HiSoOptimizer, NonFiniteScalarError

__version__ = "0.1.0"

__all__ = [
    "FederatedZOCallback",
    "HiSoConfig",
    "HiSoOptimizer",
    "HiSoTrainer",
    "NonFiniteScalarError",
    "ZOArguments",
    "__version__",
]
