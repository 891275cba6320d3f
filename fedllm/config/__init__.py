"""One typed config tree, built once from Flower's flat run_config.

Flower hands apps a flat dict such as {"lora.rank": 8, "server.num-rounds": 3}. `Config.from_flat`
turns it into dataclasses, checks every key and type, and refuses unknown keys by name, so a
typo never passes silently. Dashes and underscores in key names are interchangeable.

    cfg = Config.from_flat({"lora.rank": 16})
    cfg.lora.rank          # 16
    cfg.to_flat()          # back to a flat dict, e.g. to send to clients

The sections live in fedllm/config/training.py, server.py and federation.py (a method's own in its
folder); fields.py has what a section is made of.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

from fedllm.config.federation import (PENALTY_FLAGS, AttackConfig, CompressionConfig, DPConfig, LedgerConfig,
                                      SecAggConfig, ServerConfig, StrategyConfig, attack_kinds)
from fedllm.config.fields import (DEFAULT_MODEL, DEVICE, OPTIMIZERS, QUANTIZE, check_device, check_numbers, choice,
                                  option, parse_check, positive, within)
from fedllm.config.training import DataConfig, ModelConfig, TrainConfig
from fedllm.errors import ConfigError

CORE = ("model", "data", "train", "server", "compression", "strategy", "dp", "secagg", "ledger", "attack")
_SECTIONS: dict[str, type] = {}  # a method's own sections, by name, in registration order
_BUILTIN = "fedllm.methods"  # registers the built-in methods' sections when first imported


def register_section(name: str, section_type: type) -> type:
    """Add a config section (a dataclass of `option` fields) that a method owns, e.g. [zo]; its
    keys are `name.key`. A method's config.py calls this; sections come after [train].

    Raises:
        ValueError: for a name taken by another section.
    """
    taken = _SECTIONS.get(name)
    if name in CORE or (taken is not None and taken.__qualname__ != section_type.__qualname__):
        raise ValueError(f"config section [{name}] is taken")
    _SECTIONS[name] = section_type
    return section_type


def section_types() -> dict[str, type]:
    """Every section's dataclass, in key order: the core ones and the registered methods' (the
    built-in methods' import light: their config modules, not their engines)."""
    importlib.import_module(_BUILTIN)
    core = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "server": ServerConfig,
            "compression": CompressionConfig, "strategy": StrategyConfig, "dp": DPConfig, "secagg": SecAggConfig,
            "ledger": LedgerConfig, "attack": AttackConfig}
    head = {k: core[k] for k in ("model", "data", "train")}
    return {**head, **_SECTIONS, **{k: v for k, v in core.items() if k not in head}}


class Config:
    """The run's config: one typed section per `[name]` (cfg.model, cfg.train, cfg.server, ...,
    and each method's own, e.g. cfg.zo). Build it with `from_flat`; sections not given take
    their defaults."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    server: ServerConfig
    compression: CompressionConfig
    strategy: StrategyConfig
    dp: DPConfig
    secagg: SecAggConfig
    ledger: LedgerConfig
    attack: AttackConfig

    def __init__(self, **sections: Any) -> None:
        types = section_types()
        unknown = set(sections) - set(types)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        object.__setattr__(self, "_sections", {n: sections[n] if n in sections else t() for n, t in types.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(f"Config has no section {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._sections:
            raise AttributeError(f"Config has no section {name!r}")
        self._sections[name] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._sections == other._sections

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{n}={v!r}' for n, v in self._sections.items())})"

    def sections(self) -> dict[str, Any]:
        """{name: section} in key order."""
        return dict(self._sections)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any] | None = None) -> "Config":
        """Build the tree from `{"section.key": value}`; unknown keys are errors.

        Raises:
            ConfigError: naming the first unknown, mistyped or out-of-range key.
        """
        plugins = {k.replace("_", "-"): v for k, v in (flat or {}).items()}.get("server.plugins")
        if isinstance(plugins, str) and plugins.strip():  # a user's method registers its sections there
            from fedllm.plugins import import_plugins

            import_plugins(plugins)
        types = section_types()
        sections: dict[str, dict[str, Any]] = {name: {} for name in types}
        for key, value in (flat or {}).items():
            section, _, name = key.partition(".")
            section_type = types.get(section)
            if section_type is None or not name:
                raise ConfigError(f"{key}: unknown config key (sections: {', '.join(sections)})")
            fields = {f.name: f for f in dataclasses.fields(section_type)}
            attr = name.replace("-", "_")
            if attr not in fields:
                raise ConfigError(f"{key}: unknown config key in [{section}]")
            sections[section][attr] = _coerce(key, value, fields[attr].type)
        built = {name: types[name](**kw) for name, kw in sections.items()}
        for name, section_obj in built.items():
            check_numbers(name, section_obj)
        return cls(**built)

    def to_flat(self) -> dict[str, Any]:
        """The inverse of `from_flat`, with dashed key names as in pyproject.toml."""
        flat: dict[str, Any] = {}
        for name, section in self._sections.items():
            for f in dataclasses.fields(section):
                flat[f"{name}.{f.name.replace('_', '-')}"] = getattr(section, f.name)
        return flat

    def replace(self, **overrides: Any) -> "Config":
        """A copy with `{"section.key": value}` overrides applied (dots as `__`)."""
        flat = self.to_flat()
        flat.update({k.replace("__", "."): v for k, v in overrides.items()})
        return Config.from_flat(flat)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings; values stay strings and are typed by from_flat."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{pair}: expected key=value, e.g. lora.rank=16")
        out[key.strip()] = value.strip()
    return out


def options() -> dict[str, dataclasses.Field]:
    """Every config key's field (its metadata holds "help" and "check"), in key order."""
    return {f"{name}.{f.name.replace('_', '-')}": f
            for name, section_type in section_types().items() for f in dataclasses.fields(section_type)}


def help_table() -> list[tuple[str, str, Any]]:
    """(key, help, default) for every config key, for `fedllm config`."""
    rows = []
    for name, section_type in section_types().items():
        for f in dataclasses.fields(section_type):
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((f"{name}.{f.name.replace('_', '-')}", f.metadata["help"], default))
    return rows


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    want = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    if isinstance(value, str) and want is not str:
        text = value.strip().lower()
        try:
            if want is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return want(int(text) if want is int else float(text))
        except ValueError:
            raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}")
    return value


__all__ = ["AttackConfig", "CORE", "CompressionConfig", "Config", "DEFAULT_MODEL", "DEVICE", "DPConfig", "DataConfig",
           "LedgerConfig", "ModelConfig", "OPTIMIZERS", "PENALTY_FLAGS", "QUANTIZE", "SecAggConfig", "ServerConfig",
           "StrategyConfig", "TrainConfig", "attack_kinds", "check_device", "check_numbers", "choice", "help_table",
           "option", "options", "parse_check", "parse_overrides", "positive", "register_section", "section_types",
           "within"]
