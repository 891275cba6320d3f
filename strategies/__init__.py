"""Aggregation rules (pure functions), server optimizers ((init, update) pairs), their chain,
and the one Flower Strategy adapter. server.strategy picks a chain by name:

    "fedavg"  "median"  "median > fedadam"  "fedadam" (= the method's default rule > fedadam)
    "trimmed-mean(fraction=0.2) > fedadam(lr=0.01, beta1=0.9)"   (stage arguments: literals)
    "my_pkg.rules:loss_weighted(temperature=2)"   (a user's rule: called (updates, cfg, temperature=2))
    "fedadam(flavor=flower)"  "krum(flavor=flower)"   (Flower's formulas and defaults: strategies.flavors)

Rules: fedavg, fedprox, fedkseed, median, trimmed-mean, krum, multikrum, norm-bounded (and
the methods' own, e.g. exact-lora's stack). Optimizers: fedavgm, fedadam, fedyogi, fedadagrad.
"""

from fedllm.protocol import Update, weighted_mean
from strategies.adapter import FedLLMStrategy, build, resolve
from strategies.arrays import state_arrays
from strategies.chain import Chain, parse_chain
from strategies.optimizers import OPTIMIZERS, Moments, ServerOpt, adaptive_step, momentum_step
from strategies.rules import (RULES, Aggregate, coordinate_median, fedavg, krum_scores, multi_krum, norm_bounded_mean,
                              trimmed_mean)

__all__ = [
    "Aggregate", "Chain", "FedLLMStrategy", "Moments", "OPTIMIZERS", "RULES", "ServerOpt", "Update",
    "adaptive_step", "build", "coordinate_median", "fedavg", "krum_scores", "momentum_step", "multi_krum",
    "norm_bounded_mean", "parse_chain", "resolve", "state_arrays", "trimmed_mean", "weighted_mean",
]
