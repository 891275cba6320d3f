"""Training methods, one folder each (both halves, config section, engine), registered by name.

    from fedllm.methods import METHODS
    method = METHODS.get(cfg.train.method)       # Entry: impl.server(cfg), impl.client(cfg, context, pid)

Importing this package registers lora, exact-lora, zo, diloco and dpo.
"""

from fedllm.config import Config
from fedllm.data import load_splits
from fedllm.methods import diloco, dpo, exact_lora, lora, zo  # noqa: F401  (register)
from fedllm.methods.base import METHODS, ClientHalf, ServerHalf, register_method
from fedllm.methods.downlink import Downlink


def uses_pairs(cfg: Config) -> bool:
    """Whether train.method trains on preference pairs (registered with preference=True: dpo)."""
    return bool(METHODS.get(cfg.train.method).meta.get("preference", False))


def data_splits(cfg: Config) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, held-out) examples of data.* as train.method takes them: instruction examples, or
    preference pairs (each with a "rejected" answer)."""
    return load_splits(cfg.data, preference=uses_pairs(cfg))


__all__ = ["METHODS", "ClientHalf", "Downlink", "ServerHalf", "data_splits", "register_method", "uses_pairs"]
