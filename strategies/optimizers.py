"""Server optimizers over the aggregate delta: FedAvgM, FedAdam, FedYogi, FedAdagrad, each an
(init, update) pair with explicit state, optax style.

    opt = OPTIMIZERS.get("fedadam").impl
    state = opt.init(delta, cfg)
    step, state = opt.update(delta, state, cfg, lr=0.01)     # the stage's arguments: fedadam(lr=0.01)

An optimizer's parameters are keyword arguments of `update` after (delta, state, cfg), given as
its stage's arguments in server.strategy; the built-ins default each to its strategy.* key, and
take `flavor=flower` for Flower's formulas and defaults (strategies.flavors).

The aggregate delta is a pseudo-gradient (its negative); the server keeps moments across
rounds and takes its own step. Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295 (Algorithm 2); Hsu et al., 2019,
https://arxiv.org/abs/1909.06335 (FedAvgM).

    m = beta1 m + (1 - beta1) d                       (m_0 = 0)
    v = beta2 v + (1 - beta2) d^2                     (adam)
    v = v - (1 - beta2) d^2 sign(v - d^2)             (yogi)
    v = v + d^2                                       (adagrad)
    step = lr m / (sqrt(v) + tau)

fedllm (Reddi et al.): v_0 = tau^2, no bias correction; lr 1e-3 by default. flavor=flower
(flwr.serverapp.strategy FedAdam, FedYogi, FedAdagrad): v_0 = 0; FedAdam's lr times
sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) at step t (Flower's server_round); FedAdagrad without
a first moment (beta1 = 0); lr 0.1 (adam, adagrad) or 0.01 (yogi). FedAvgM: the same formula
in both, momentum 0.9 here and 0.0 in Flower by default.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch

from fedllm.config import Config
from fedllm.protocol import State
from fedllm.registry import Registry
from strategies.flavors import FLAVOR_CHECK, flavor_of, setting


class ServerOpt(NamedTuple):
    """init(delta, cfg) -> state; update(delta, state, cfg, **args) -> (step, state)."""

    init: Callable[[State, Config], Any]
    update: Callable[[State, Any, Config], tuple[State, Any]]


class Moments(NamedTuple):
    """The adaptive optimizers' state: first and second moments, and the steps taken."""

    m: State
    v: State
    t: int = 0


OPTIMIZERS: Registry[ServerOpt] = Registry("server optimizer", "server.strategy")


def momentum_step(d: State, m: State | None, momentum: float, lr: float) -> tuple[State, State]:
    """FedAvgM: m = momentum m + d; step = lr m. Returns (step, m)."""
    m = {k: d[k].clone() if m is None else momentum * m[k] + d[k] for k in d}
    return {k: lr * m[k] for k in m}, m


def adaptive_step(d: State, state: Moments | None, rule: str, lr: float, beta1: float, beta2: float,
                  tau: float, flavor: str = "fedllm") -> tuple[State, Moments]:
    """One FedAdam/FedYogi/FedAdagrad step on the mean delta `d`. Returns (step, moments).

    The first moment starts at 0; the second at tau^2 (Reddi et al.'s v_{-1} >= tau^2), or at 0
    with flavor=flower, whose FedAdam also corrects lr for bias as Flower does (its exponent is
    the round number + 1; here the number of steps taken + 1: the same when every round applies).
    """
    if state is None:
        v0 = tau * tau if flavor == "fedllm" else 0.0
        state = Moments({k: torch.zeros_like(t) for k, t in d.items()},
                        {k: torch.full_like(t, v0) for k, t in d.items()})
    m = {k: beta1 * state.m[k] + (1 - beta1) * d[k] for k in d}
    sq = {k: d[k] * d[k] for k in d}
    if rule == "adam":
        v = {k: beta2 * state.v[k] + (1 - beta2) * sq[k] for k in d}
    elif rule == "yogi":
        v = {k: state.v[k] - (1 - beta2) * sq[k] * torch.sign(state.v[k] - sq[k]) for k in d}
    elif rule == "adagrad":
        v = {k: state.v[k] + sq[k] for k in d}
    else:
        raise ValueError(f"unknown adaptive rule {rule!r}")
    t = state.t + 1
    if flavor == "flower" and rule == "adam":
        lr = lr * math.sqrt(1 - beta2 ** (t + 1)) / (1 - beta1 ** (t + 1))
    step = {k: lr * m[k] / (v[k].sqrt() + tau) for k in d}
    return step, Moments(m, v, t)


def _float(d: State) -> State:
    return {k: t.float() for k, t in d.items()}


def fedavgm() -> ServerOpt:
    """FedAvg with server momentum: fedavgm(lr=1.0, momentum=0.9) (defaults strategy.server-lr or
    1.0, strategy.momentum; flavor=flower: Flower's FedAvgM, momentum 0.0)."""

    def update(d: State, m: State | None, cfg: Config, lr: float | None = None, momentum: float | None = None, *,
               flavor: str | None = None) -> tuple[State, State]:
        flavor = flavor_of(flavor)
        return momentum_step(_float(d), m, setting(cfg, flavor, "fedavgm", "momentum", momentum, "momentum"),
                             setting(cfg, flavor, "fedavgm", "lr", lr, "server_lr", 1.0))

    return ServerOpt(lambda d, cfg: None, update)


def adaptive(rule: str) -> ServerOpt:
    """Adam, Yogi or Adagrad on the server: fedadam(lr=1e-3, beta1=0.9, beta2=0.99, tau=1e-3)
    (defaults strategy.server-lr or 1e-3, strategy.beta1, beta2, tau); fedadam(flavor=flower):
    Flower's formula and defaults (module docstring)."""
    stage = f"fed{rule}"

    def update(d: State, moments: dict[str, Any] | None, cfg: Config, lr: float | None = None,
               beta1: float | None = None, beta2: float | None = None, tau: float | None = None, *,
               flavor: str | None = None) -> tuple[State, dict[str, Any]]:
        flavor = flavor_of(flavor)
        lr, beta1, beta2, tau = (setting(cfg, flavor, stage, param, arg, key, fedllm) for param, arg, key, fedllm in (
            ("lr", lr, "server_lr", 1e-3), ("beta1", beta1, "beta1", None), ("beta2", beta2, "beta2", None),
            ("tau", tau, "tau", None)))
        step, new = adaptive_step(_float(d), Moments(**moments) if moments else None, rule, lr, beta1, beta2, tau,
                                  flavor)
        return step, new._asdict()  # plain data, as a checkpoint stores it

    return ServerOpt(lambda d, cfg: None, update)


# checked with the config
ADAPTIVE_CHECKS = {"lr": "> 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "tau": "> 0", **FLAVOR_CHECK}
OPTIMIZERS.register("fedavgm", fedavgm(), accepts=frozenset({"dense"}),
                    checks={"lr": "> 0", "momentum": "[0, 1)", **FLAVOR_CHECK})
OPTIMIZERS.register("fedadam", adaptive("adam"), accepts=frozenset({"dense"}), checks=ADAPTIVE_CHECKS)
OPTIMIZERS.register("fedyogi", adaptive("yogi"), accepts=frozenset({"dense"}), checks=ADAPTIVE_CHECKS)
OPTIMIZERS.register("fedadagrad", adaptive("adagrad"), accepts=frozenset({"dense"}), checks=ADAPTIVE_CHECKS)
