"""Training methods, one folder each (both halves, config section, engine), registered by name.

    from fedllm.methods import METHODS
    method = METHODS.get(cfg.train.method)       # Entry: impl.server(cfg), impl.client(cfg, context, pid)

Importing this package registers lora, exact-lora, zo and diloco.
"""

from fedllm.methods import diloco, exact_lora, lora, zo  # noqa: F401  (register)
from fedllm.methods.base import METHODS, ClientHalf, ServerHalf, register_method
from fedllm.methods.downlink import Downlink

__all__ = ["METHODS", "ClientHalf", "Downlink", "ServerHalf", "register_method"]
