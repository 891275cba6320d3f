"""DPO's server half: LoRA's (the global adapter moved by the rule chain's aggregate), plus the
held-out preference figures at every evaluation.

The held-out rewards are measured against the run's starting model (the base with the initial
adapter: fresh, or server.init-from's), not against each round's training reference, so that every
round is scored on the same scale. The starting adapter and its log-likelihoods of the held-out
pairs (computed at the first evaluation, keyed by a digest of the pairs) are kept in the checkpoint:
a resumed run keeps its scale, and a changed held-out set is scored against the same start."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from fedllm.config import Config
from fedllm.data import example_key
from fedllm.evaluation.held_out import pair_logps, preference_metrics
from fedllm.methods.adapters import engine as lora
from fedllm.methods.adapters.server import LoraServer
from fedllm.protocol import State


def pairs_digest(pairs: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps([example_key(p) for p in pairs]).encode()).hexdigest()


class DpoServer(LoraServer):
    def __init__(self, cfg: Config, state: State | None = None) -> None:
        super().__init__(cfg, state)
        self.initial = self.state  # the run's starting adapter: the reference of the held-out rewards
        self.reference: torch.Tensor | None = None  # (pairs, 2) log-likelihoods under it
        self.reference_of = ""  # pairs_digest of the pairs they are of

    def evaluate(self, model: Any, held_out: list[dict[str, str]]) -> dict[str, float]:
        """reward-accuracy, reward-margin and preference-accuracy of the model at the global state
        on the held-out pairs (fedllm.evaluation.held_out.preference_metrics)."""
        cfg = self.cfg
        digest = pairs_digest(held_out)
        if self.reference is None or self.reference_of != digest:
            lora.set_adapter_state(model, self.initial)
            try:
                self.reference = pair_logps(model, self.tokenizer, held_out, cfg.data, cfg.server.eval_batch_size)
                self.reference_of = digest
            finally:
                lora.set_adapter_state(model, self.state)
        policy = pair_logps(model, self.tokenizer, held_out, cfg.data, cfg.server.eval_batch_size)
        return preference_metrics(policy, self.reference, cfg.dpo.beta)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": self.initial, "reference-logps": self.reference,
                "reference-of": self.reference_of}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial = state["initial"]
        reference = state.get("reference-logps")
        shaped = isinstance(reference, torch.Tensor) and reference.ndim == 2 and reference.shape[1] == 2
        self.reference = reference if shaped else None  # else computed again, from the start adapter
        self.reference_of = str(state.get("reference-of", "")) if shaped else ""
