"""exact-lora: FLoRA-style stacking of clients' LoRA factors (ranks may differ per client)."""

from fedllm.config import OPTIMIZERS
from fedllm.methods.adapters.config import check_adapter
from fedllm.methods.base import MethodSpec, register_method

register_method("exact-lora", server="fedllm.methods.exact_lora.server:ExactLoraServer",
                client="fedllm.methods.exact_lora.client:ExactLoraClient",
                spec=MethodSpec(default_rule="stack", compression=False, dp=False, delta_kind="factors",
                                optimizers=OPTIMIZERS, rules=(("stack", "fedllm.methods.exact_lora.server:stack"),),
                                check=check_adapter, why_sync="a round stacks its cohort's factors into one exact product, which a stale reply's factors do not fit"))
