"""DPO's client half: LoRA's (the global adapter in, the local adapter or an encoded delta out, any
lower rank), with the round's local steps run by TRL's DPOTrainer on this node's preference pairs.

DPO trains without dropout (TRL's default); the model is built with lora.dropout 0 so that the
cached model TRL's trainer touches is not one a LoRA run with dropout shares."""

from __future__ import annotations

from typing import Any

from flwr.app import Context

from fedllm.config import Config
from fedllm.methods.dpo import engine as dpo
from fedllm.methods.lora.client import LoraClient


def dpo_config(cfg: Config) -> Config:
    """The config both halves build their model from: lora.dropout 0 (TRL turns dropout off)."""
    return cfg.replace(lora__dropout=0.0)


class DpoClient(LoraClient):
    """One train message's DPO on this node's cached PEFT model."""

    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        super().__init__(dpo_config(cfg), context, partition_id)

    def train(self, rows: list[dict[str, Any]], seed: int) -> dict[str, float]:
        return dpo.train(self.net, self.tokenizer, rows, self.cfg.train, self.cfg.dpo, self.cfg.data.max_length, seed)
