"""exact-lora: FLoRA-style stacking of clients' LoRA factors (ranks may differ per client)."""

from fedllm.config import OPTIMIZERS, LoraConfig
from fedllm.methods.base import register_method
from fedllm.methods.exact_lora.client import ExactLoraClient
from fedllm.methods.exact_lora.server import ExactLoraServer, compact, pad_ranks, stack, stack_factors

register_method("exact-lora", server=ExactLoraServer, client=ExactLoraClient, config=LoraConfig,
                default_rule="stack", compression=False, dp=False, utility=False, delta_kind="factors",
                optimizers=OPTIMIZERS, rules=(("stack", stack),))

__all__ = ["ExactLoraClient", "ExactLoraServer", "compact", "pad_ranks", "stack", "stack_factors"]
