"""The scaffold rule: SCAFFOLD's server (Karimireddy et al., ICML 2020, https://arxiv.org/abs/1910.06378,
option II) for the methods whose spec says `variates` (lora).

    server.strategy = "scaffold"                                   # x += fedavg's mean of delta y
    server.strategy = "scaffold > fedavgm(lr=1.5, momentum=0.0)"  # the paper's global step eta_g = 1.5

The rule aggregates the adapter deltas as fedavg does (the same MEAN fold, so it streams); its
`variates` metadata tells the method to send the server's control variate c with each train message,
correct its clients' gradients by c - c_i and collect their delta c_i (the method owns c and c_i:
fedllm.methods.adapters.scaffold, where the maths and the choices are written down). `fits` holds
what it cannot go with.
"""

from __future__ import annotations

from typing import Any

from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.methods.adapters.scaffold import CORRECT, RULE, WHERE
from fedllm.protocol import State, Update
from strategies.fold import MEAN
from strategies.rules import RULES, fedavg

PEFT = ("lora", "dora", "ia3")  # adapters whose saved tensors are their trainable parameters


def scaffold(updates: list[Update], cfg: Config, correct: str = "gradient") -> State:
    """The example-weighted mean of the deltas (fedavg); the control variates are the method's.
    `correct`: where clients apply c - c_i: "gradient" (added to the gradient before the optimizer's
    step) or "step" (y -= lr (c - c_i) after it); the same step with SGD."""
    return fedavg(updates, cfg)


def round_config(cfg: Config, correct: str = "gradient") -> dict[str, str]:
    """What the clients are told each round: where the correction goes."""
    return {CORRECT: correct}


def fits(cfg: Config, method: str, variates: bool) -> None:
    """What server.strategy=scaffold cannot go with.

    Raises:
        ConfigError: naming the key, with the reason, in one line.
    """
    if not variates:
        raise ConfigError(f"server.strategy: scaffold's control variates correct each local gradient, which "
                          f"train.method={method} does not take (lora does)")
    if cfg.secagg.enabled:
        raise ConfigError("secagg.enabled: scaffold's server reads each client's control-variate delta, which "
                          "secure aggregation hides; use fedavg with secagg")
    if cfg.dp.clipping_norm > 0:
        raise ConfigError("dp.clipping-norm: scaffold's control-variate delta would travel unclipped beside the "
                          "clipped update; use fedavg with differential privacy")
    if cfg.lora.peft not in PEFT:
        raise ConfigError(f"lora.peft: scaffold corrects the gradient of each saved adapter tensor, and {cfg.lora.peft}"
                          f" saves tensors computed from its trainable ones; use {', '.join(PEFT)}")
    if cfg.lora.client_ranks.strip() or cfg.lora.policy != "none":
        raise ConfigError("lora.client-ranks: scaffold keeps one control variate of the global adapter's shape per "
                          "client, and a lower-rank client trains part of it; give every client lora.rank "
                          "(lora.client-ranks='', lora.policy=none)")
    if cfg.server.mode != "sync":
        raise ConfigError("server.mode: scaffold updates c from one round's cohort of variate deltas; asynchronous "
                          "rounds apply replies trained at older versions of c; use server.mode=sync")


def check(cfg: Config, chain: Any, method: str, variates: bool) -> None:
    """`fits` when the chain's rule is scaffold's (called by strategies.resolve)."""
    if chain.rule.meta.get("variates"):
        fits(cfg, method, variates)


RULES.register(RULE, scaffold, accepts=frozenset({"dense"}), streams=True, fold=MEAN, variates=True,
               round_config=round_config, checks={"correct": "one of " + ", ".join(WHERE)})
