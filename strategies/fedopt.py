"""Server optimizers over the aggregated adapter delta: FedAvgM, FedAdam, FedYogi, FedAdagrad.

The example-weighted mean delta is a pseudo-gradient (its negative); the server keeps
moments across rounds and takes its own step. Reddi et al., "Adaptive Federated
Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295 (Algorithm 2); Hsu et al., 2019,
https://arxiv.org/abs/1909.06335 (FedAvgM).

    m = beta1 m + (1 - beta1) d
    v = beta2 v + (1 - beta2) d^2                     (adam)
    v = v - (1 - beta2) d^2 sign(v - d^2)             (yogi)
    v = v + d^2                                       (adagrad)
    step = lr m / (sqrt(v) + tau)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from strategies.base import FedLLMStrategy, State, Update, weighted_mean
from strategies.registry import register


class Moments(NamedTuple):
    m: State
    v: State


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


def _mean(updates: list[Update]) -> State:
    return weighted_mean([{k: t.float() for k, t in u.delta.items()} for u in updates],
                         [u.num_examples for u in updates])


@register("fedavgm")
class FedAvgM(FedLLMStrategy):
    """FedAvg with server momentum (strategy.momentum, strategy.server-lr, default 1.0)."""

    momentum_buffer: State | None = None

    def aggregate(self, server_round: int, updates: list[Update]) -> State:
        lr = self.cfg.strategy.server_lr or 1.0
        step, self.momentum_buffer = momentum_step(_mean(updates), self.momentum_buffer,
                                                   self.cfg.strategy.momentum, lr)
        return step


class _Adaptive(FedLLMStrategy):
    rule = ""
    moments: Moments | None = None

    def aggregate(self, server_round: int, updates: list[Update]) -> State:
        s = self.cfg.strategy
        step, self.moments = adaptive_step(_mean(updates), self.moments, self.rule, s.server_lr or 1e-3,
                                           s.beta1, s.beta2, s.tau)
        return step


@register("fedadam")
class FedAdam(_Adaptive):
    """Adam on the server (strategy.server-lr, beta1, beta2, tau)."""

    rule = "adam"


@register("fedyogi")
class FedYogi(_Adaptive):
    """Yogi on the server: the second moment moves additively, so it grows more slowly."""

    rule = "yogi"


@register("fedadagrad")
class FedAdagrad(_Adaptive):
    """Adagrad on the server: the second moment sums all squared deltas."""

    rule = "adagrad"
