"""Ferret's client half: sync the engine to the global version (the round payloads it lacks), take
first-order local steps, and send the update's coordinates on this version's bases."""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.base import Transform
from fedllm.methods.ferret.engine import engine_for
from fedllm.methods.ferret.server import COEF, FERRET
from fedllm.methods.schedule import clock
from fedllm.protocol import CONFIG


class FerretClient:
    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        self.cfg = cfg
        self.engine, self.tokenizer = engine_for(cfg)
        self.coefs = torch.zeros(0, dtype=torch.float64)
        self.seed, self.mu, self.version, self.round = 0, 0.0, 0, 0

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        down = request.config_records.get(FERRET)
        if down is None:
            raise PayloadError(f"ferret: the message lacks the {FERRET!r} record")
        if int(down["fingerprint"]) != self.engine.fingerprint:
            raise PayloadError("ferret: this client's trained tensors or bases differ from the server's "
                               "(model.*, lora.*, ferret.* and the fedllm version must match; the device does not)")
        rounds = [bytes(p) for p in down.get("rounds", [])]
        t0 = time.perf_counter()
        applied = self.engine.sync(int(down["since"]), bytes(down["base"]), rounds)
        if self.engine.version != int(down["version"]):
            raise PayloadError(f"ferret sync: reached version {self.engine.version}, the server is at "
                               f"{down['version']}")
        self.seed, self.version = seed, self.engine.version
        config = request.config_records.get(CONFIG)
        self.mu = float(config.get("proximal-mu", 0.0)) if config is not None else 0.0
        self.round = int(config.get("server-round", 0)) if config is not None else 0
        return {"ferret-version": self.engine.version, "ferret-fingerprint": self.engine.fingerprint,
                "sync-rounds": applied, "sync-seconds": time.perf_counter() - t0}

    def train(self, rows: list[dict[str, list[int]]], seed: int) -> dict[str, float]:
        self.coefs, stats = self.engine.train(rows, self.cfg.train, self.tokenizer.pad_token_id, seed, self.mu,
                                              clock=clock(self.cfg, self.round))
        return stats

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        coefs = self.coefs
        if transform is not None:
            coefs = transform({COEF: coefs.float()})[COEF].double()
        return {FERRET: ConfigRecord({"up": self.engine.encode(coefs, self.version, self.seed)})}
