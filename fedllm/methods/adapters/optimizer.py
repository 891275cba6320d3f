"""A client's local optimizer: a fresh one for train.optimizer, or an AdamW that carries its moments
from round to round (train.keep-optimizer; DiLoCo's inner optimizer), its state as named tensors
that a node keeps in its context.state between messages.

    opt = make_adamw(net, cfg.train, held)     # held: adamw_state(...) of the last round, or None
    ...train...
    held = adamw_state(opt)
    step(opt, scaler, params, cfg.max_grad_norm, correct)   # one step: unscale, clip, step (SCAFFOLD's correction)
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch

from fedllm.config import TrainConfig
from fedllm.errors import ConfigError

State = dict[str, torch.Tensor]


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """A fresh local optimizer for train.optimizer: torch's AdamW, or bitsandbytes' paged 8-bit AdamW
    (QLoRA's: moments in 8 bits, paged to host memory under pressure)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    check_optimizer(cfg, device)
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def check_optimizer(cfg: TrainConfig, device: torch.device) -> None:
    """Raises:
        ConfigError: paged-adamw-8bit for a model that is not on a GPU, or without bitsandbytes."""
    if cfg.optimizer == "adamw":
        return
    if device.type != "cuda":
        raise ConfigError(f"train.optimizer={cfg.optimizer}: bitsandbytes' paged optimizers need a CUDA device; "
                          f"this model is on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"train.optimizer={cfg.optimizer} needs bitsandbytes (pip install 'fedllm[quantize]')")


def make_adamw(net: Any, cfg: TrainConfig, state: State | None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (in model order), with the moments and step counts of
    `state` (from `adamw_state`) when they fit them: the same count and shapes. Otherwise (none
    held, or the trained tensors changed) a fresh AdamW."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state and fits(state, params):
        saved = {i: {"step": state[f"{i}.step"].reshape(()).clone(), "exp_avg": state[f"{i}.exp_avg"],
                     "exp_avg_sq": state[f"{i}.exp_avg_sq"]} for i in range(len(params)) if f"{i}.step" in state}
        opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})
    return opt


def fits(state: State, params: list[torch.Tensor]) -> bool:
    """Whether `state` holds moments for these parameters alone, each of its parameter's shape."""
    held = {k.split(".", 1)[0] for k in state}
    return held <= {str(i) for i in range(len(params))} and all(
        state[f"{i}.exp_avg"].shape == p.shape and state[f"{i}.exp_avg_sq"].shape == p.shape
        for i, p in enumerate(params) if f"{i}.step" in state)


def adamw_state(opt: torch.optim.Optimizer) -> State:
    """AdamW's moments and step counts as named CPU tensors (I.step, I.exp_avg, I.exp_avg_sq for
    parameter I; an ArrayRecord stores them)."""
    out: State = {}
    for i, s in opt.state_dict()["state"].items():
        out[f"{i}.step"] = torch.as_tensor(s["step"], dtype=torch.float32).reshape(1)
        out[f"{i}.exp_avg"], out[f"{i}.exp_avg_sq"] = s["exp_avg"].detach().cpu(), s["exp_avg_sq"].detach().cpu()
    return out


def step(opt: torch.optim.Optimizer, scaler: Any, params: list[torch.Tensor], max_norm: float,
         correct: Callable[[str, float], None] | None = None) -> None:
    """One optimizer step on the accumulated gradients: unscaled, clipped to `max_norm` (> 0), and with
    `correct(stage, lr)`, SCAFFOLD's c - c_i, called with "gradient" before the step and "step" after it
    (fedllm.methods.adapters.scaffold)."""
    if max_norm > 0 or correct is not None:
        scaler.unscale_(opt)
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    lr = opt.param_groups[0]["lr"]
    if correct is not None:
        correct("gradient", lr)
    scaler.step(opt)
    if correct is not None:
        correct("step", lr)
    scaler.update()
