"""Flower ClientApp: global adapter in, local LoRA steps, local adapter out.

Started by Flower (`flwr run .`, `fedllm simulate`, or a SuperNode). The run config travels in
every train message, so a client needs no config of its own beyond its partition
(node_config: partition-id, num-partitions). The reply carries the local adapter state, so
any Flower strategy can average it as is; fedllm's strategies subtract the global state.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm.config import Config
from fedllm.data import encode, load_splits, partition
from fedllm.model import MODEL_CACHE
from fedllm.updates import lora

log = logging.getLogger(__name__)
app = ClientApp()


def config_from_message(msg: Message) -> Config:
    flat = {k: v for k, v in msg.content.config_records["config"].items() if k != "server-round"}
    return Config.from_flat(flat)


@functools.lru_cache(maxsize=8)
def client_rows(cfg_items: tuple, partition_id: int, num_partitions: int) -> tuple[list, int]:
    """Encoded training rows of one partition (cached per process) and the example count."""
    cfg = Config.from_flat(dict(cfg_items))
    _, tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
    train, _ = load_splits(cfg.data)
    mine = partition(train, cfg.data, num_partitions, partition_id)
    rows = [encode(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt) for e in mine]
    return rows, len(mine)


def node_partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = config_from_message(msg)
    server_round = int(msg.content.config_records["config"].get("server-round", 0))
    pid, n = node_partition(context)
    model, tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
    global_state = msg.content.array_records["arrays"].to_torch_state_dict()
    lora.set_adapter_state(model, global_state)
    rows, num_examples = client_rows(tuple(sorted(cfg.to_flat().items())), pid, n)
    stats = lora.train(model, rows, cfg.train, tokenizer.pad_token_id,
                       seed=cfg.train.seed * 1_000_003 + server_round * 1009 + pid)
    metrics: dict[str, Any] = {
        **stats,
        "num-examples": num_examples,
        "partition-id": pid,
        "model-loads": MODEL_CACHE.loads,
    }
    log.info("client %d round %d: loss %.4f", pid, server_round, stats["train-loss"])
    return Message(RecordDict({"arrays": ArrayRecord(lora.adapter_state(model)), "metrics": MetricRecord(metrics)}), reply_to=msg)
