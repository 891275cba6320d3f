"""Server strategies: Flower Strategy subclasses, selected by name or `module:Class`."""

from strategies.base import FedLLMStrategy, Update, parse_reply, reply_metrics, weighted_mean
from strategies.fedavg import FedAvg
from strategies.fedkseed import FedKSeed
from strategies.registry import STRATEGIES, get_strategy, register

__all__ = [
    "FedAvg",
    "FedKSeed",
    "FedLLMStrategy",
    "STRATEGIES",
    "Update",
    "get_strategy",
    "parse_reply",
    "register",
    "reply_metrics",
    "weighted_mean",
]
