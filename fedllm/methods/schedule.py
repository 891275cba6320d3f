"""Round-aware learning rates: one schedule over the run's local steps, continued across rounds.

    first, total = clock(cfg, server_round)           # this round's first step, the run's steps
    lr = cfg.train.lr * lr_factor(cfg.train, first + i, total)

The clock counts a client's local steps as if it took part in every round: round t (1-based) runs
steps (t - 1) x S .. t x S - 1 of server.num-rounds x S, with S the method's steps per round
(train.local-steps; diloco's H / P). A client sampled in round t trains at round t's rates,
whatever rounds it missed, and a resumed run (which continues its round numbers) continues the
schedule: the rate is a function of the round, not of state a process holds. FlowerTune's
template decays the rate with the round the same way (cosine from lr to a floor).

Schedules: constant; linear (to train.min-lr at the last step); cosine (half a cosine from
train.lr to train.min-lr; Loshchilov & Hutter, "SGDR", 2017); each after train.warmup-steps of a
linear warm-up from 0 (the first step takes lr / warm-up steps).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedllm.config import Config, TrainConfig

SCHEDULES = ("constant", "linear", "cosine")


def steps_per_round(cfg: Config) -> int:
    """Local steps one round runs: the method's own count (its spec's round_steps), else train.local-steps."""
    from fedllm.methods.base import spec_of

    spec = spec_of(cfg)
    return spec.round_steps(cfg) if spec.round_steps is not None else cfg.train.local_steps


def clock(cfg: Config, server_round: int) -> tuple[int, int]:
    """(the first local step of `server_round`, the run's local steps); round 0 (a query) is step 0."""
    per = steps_per_round(cfg)
    return max(server_round - 1, 0) * per, cfg.server.num_rounds * per


def lr_factor(train: TrainConfig, step: int, total: int) -> float:
    """The multiple of train.lr at local step `step` (0-based) of `total`."""
    if train.lr_schedule == "constant" and train.warmup_steps == 0:
        return 1.0
    if step < train.warmup_steps:
        return (step + 1) / train.warmup_steps
    floor = train.min_lr / train.lr
    if train.lr_schedule == "constant":
        return 1.0
    span = max(total - train.warmup_steps - 1, 1)
    progress = min((step - train.warmup_steps) / span, 1.0)
    if train.lr_schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check(cfg: Config) -> None:
    """Raises:
        ConfigError: a warm-up as long as the run, a floor above train.lr, or a schedule for a method
        whose steps take no learning rate of train.lr."""
    from fedllm.errors import ConfigError
    from fedllm.methods.base import spec_of

    train = cfg.train
    if train.lr_schedule == "constant" and train.warmup_steps == 0 and train.min_lr == 0:
        return
    if not spec_of(cfg).schedule:
        raise ConfigError(f"train.lr-schedule: train.method={cfg.train.method} does not step with train.lr; "
                          "leave train.lr-schedule=constant, train.warmup-steps=0 and train.min-lr=0")
    _, total = clock(cfg, 1)
    if train.warmup_steps >= total:
        raise ConfigError(f"train.warmup-steps: {train.warmup_steps} is not below the run's {total} local steps "
                          f"(server.num-rounds x {steps_per_round(cfg)} steps a round)")
    if train.min_lr > train.lr:
        raise ConfigError(f"train.min-lr: {train.min_lr} is above train.lr={train.lr} (the floor a schedule decays to)")
