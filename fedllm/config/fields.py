"""What a config section is made of: `option` fields with a help line and a numeric check, and the
checks a section's `__post_init__` calls (`choice`, `positive`, `check_device`)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field
from typing import Any

from fedllm.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANTIZE = ("none", "int8", "nf4", "fp4")
OPTIMIZERS = ("adamw", "paged-adamw-8bit")


def option(text: str, default: Any, check: str = "") -> Any:
    """A field with its help line and, for a number, the values it takes: "> 0", ">= 0",
    an interval such as "[0, 1)", or "finite" (any finite number). Every number is refused
    when NaN or infinite, at parse time, with the key named."""
    return field(default=default, metadata={"help": text, "check": check})




def parse_check(check: str) -> tuple[float, float, bool, bool]:
    """(low, high, low included, high included) of a field's check."""
    check = check.strip()
    if check in ("", "finite"):
        return -math.inf, math.inf, False, False
    if check.startswith(">="):
        return float(check[2:]), math.inf, True, False
    if check.startswith(">"):
        return float(check[1:]), math.inf, False, False
    low, high = (float(x) for x in check[1:-1].split(","))
    return low, high, check[0] == "[", check[-1] == "]"


def within(value: float, check: str) -> bool:
    """Whether a finite `value` satisfies `check`."""
    low, high, low_in, high_in = parse_check(check)
    return (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))


def check_numbers(section: str, obj: Any) -> None:
    """Every number of a config section finite and within its field's check.

    Raises:
        ConfigError: naming the first key whose value is out of range.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        key, check = f"{section}.{f.name.replace('_', '-')}", f.metadata.get("check", "")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        if not within(value, check):
            raise ConfigError(f"{key}: must be {check if check[0] in '<>' else 'in ' + check}, got {value}")



DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")  # model.device, server.device, a node config's device


def check_device(spec: Any, key: str) -> None:
    """A device's spelling: auto, cpu, cuda or cuda:N (fedllm.devices resolves it where it runs).

    Raises:
        ConfigError: naming `key`.
    """
    if not isinstance(spec, str) or not DEVICE.match(spec.strip()):
        raise ConfigError(f"{key}: must be auto, cpu, cuda or cuda:N, got {spec!r}")


def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not among `choices`, naming `key`."""
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")


def positive(key: str, value: float) -> None:
    """Refuse a value that is not > 0, naming `key`."""
    if value <= 0:
        raise ConfigError(f"{key}: must be positive, got {value}")
