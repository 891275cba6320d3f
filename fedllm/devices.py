"""Devices: where a party's model lives, how many GPUs a simulation may hand out, and precision.

    resolve("auto")                  # cuda:0 of what this process sees, where there is a GPU; else cpu
    resolve("cuda:1", "server.device")   # refused in one line where this process sees one GPU
    visible_gpus()                   # GPUs this process may use (CUDA_VISIBLE_DEVICES, else the driver's)
    gpu_share(0.25, 1)               # a client's share of a GPU in Ray: four clients a GPU
    precision("auto", device)        # bf16 on a GPU that has it, else no mixed precision

A method takes the device it is given and moves data once (STYLE.md 18): the model cache keys its
models by device (fedllm.model), a client's device comes from its node config `device` or
model.device, the server's from server.device. Randomness that parties share does not depend on
the device (fedllm.methods.counter_rng).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator

import torch

from fedllm.config import check_device as check_spec
from fedllm.errors import ConfigError

def resolve(spec: str, key: str = "model.device") -> torch.device:
    """The torch device `spec` names in this process: auto is cuda:0 of the GPUs this process sees
    (in Ray, the one it was given) where torch has CUDA, else the CPU.

    Raises:
        ConfigError: naming `key`, for cuda without CUDA or a GPU index this process does not see.
    """
    check_spec(spec, key)
    spec = spec.strip()
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={spec}: torch {torch.__version__} sees no CUDA device here "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use auto or cpu")
    index = 0 if spec in ("auto", "cuda") else int(spec.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"{key}={spec}: this process sees {count} GPU{'s' * (count != 1)} "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def visible_gpus() -> int:
    """GPUs this process may hand out: the entries of CUDA_VISIBLE_DEVICES where it is set (what Ray
    counts, and what CUDA then shows, up to its first invalid entry), else the driver's count."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    count = 0
    for entry in env.split(","):
        entry = entry.strip()
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):  # an index or a UUID, as CUDA reads them
            break
        count += 1
    return count


def gpu_share(value: float | None, available: int | None, key: str = "--gpus-per-client") -> float:
    """A client's GPUs in Ray: `value`, or by default one GPU each where there are GPUs (0 without).

    Ray takes a fraction of one GPU (0.25: four clients share it) or a whole number of them.
    `available`: the GPUs there are (of a machine, or the largest node of a cluster); None checks
    the value's form alone.

    Raises:
        ConfigError: naming `key`, for a negative, non-finite or non-whole value above 1, or more
            GPUs than `available`.
    """
    if value is None:
        return 1.0 if available else 0.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key}: must be a finite number >= 0, got {value}")
    if value > 1 and not float(value).is_integer():
        raise ConfigError(f"{key}: above 1 it must be a whole number of GPUs (Ray's rule), got {value}")
    if available is not None and value > available:
        raise ConfigError(f"{key}: {value:g} GPUs a client, but {available} {'is' if available == 1 else 'are'} "
                          "visible here (CUDA_VISIBLE_DEVICES, or the driver)")
    return float(value)


def precision(requested: str, device: torch.device) -> str:
    """train.precision for a model on `device`: auto is bf16 on a GPU that has bf16, else no.

    Raises:
        ConfigError: fp16 on the CPU (no fp16 kernels to gain from; use bf16 or no).
    """
    if requested == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if requested == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision=fp16: the model is on the CPU; use bf16, auto or no")
    return requested


@contextlib.contextmanager
def autocast(device: torch.device, mode: str) -> Iterator[None]:
    """torch.autocast on `device` for a resolved precision (no: nothing)."""
    if mode == "no":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16):
        yield


def of(model: Any) -> torch.device:
    """The device a model's inputs go to: its first parameter's (the embedding, under a device map)."""
    return next(model.parameters()).device
