"""hf_hiso: HiSo (Hessian-informed federated zeroth-order optimization) for the Hugging Face Trainer."""

from .hiso_config import HiSoConfig, ZOArguments
from .hiso_trainer import HiSoTrainer
from .zo_optimizer import HiSoOptimizer, NonFiniteScalarError

__version__ = "0.1.0"

__all__ = ["HiSoConfig", "HiSoOptimizer", "HiSoTrainer", "NonFiniteScalarError", "ZOArguments", "__version__"]
