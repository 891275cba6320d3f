"""zo's client half: sync the engine to the global accumulators, run tau two-point ZO steps,
and send the (seed index, scalar) pairs, or their per-seed sums, whichever is smaller."""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.base import Transform
from fedllm.methods.zo import engine as zo
from fedllm.methods.zo.server import SUMS
from fedllm.protocol import ZO, ZO_SUMS

VALUES = "g"  # the one tensor an attack transform sees: the step scalars, in step order


class ZOClient:
    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        self.cfg = cfg
        self.engine, self.tokenizer = zo.engine_for(cfg)
        self.pairs: list[tuple[int, float]] = []
        self.seed = 0

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        if ZO not in request.config_records:
            raise PayloadError(f"zo: the message lacks the {ZO!r} record")
        down = request.config_records[ZO]
        if int(down["fingerprint"]) != self.engine.fingerprint:
            raise PayloadError("zo: this client's perturbations differ from the server's "
                               "(fedllm version, dtype and model must match; the device does not matter)")
        self.seed, self.pairs = seed, []
        t0 = time.perf_counter()
        regenerated = self.engine.sync(zo.decode_down(bytes(down["down"]), self.engine.state))
        return {"zo-version": self.engine.state.version, "zo-fingerprint": self.engine.fingerprint,
                "sync-seeds": regenerated, "sync-seconds": time.perf_counter() - t0}

    def train(self, rows: list[dict[str, list[int]]], seed: int) -> dict[str, float]:
        self.pairs, stats = self.engine.train(rows, self.cfg.train, self.tokenizer.pad_token_id, seed)
        return stats

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        pairs = self.pairs
        if transform is not None and pairs:
            values = transform({VALUES: torch.tensor([g for _, g in pairs], dtype=torch.float64)})[VALUES]
            pairs = list(zip([i for i, _ in pairs], values.tolist()))
        if self.cfg.secagg.enabled:  # a sum of these over clients is the round's per-seed sums
            dense = torch.zeros(self.cfg.zo.num_seeds, dtype=torch.float64)
            for i, g in pairs:
                dense[i] += g
            return {ZO_SUMS: ArrayRecord({SUMS: dense.float()})}
        return {ZO: ConfigRecord({"up": zo.encode_upload(self.cfg.zo.num_seeds, pairs, self.cfg.zo.bits, self.seed)})}
