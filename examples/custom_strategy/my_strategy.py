"""A user's own aggregation rule, plugged into fedllm's server: run with `flwr run .` here.

LossWeighted averages the clients' LoRA deltas with weights examples x exp(-train loss / T),
so clients whose data the model already fits well count a little more. Everything else
(sampling, decoding, validation, evaluation, checkpoints, metrics) is fedllm's base strategy.
"""

from __future__ import annotations

import math

from fedllm.server_app import make_app
from strategies import FedLLMStrategy, Update, register, weighted_mean

TEMPERATURE = 1.0


@register("loss-weighted")
class LossWeighted(FedLLMStrategy):
    def aggregate(self, server_round: int, updates: list[Update]) -> dict:
        weights = [u.num_examples * math.exp(-u.metrics["train-loss"] / TEMPERATURE) for u in updates]
        self.last_weights = {u.node_id: w / sum(weights) for u, w in zip(updates, weights)}
        return weighted_mean([u.delta for u in updates], weights)


# The ServerApp that `flwr run` starts: fedllm's, with this strategy by module:Class.
app = make_app({"server.strategy": "my_strategy:LossWeighted"})
