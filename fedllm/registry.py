"""One registry shape for every plug-in: methods, aggregation rules, server optimizers, codecs
and contribution scorers.

    RULES = Registry("rule", "server.strategy")
    RULES.register("fedavg", fedavg, accepts={"lora"}, streams=True)     # or as a decorator
    entry = RULES.get("fedavg")            # Entry(name, impl, config, meta)
    entry = RULES.get("my_pkg.mod:my_rule")   # a user's own, by module:object

Names are unique and lower-case (as peft's register_peft_method checks); metadata (`**meta`)
says what an entry works with, so config choices and cross-checks read it instead of lists of
names.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

from fedllm.errors import ConfigError

T = TypeVar("T")
NAME = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered plug-in: its name, the implementation, its config section type (if any)
    and free-form metadata."""

    name: str
    impl: T
    config: type | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Plug-ins of one kind by name; `key` is the config key that picks one (for errors)."""

    def __init__(self, kind: str, key: str) -> None:
        self.kind, self.key = kind, key
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, impl: T | None = None, *, config: type | None = None,
                 **meta: Any) -> Any:
        """Add `impl` under `name`; without `impl`, a decorator that adds what it decorates.

        Raises:
            ValueError: for a name that is not lower-case or is taken by another implementation.
        """
        if not NAME.fullmatch(name):
            raise ValueError(f"{self.kind} name must be lower-case letters, digits, - or _: {name!r}")

        def add(obj: T) -> T:
            old = self._entries.get(name)
            if old is not None and old.impl is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered already ({getattr(old.impl, '__name__', old.impl)})")
            self._entries[name] = Entry(name, obj, config, dict(meta))
            return obj

        return add if impl is None else add(impl)

    def get(self, spec: str) -> Entry[T]:
        """The entry for a registered name, or for `module:object` (metadata from the object's
        `meta` attribute, if it has one).

        Raises:
            ConfigError: naming the config key when nothing matches.
        """
        spec = spec.strip()
        if ":" in spec:
            module_name, _, attr = spec.partition(":")
            try:
                obj = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise ConfigError(f"{self.key}: cannot import {spec!r}: {err}") from err
            return Entry(spec, obj, None, dict(getattr(obj, "meta", {}) or {}))
        if spec not in self._entries:
            raise ConfigError(f"{self.key}: unknown {self.kind} {spec!r}; registered: {', '.join(self.names())}")
        return self._entries[spec]

    def remove(self, name: str) -> None:
        """Take an entry out (a plug-in's tests, or a user replacing a built-in on purpose)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        """Every entry, by name (what contract tests iterate)."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def load(obj: Any, key: str) -> Any:
    """`obj` itself, or the object a "module:object" string names, imported now (how a method's
    halves and rules are registered without importing their engines).

    Raises:
        ConfigError: naming `key` when the import fails.
    """
    if not isinstance(obj, str):
        return obj
    module_name, _, attr = obj.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{key}: cannot import {obj!r}: {err}") from err
