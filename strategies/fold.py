"""Streaming aggregation: a rule that is a sum folds each validated update into a running
total as it arrives, so the server holds one update's worth of memory, not one per client.

    fold = RULES.get("fedavg").meta["fold"]         # MEAN
    acc = fold.init()
    for u in updates_as_they_arrive:
        acc = fold.add(acc, u.delta, u.num_examples)
    delta = fold.result(acc)                        # == fedavg(updates) when folded in the same order

A `Fold` is three pure functions over an explicit accumulator (optax's init/update shape);
`add` may reuse the accumulator's storage (it owns it), which is what keeps the memory flat.
The list rule `fedavg` is this fold run over the list, so the two are bit-identical when the
updates come in the same order; in another order the float32 sums differ by rounding only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fedllm.protocol import State


class Sum(NamedTuple):
    """A running weighted sum: sum_i w_i * delta_i per tensor (float32), and sum_i w_i."""

    total: State
    weight: float


class Fold(NamedTuple):
    """init() -> acc; add(acc, delta, weight) -> acc; result(acc) -> the aggregate delta."""

    init: Callable[[], Sum]
    add: Callable[[Sum, State, float], Sum]
    result: Callable[[Sum], State]


def _init() -> Sum:
    return Sum({}, 0.0)


def _add(acc: Sum, delta: State, weight: float) -> Sum:
    names = list(delta)
    if not acc.total:  # the first update: its weighted copy becomes the accumulator
        return Sum(dict(zip(names, torch._foreach_mul([delta[k].float() for k in names], float(weight)))),
                   float(weight))
    if delta.keys() != acc.total.keys():
        raise ValueError(f"fold: update tensors {sorted(delta)[:3]}... differ from the first update's")
    # one multi-tensor kernel launch for every tensor (a LoRA adapter has hundreds of small ones)
    torch._foreach_add_([acc.total[k] for k in names], [delta[k].float() for k in names], alpha=float(weight))
    return Sum(acc.total, acc.weight + float(weight))


def _result(acc: Sum) -> State:
    if acc.weight <= 0:
        raise ValueError("weights must sum to a positive number")
    names = list(acc.total)
    return dict(zip(names, torch._foreach_div([acc.total[k] for k in names], acc.weight)))


MEAN = Fold(_init, _add, _result)
"""The example-weighted mean (FedAvg), accumulated in float32."""


def fold_all(fold: Fold, deltas: list[State], weights: list[float]) -> State:
    """`fold` run over a list, in its order."""
    acc = fold.init()
    for delta, w in zip(deltas, weights):
        acc = fold.add(acc, delta, w)
    return fold.result(acc)



class Running:
    """A fold and its accumulator behind `add` / `result` (the interface SumTree shares)."""

    def __init__(self, fold: Fold) -> None:
        self.fold, self.acc = fold, fold.init()

    def add(self, delta: State, weight: float) -> None:
        self.acc = self.fold.add(self.acc, delta, weight)

    def result(self) -> State:
        return self.fold.result(self.acc)

    def close(self) -> None:
        self.acc = self.fold.init()
