"""diloco: Streaming DiLoCo (Douillard et al., 2023 and 2025): H inner AdamW steps per
fragment sync, P fragments synced in turn, an outer Nesterov SGD step on the server, the
arriving global merged tau rounds late; full parameters or a LoRA adapter."""

from fedllm.config import DiLoCoConfig
from fedllm.methods.base import register_method
from fedllm.methods.diloco.client import DiLoCoClient
from fedllm.methods.diloco.server import DiLoCoServer

register_method("diloco", server=DiLoCoServer, client=DiLoCoClient, config=DiLoCoConfig, default_rule="fedavg",
                compression=True, dp=False, utility=False, delta_kind="dense", server_optimizers=False, secagg=True, secagg_range=4.0,
                secagg_agree=("diloco-fragment",))

__all__ = ["DiLoCoClient", "DiLoCoServer"]
