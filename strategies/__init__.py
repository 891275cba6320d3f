"""Server strategies: Flower Strategy subclasses, selected by name or `module:Class`."""

from strategies.base import FedLLMStrategy, Update, parse_reply, weighted_mean
from strategies.fedavg import FedAvg
from strategies.registry import STRATEGIES, get_strategy, register

__all__ = [
    "FedAvg",
    "FedLLMStrategy",
    "STRATEGIES",
    "Update",
    "get_strategy",
    "parse_reply",
    "register",
    "weighted_mean",
]
