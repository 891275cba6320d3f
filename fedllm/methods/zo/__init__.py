"""zo: FedKSeed's zeroth-order, seed-based full-parameter updates (K seeds, a few bytes a step)."""

from fedllm.config import ZOConfig
from fedllm.methods.base import register_method
from fedllm.methods.zo.client import ZOClient
from fedllm.methods.zo.server import ZOServer

register_method("zo", server=ZOServer, client=ZOClient, config=ZOConfig, default_rule="fedavg", compression=False,
                dp=False, utility=False, delta_kind="sums", secagg=True, secagg_range=1024.0,
                secagg_agree=("zo-version", "zo-fingerprint"))

__all__ = ["ZOClient", "ZOServer"]
