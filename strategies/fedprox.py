"""FedProx: FedAvg aggregation, a proximal term on the client.

Each client minimises loss + (mu / 2) ||w - w_global||^2 over its adapter weights
(strategy.proximal-mu, sent each round as "proximal-mu"), which keeps local models near the
global one under heterogeneous data. Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127.
"""

from __future__ import annotations

from typing import Any

from strategies.fedavg import FedAvg
from strategies.registry import register


@register("fedprox")
class FedProx(FedAvg):
    def round_config(self, server_round: int) -> dict[str, Any]:
        return {**super().round_config(server_round), "proximal-mu": self.cfg.strategy.proximal_mu}
