"""exact-lora's client half: a fresh adapter of this node's rank, trained on top of the frozen
global delta the server sends; the upload is the adapter itself."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Context, RecordDict

from fedllm.config import Config
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods.base import Transform
from fedllm.methods.adapters import engine as lora
from fedllm.methods.adapters.client import client_rank, shifted
from fedllm.methods.schedule import clock
from fedllm.protocol import ARRAYS, CONFIG, FROZEN, State


class ExactLoraClient:
    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        self.cfg = client_rank(cfg, context, partition_id)
        if self.cfg.model.quantize != "none":
            raise ConfigError("exact-lora adds the frozen global delta into the base weights: this node's quantize "
                              "must be none (node config quantize)")
        self.net, self.tokenizer = lora.lora_model(self.cfg.model, self.cfg.lora, self.cfg.train.seed)
        self.frozen: State = {}
        self.start: State = {}
        self.round = 0

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        if FROZEN not in request.array_records:
            raise PayloadError(f"exact-lora: the message lacks the {FROZEN!r} record")
        self.frozen = request.array_records[FROZEN].to_torch_state_dict()
        self.round = int(request.config_records[CONFIG].get("server-round", 0))
        lora.reset_adapter(self.net, seed)
        self.start = lora.adapter_state(self.net)
        return {"lora-rank": self.cfg.lora.rank}

    def train(self, rows: list[dict[str, list[int]]], seed: int) -> dict[str, float]:
        with lora.frozen_delta(self.net, self.frozen):
            return lora.train(self.net, rows, self.cfg.train, self.tokenizer.pad_token_id, seed=seed,
                              clock=clock(self.cfg, self.round))

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        local = lora.adapter_state(self.net)
        return {ARRAYS: ArrayRecord(local if transform is None else shifted(local, self.start, transform))}
