"""DPO's client half: LoRA's (the global adapter in, the local adapter or an encoded delta out, any
lower rank), with the round's local steps run by TRL's DPOTrainer on this node's preference pairs
(without dropout, TRL's default; the rates come back after the round: `engine.patched`)."""

from __future__ import annotations

from typing import Any

from fedllm.methods.dpo import engine as dpo
from fedllm.methods.adapters.client import LoraClient, keep_optimizer, kept_optimizer
from fedllm.methods.schedule import clock


class DpoClient(LoraClient):
    """One train message's DPO on this node's cached PEFT model."""

    def train(self, rows: list[dict[str, Any]], seed: int) -> dict[str, float]:
        opt = kept_optimizer(self.net, self.context, self.cfg)
        stats = dpo.train(self.net, self.tokenizer, rows, self.cfg.train, self.cfg.dpo, self.cfg.data.max_length, seed,
                          optimizer=opt, clock=clock(self.cfg, self.round))
        if opt is not None:
            keep_optimizer(opt, self.context)
        return stats
