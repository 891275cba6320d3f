"""LoRA's client half: receive the global adapter (whole, or rebuilt from the encoded deltas
this node lacks), train it, and send the local adapter (or, with compression.up, the encoded
delta through this node's error-feedback residual).

A node whose rank r is below lora.rank R (lora.client-ranks, lora.policy, node config lora-rank)
trains the leading r rows of the global factors with alpha scaled by r / R (so alpha / r stays
alpha / R: its adapter is exactly the rank-r truncation of the global one) and sends the other rows
back unchanged: its delta there is zero (HetLoRA's zero-padding; fedavg then averages each row
over all clients). Its base may be quantized (model.quantize or node config quantize)."""

from __future__ import annotations

from typing import Any, Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedllm.compression import Feedback, compress, decode, parse
from fedllm.config import Config
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods.base import Transform
from fedllm.methods.adapters import engine as lora
from fedllm.methods.adapters import modules, scaffold
from fedllm.methods.adapters.optimizer import adamw_state, make_adamw
from fedllm.methods.adapters.personal import Personal
from fedllm.methods.adapters.resources import base_bits, client_config, pad, truncate
from fedllm.methods.schedule import clock
from fedllm.protocol import ARRAYS, CONFIG, DOWN, METRICS, PEFT, SCORES, UPDATE, State

GLOBAL, GLOBAL_VERSION, RESIDUAL = "global", "fedllm-global", "ef-residual"  # context.state names
MOMENTS = "adamw-moments"  # train.keep-optimizer's, in context.state
Rows = Callable[[Any], tuple[list[dict[str, list[int]]], int]]  # tokenizer -> (encoded rows, examples)


def client_rank(cfg: Config, context: Context, partition_id: int) -> Config:
    """The config with this node's rank and quantization (fedllm.methods.adapters.resources)."""
    return client_config(cfg, context.node_config, partition_id)


def chosen_modules(request: RecordDict, cfg: Config) -> Config:
    """With lora.target-modules=auto, the config with the modules the server chose (sent with each
    message); otherwise `cfg`.

    Raises:
        PayloadError: the message lacks the choice.
    """
    if not cfg.lora.auto_modules():
        return cfg
    modules = request.config_records.get(PEFT, {}).get("target-modules")
    if not isinstance(modules, str) or not modules.strip() or modules.strip() == "auto":
        raise PayloadError(f"lora.target-modules=auto: the message lacks the server's module choice ({PEFT!r})")
    return cfg.replace(lora__target_modules=modules)


class LoraClient:
    """One train message's work on this node's cached PEFT model."""

    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        self.cfg = client_rank(cfg, context, partition_id)
        self.global_rank = cfg.lora.rank
        if self.cfg.lora.rank > self.global_rank:
            raise ConfigError(f"lora rank {self.cfg.lora.rank} of this node is above lora.rank={self.global_rank} "
                              "(the global adapter's); train.method=exact-lora takes any rank")
        self.context = context
        self.personal = Personal(self.cfg, context, partition_id) if cfg.lora.personal != "none" else None
        self.net = self.tokenizer = None
        if not cfg.lora.auto_modules():
            self._build(self.cfg)
        self.start: State = {}  # the state training starts from (what an update is relative to)
        self.mu, self.seed, self.round = 0.0, 0, 0
        self.variate: scaffold.Held | None = None  # SCAFFOLD's c and c_i (server.strategy=scaffold)

    def _build(self, cfg: Config) -> None:
        shape = cfg.lora
        if shape.rank < self.global_rank:  # alpha / r = alpha / R: the rank-r truncation of the global adapter
            shape = cfg.replace(lora__alpha=shape.alpha * shape.rank / self.global_rank).lora
        build = self.personal.build if self.personal is not None else lora.lora_model  # dual: a second adapter
        self.net, self.tokenizer = build(cfg.model, shape, cfg.train.seed)

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        self.seed = seed
        if self.net is None:
            self.cfg = chosen_modules(request, self.cfg)
            self._build(self.cfg)
        self.start = receive_global(request, self.context, self.cfg)
        mine = self.mine(self.start)
        lora.set_adapter_state(self.net, self.personal.whole(self.net, mine) if self.personal is not None else mine)
        self.variate = scaffold.receive(request, self.context, self.cfg, self.start)
        self.mu = float(request.config_records[CONFIG].get("proximal-mu", 0.0))
        self.round = int(request.config_records[CONFIG].get("server-round", 0))
        held_out = {} if self.personal is None else self.personal.evaluate(self.net, self.tokenizer, mine, self.round)
        return {"lora-rank": self.cfg.lora.rank, "base-bits": base_bits(self.cfg.model), **held_out}

    def mine(self, state: State) -> State:
        return truncate(state, self.cfg.lora.rank) if self.cfg.lora.rank < self.global_rank else state

    def train(self, rows: list[dict[str, list[int]]], seed: int) -> dict[str, float]:
        private = {} if self.personal is None else self.personal.before(  # dual: the private adapter's steps first
            self.net, rows, self.tokenizer.pad_token_id, seed, clock(self.cfg, self.round))
        opt = kept_optimizer(self.net, self.context, self.cfg)
        stats = lora.train(self.net, rows, self.cfg.train, self.tokenizer.pad_token_id, seed=seed, proximal_mu=self.mu,
                           optimizer=opt, clock=clock(self.cfg, self.round),
                           correct=scaffold.correction(self.net, self.variate))
        if opt is not None:
            keep_optimizer(opt, self.context)
        if self.personal is not None:
            self.personal.keep(self.net)  # head's private layers stay in the node state
        return {**stats, **private}

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        local = lora.adapter_state(self.net)
        if self.personal is not None:
            local = self.personal.shared(local)
        local = {k: t.to(self.start[k].dtype) for k, t in local.items()}  # the global's dtypes, whatever the base's
        if self.cfg.lora.rank < self.global_rank:
            local = pad(local, self.start)
        variate = scaffold.reply(self.variate, self.start, local, self.context, self.cfg, clock(self.cfg, self.round),
                                 self.seed)
        if transform is not None:
            local = shifted(local, self.start, transform)
        if not self.cfg.compression.up:  # asynchronous rounds send the delta: the server may have moved on
            return {ARRAYS: ArrayRecord(lora.subtract(local, self.start) if self.cfg.server.mode == "async" else local),
                    **variate}
        payload = send_compressed(lora.subtract(local, self.start), self.context, self.cfg, self.seed)
        return {UPDATE: ConfigRecord({"payload": payload}), **variate}

    def answer(self, request: RecordDict, rows_of: Rows, seed: int) -> dict[str, Any]:
        """A query before round 1 (lora.target-modules=auto): this node's importance score of every
        linear module of the decoder, from a probe adapter on all of them."""
        probe = self.cfg.replace(lora__target_modules=",".join(modules.candidate_leaves(self.cfg.model)),
                                 lora__dropout=0.0, lora__rank=self.global_rank)
        net, self.tokenizer = lora.lora_model(probe.model, probe.lora, probe.train.seed)
        rows, examples = rows_of(self.tokenizer)
        scores = modules.module_scores(net, rows, probe.train, self.tokenizer.pad_token_id,
                                    probe.lora.calibration_batches, seed)
        return {SCORES: MetricRecord(scores), METRICS: MetricRecord({"num-examples": examples})}


def kept_optimizer(net: Any, context: Context, cfg: Config) -> Any:
    """With train.keep-optimizer, an AdamW holding the moments this node kept from its last round
    (fresh on its first, or when the adapter's tensors changed); otherwise None (train makes its own)."""
    if not cfg.train.keep_optimizer:
        return None
    held = context.state.array_records.get(MOMENTS)
    return make_adamw(net, cfg.train, held.to_torch_state_dict() if held is not None else None)


def keep_optimizer(opt: Any, context: Context) -> None:
    """Store the optimizer's moments in the node state (train.keep-optimizer)."""
    context.state[MOMENTS] = ArrayRecord(adamw_state(opt))


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
