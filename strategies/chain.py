"""A rule chain: one aggregation rule, then server optimizers, then (with DP) Gaussian noise.

    chain = parse_chain("median > fedadam", cfg, method)     # server.strategy
    agg, = chain(updates)                                     # Aggregate(delta, outliers)
    chain.state_dict()                                        # the optimizers' states, by position

server.strategy names the rule first ("fedavg", "median", ..., or `module:function`), then
zero or more optimizers; a chain that starts with an optimizer ("fedadam") starts from the
method's default rule. With dp.clipping-norm > 0 the chain ends in `dp-noise`: Gaussian noise
of std dp.noise-multiplier x dp.clipping-norm / sampled clients on the aggregate, as Flower's
client-side fixed-clipping strategy adds it (the clients clip with Flower's mod).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.protocol import Update
from fedllm.registry import Entry
from strategies.fold import Fold
from strategies.optimizers import OPTIMIZERS, ServerOpt
from strategies.rules import RULES, Aggregate, Rule


@dataclass
class Chain:
    """A parsed server.strategy: the rule, the optimizers and their states, the DP noise std."""

    name: str
    rule: Entry[Rule]
    optimizers: list[Entry[ServerOpt]]
    cfg: Config
    noise_std: float = 0.0
    states: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.states = [None] * len(self.optimizers)

    def __call__(self, updates: list[Update]) -> Aggregate:
        out = self.rule.impl(updates, self.cfg)
        return self.finish(out if isinstance(out, Aggregate) else Aggregate(out))

    @property
    def fold(self) -> Fold | None:
        """The rule's streaming fold (registry metadata `fold`), or None for a rule that needs
        every update at once."""
        return self.rule.meta.get("fold") if self.rule.meta.get("streams") else None

    def finish(self, agg: Aggregate) -> Aggregate:
        """The stages after the rule (optimizers, DP noise) on the rule's aggregate; what
        `__call__` runs after the rule, and what a streamed round runs after its fold."""
        delta = agg.delta
        for i, opt in enumerate(self.optimizers):
            if self.states[i] is None:
                self.states[i] = opt.impl.init(delta, self.cfg)
            delta, self.states[i] = opt.impl.update(delta, self.states[i], self.cfg)
        if self.noise_std > 0:
            delta = {k: t + torch.from_numpy(np.random.normal(0.0, self.noise_std, t.shape)).to(t.dtype)
                     for k, t in delta.items()}
        return Aggregate(delta, agg.outliers)

    def round_config(self) -> dict[str, Any]:
        """Per-round values the rule sends the clients (FedProx's proximal-mu)."""
        fn = self.rule.meta.get("round_config")
        return dict(fn(self.cfg)) if fn else {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {f"{i}:{o.name}": s for i, (o, s) in enumerate(zip(self.optimizers, self.states))}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["optimizers"]
        expected = [f"{i}:{o.name}" for i, o in enumerate(self.optimizers)]
        if sorted(saved) != sorted(expected):
            raise ConfigError(f"server.strategy: the checkpoint's optimizers {sorted(saved)} differ from {expected}")
        self.states = [saved[k] for k in expected]


def takes_two(fn: Any) -> bool:
    """Whether `fn` can be called with two positional arguments (updates, cfg)."""
    try:
        inspect.signature(fn).bind(None, None)
    except (TypeError, ValueError):
        return False
    return True


def parse_chain(spec: str, cfg: Config, kind: str, default_rule: str,
                method_rules: Mapping[str, Rule] | None = None) -> Chain:
    """The chain for server.strategy `spec`, checked against the method's update kind.

    Raises:
        ConfigError: naming server.strategy for an unknown part, a rule that does not accept
            the method's updates, or a rule in an optimizer's place.
    """
    parts = [p.strip() for p in re.split(r"\s*>\s*", spec.strip())] if spec.strip() else []
    if any(not p for p in parts):
        raise ConfigError(f"server.strategy: {spec!r} has an empty stage")
    method_rules = dict(method_rules or {})
    if not parts or parts[0] in OPTIMIZERS:
        parts.insert(0, default_rule)
    head, *rest = parts
    if head in method_rules:
        rule: Entry[Rule] = Entry(head, method_rules[head], None, {"accepts": frozenset({kind})})
    else:
        rule = RULES.get(head)
    if isinstance(rule.impl, type) or not callable(rule.impl) or not takes_two(rule.impl):
        got = "a class" if isinstance(rule.impl, type) else f"{type(rule.impl).__name__} {getattr(rule.impl, '__name__', '')}"
        raise ConfigError(f"server.strategy: {head!r} is not a rule: a rule is a function (updates, cfg) -> delta "
                          f"(got {got.strip()})")
    accepts = rule.meta.get("accepts")
    if accepts is not None and kind not in accepts:
        raise ConfigError(f"server.strategy: rule {head!r} does not aggregate {kind!r} updates "
                          f"(train.method={cfg.train.method})")
    optimizers = []
    for part in rest:
        if part in RULES or part in method_rules:
            raise ConfigError(f"server.strategy: {part!r} is a rule; a chain has one rule, first, then optimizers")
        opt = OPTIMIZERS.get(part)
        if kind not in opt.meta.get("accepts", frozenset({kind})):
            raise ConfigError(f"server.strategy: optimizer {part!r} does not apply to {kind!r} updates "
                              f"(train.method={cfg.train.method})")
        optimizers.append(opt)
    noise = 0.0
    if cfg.dp.clipping_norm > 0:
        noise = cfg.dp.noise_multiplier * cfg.dp.clipping_norm / (cfg.dp.sampled_clients or cfg.server.min_clients)
    return Chain(" > ".join(parts), rule, optimizers, cfg, noise)
