"""Local LoRA training: a plain loop a reader follows top to bottom.

Only adapter tensors travel: the server sends the global adapter state, the client trains
from it and replies with delta = local - global (the same key set, PEFT state-dict names).

    model = lora_model(model_cfg, lora_cfg, seed=0)        # cached per process
    set_adapter_state(model, global_state)
    stats = train(model, rows, train_cfg, pad_id, seed=round)
    delta = subtract(adapter_state(model), global_state)

LoRA: Hu et al., 2021, https://arxiv.org/abs/2106.09685 (h = W x + (alpha / r) B A x).
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path
from typing import Any, Iterator

import torch

from fedllm.config import LoraConfig, ModelConfig, TrainConfig
from fedllm.data.templates import batches
from fedllm.errors import ConfigError
from fedllm.model import MODEL_CACHE, load_base_model

State = dict[str, torch.Tensor]


def lora_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> tuple[Any, Any]:
    """(PeftModel, tokenizer), loaded once per process for a given model and LoRA shape.

    The base model is loaded fresh (not from the base cache) because PEFT injects its layers
    into the module it wraps.
    """
    key = ("lora", model_cfg.name, model_cfg.dtype, lora_cfg.rank, lora_cfg.alpha,
           lora_cfg.dropout, lora_cfg.target_modules, seed)

    return MODEL_CACHE.get(key, lambda: build_lora_model(model_cfg, lora_cfg, seed))


def build_lora_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> tuple[Any, Any]:
    """A new (PeftModel, tokenizer); the adapter initialisation depends only on `seed`."""
    base, tokenizer = load_base_model(model_cfg, cached=False)
    model = _wrap(base, lora_cfg)
    reset_adapter(model, seed)  # the same initial adapter on every party, and as init_adapter_state's
    model.to(accelerator("no").device)
    model.eval()
    return model, tokenizer


def peft_config(lora_cfg: LoraConfig, base_name: str = "") -> Any:
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.modules(),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name or None,
    )


def _wrap(base: Any, lora_cfg: LoraConfig) -> Any:
    from peft import get_peft_model

    try:
        return get_peft_model(base, peft_config(lora_cfg))
    except ValueError as err:
        raise ConfigError(f"lora.target-modules: {err}") from err


def init_adapter_state(model_cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> State:
    """A freshly initialised adapter without loading the base weights.

    The base model is built on the meta device (no memory); only the LoRA tensors are
    materialised and initialised as PEFT does (A: Kaiming-uniform, B: zeros). For a server
    that neither evaluates nor merges, this is all it needs.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedllm.model import resolve

    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(resolve(model_cfg))))
    model = _wrap(base, lora_cfg)
    for _, module in lora_layers(model):
        for name in module.lora_A:
            module.lora_A[name].to_empty(device="cpu")
            module.lora_B[name].to_empty(device="cpu")
    reset_adapter(model, seed)
    return adapter_state(model)


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """(module name, PEFT LoraLayer) pairs; a layer's state-dict keys are NAME.lora_A.weight etc."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def reset_adapter(model: Any, seed: int) -> None:
    """Initialise every adapter as PEFT does (A: Kaiming-uniform, B: zeros), from `seed`."""
    torch.manual_seed(seed)
    for _, module in lora_layers(model):
        for name in module.lora_A:
            module.reset_lora_parameters(name, init_lora_weights=True)


@contextlib.contextmanager
def frozen_delta(model: Any, factors: State) -> Iterator[None]:
    """Add B @ A to each adapted module's base weight while inside, restore it after.

    `factors` holds NAME.lora_A.weight (R, in) and NAME.lora_B.weight (out, R), any R per
    module, scaling folded in: the frozen global delta of exact LoRA aggregation
    (fedllm/methods/exact_lora). The base weight is restored from a copy, not by subtraction,
    so no drift builds up in the cached model.
    """
    saved = []
    try:
        for name, module in lora_layers(model):
            a, b = factors.get(f"{name}.lora_A.weight"), factors.get(f"{name}.lora_B.weight")
            if a is None or b is None or a.shape[0] == 0:
                continue
            weight = module.get_base_layer().weight
            saved.append((weight, weight.data.clone()))
            weight.data += (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)).to(weight.dtype)
        yield
    finally:
        for weight, original in saved:
            weight.data.copy_(original)


def save_adapter(state: State, model_cfg: ModelConfig, lora_cfg: LoraConfig, path: Path) -> None:
    """Write adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained does."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    peft_config(lora_cfg, model_cfg.name).save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})


@functools.lru_cache(maxsize=None)
def accelerator(precision: str) -> Any:
    """One accelerate.Accelerator per precision and process (it holds process-wide state)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def adapter_state(model: Any) -> State:
    """A detached CPU copy of the adapter tensors, keyed as PEFT saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: Any, state: State) -> None:
    """Load adapter tensors in place; the key set must match exactly."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(f"adapter state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    set_peft_model_state_dict(model, state)


def subtract(a: State, b: State) -> State:
    return {k: a[k] - b[k] for k in a}


def train(model: Any, rows: list[dict[str, list[int]]], cfg: TrainConfig, pad_id: int,
          seed: int, proximal_mu: float = 0.0, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """Run `cfg.local_steps` AdamW steps on encoded rows; returns loss and counts.

    Batches are drawn from a seeded permutation, epoch after epoch, and dropout masks from the
    seeded global generator, so a round is repeatable (also after a resume, in a new process).
    `proximal_mu` > 0 adds FedProx's (mu / 2) * ||w - w_global||^2 on the adapter weights.
    `optimizer`: step this one (over the trainable parameters, its state carried by the caller
    from round to round, as DiLoCo's inner AdamW) instead of a fresh AdamW.
    """
    acc = accelerator(cfg.precision)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = optimizer or torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stream = batches(rows, cfg.batch_size, pad_id, torch.Generator().manual_seed(seed))
    losses: list[float] = []
    model.train()
    try:
        for _ in range(cfg.local_steps):
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(acc.device) for k, v in next(stream).items()}
                with acc.autocast():
                    loss = model(**batch).loss / cfg.grad_accum
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                    loss = loss + proximal_mu / 2 * prox / cfg.grad_accum
                acc.backward(loss)
                step_loss += loss.item()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if math.isfinite(step_loss):
                losses.append(step_loss)
    finally:
        model.eval()
    return {
        "train-loss": sum(losses) / max(len(losses), 1),
        "steps": float(cfg.local_steps),
        "examples-seen": float(cfg.local_steps * cfg.grad_accum * cfg.batch_size),
    }
