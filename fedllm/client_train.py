"""A client's round: global state in, local steps, update out (LoRA or zeroth-order).

`handle(request, context)` turns a train request's content into the reply's content; the
ClientApp (fedllm/client_app.py) runs it in its own process or in the node's warm worker
(fedllm/worker.py). The run config travels in every request, so a client needs no config of its
own beyond its node config (partition-id, num-partitions; or data-path, a site's own data
file). The reply carries the local adapter state, so any Flower strategy can average it as is;
fedllm's strategies subtract the global state. With train.method=zo the request carries the
accumulators' sync bytes down and the reply the encoded (seed index, scalar) pairs up
(fedllm/updates/zo.py).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedllm.attacks import attacked, attacked_pairs, crash, flip_labels
from fedllm.compression import Feedback, compress, decode, parse
from fedllm.config import Config
from fedllm.data import encode, load_source, load_splits, partition
from fedllm.errors import PayloadError
from fedllm.model import MODEL_CACHE
from fedllm.updates import lora, zo

log = logging.getLogger(__name__)


def config_from_request(request: RecordDict) -> Config:
    """The run config; keys without a dot are per-round values (server-round, proximal-mu,
    Flower's clipping_norm), not config."""
    flat = {k: v for k, v in request.config_records["config"].items() if "." in k}
    return Config.from_flat(flat)


@functools.lru_cache(maxsize=8)
def client_rows(cfg_items: tuple, partition_id: int, num_partitions: int, site_data: str = "",
                flip_seed: int | None = None) -> tuple[list, int]:
    """Encoded training rows (cached per process) and the example count: the file `site_data`
    (a site's own data, named in its node config as data-path), else one partition of data.source.
    With `flip_seed` the responses are shuffled among the examples (the label-flip attack)."""
    cfg = Config.from_flat(dict(cfg_items))
    if cfg.train.method == "zo":
        _, tokenizer = zo.engine_for(cfg)
    else:
        _, tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
    if site_data:
        mine = load_source(site_data, cfg.data)
    else:
        train, _ = load_splits(cfg.data)
        mine = partition(train, cfg.data, num_partitions, partition_id)
    if flip_seed is not None:
        mine = flip_labels(mine, flip_seed)
    rows = [encode(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt) for e in mine]
    return rows, len(mine)


def node_partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def node_rows(cfg: Config, context: Context, as_partition: int | None = None,
              flip: bool = False) -> tuple[list, int]:
    """This node's rows; `as_partition` trains on another partition's (the duplicate attack)."""
    pid, n = node_partition(context)
    pid = pid if as_partition is None else as_partition
    return client_rows(tuple(sorted(cfg.to_flat().items())), pid, n, str(context.node_config.get("data-path", "")),
                       cfg.train.seed + pid if flip else None)


def round_seed(cfg: Config, server_round: int, pid: int) -> int:
    return cfg.train.seed * 1_000_003 + server_round * 1009 + pid


REPLAY = "attack-replay-"  # context.state: a replay attacker's last update records, under this prefix
UPDATE_RECORDS = ("arrays", "update", "zo")


def replayed(context: Context, metrics: dict[str, Any]) -> RecordDict | None:
    """A replay attacker's previous update records with this round's metrics, or None in its
    first round."""
    held = {name: context.state[REPLAY + name] for name in UPDATE_RECORDS if REPLAY + name in context.state}
    return RecordDict({**held, "metrics": MetricRecord(metrics)}) if held else None


def keep_for_replay(context: Context, reply: RecordDict) -> None:
    for name in UPDATE_RECORDS:
        if name in reply:
            context.state[REPLAY + name] = reply[name]


def handle(request: RecordDict, context: Context, started: float | None = None) -> RecordDict:
    """A train request's content in, the reply's content out (context.state updated).
    `started` (time.time() when the message reached the ClientApp) gives the metric
    start-seconds, the wait until the first training step."""
    started = time.time() if started is None else started
    cfg = config_from_request(request)
    server_round = int(request.config_records["config"].get("server-round", 0))
    pid, _ = node_partition(context)
    if cfg.train.method == "zo":
        return train_zo(request, context, cfg, server_round, pid, started)
    # exact-lora sends the frozen global delta and wants a fresh adapter of this node's rank
    exact = "frozen" in request.array_records
    rank = int(context.node_config.get("lora-rank", cfg.lora.rank_of(pid)))  # exact-lora accepts any
    if rank != cfg.lora.rank:
        cfg = cfg.replace(lora__rank=rank)
    model, tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
    attack = cfg.attack.kinds().get(pid)
    if attack == "crash":
        crash(pid, server_round)
    as_pid = cfg.attack.victim if attack == "duplicate" else pid
    seed = round_seed(cfg, server_round, as_pid)
    if exact:
        frozen, global_state = request.array_records["frozen"].to_torch_state_dict(), {}
        lora.reset_adapter(model, seed)
    else:
        frozen, global_state = {}, receive_global(request, context, cfg)
        lora.set_adapter_state(model, global_state)
    rows, num_examples = node_rows(cfg, context, as_pid, flip=attack == "label-flip")
    mu = float(request.config_records["config"].get("proximal-mu", 0.0))
    start = lora.adapter_state(model) if attack else {}  # what an attacker pretends to start from
    start_seconds = time.time() - started
    metrics: dict[str, Any] = {
        "num-examples": num_examples,
        "partition-id": pid,
        "server-round": server_round,
        "model-loads": MODEL_CACHE.loads,
        "lora-rank": cfg.lora.rank,
        "start-seconds": start_seconds,
    }
    if attack == "replay" and (again := replayed(context, {**metrics, "train-loss": 0.0, "steps": 0})):
        return signed(again, request, context, cfg, pid)
    if attack == "zero":  # a free rider does no work
        stats = {"train-loss": 0.0, "steps": 0}
    else:
        with lora.frozen_delta(model, frozen):
            stats = lora.train(model, rows, cfg.train, tokenizer.pad_token_id, seed=seed, proximal_mu=mu)
    metrics.update(stats)
    log.info("client %d round %d: loss %.4f", pid, server_round, stats["train-loss"])
    local = lora.adapter_state(model)
    if attack in ("zero", "noise", "sign-flip", "scale"):
        local = attacked(attack, local, start, seed, cfg.attack.noise_scale, cfg.attack.scale)
    if exact or not cfg.compression.up:
        reply = RecordDict({"arrays": ArrayRecord(local), "metrics": MetricRecord(metrics)})
    else:
        payload = send_compressed(lora.subtract(local, global_state), context, cfg, seed)
        reply = RecordDict({"update": ConfigRecord({"payload": payload}), "metrics": MetricRecord(metrics)})
    if attack == "replay":
        keep_for_replay(context, reply)
    return signed(reply, request, context, cfg, pid)


def signed(content: RecordDict, request: RecordDict, context: Context, cfg: Config, pid: int) -> RecordDict:
    """With the ledger on, add this client's account and its signature over (contract, round,
    update hash), so the server credits or penalises the right account."""
    if not cfg.ledger.enabled:
        return content
    from fedllm import ledger  # web3 is the optional [ledger] extra
    config = request.config_records["config"]
    if cfg.ledger.client_keys == "simulated":
        account = ledger.derived_account(cfg.ledger.seed, f"client-{pid}")
    else:
        spec = context.node_config.get("ledger-key")
        if not spec:
            raise PayloadError("ledger.client-keys=node: this SuperNode's node config lacks ledger-key")
        account = ledger.read_key(str(spec), "node config ledger-key")
    digest = ledger.update_hash(content)
    signature = ledger.sign_update(account, str(config["ledger-contract"]), int(config["server-round"]), digest)
    content[ledger.LEDGER_RECORD] = ConfigRecord({"account": account.address, "signature": signature})
    return content


def receive_global(request: RecordDict, context: Context, cfg: Config) -> dict[str, Any]:
    """The global adapter: sent whole as arrays, or (compression.down) rebuilt from the copy in
    this node's state plus the encoded round deltas it lacks. The node keeps the result.

    Raises:
        PayloadError: when the deltas do not start at the version this node holds.
    """
    down = request.config_records.get("down")
    if "arrays" in request.array_records:
        state = request.array_records["arrays"].to_torch_state_dict()
    else:
        if down is None:
            raise PayloadError("message carries neither the global arrays nor the encoded deltas")
        held = context.state.config_records.get("fedllm-global")
        if held is None or "global" not in context.state.array_records or held["version"] != down["base"]:
            raise PayloadError(f"this node does not hold global version {down['base']}; it needs the full state")
        state = context.state.array_records["global"].to_torch_state_dict()
        codec = parse(cfg.compression.down)
        for payload in down["deltas"]:
            delta = decode(codec, payload, sorted(state))
            state = {k: state[k] + delta[k].to(state[k].dtype) for k in state}
    if down is not None:
        context.state["global"] = ArrayRecord(state)
        context.state["fedllm-global"] = ConfigRecord({"version": down["version"]})
    return state


def send_compressed(delta: dict[str, Any], context: Context, cfg: Config, seed: int) -> bytes:
    """Encode the update with compression.up, through this node's error-feedback residual."""
    feedback = None
    if cfg.compression.error_feedback:
        held = context.state.array_records.get("ef-residual")
        feedback = Feedback(held.to_torch_state_dict() if held is not None else {})
    payload, feedback = compress(parse(cfg.compression.up), delta, feedback, seed)
    if feedback is not None:
        context.state["ef-residual"] = ArrayRecord(feedback.residual)
    return payload


def train_zo(request: RecordDict, context: Context, cfg: Config, server_round: int, pid: int,
             started: float | None = None) -> RecordDict:
    """Sync to the global accumulators, run tau ZO steps, reply with the encoded scalars."""
    engine, tokenizer = zo.engine_for(cfg)
    down = request.config_records["zo"]
    if int(down["fingerprint"]) != engine.fingerprint:
        raise PayloadError("zo: this client's perturbations differ from the server's "
                           "(torch version, device type, dtype and model must match)")
    attack = cfg.attack.kinds().get(pid)
    if attack == "crash":
        crash(pid, server_round)
    t0 = time.perf_counter()
    regenerated = engine.sync(zo.decode_down(bytes(down["down"]), engine.state))
    sync_seconds = time.perf_counter() - t0
    as_pid = cfg.attack.victim if attack == "duplicate" else pid
    rows, num_examples = node_rows(cfg, context, as_pid, flip=attack == "label-flip")
    seed = round_seed(cfg, server_round, as_pid)
    start_seconds = time.time() - (started or time.time())
    metrics: dict[str, Any] = {
        "num-examples": num_examples,
        "partition-id": pid,
        "server-round": server_round,
        "model-loads": MODEL_CACHE.loads,
        "zo-version": engine.state.version,
        "zo-fingerprint": engine.fingerprint,
        "sync-seeds": regenerated,
        "sync-seconds": sync_seconds,
        "start-seconds": start_seconds,
    }
    if attack == "replay" and (again := replayed(context, {**metrics, "train-loss": 0.0, "steps": 0})):
        return signed(again, request, context, cfg, pid)
    if attack == "zero":
        pairs, stats = [], {"train-loss": 0.0, "steps": 0}
    else:
        pairs, stats = engine.train(rows, cfg.train, tokenizer.pad_token_id, seed)
    if attack in ("noise", "sign-flip", "scale"):
        pairs = attacked_pairs(attack, pairs, seed, cfg.attack.noise_scale, cfg.attack.scale)
    up = zo.encode_upload(cfg.zo.num_seeds, pairs, cfg.zo.bits, seed)
    metrics.update(stats)
    log.info("client %d round %d: zo loss %.4f, %d seeds synced", pid, server_round, stats["train-loss"], regenerated)
    reply = RecordDict({"zo": ConfigRecord({"up": up}), "metrics": MetricRecord(metrics)})
    if attack == "replay":
        keep_for_replay(context, reply)
    return signed(reply, request, context, cfg, pid)
