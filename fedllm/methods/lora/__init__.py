"""lora: PEFT LoRA adapters; clients send their local adapter (or an encoded delta) and the
server moves the global adapter by the rule chain's aggregate of the deltas."""

from fedllm.config import OPTIMIZERS, PEFT_TYPES, LoraConfig
from fedllm.methods.base import register_method
from fedllm.methods.lora.client import LoraClient
from fedllm.methods.lora.server import LoraServer

register_method("lora", server=LoraServer, client=LoraClient, config=LoraConfig, default_rule="fedavg",
                compression=True, dp=True, utility=True, delta_kind="dense", quantize=True, peft=PEFT_TYPES,
                optimizers=OPTIMIZERS, auto_modules=True, init_from=True, secagg=True, secagg_range=4.0)

__all__ = ["LoraClient", "LoraServer"]
