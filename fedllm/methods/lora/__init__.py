"""lora: PEFT LoRA adapters; clients send their local adapter (or an encoded delta) and the
server moves the global adapter by the rule chain's aggregate of the deltas. Its halves are the
shared adapter halves (fedllm.methods.adapters)."""

from fedllm.config import OPTIMIZERS
from fedllm.methods.adapters.config import PEFT_TYPES, check_adapter
from fedllm.methods.base import MethodSpec, register_method

register_method("lora", server="fedllm.methods.adapters.server:LoraServer",
                client="fedllm.methods.adapters.client:LoraClient",
                spec=MethodSpec(default_rule="fedavg", utility=True, quantize=True, peft=PEFT_TYPES,
                                optimizers=OPTIMIZERS, auto_modules=True, keep_optimizer=True, init_from=True, secagg=True,
                                variates=True, buffered=True, check=check_adapter))
