"""What each client trains with, from what its node has: quantization and LoRA rank (FedPipe's idea,
Fang et al., 2024: fit every client's adapter and base precision to its resources).

A SuperNode says what it has in its node config (`memory-mb`, and `compute`: its speed relative to
the federation's typical node, default 1). With lora.policy=resources:

    quantize = the least aggressive of none, int8, nf4 whose estimate fits memory-mb, where
               estimate(q) = 2 x weights_mb(q) + RUNTIME_MB
               (weights_mb: the linear layers of the decoder at q's bytes per weight, the rest at
               model.dtype's; twice for the activations, gradients and optimizer of a step; plus
               the Python, torch and transformers runtime)
    rank     = lora.rank when compute >= 1, else the largest power of two <= lora.rank x compute (>= 1)

The node config keys `quantize`, `lora-rank` and `dtype` override the policy (and lora.client-ranks,
model.client-quantize, model.dtype) for that node. A rank below lora.rank trains the leading rows of the global factors (LoraClient); exact-lora
aggregates any rank exactly.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from fedllm.config import QUANTIZE, Config, ModelConfig
from fedllm.errors import ConfigError
from fedllm.methods.adapters import modules
from fedllm.protocol import State

DTYPES = ("float32", "bfloat16")

RUNTIME_MB = 600.0
BYTES = {"none": None, "int8": 1.0, "nf4": 0.5, "fp4": 0.5}  # per linear weight (None: model.dtype's)


def parameter_counts(model_cfg: ModelConfig) -> tuple[int, int]:
    """(weights of the decoder's linear layers, every other weight), counted on the meta device."""
    linear = sum(i * o for i, o in modules.candidate_shapes(model_cfg).values())
    return linear, modules.parameter_count(model_cfg) - linear


def weights_mb(model_cfg: ModelConfig, quantize: str) -> float:
    """The base model's weights in MB when its decoder's linear layers are stored as `quantize`."""
    linear, other = parameter_counts(model_cfg)
    full = 2.0 if model_cfg.dtype == "bfloat16" else 4.0
    return (linear * (BYTES[quantize] or full) + other * full) / 1e6


def estimate_mb(model_cfg: ModelConfig, quantize: str) -> float:
    return 2 * weights_mb(model_cfg, quantize) + RUNTIME_MB


def plan(cfg: Config, memory_mb: float, compute: float = 1.0) -> tuple[int, str]:
    """(LoRA rank, model.quantize) for a node with `memory_mb` of memory and relative speed `compute`.

    Raises:
        ConfigError: naming node config memory-mb when not even the 4-bit estimate fits.
    """
    if not (math.isfinite(memory_mb) and memory_mb > 0):
        raise ConfigError(f"node config memory-mb: must be a positive number of megabytes, got {memory_mb}")
    if not (math.isfinite(compute) and compute > 0):
        raise ConfigError(f"node config compute: must be a positive relative speed, got {compute}")
    for quantize in ("none", "int8", "nf4"):
        if estimate_mb(cfg.model, quantize) <= memory_mb:
            break
    else:
        raise ConfigError(f"node config memory-mb: {memory_mb:g} MB is below the 4-bit estimate of "
                          f"{estimate_mb(cfg.model, 'nf4'):.0f} MB for {cfg.model.name}")
    rank = cfg.lora.rank if compute >= 1 else max(1, 2 ** int(math.floor(math.log2(max(cfg.lora.rank * compute, 1)))))
    return rank, quantize


def client_config(cfg: Config, node: Mapping[str, Any], partition_id: int) -> Config:
    """The config a node trains with: lora.client-ranks and model.client-quantize, or lora.policy,
    then its node config's `lora-rank` and `quantize`.

    Raises:
        ConfigError: naming the node config key with a bad value.
    """
    rank, quantize = cfg.lora.rank_of(partition_id), cfg.model.quantize_of(partition_id)
    if cfg.lora.policy == "resources":
        if "memory-mb" not in node:
            raise ConfigError("lora.policy=resources: this node's node config lacks memory-mb")
        rank, quantize = plan(cfg, _number(node, "memory-mb"), _number(node, "compute", 1.0))
    if "lora-rank" in node:
        rank = int(_number(node, "lora-rank"))
        if rank < 1:
            raise ConfigError(f"node config lora-rank: must be >= 1, got {node['lora-rank']}")
    quantize = str(node.get("quantize", quantize))
    if quantize not in QUANTIZE:
        raise ConfigError(f"node config quantize: must be one of {', '.join(QUANTIZE)}, got {quantize!r}")
    dtype = str(node.get("dtype", cfg.model.dtype))
    if dtype not in DTYPES:
        raise ConfigError(f"node config dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if (rank, quantize, dtype) == (cfg.lora.rank, cfg.model.quantize, cfg.model.dtype):
        return cfg
    return cfg.replace(lora__rank=rank, model__quantize=quantize, model__dtype=dtype)


def base_bits(model_cfg: ModelConfig) -> int:
    """Bits per weight of a client's decoder linear layers (the metric base-bits)."""
    return {"int8": 8, "nf4": 4, "fp4": 4}.get(model_cfg.quantize, 16 if model_cfg.dtype == "bfloat16" else 32)


def _number(node: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = node.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key}: expected a number, got {value!r}") from None


def truncate(state: State, rank: int) -> State:
    """The first `rank` rows of every lora_A and columns of every lora_B (other tensors as they are):
    what a client of a lower rank trains of the global adapter."""
    out = {}
    for k, t in state.items():
        if ".lora_A." in k:
            t = t[:rank]
        elif ".lora_B." in k:
            t = t[:, :rank]
        out[k] = t.contiguous()
    return out


def pad(local: State, start: State) -> State:
    """`start` (a full-rank state) with the leading rows / columns replaced by a truncated `local`: the
    rows a lower-rank client did not train come back unchanged, so its delta there is zero."""
    out = {}
    for k, t in start.items():
        part = local[k]
        if part.shape == t.shape:
            out[k] = part
            continue
        full = t.clone()
        full[tuple(slice(0, n) for n in part.shape)] = part
        out[k] = full
    return out
