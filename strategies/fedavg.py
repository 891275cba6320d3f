"""FedAvg over adapter deltas, weighted by each client's example count.

McMahan et al., 2017, https://arxiv.org/abs/1602.05629. On LoRA it averages the A and B
factors separately, which is not the average of the products B @ A: the usual approximation.
"""

from __future__ import annotations

from strategies.base import FedLLMStrategy, State, Update, weighted_mean
from strategies.registry import register


@register("fedavg")
class FedAvg(FedLLMStrategy):
    def aggregate(self, server_round: int, updates: list[Update]) -> State:
        return weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])
