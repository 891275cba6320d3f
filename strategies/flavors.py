"""Whose semantics a built-in stage follows: fedllm's (the default) or Flower's, picked with the
stage argument `flavor`.

    "median > fedadam(flavor=flower)"      # Flower's FedAdam: its formula and its defaults
    "krum(flavor=flower)"                  # Flower's Krum: f = 0

fedllm follows the papers: FedAdam/FedYogi/FedAdagrad as Reddi et al. write them (Algorithm 2:
the second moment starts at tau^2, no bias correction, Adagrad with a first moment), a small
server learning rate (1e-3), Krum tolerating f = 1 and Multi-Krum averaging the n - f best.
Flower's strategies (flwr.serverapp.strategy, 1.42) differ; `flavor=flower` takes their formulas
(`strategies.optimizers.adaptive_step`) and their constructor defaults (`FLOWER` below), so that
the same inputs give Flower's aggregate.

A parameter's value is its stage argument, else its strategy.* key where set away from the key's
default (deprecated), else the flavor's default (`setting`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedllm.config import Config

FLAVORS = ("fedllm", "flower")
FLAVOR_CHECK = {"flavor": "one of " + ", ".join(FLAVORS)}  # the registries' `checks` entry

# Flower's constructor defaults, by stage and parameter (fedadagrad's beta1: FedAdagrad has no
# first moment; Krum and MultiKrum: num_malicious_nodes, num_nodes_to_select)
FLOWER: dict[str, dict[str, float]] = {
    "fedavgm": {"lr": 1.0, "momentum": 0.0},
    "fedadam": {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"lr": 0.1, "beta1": 0.0, "beta2": 0.0, "tau": 1e-3},
    "krum": {"f": 0},
    "multikrum": {"f": 0, "keep": 1},
}


def flavor_of(flavor: str | None) -> str:
    """`flavor` or the default one. Raises ValueError for another name (the chain checks it first)."""
    flavor = flavor or FLAVORS[0]
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, got {flavor!r}")
    return flavor


def key_default(cfg: Config, key: str) -> Any:
    """The default of strategy.`key` (an attribute name of cfg.strategy)."""
    return next(f.default for f in dataclasses.fields(cfg.strategy) if f.name == key)


def setting(cfg: Config, flavor: str, stage: str, param: str, arg: Any, key: str, fedllm: Any = None) -> Any:
    """The value of `param` of `stage`: `arg` (its stage argument) unless None, else strategy.`key`
    where set away from its default, else the flavor's default: Flower's (`FLOWER`) with
    flavor=flower, else `fedllm` where given, else the key's default."""
    if arg is not None:
        return arg
    value, unset = getattr(cfg.strategy, key), key_default(cfg, key)
    if value != unset:
        return value
    if flavor == "flower":
        return FLOWER[stage][param]
    return unset if fedllm is None else fedllm
