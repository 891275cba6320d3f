"""zo's client half: sync the engine to the global accumulators, run tau two-point ZO steps,
and send the (seed index, scalar) pairs, or their per-seed sums, whichever is smaller; in a
warm-up round (zo.warmup-rounds), AdamW steps on the perturbed weights and their dense delta."""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.base import Transform
from fedllm.methods.zo import engine as zo
from fedllm.methods.zo.server import SUMS, WARM
from fedllm.methods.zo.state import Accumulators
from fedllm.protocol import ZO, ZO_SUMS

VALUES = "g"  # the one tensor an attack transform sees: the step scalars, in step order
HELD = "zo-accumulators"  # server.mode=async: the accumulators this node holds, in context.state


class ZOClient:
    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        self.cfg = cfg
        self.engine, self.tokenizer = zo.engine_for(cfg)
        self.context = context
        self.pairs: list[tuple[int, float]] = []
        self.delta: torch.Tensor | None = None  # a warm-up round's dense delta (zo.warmup-rounds)
        self.warming = False  # whether this round, at the synced state, is a warm-up round
        self.seed = 0

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        if ZO not in request.config_records:
            raise PayloadError(f"zo: the message lacks the {ZO!r} record")
        down = request.config_records[ZO]
        if int(down["fingerprint"]) != self.engine.fingerprint:
            raise PayloadError("zo: this client's perturbations differ from the server's "
                               "(fedllm version, dtype and model must match; the device does not matter)")
        self.seed, self.pairs, self.delta = seed, [], None
        t0 = time.perf_counter()
        local = self.engine.state
        if self.cfg.server.mode == "async":  # the nodes sharing this process's engine may hold other versions
            held = self.context.state.config_records.get(HELD)
            local = (Accumulators.from_bytes(bytes(held["state"]), local.k, local.n) if held is not None
                     else Accumulators(local.k, n=local.n))
        state = zo.decode_down(bytes(down["down"]), local)
        regenerated = self.engine.sync(state)  # moves the weights either way, to this node's version
        if self.cfg.server.mode == "async":
            self.context.state[HELD] = ConfigRecord({"state": state.to_bytes()})
        self.warming = self.engine.warming()
        return {"zo-version": self.engine.state.version, "zo-fingerprint": self.engine.fingerprint,
                "sync-seeds": regenerated, "sync-seconds": time.perf_counter() - t0}

    def train(self, rows: list[dict[str, list[int]]], seed: int) -> dict[str, float]:
        if self.warming:
            self.delta, stats = self.engine.train_first_order(rows, self.cfg.train, self.tokenizer.pad_token_id, seed)
            return stats
        self.pairs, stats = self.engine.train(rows, self.cfg.train, self.tokenizer.pad_token_id, seed)
        return stats

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        if self.warming:  # the dense delta; zeros from a client that took no step
            delta = self.delta if self.delta is not None else torch.zeros(self.engine.state.n)
            if transform is not None:
                delta = transform({WARM: delta})[WARM]
            return {ZO_SUMS: ArrayRecord({WARM: delta.float().contiguous()})}
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
