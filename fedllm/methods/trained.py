"""What the seed- and projection-based methods (zo, ferret) share of the weights they train: the
parameters in an order every party agrees on, and the model with a way back to its start.

    params = trainable(model, "lora")                 # [(name, tensor)], sorted by name, tied tensors once
    model, tokenizer, reload = start_model(cfg, "all")  # reload(): the starting tensors, in that order
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from fedllm.config import Config


def trainable(model: Any, which: str) -> list[tuple[str, torch.Tensor]]:
    """The trained parameters ("all", or "lora": the adapter's), sorted by name so that every party
    agrees on the order; tied weights (embeddings / lm_head) are one tensor, listed once."""
    named = [(n, p) for n, p in model.named_parameters() if which == "all" or "lora_" in n]
    seen: set[int] = set()
    out = []
    for n, p in sorted(named, key=lambda item: item[0]):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def start_model(cfg: Config, which: str) -> tuple[Any, Any, Callable[[], list[torch.Tensor]]]:
    """(model, tokenizer, reload) for `which` = "all" (every base weight trained; reload reads them
    again from the model cache on disk, on the host: no second model on the device) or "lora" (the
    [lora] adapter of a PEFT model initialised from train.seed, on a frozen base; reload gives its
    initial tensors)."""
    from fedllm.methods.adapters import engine as lora
    from fedllm.model import load_base_model

    if which == "all":
        model, tokenizer = load_base_model(cfg.model, cached=False)

        def reload() -> list[torch.Tensor]:
            fresh, _ = load_base_model(dataclasses.replace(cfg.model, device="cpu", device_map=""), cached=False)
            return [p.detach() for _, p in trainable(fresh, "all")]

        return model, tokenizer, reload
    model, tokenizer = lora.build_lora_model(cfg.model, cfg.lora, cfg.train.seed)
    initial = [p.detach().clone() for _, p in trainable(model, "lora")]
    return model, tokenizer, lambda: initial
