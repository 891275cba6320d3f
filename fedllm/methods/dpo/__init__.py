"""dpo: federated preference alignment. Each client runs DPO (Rafailov et al., 2023) on its own
preference pairs with TRL's DPOTrainer, training a LoRA adapter against a frozen reference (the
round's global adapter, or the base); the server aggregates the adapters with any LoRA rule."""

from fedllm.config import OPTIMIZERS, DpoConfig
from fedllm.methods.base import register_method
from fedllm.methods.dpo.client import DpoClient
from fedllm.methods.dpo.server import DpoServer

register_method("dpo", server=DpoServer, client=DpoClient, config=DpoConfig, default_rule="fedavg",
                compression=True, dp=True, utility=False, delta_kind="dense", preference=True, init_from=True,
                optimizers=OPTIMIZERS, proximal=False, secagg=True, secagg_range=4.0)

__all__ = ["DpoClient", "DpoServer"]
