"""dpo: federated preference alignment. Each client runs DPO (Rafailov et al., 2023) on its own
preference pairs with TRL's DPOTrainer, training a LoRA adapter against a frozen reference (the
round's global adapter, or the base); the server aggregates the adapters with any LoRA rule."""

from fedllm.config import OPTIMIZERS
from fedllm.methods.adapters.config import check_adapter
from fedllm.methods.base import MethodSpec, register_method
from fedllm.methods.dpo import config  # noqa: F401  (the [dpo] section)

register_method("dpo", server="fedllm.methods.dpo.server:DpoServer", client="fedllm.methods.dpo.client:DpoClient",
                spec=MethodSpec(default_rule="fedavg", preference=True, init_from=True, optimizers=OPTIMIZERS,
                                proximal=False, secagg=True, keep_optimizer=True, buffered=True, check=check_adapter))
