"""Streaming DiLoCo's parts as plain functions: the fragment schedule, the fragments, the outer
Nesterov step, the merge on arrival, and the model and inner-optimizer state a client carries.

DiLoCo (Douillard et al., 2023, https://arxiv.org/abs/2311.08105): each worker runs H inner
AdamW steps from the global parameters; the outer gradient is global - local; the server
averages the outer gradients and takes an outer SGD step with Nesterov momentum.
Streaming DiLoCo (Douillard et al., 2025, https://arxiv.org/abs/2501.18512): the parameters
are split into P fragments synced in turn, fragment p at steps p H / P + k H, so one sync moves
1 / P of the parameters; the arriving global fragment is merged with the local one,
local <- alpha local + (1 - alpha) global, possibly tau rounds late (the overlapped variant).

On Flower's rounds: round t runs H / P inner steps and then syncs fragment t mod P, so that
fragment p is synced after the steps t H / P with t = p + k P, i.e. at steps p H / P + k H.
The run's last round syncs every fragment (diloco.final-sync; code ALL), so that no fragment
ends the run without its clients' last up to H - H / P inner steps.

    p = synced_by(server_round, P, last_round)             # t mod P, or ALL in the last round
    keys = keys_of(fragments(global_state, P, "strided"), p)  # names, and NAME#i row slices
    mine = take(global_state, keys, P)
    step, m = outer_step({k: -mean_delta[k]}, m, lr=0.7, momentum=0.9, nesterov=True)
"""

from __future__ import annotations

import dataclasses

import re
from typing import Any

import torch

from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.model import MODEL_CACHE, cache_root, load_base_model, placement

State = dict[str, torch.Tensor]
# a transformer block's parameters: ...layers.N... (Llama, Mistral, Qwen), h.N (GPT-2), layer.N, blocks.N
BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


ALL = -1  # the code of a round that syncs every fragment (the run's last, diloco.final-sync)


def fragment_of(server_round: int, fragments: int) -> int:
    """The fragment round `server_round` syncs on the streaming schedule (after its H / P inner
    steps)."""
    return server_round % fragments


def synced_by(server_round: int, fragments: int, last_round: int | None) -> int:
    """What round `server_round` syncs: its fragment (`fragment_of`), or ALL when it is
    `last_round` (the run's last with diloco.final-sync; None: no such round) and P > 1."""
    if server_round == last_round and fragments > 1:
        return ALL
    return fragment_of(server_round, fragments)


def members(code: int, fragments: int) -> list[int]:
    """The fragments a round's code stands for: every one for ALL, else the one."""
    return list(range(fragments)) if code == ALL else [code]


def sync_steps(fragment: int, inner_steps: int, fragments: int, total_steps: int,
               final_sync: bool = False) -> list[int]:
    """The inner steps (1-based, counted from the start of the run) after which `fragment` is
    synced, up to `total_steps`: p H / P, p H / P + H, ... (fragment 0 first at H); with
    `final_sync`, also the run's last round's end (the run lasting `total_steps`)."""
    per_round = inner_steps // fragments
    last = total_steps // per_round if final_sync else None
    rounds = range(1, total_steps // per_round + 1)
    return [t * per_round for t in rounds if fragment in members(synced_by(t, fragments, last), fragments)]


def block_of(name: str) -> int | None:
    """The transformer block a parameter belongs to, or None (embeddings, final norm, head)."""
    m = BLOCK.search(name)
    return int(m.group(1)) if m else None


def fragments(state: State, count: int, pattern: str) -> list[list[str]]:
    """The tensors of `state` (in model order) split into `count` fragments by transformer
    block: strided puts block i in fragment i mod P (every fragment spans the depth),
    sequential puts consecutive blocks together. A tensor outside the blocks (embeddings, final
    norm, head) is split by rows into P slices, one per fragment, named NAME#i (`take`, `put`):
    the embedding of a small model is a fifth of its weights, and would double one fragment.

    Raises:
        ConfigError: when P exceeds the number of blocks (naming diloco.fragments).
    """
    if count == 1:
        return [list(state)]
    blocks = sorted({b for b in map(block_of, state) if b is not None})
    if count > len(blocks):
        raise ConfigError(f"diloco.fragments: P={count} exceeds the model's {len(blocks)} transformer blocks")
    rank = {b: i for i, b in enumerate(blocks)}
    out: list[list[str]] = [[] for _ in range(count)]
    for name, t in state.items():
        b = block_of(name)
        if b is not None:
            i = rank[b]
            out[i % count if pattern == "strided" else i * count // len(blocks)].append(name)
        elif count == 1:
            out[0].append(name)
        else:
            if t.dim() == 0 or t.shape[0] < count:
                raise ConfigError(f"diloco.fragments: {name} has {t.shape[0] if t.dim() else 0} rows, fewer than "
                                  f"P={count} to split it by")
            for i in range(count):
                out[i].append(f"{name}#{i}")
    return out


def keys_of(parts: list[list[str]], code: int) -> list[str]:
    """The tensors of the fragments a round's `code` stands for (`parts` from `fragments`), in
    fragment order: never `parts[code]`, which would read ALL as the last fragment."""
    return [k for q in members(code, len(parts)) for k in parts[q]]


def _slice(state: State, key: str, count: int) -> torch.Tensor:
    name, _, i = key.partition("#")
    return torch.tensor_split(state[name], count, dim=0)[int(i)] if i else state[name]


def take(state: State, keys: list[str], count: int) -> State:
    """The fragment's tensors (views into `state`): whole tensors, and NAME#i as the i-th of
    `count` row slices of NAME."""
    return {k: _slice(state, k, count) for k in keys}


def put(state: State, values: State, count: int) -> None:
    """Write a fragment's tensors back into `state` in place (the inverse of `take`)."""
    for k, v in values.items():
        if "#" in k:
            _slice(state, k, count).copy_(v)
        else:
            state[k] = v


def outer_step(grad: State, momentum: State | None, lr: float, mu: float, nesterov: bool) -> tuple[State, State]:
    """One outer SGD step on the outer gradient `grad` (global - mean local). Returns (the
    change to add to the global parameters, the new momentum):

        m = mu m + g;   change = -lr (g + mu m) with Nesterov, -lr m without.
    """
    m = {k: g.clone() if momentum is None else mu * momentum[k] + g for k, g in grad.items()}
    direction = {k: grad[k] + mu * m[k] for k in grad} if nesterov else m
    return {k: -lr * d for k, d in direction.items()}, m


def merge(local: torch.Tensor, arrived: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha local + (1 - alpha) global; alpha = 0 takes the global exactly."""
    if alpha == 0.0:
        return arrived.clone()
    return (alpha * local.float() + (1 - alpha) * arrived.float()).to(local.dtype)


def advance(value: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """value + change in float32, back in value's dtype: how every party moves a global tensor
    (so that the server's and the clients' copies stay bit-identical)."""
    return (value.float() + change.float()).to(value.dtype)


# --- the model a method half trains or evaluates -----------------------------------------------
def trainable_model(cfg: Config) -> tuple[Any, Any]:
    """(model, tokenizer), once per process: the base model itself (params=full) or the LoRA
    model of [lora] (params=lora). Every user loads the state it needs before using it."""
    if cfg.diloco.params == "lora":
        from fedllm.methods.adapters import engine as lora

        return lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
    key = ("diloco-full", cfg.model.name, cfg.model.dtype, str(cache_root(cfg.model)), *placement(cfg.model))
    return MODEL_CACHE.get(key, lambda: load_base_model(cfg.model, cached=False))


def get_state(net: Any, params: str) -> State:
    """A detached CPU copy of the trained tensors: every parameter (full; tied weights once)
    or the LoRA adapter (PEFT state-dict names)."""
    if params == "lora":
        from fedllm.methods.adapters import engine as lora

        return lora.adapter_state(net)
    return {n: p.detach().to("cpu", copy=True) for n, p in net.named_parameters()}


def set_state(net: Any, params: str, state: State) -> None:
    """Load `state` (every trained tensor) into `net` in place."""
    if params == "lora":
        from fedllm.methods.adapters import engine as lora

        lora.set_adapter_state(net, state)
        return
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(state[n])


def initial_state(cfg: Config) -> State:
    """The state every party starts from, without a message: the base weights (full) or the
    seeded fresh adapter (lora). Computed once per process."""
    if cfg.diloco.params == "lora":
        from fedllm.methods.adapters import engine as lora

        key: tuple = ("diloco-initial-lora", cfg.model.name, cfg.lora.rank, cfg.lora.target_modules, cfg.train.seed)
        return MODEL_CACHE.get(key, lambda: lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed))
    key = ("diloco-initial", cfg.model.name, cfg.model.dtype, str(cache_root(cfg.model)))
    host = dataclasses.replace(cfg.model, device="cpu", device_map="")  # read on the host: the state lives there
    return MODEL_CACHE.get(key, lambda: get_state(load_base_model(host, cached=False)[0], "full"))


