"""Server optimizers over the aggregate delta: FedAvgM, FedAdam, FedYogi, FedAdagrad, each an
(init, update) pair with explicit state, optax style.

    opt = OPTIMIZERS.get("fedadam").impl
    state = opt.init(delta, cfg)
    step, state = opt.update(delta, state, cfg, lr=0.01)     # the stage's arguments: fedadam(lr=0.01)

An optimizer's parameters are keyword arguments of `update` after (delta, state, cfg), given as
its stage's arguments in server.strategy; the built-ins default each to its strategy.* key.

The aggregate delta is a pseudo-gradient (its negative); the server keeps moments across
rounds and takes its own step. Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295 (Algorithm 2); Hsu et al., 2019,
https://arxiv.org/abs/1909.06335 (FedAvgM).

    m = beta1 m + (1 - beta1) d
    v = beta2 v + (1 - beta2) d^2                     (adam)
    v = v - (1 - beta2) d^2 sign(v - d^2)             (yogi)
    v = v + d^2                                       (adagrad)
    step = lr m / (sqrt(v) + tau)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from fedllm.config import Config
from fedllm.protocol import State
from fedllm.registry import Registry


class ServerOpt(NamedTuple):
    """init(delta, cfg) -> state; update(delta, state, cfg, **args) -> (step, state)."""

    init: Callable[[State, Config], Any]
    update: Callable[[State, Any, Config], tuple[State, Any]]


class Moments(NamedTuple):
    m: State
    v: State


OPTIMIZERS: Registry[ServerOpt] = Registry("server optimizer", "server.strategy")


def momentum_step(d: State, m: State | None, momentum: float, lr: float) -> tuple[State, State]:
    """FedAvgM: m = momentum m + d; step = lr m. Returns (step, m)."""
    m = {k: d[k].clone() if m is None else momentum * m[k] + d[k] for k in d}
    return {k: lr * m[k] for k in m}, m


def adaptive_step(d: State, state: Moments | None, rule: str, lr: float, beta1: float, beta2: float,
                  tau: float) -> tuple[State, Moments]:
    """One FedAdam/FedYogi/FedAdagrad step on the mean delta `d`. Returns (step, moments).

    The second moment starts at tau^2 (Reddi et al.'s v_{-1} >= tau^2), the first at 0.
    """
    if state is None:
        state = Moments({k: torch.zeros_like(t) for k, t in d.items()},
                        {k: torch.full_like(t, tau * tau) for k, t in d.items()})
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
    step = {k: lr * m[k] / (v[k].sqrt() + tau) for k in d}
    return step, Moments(m, v)


def _float(d: State) -> State:
    return {k: t.float() for k, t in d.items()}


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def fedavgm() -> ServerOpt:
    """FedAvg with server momentum: fedavgm(lr=1.0, momentum=0.9) (defaults strategy.server-lr
    or 1.0, strategy.momentum)."""

    def update(d: State, m: State | None, cfg: Config, lr: float | None = None,
               momentum: float | None = None) -> tuple[State, State]:
        return momentum_step(_float(d), m, _or(momentum, cfg.strategy.momentum), _or(lr, cfg.strategy.server_lr or 1.0))

    return ServerOpt(lambda d, cfg: None, update)


def adaptive(rule: str) -> ServerOpt:
    """Adam, Yogi or Adagrad on the server: fedadam(lr=1e-3, beta1=0.9, beta2=0.99, tau=1e-3)
    (defaults strategy.server-lr or 1e-3, strategy.beta1, beta2, tau)."""

    def update(d: State, moments: dict[str, State] | None, cfg: Config, lr: float | None = None,
               beta1: float | None = None, beta2: float | None = None,
               tau: float | None = None) -> tuple[State, dict[str, State]]:
        s = cfg.strategy
        step, new = adaptive_step(_float(d), Moments(**moments) if moments else None, rule, _or(lr, s.server_lr or 1e-3),
                                  _or(beta1, s.beta1), _or(beta2, s.beta2), _or(tau, s.tau))
        return step, new._asdict()  # plain data, as a checkpoint stores it

    return ServerOpt(lambda d, cfg: None, update)


ADAPTIVE_CHECKS = {"lr": "> 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "tau": "> 0"}  # checked with the config
OPTIMIZERS.register("fedavgm", fedavgm(), accepts=frozenset({"dense"}), checks={"lr": "> 0", "momentum": "[0, 1)"})
OPTIMIZERS.register("fedadam", adaptive("adam"), accepts=frozenset({"dense"}), checks=ADAPTIVE_CHECKS)
OPTIMIZERS.register("fedyogi", adaptive("yogi"), accepts=frozenset({"dense"}), checks=ADAPTIVE_CHECKS)
OPTIMIZERS.register("fedadagrad", adaptive("adagrad"), accepts=frozenset({"dense"}), checks=ADAPTIVE_CHECKS)
