"""LoRA's client half: receive the global adapter (whole, or rebuilt from the encoded deltas
this node lacks), train it, and send the local adapter (or, with compression.up, the encoded
delta through this node's error-feedback residual)."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedllm.compression import Feedback, compress, decode, parse
from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.base import Transform
from fedllm.methods.lora import engine as lora
from fedllm.protocol import ARRAYS, CONFIG, DOWN, UPDATE, State

GLOBAL, GLOBAL_VERSION, RESIDUAL = "global", "fedllm-global", "ef-residual"  # context.state names


def client_rank(cfg: Config, context: Context, partition_id: int) -> Config:
    """The config with this node's LoRA rank: node config lora-rank, else lora.client-ranks."""
    rank = int(context.node_config.get("lora-rank", cfg.lora.rank_of(partition_id)))
    return cfg if rank == cfg.lora.rank else cfg.replace(lora__rank=rank)


class LoraClient:
    """One train message's work on this node's cached PEFT model."""

    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        self.cfg = client_rank(cfg, context, partition_id)
        self.context = context
        self.net, self.tokenizer = lora.lora_model(self.cfg.model, self.cfg.lora, self.cfg.train.seed)
        self.start: State = {}  # the state training starts from (what an update is relative to)
        self.mu, self.seed = 0.0, 0

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        self.seed = seed
        self.start = receive_global(request, self.context, self.cfg)
        lora.set_adapter_state(self.net, self.start)
        self.mu = float(request.config_records[CONFIG].get("proximal-mu", 0.0))
        return {"lora-rank": self.cfg.lora.rank}

    def train(self, rows: list[dict[str, list[int]]], seed: int) -> dict[str, float]:
        return lora.train(self.net, rows, self.cfg.train, self.tokenizer.pad_token_id, seed=seed, proximal_mu=self.mu)

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        local = lora.adapter_state(self.net)
        if transform is not None:
            local = shifted(local, self.start, transform)
        if not self.cfg.compression.up:
            return {ARRAYS: ArrayRecord(local)}
        payload = send_compressed(lora.subtract(local, self.start), self.context, self.cfg, self.seed)
        return {UPDATE: ConfigRecord({"payload": payload})}


def shifted(local: State, start: State, transform: Transform) -> State:
    """start + transform(local - start), in local's dtypes (an attack on a LoRA update)."""
    delta = {k: local[k].float() - start[k].float() for k in local}
    bad = transform(delta)
    return {k: (start[k].float() + bad[k]).to(local[k].dtype) for k in local}


def receive_global(request: RecordDict, context: Context, cfg: Config) -> State:
    """The global adapter: sent whole as arrays, or (compression.down) rebuilt from the copy in
    this node's state plus the encoded round deltas it lacks. The node keeps the result.

    Raises:
        PayloadError: when the deltas do not start at the version this node holds.
    """
    down = request.config_records.get(DOWN)
    if ARRAYS in request.array_records:
        state = request.array_records[ARRAYS].to_torch_state_dict()
    else:
        if down is None:
            raise PayloadError("message carries neither the global arrays nor the encoded deltas")
        held = context.state.config_records.get(GLOBAL_VERSION)
        if held is None or GLOBAL not in context.state.array_records or held["version"] != down["base"]:
            raise PayloadError(f"this node does not hold global version {down['base']}; it needs the full state")
        state = context.state.array_records[GLOBAL].to_torch_state_dict()
        codec = parse(cfg.compression.down)
        for payload in down["deltas"]:
            delta = decode(codec, payload, sorted(state))
            state = {k: state[k] + delta[k].to(state[k].dtype) for k in state}
    if down is not None:
        context.state[GLOBAL] = ArrayRecord(state)
        context.state[GLOBAL_VERSION] = ConfigRecord({"version": down["version"]})
    return state


def send_compressed(delta: State, context: Context, cfg: Config, seed: int) -> bytes:
    """Encode the update with compression.up, through this node's error-feedback residual."""
    feedback = None
    if cfg.compression.error_feedback:
        held = context.state.array_records.get(RESIDUAL)
        feedback = Feedback(held.to_torch_state_dict() if held is not None else {})
    payload, feedback = compress(parse(cfg.compression.up), delta, feedback, seed)
    if feedback is not None:
        context.state[RESIDUAL] = ArrayRecord(feedback.residual)
    return payload
