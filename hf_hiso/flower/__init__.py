"""HiSo federations on Flower (optional extra `flower`): a `ServerApp`/`ClientApp` pair and a strategy whose messages
carry only seeds, learning rates and scalars. See `docs/scaling.md` for deployments with `flwr run`."""

from .client_app import HiSoClient, federated_shard, make_client_app, replica_fingerprint
from .messages import decode_reply, decode_train, encode_reply, encode_train, message_bytes
from .server_app import make_server_app
from .strategy import HiSoStrategy, round_learning_rates

__all__ = [
    "HiSoClient",
    "HiSoStrategy",
    "decode_reply",
    "decode_train",
    "encode_reply",
    "encode_train",
    "federated_shard",
    "make_client_app",
    "make_server_app",
    "message_bytes",
    "replica_fingerprint",
    "round_learning_rates",
]
