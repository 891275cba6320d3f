"""A rule chain: one aggregation rule, then server optimizers, then (with DP) Gaussian noise.

    chain = parse_chain("trimmed-mean(fraction=0.2) > fedadam(lr=0.01)", cfg, kind, "fedavg")
    agg = chain(updates)                                      # Aggregate(delta, outliers)
    chain.state_dict()                                        # the optimizers' states, by position

server.strategy names the rule first ("fedavg", "median", ..., or `module:function`), then
zero or more optimizers; a chain that starts with an optimizer ("fedadam") starts from the
method's default rule. Each stage may take arguments in fedllm.plugins' grammar (literals
only): a rule is called `rule(updates, cfg, *args, **kwargs)` and an optimizer's update
`update(delta, state, cfg, *args, **kwargs)` with its stage's arguments, so a user's
`my_pkg.rules:clipped(c=1.5)` receives c=1.5 as a keyword argument; an argument the function
does not take is a ConfigError naming the stage and the ones it takes. The built-ins fall back
to the strategy.* keys, which are deprecated (a warning names the new spelling). With dp.clipping-norm > 0 the chain ends in `dp-noise`: Gaussian noise
of std dp.noise-multiplier x dp.clipping-norm / sampled clients on the aggregate, as Flower's
client-side fixed-clipping strategy adds it (the clients clip with Flower's mod).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from fedllm.config import Config, within
from fedllm.errors import ConfigError
from fedllm.plugins import Stage, check_arguments, parse_stages
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
    stages: list[Stage] = field(default_factory=list)  # the rule's, then each optimizer's (their arguments)

    def __post_init__(self) -> None:
        self.states = [None] * len(self.optimizers)
        if not self.stages:
            self.stages = [Stage(e.name) for e in [self.rule, *self.optimizers]]

    def __call__(self, updates: list[Update]) -> Aggregate:
        rule = self.stages[0]
        out = self.rule.impl(updates, self.cfg, *rule.args, **rule.kwargs)
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
        for i, (opt, stage) in enumerate(zip(self.optimizers, self.stages[1:])):
            if self.states[i] is None:
                self.states[i] = opt.impl.init(delta, self.cfg)
            delta, self.states[i] = opt.impl.update(delta, self.states[i], self.cfg, *stage.args, **stage.kwargs)
        if self.noise_std > 0:
            delta = {k: t + torch.from_numpy(np.random.normal(0.0, self.noise_std, t.shape)).to(t.dtype)
                     for k, t in delta.items()}
        return Aggregate(delta, agg.outliers)

    def round_config(self) -> dict[str, Any]:
        """Per-round values the rule sends the clients (FedProx's proximal-mu)."""
        fn = self.rule.meta.get("round_config")
        return dict(fn(self.cfg, *self.stages[0].args, **self.stages[0].kwargs)) if fn else {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {f"{i}:{o.name}": s for i, (o, s) in enumerate(zip(self.optimizers, self.states))}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["optimizers"]
        expected = [f"{i}:{o.name}" for i, o in enumerate(self.optimizers)]
        if sorted(saved) != sorted(expected):
            raise ConfigError(f"server.strategy: the checkpoint's optimizers {sorted(saved)} differ from {expected}")
        self.states = [saved[k] for k in expected]


def takes_two(fn: Any) -> bool:
    """Whether `fn` takes two positional arguments (updates, cfg) first; its own parameters
    (the stage's arguments) may follow."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params[:3]):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_after = [p for p in positional[2:] if p.default is p.empty]
    return len(positional) >= 2 and not any(p.kind is p.POSITIONAL_ONLY for p in required_after)


# strategy.* key: (the argument that replaces it, the stages that take it; the first is the suggestion)
DEPRECATED = {
    "proximal_mu": ("mu", ("fedprox",)),
    "trim_fraction": ("fraction", ("trimmed-mean",)),
    "byzantine": ("f", ("krum", "multikrum")),
    "multikrum_keep": ("keep", ("multikrum",)),
    "max_norm": ("max_norm", ("norm-bounded",)),
    "server_lr": ("lr", ("fedadam", "fedavgm", "fedyogi", "fedadagrad")),
    "momentum": ("momentum", ("fedavgm",)),
    "beta1": ("beta1", ("fedadam", "fedyogi", "fedadagrad")),
    "beta2": ("beta2", ("fedadam", "fedyogi")),
    "tau": ("tau", ("fedadam", "fedyogi", "fedadagrad")),
}


def deprecation(cfg: Config, stages: list[Stage]) -> str:
    """The one warning line for strategy.* keys set away from their defaults ('' for none): the
    chain spelled with them as its stages' arguments."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg.strategy)}
    extra: list[dict[str, Any]] = [{} for _ in stages]
    keys, unused = [], []
    for attr, (arg, takers) in DEPRECATED.items():
        value = getattr(cfg.strategy, attr)
        if value == defaults[attr]:
            continue
        keys.append(f"strategy.{attr.replace('_', '-')}")
        at = next((i for i, s in enumerate(stages) if s.name in takers and arg not in s.kwargs), None)
        if at is None:
            unused.append(f"{takers[0]}({arg}={value!r})")
        else:
            extra[at][arg] = value
    if not keys:
        return ""
    spelled = " > ".join(s.spelled(**x) for s, x in zip(stages, extra))
    line = (f"{', '.join(keys)}: deprecated, going in the next release; give {'it' if len(keys) == 1 else 'them'} "
            f"as stage arguments: server.strategy=\"{spelled}\"")
    return line + (f" ({', '.join(unused)} where that stage is in the chain)" if unused else "")


def check_values(checks: Mapping[str, str] | None, fn: Any, leading: int, stage: Stage) -> None:
    """A stage's arguments within the ranges its registration declares (`checks`: {name: "> 0",
    "[0, 0.5)", ...; "int >= 0" for a whole number; "one of a, b" for a word}), so a bad value
    fails with the config, not in a round.

    Raises:
        ConfigError: naming server.strategy, the stage and the argument.
    """
    if not checks:
        return
    bound = inspect.signature(fn).bind_partial(*([None] * leading), *stage.args, **stage.kwargs).arguments
    for name, check in checks.items():
        if name not in bound:
            continue
        value, whole = bound[name], check.startswith("int ")
        if check.startswith("one of "):
            words = [w.strip() for w in check.removeprefix("one of ").split(",")]
            if value not in words:
                raise ConfigError(f"server.strategy: stage {stage.text or stage.name!r}: {name} must be one of "
                                  f"{', '.join(words)}, got {value!r}")
            continue
        rng = check.removeprefix("int ")
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (whole and not float(value).is_integer()) or not within(float(value), rng)):
            where = rng if rng[0] in "<>" else "in " + rng
            raise ConfigError(f"server.strategy: stage {stage.text or stage.name!r}: {name} must be "
                              f"{'a whole number ' if whole else ''}{where}, got {value!r}")


def parse_chain(spec: str, cfg: Config, kind: str, default_rule: str,
                method_rules: Mapping[str, Rule] | None = None) -> Chain:
    """The chain for server.strategy `spec`, checked against the method's update kind; logs
    one deprecation line when strategy.* keys are set (`deprecation`).

    Raises:
        ConfigError: naming server.strategy for an unknown part, a rule that does not accept
            the method's updates, a rule in an optimizer's place, or an argument a stage does
            not take.
    """
    stages = parse_stages(spec, "server.strategy")
    method_rules = dict(method_rules or {})
    if not stages or stages[0].name in OPTIMIZERS:
        stages.insert(0, Stage(default_rule, text=default_rule))
    head, *rest = stages
    if head.name in method_rules:
        rule: Entry[Rule] = Entry(head.name, method_rules[head.name], None, {"accepts": frozenset({kind})})
    else:
        rule = RULES.get(head.name)
    if isinstance(rule.impl, type) or not callable(rule.impl) or not takes_two(rule.impl):
        got = "a class" if isinstance(rule.impl, type) else f"{type(rule.impl).__name__} {getattr(rule.impl, '__name__', '')}"
        raise ConfigError(f"server.strategy: {head.name!r} is not a rule: a rule is a function (updates, cfg) -> delta "
                          f"(got {got.strip()})")
    check_arguments(rule.impl, 2, head, "server.strategy")
    check_values(rule.meta.get("checks"), rule.impl, 2, head)
    accepts = rule.meta.get("accepts")
    if accepts is not None and kind not in accepts:
        raise ConfigError(f"server.strategy: rule {head.name!r} does not aggregate {kind!r} updates "
                          f"(train.method={cfg.train.method})")
    optimizers = []
    for part in rest:
        if part.name in RULES or part.name in method_rules:
            raise ConfigError(f"server.strategy: {part.name!r} is a rule; a chain has one rule, first, then optimizers")
        opt = OPTIMIZERS.get(part.name)
        if kind not in opt.meta.get("accepts", frozenset({kind})):
            raise ConfigError(f"server.strategy: optimizer {part.name!r} does not apply to {kind!r} updates "
                              f"(train.method={cfg.train.method})")
        check_arguments(opt.impl.update, 3, part, "server.strategy")
        check_values(opt.meta.get("checks"), opt.impl.update, 3, part)
        optimizers.append(opt)
    warning = deprecation(cfg, stages)
    if warning:
        logging.getLogger("fedllm").warning(warning)
    noise = 0.0
    if cfg.dp.clipping_norm > 0:
        noise = cfg.dp.noise_multiplier * cfg.dp.clipping_norm / (cfg.dp.sampled_clients or cfg.server.min_clients)
    return Chain(" > ".join(s.text or s.name for s in stages), rule, optimizers, cfg, noise, stages=stages)
