"""Local LoRA training: a plain loop a reader follows top to bottom.

Only adapter tensors travel: the server sends the global adapter state, the client trains
from it and replies with delta = local - global (the same key set, PEFT state-dict names).

    model = lora_model(model_cfg, lora_cfg, seed=0)        # cached per process
    set_adapter_state(model, global_state)
    stats = train(model, rows, train_cfg, pad_id, seed=round)
    delta = subtract(adapter_state(model), global_state)

LoRA: Hu et al., 2021, https://arxiv.org/abs/2106.09685 (h = W x + (alpha / r) B A x).
The other adapters of lora.peft come from PEFT's own configs (DoRA: Liu et al., 2024; IA3: Liu et al.,
2022; prefix tuning: Li & Liang, 2021; prompt tuning: Lester et al., 2021; P-tuning: Liu et al., 2021);
their tensors are averaged name by name like LoRA's. With model.quantize the base is loaded through
bitsandbytes and prepared as QLoRA does (Dettmers et al., 2023, PEFT's prepare_model_for_kbit_training).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from fedllm import devices
from fedllm.config import ModelConfig, TrainConfig
from fedllm.methods.adapters.config import LoraConfig
from fedllm.methods.adapters.optimizer import check_optimizer, make_optimizer  # noqa: F401  (callers reach them here too)
from fedllm.methods.adapters.optimizer import step
from fedllm.methods.schedule import lr_factor
from fedllm.data.templates import batches
from fedllm.errors import ConfigError
from fedllm.model import MODEL_CACHE, empty_model, first_line, load_base_model, placement

State = dict[str, torch.Tensor]


def lora_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> tuple[Any, Any]:
    """(PeftModel, tokenizer), loaded once per process for a given model and LoRA shape.

    The base model is loaded fresh (not from the base cache) because PEFT injects its layers
    into the module it wraps.
    """
    key = ("lora", model_cfg.name, model_cfg.dtype, model_cfg.quantize, lora_cfg.peft, lora_cfg.rank, lora_cfg.alpha,
           lora_cfg.dropout, lora_cfg.target_modules, lora_cfg.virtual_tokens, seed, *placement(model_cfg))

    return MODEL_CACHE.get(key, lambda: build_lora_model(model_cfg, lora_cfg, seed))


def build_lora_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, seed: int = 0) -> tuple[Any, Any]:
    """A new (PeftModel, tokenizer); the adapter initialisation depends only on `seed`."""
    if lora_cfg.auto_modules():
        raise ConfigError("lora.target-modules: auto is resolved before a model is built (the server's module "
                          "choice travels with each message)")
    base, tokenizer = load_base_model(model_cfg, cached=False)
    if model_cfg.quantize != "none":
        from peft import prepare_model_for_kbit_training

        # float32 norms and embeddings, frozen base; checkpointing stays train.gradient-checkpointing's choice
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        for module in base.modules():
            # bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel on the first
            # no-grad forward in eval mode (on CPUs with AVX512-BF16), and that kernel has no
            # backward: training after one evaluation got no gradients. Keep the trainable layout.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    torch.manual_seed(seed)  # the random initialisations of prefix, prompt and p-tuning adapters
    model = _wrap(base, lora_cfg)
    reset_adapter(model, seed)  # the same initial adapter on every party, and as init_adapter_state's
    model.fedllm_initial = adapter_state(model)  # what reset_adapter restores for the other PEFT types
    if model_cfg.quantize == "none" and not model_cfg.device_map:
        model.to(placement(model_cfg)[0])  # the adapters PEFT made beside the base (prompt encoders too)
    model.eval()
    return model, tokenizer


def peft_config(lora_cfg: LoraConfig, base_name: str = "") -> Any:
    """PEFT's config for lora.peft (the adapter_config.json a saved adapter carries)."""
    import peft

    common = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base_name or None}
    kind = lora_cfg.peft
    if kind in ("lora", "dora"):
        return peft.LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                               target_modules=lora_cfg.modules(), use_dora=kind == "dora", **common)
    if kind == "ia3":
        modules = lora_cfg.modules()
        return peft.IA3Config(target_modules=modules, feedforward_modules=[m for m in modules if m in FEEDFORWARD],
                              **common)
    tokens = lora_cfg.virtual_tokens
    if kind == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=tokens, **common)
    if kind == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=tokens, **common)
    return peft.PromptEncoderConfig(num_virtual_tokens=tokens, encoder_hidden_size=P_TUNING_HIDDEN, **common)


FEEDFORWARD = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "mlp.c_fc", "mlp.c_proj")  # IA3 scales their input
P_TUNING_HIDDEN = 128  # the prompt encoder's MLP width


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
    if lora_cfg.peft != "lora":  # DoRA's magnitudes come from the base weights; others are small to build
        model, _ = build_lora_model(dataclasses.replace(model_cfg, quantize="none"), lora_cfg, seed)
        return model.fedllm_initial
    model = _wrap(empty_model(model_cfg), lora_cfg)
    for _, module in lora_layers(model):
        for name in module.lora_A:
            module.lora_A[name].to_empty(device="cpu")
            module.lora_B[name].to_empty(device="cpu")
    reset_adapter(model, seed)
    return adapter_state(model)


def read_adapter(folder: Path, like: State, lora_cfg: LoraConfig, key: str = "server.init-from") -> State:
    """The adapter tensors of a PEFT adapter folder (adapter_config.json + adapter_model.safetensors,
    what fedllm saves as RUN_DIR/adapter and PeftModel.save_pretrained writes), checked against the
    configured adapter `like`: type, rank, alpha and modules as lora.*, the same tensor names and
    shapes, finite values; cast to `like`'s dtypes. safetensors only (nothing in it runs).

    Raises:
        ConfigError: naming `key`, the file and what differs (and the setting that would match).
    """
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fedllm.files import nesting_line

    folder = Path(folder).expanduser()
    weights, config_file = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if not weights.is_file() or not config_file.is_file():
        raise ConfigError(f"{key}: {folder} is not an adapter folder (it needs adapter_config.json and "
                          "adapter_model.safetensors, as a run's RUN_DIR/adapter has)")
    try:
        text = config_file.read_text(encoding="utf-8")
        if nesting_line(text):  # before the parser: its C recursion can crash the process
            raise ValueError("adapter_config.json nests too deep")
        saved = json.loads(text)
        state = load_file(str(weights))
    except (ValueError, OSError, RecursionError, SafetensorError) as err:
        raise ConfigError(f"{key}: cannot read {folder}: {first_line(err)[:200]}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{key}: {config_file} is not a JSON object")
    kind = peft_config(lora_cfg).peft_type.value
    checks = [("peft_type", saved.get("peft_type"), kind, "lora.peft")]
    if kind == "LORA":
        targets = saved.get("target_modules")
        checks += [("r", saved.get("r"), lora_cfg.rank, "lora.rank"),
                   ("lora_alpha", saved.get("lora_alpha"), lora_cfg.alpha, "lora.alpha"),
                   ("use_dora", saved.get("use_dora", False), lora_cfg.peft == "dora", "lora.peft"),
                   ("target_modules", _names(targets), sorted(lora_cfg.modules()), "lora.target-modules"),
                   # scalings fedllm does not use: rsLoRA, per-module ranks or alphas
                   ("use_rslora", saved.get("use_rslora", False), False, "fedllm trains without rsLoRA"),
                   ("rank_pattern", saved.get("rank_pattern") or {}, {}, "fedllm gives every module lora.rank"),
                   ("alpha_pattern", saved.get("alpha_pattern") or {}, {}, "fedllm gives every module lora.alpha")]
    for name, have, value, setting in checks:
        if have != value or isinstance(have, bool) != isinstance(value, bool):  # True == 1 in Python
            raise ConfigError(f"{key}: the adapter in {folder} has {name}={repr(have)[:120]}, this run "
                              f"{value!r} ({setting}); set it to the adapter's")
    if set(state) != set(like):
        missing, extra = sorted(set(like) - set(state)), sorted(set(state) - set(like))
        raise ConfigError(f"{key}: {weights} does not fit the configured adapter: missing {missing[:2]}, "
                          f"unexpected {extra[:2]}")
    for name, tensor in state.items():
        if tensor.shape != like[name].shape:
            raise ConfigError(f"{key}: {weights}: {name} has shape {tuple(tensor.shape)}, the configured adapter "
                              f"{tuple(like[name].shape)}")
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ConfigError(f"{key}: {weights}: {name} is {tensor.dtype}, not a float32/16 or bfloat16 tensor")
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"{key}: {weights}: {name} holds non-finite values")
    return {k: state[k].to(like[k].dtype) for k in like}


def _names(value: Any) -> Any:
    """adapter_config.json's target_modules as a sorted list of names (a string is one name); any
    other JSON value as it is, so that it compares unequal and is shown in the error."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return sorted(value)
    return value


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """(module name, PEFT LoraLayer) pairs; a layer's state-dict keys are NAME.lora_A.weight etc."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def reset_adapter(model: Any, seed: int) -> None:
    """Initialise every adapter as PEFT does (A: Kaiming-uniform, B: zeros), from `seed`; the other
    PEFT types go back to the state they were built with (from the seed of their cache key)."""
    if getattr(model, "fedllm_initial", None) is not None and model.peft_config["default"].peft_type.value != "LORA":
        set_adapter_state(model, model.fedllm_initial)
        return
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
    if lora_cfg.peft == "p-tuning":
        state = {"prompt_embeddings": prompt_embeddings(state, model_cfg, lora_cfg)}
    peft_config(lora_cfg, model_cfg.name).save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def _encoder(model: Any) -> Any:
    """P-tuning's prompt encoder, or None: its embedding and MLP are what train, while PEFT's state
    dict holds only their output (the prompt it computes), which cannot be trained further."""
    config = model.peft_config["default"]
    return model.prompt_encoder["default"] if config.peft_type.value == "P_TUNING" else None


def adapter_state(model: Any) -> State:
    """A detached CPU copy of the adapter tensors, keyed as PEFT saves them (P-tuning: its encoder's
    weights, prompt_encoder.NAME)."""
    from peft import get_peft_model_state_dict

    encoder = _encoder(model)
    if encoder is not None:
        return {f"prompt_encoder.{k}": v.detach().to("cpu", copy=True) for k, v in encoder.state_dict().items()}
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def set_adapter_state(model: Any, state: State) -> None:
    """Load adapter tensors in place; the key set must match exactly."""
    from peft import set_peft_model_state_dict

    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ConfigError(f"adapter state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    encoder = _encoder(model)
    if encoder is not None:
        encoder.load_state_dict({k.removeprefix("prompt_encoder."): v for k, v in state.items()})
        return
    set_peft_model_state_dict(model, state)


def prompt_embeddings(state: State, model_cfg: ModelConfig, lora_cfg: LoraConfig) -> torch.Tensor:
    """The prompt a P-tuning encoder state computes: what PEFT saves for it (prompt_embeddings)."""
    from peft.tuners.p_tuning import PromptEncoder
    from transformers import AutoConfig

    from fedllm.model import resolve

    config = peft_config(lora_cfg)
    config.token_dim = AutoConfig.from_pretrained(str(resolve(model_cfg))).hidden_size
    config.num_transformer_submodules = 1
    encoder = PromptEncoder(config)
    encoder.load_state_dict({k.removeprefix("prompt_encoder."): v for k, v in state.items()})
    with torch.no_grad():
        return encoder(torch.arange(lora_cfg.virtual_tokens)[None])[0].contiguous()


def subtract(a: State, b: State) -> State:
    return {k: a[k] - b[k] for k in a}


def train(model: Any, rows: list[dict[str, list[int]]], cfg: TrainConfig, pad_id: int,
          seed: int, proximal_mu: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
          clock: tuple[int, int] = (0, 0), correct: Callable[[str, float], None] | None = None) -> dict[str, float]:
    """Run `cfg.local_steps` AdamW steps on encoded rows; returns loss and counts.

    Batches are drawn from a seeded permutation, epoch after epoch, and dropout masks from the
    seeded global generator, so a round is repeatable (also after a resume, in a new process).
    `proximal_mu` > 0 adds FedProx's (mu / 2) * ||w - w_global||^2 on the adapter weights.
    `optimizer`: step this one (over the trainable parameters, its state carried by the caller
    from round to round, as DiLoCo's inner AdamW) instead of a fresh AdamW.
    `clock`: (this round's first local step, the run's local steps) for train.lr-schedule
    (fedllm.methods.schedule.clock); step i takes train.lr x lr_factor(first + i, total).
    `correct`: SCAFFOLD's correction around each step (`step`).
    """
    device = devices.of(model)
    mode = devices.precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")  # fp16 needs loss scaling; bf16 does not
    torch.manual_seed(seed)
    if cfg.gradient_checkpointing:
        checkpointing(model, True)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = optimizer or make_optimizer(params, cfg, device)
    stream = batches(rows, cfg.batch_size, pad_id, torch.Generator().manual_seed(seed))
    losses: list[float] = []
    model.train()
    try:
        for i in range(cfg.local_steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, clock[0] + i, clock[1])
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
                with devices.autocast(device, mode):
                    loss = model(**batch).loss / cfg.grad_accum
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                    loss = loss + proximal_mu / 2 * prox / cfg.grad_accum
                scaler.scale(loss).backward()
                step_loss += loss.item()
            step(opt, scaler, params, cfg.max_grad_norm, correct)
            opt.zero_grad(set_to_none=True)
            if math.isfinite(step_loss):
                losses.append(step_loss)
    finally:
        model.eval()
        if cfg.gradient_checkpointing:
            checkpointing(model, False)
    return {
        "train-loss": sum(losses) / max(len(losses), 1),
        "steps": float(cfg.local_steps),
        "examples-seen": float(cfg.local_steps * cfg.grad_accum * min(cfg.batch_size, len(rows))),
    }


def checkpointing(model: Any, on: bool) -> None:
    """Switch activation (gradient) checkpointing of a PEFT model's base on or off (non-reentrant:
    the frozen embeddings' outputs need no requires_grad)."""
    base = model.base_model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers 5
        if on:
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.activation_checkpointing_disable()
    elif on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()
