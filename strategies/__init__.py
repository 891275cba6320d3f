"""Server strategies: Flower Strategy subclasses, selected by name or `module:Class`.

Registered: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed-mean,
krum, multikrum, norm-bounded, exact-lora (LoRA); fedkseed (zeroth-order).
"""

from strategies.base import FedLLMStrategy, Update, check_like, parse_reply, reply_metrics, weighted_mean
from strategies.exact_lora import ExactLoRA, compact, stack_factors
from strategies.fedavg import FedAvg
from strategies.fedkseed import FedKSeed
from strategies.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, adaptive_step, momentum_step
from strategies.fedprox import FedProx
from strategies.registry import STRATEGIES, get_strategy, register
from strategies.robust import (Krum, Median, MultiKrum, NormBounded, TrimmedMean, coordinate_median, krum_scores,
                               multi_krum, norm_bounded_mean, trimmed_mean)

__all__ = [
    "ExactLoRA", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedKSeed", "FedLLMStrategy", "FedProx", "FedYogi",
    "Krum", "Median", "MultiKrum", "NormBounded", "STRATEGIES", "TrimmedMean", "Update", "adaptive_step",
    "check_like", "compact", "coordinate_median", "get_strategy", "krum_scores", "momentum_step", "multi_krum",
    "norm_bounded_mean", "parse_reply", "register", "reply_metrics", "stack_factors", "trimmed_mean",
    "weighted_mean",
]
