"""Strategies by name, or by `module:Class` for a user's own.

    @register("mystrategy")
    class Mine(FedLLMStrategy): ...

    cls = get_strategy("fedavg")            # or get_strategy("my_pkg.mod:Mine")
"""

from __future__ import annotations

import importlib
import re

from fedllm.errors import ConfigError

STRATEGIES: dict[str, type] = {}


def register(name: str):
    """Class decorator: add a strategy under a unique lower-case name."""
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
        raise ValueError(f"strategy name must be lower-case letters, digits, - or _: {name!r}")

    def wrap(cls: type) -> type:
        if name in STRATEGIES and STRATEGIES[name] is not cls:
            raise ValueError(f"strategy {name!r} is registered already ({STRATEGIES[name].__name__})")
        STRATEGIES[name] = cls
        return cls

    return wrap


def get_strategy(spec: str) -> type:
    """The class for a registered name or a `module:Class` path.

    Raises:
        ConfigError: naming server.strategy when nothing matches.
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"server.strategy: cannot import {spec!r}: {err}") from err
        return cls
    if spec not in STRATEGIES:
        raise ConfigError(
            f"server.strategy: unknown strategy {spec!r}; registered: {', '.join(sorted(STRATEGIES))}"
        )
    return STRATEGIES[spec]
