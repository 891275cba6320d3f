"""lora.target-modules=auto: which modules to adapt. The candidates are the linear modules of the
decoder layers (read from the model's config on the meta device); each client scores them on a few
batches of its data (`module_scores`), and the server keeps the best per adapter parameter within
lora.module-budget (`select_modules`)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from fedllm import devices
from fedllm.config import ModelConfig, TrainConfig
from fedllm.data.templates import batches
from fedllm.methods.adapters.engine import lora_layers, reset_adapter
from fedllm.model import empty_model


def candidate_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear module inside the decoder layers, by full module name,
    read from the model's config on the meta device."""
    return dict(_architecture(model_cfg.name, model_cfg.cache_dir)[0])


def parameter_count(model_cfg: ModelConfig) -> int:
    """The base model's parameters (a tied embedding counted once), from its config."""
    return _architecture(model_cfg.name, model_cfg.cache_dir)[1]


@functools.lru_cache(maxsize=8)
def _architecture(name: str, cache_dir: str) -> tuple[tuple[tuple[str, tuple[int, int]], ...], int]:
    base = empty_model(ModelConfig(name=name, cache_dir=cache_dir))
    shapes = tuple((n, (m.in_features, m.out_features)) for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}")
    total = sum(p.numel() for p in base.parameters())
    if getattr(base.config, "tie_word_embeddings", False) and base.get_output_embeddings() is not None:
        total -= base.get_output_embeddings().weight.numel()  # one tensor once loaded (meta leaves it untied)
    return shapes, total


def candidate_leaves(model_cfg: ModelConfig) -> list[str]:
    """The distinct last names of the candidates (q_proj, ..., down_proj): a probe adapter's targets."""
    return sorted({n.rsplit(".", 1)[-1] for n in candidate_shapes(model_cfg)})


def module_scores(model: Any, rows: list[dict[str, list[int]]], cfg: TrainConfig, pad_id: int, n_batches: int,
                  seed: int) -> dict[str, float]:
    """Each adapted module's importance on `n_batches` batches of `rows`: the mean L1 norm of the
    loss gradient of its probe adapter's B (B = 0, A random: the gradient a LoRA step on that module
    starts from). Adam's first step moves every weight by about lr x sign(g), so lr x sum |g| is the
    first-order loss decrease it buys; per adapter parameter (select_modules) that is mean |g|.
    Keyed by the base model's module name."""
    device = devices.of(model)
    mode = devices.precision(cfg.precision, device)
    reset_adapter(model, seed)
    stream = batches(rows, cfg.batch_size, pad_id, torch.Generator().manual_seed(seed))
    layers = lora_layers(model)
    totals = {name: 0.0 for name, _ in layers}
    model.train()
    try:
        for _ in range(n_batches):
            batch = {k: v.to(device) for k, v in next(stream).items()}
            with devices.autocast(device, mode):
                loss = model(**batch).loss
            loss.backward()
            for name, module in layers:
                grad = module.lora_B["default"].weight.grad
                totals[name] += float(grad.float().abs().sum()) if grad is not None else 0.0
            model.zero_grad(set_to_none=True)
    finally:
        model.eval()
    prefix = "base_model.model."
    return {name.removeprefix(prefix): total / n_batches for name, total in totals.items()}


def select_modules(scores: dict[str, float], shapes: dict[str, tuple[int, int]], budget: float) -> list[str]:
    """The modules to adapt: by score per adapter parameter (r (in + out) for each), best first,
    while their parameters stay within `budget` x those of every candidate (at least one module)."""
    cost = {n: i + o for n, (i, o) in shapes.items()}
    limit = budget * sum(cost.values())
    chosen, used = [], 0
    for name in sorted(shapes, key=lambda n: (-scores.get(n, 0.0) / cost[n], n)):
        if chosen and (used + cost[name] > limit or scores.get(name, 0.0) <= 0):
            continue  # over the budget, or no gradient at all: nothing a step on it would learn
        chosen.append(name)
        used += cost[name]
    return sorted(chosen, key=list(shapes).index)
