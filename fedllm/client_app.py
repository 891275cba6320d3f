"""Flower ClientApp: global state in, local steps, update out (LoRA or zeroth-order).

Started by Flower (`flwr run .`, `fedllm simulate`, or a SuperNode). The run config travels in
every train message, so a client needs no config of its own beyond its partition
(node_config: partition-id, num-partitions). The reply carries the local adapter state, so
any Flower strategy can average it as is; fedllm's strategies subtract the global state.
With train.method=zo the message carries the accumulators' sync bytes down and the encoded
(seed index, scalar) pairs up (fedllm/updates/zo.py).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.config import Config
from fedllm.data import encode, load_splits, partition
from fedllm.errors import PayloadError
from fedllm.model import MODEL_CACHE
from fedllm.updates import lora, zo

log = logging.getLogger(__name__)
app = ClientApp()


def config_from_message(msg: Message) -> Config:
    flat = {k: v for k, v in msg.content.config_records["config"].items() if k != "server-round"}
    return Config.from_flat(flat)


@functools.lru_cache(maxsize=8)
def client_rows(cfg_items: tuple, partition_id: int, num_partitions: int) -> tuple[list, int]:
    """Encoded training rows of one partition (cached per process) and the example count."""
    cfg = Config.from_flat(dict(cfg_items))
    if cfg.train.method == "zo":
        _, tokenizer = zo.engine_for(cfg)
    else:
        _, tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
    train, _ = load_splits(cfg.data)
    mine = partition(train, cfg.data, num_partitions, partition_id)
    rows = [encode(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt) for e in mine]
    return rows, len(mine)


def node_partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def round_seed(cfg: Config, server_round: int, pid: int) -> int:
    return cfg.train.seed * 1_000_003 + server_round * 1009 + pid


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config_from_message(msg)
    server_round = int(msg.content.config_records["config"].get("server-round", 0))
    pid, n = node_partition(context)
    if cfg.train.method == "zo":
        return train_zo(msg, cfg, server_round, pid, n)
    model, tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    lora.set_adapter_state(model, global_state)
    rows, num_examples = client_rows(tuple(sorted(cfg.to_flat().items())), pid, n)
    stats = lora.train(model, rows, cfg.train, tokenizer.pad_token_id, seed=round_seed(cfg, server_round, pid))
    metrics: dict[str, Any] = {
        **stats,
        "num-examples": num_examples,
        "partition-id": pid,
        "model-loads": MODEL_CACHE.loads,
    }
    log.info("client %d round %d: loss %.4f", pid, server_round, stats["train-loss"])
    return Message(RecordDict({"arrays": ArrayRecord(lora.adapter_state(model)), "metrics": MetricRecord(metrics)}), reply_to=msg)


def train_zo(msg: Message, cfg: Config, server_round: int, pid: int, n: int) -> Message:
    """Sync to the global accumulators, run tau ZO steps, reply with the encoded scalars."""
    engine, tokenizer = zo.engine_for(cfg)
    down = msg.content.config_records["zo"]
    if int(down["fingerprint"]) != engine.fingerprint:
        raise PayloadError("zo: this client's perturbations differ from the server's "
                           "(torch version, device type, dtype and model must match)")
    t0 = time.perf_counter()
    regenerated = engine.sync(zo.decode_down(bytes(down["down"]), engine.state))
    sync_seconds = time.perf_counter() - t0
    rows, num_examples = client_rows(tuple(sorted(cfg.to_flat().items())), pid, n)
    seed = round_seed(cfg, server_round, pid)
    pairs, stats = engine.train(rows, cfg.train, tokenizer.pad_token_id, seed)
    up = zo.encode_upload(cfg.zo.num_seeds, pairs, cfg.zo.bits, seed)
    metrics: dict[str, Any] = {
        **stats,
        "num-examples": num_examples,
        "partition-id": pid,
        "model-loads": MODEL_CACHE.loads,
        "zo-version": engine.state.version,
        "zo-fingerprint": engine.fingerprint,
        "sync-seeds": regenerated,
        "sync-seconds": sync_seconds,
    }
    log.info("client %d round %d: zo loss %.4f, %d seeds synced", pid, server_round, stats["train-loss"], regenerated)
    return Message(RecordDict({"zo": ConfigRecord({"up": up}), "metrics": MetricRecord(metrics)}), reply_to=msg)
