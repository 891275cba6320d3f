"""Server optimizers over the aggregate delta: FedAvgM, FedAdam, FedYogi, FedAdagrad, each an
(init, update) pair with explicit state, optax style.

    opt = OPTIMIZERS.get("fedadam").impl
    state = opt.init(delta, cfg)
    step, state = opt.update(delta, state, cfg)

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
    """init(delta, cfg) -> state; update(delta, state, cfg) -> (step, state)."""

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


def fedavgm() -> ServerOpt:
    """FedAvg with server momentum (strategy.momentum, strategy.server-lr, default 1.0)."""

    def update(d: State, m: State | None, cfg: Config) -> tuple[State, State]:
        return momentum_step(_float(d), m, cfg.strategy.momentum, cfg.strategy.server_lr or 1.0)

    return ServerOpt(lambda d, cfg: None, update)


def adaptive(rule: str) -> ServerOpt:
    """Adam, Yogi or Adagrad on the server (strategy.server-lr (default 1e-3), beta1, beta2, tau)."""

    def update(d: State, moments: dict[str, State] | None, cfg: Config) -> tuple[State, dict[str, State]]:
        s = cfg.strategy
        step, new = adaptive_step(_float(d), Moments(**moments) if moments else None, rule, s.server_lr or 1e-3,
                                  s.beta1, s.beta2, s.tau)
        return step, new._asdict()  # plain data, as a checkpoint stores it

    return ServerOpt(lambda d, cfg: None, update)


OPTIMIZERS.register("fedavgm", fedavgm(), accepts=frozenset({"dense"}))
OPTIMIZERS.register("fedadam", adaptive("adam"), accepts=frozenset({"dense"}))
OPTIMIZERS.register("fedyogi", adaptive("yogi"), accepts=frozenset({"dense"}))
OPTIMIZERS.register("fedadagrad", adaptive("adagrad"), accepts=frozenset({"dense"}))
