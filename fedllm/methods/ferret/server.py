"""Ferret's server half: the global weights are the initial ones plus the rounds' reconstructions.

Each round the server sends every sampled node the round payloads since the version it holds (or the
whole history, replayed from the initial weights, when its version is unknown), decodes each client's
coefficients, and encodes the rule chain's aggregate into the round's payload: the bytes every party
applies, so all of them hold the same weights. Shu et al., ICML 2025, https://arxiv.org/abs/2409.06277.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Any, Iterator

from flwr.app import ConfigRecord, Message

from fedllm.config import Config
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods import counter_rng as rng
from fedllm.methods.base import UtilityOf
from fedllm.methods.downlink import Downlink
from fedllm.methods.ferret import wire
from fedllm.methods.ferret.engine import engine_for
from fedllm.model import save_merged
from fedllm.protocol import LEDGER, METRICS, State, Update, reply_metrics

FERRET = "ferret"  # the record: the payloads a node lacks down, its encoded coefficients up
COEF = "coef"  # the one tensor of an update (and what an attack transform sees): (K,) coefficients


class FerretServer:
    """The history of round payloads and an engine that follows it (to evaluate, save and merge)."""

    reply_records = frozenset({FERRET, METRICS, LEDGER})

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.engine, self.tokenizer = engine_for(cfg, cached=False)  # its own: the weights are its state
        self.downlink = Downlink(True, cfg.server.node_state)  # every party starts from the same weights

    def encode_down(self, node: int) -> dict[str, Any]:
        """The payloads `node` lacks, with the history's chain where they start (since 0: all of them)."""
        since = self.downlink.version_of(node)
        if since is None or since > self.downlink.version:
            since = 0
        self.downlink.sent(node)
        return {FERRET: ConfigRecord({"since": since, "base": self.engine.chains[since],
                                      "rounds": self.downlink.history[since:], "version": self.downlink.version,
                                      "fingerprint": self.engine.fingerprint})}

    def decode(self, msg: Message) -> Update:
        n, metrics = reply_metrics(msg)
        record = msg.content.config_records.get(FERRET)
        up = record.get("up") if record is not None else None
        if not isinstance(up, bytes):
            raise PayloadError(f"reply lacks the {FERRET!r} 'up' payload")
        if metrics.get("ferret-fingerprint") != self.engine.fingerprint:
            raise PayloadError("ferret: the client's trained tensors or bases differ from the server's "
                               "(model.*, lora.*, ferret.* and the fedllm version must match)")
        if metrics.get("ferret-version") != self.engine.version:
            raise PayloadError(f"stale update: trained at version {metrics.get('ferret-version')}, "
                               f"global is {self.engine.version}")
        coefs = self.engine.decode(up, self.engine.version)
        return Update(msg.metadata.src_node_id, {COEF: coefs.float()}, n, metrics, len(up))

    def largest_reply(self) -> int:
        return wire.size(self.engine.num_coefs, len(self.engine.counts), 0)

    def apply(self, aggregate: State, updates: list[Update], server_round: int) -> dict[str, float]:
        """Encode the aggregate coefficients (ferret.bits, stochastic rounding seeded by the round) into
        the round's payload and apply it: the same bytes every client applies next round."""
        for u in updates:
            self.downlink.accepted(u.node_id)
        payload = self.engine.encode(aggregate[COEF], self.engine.version, seed=server_round)
        self.engine.apply(payload)
        self.downlink.append(payload)
        return {"ferret-version": self.engine.version}

    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        yield self.engine.model

    def utility(self, updates: list[Update], examples: list[dict[str, str]]) -> UtilityOf | None:
        return None

    def digest(self) -> bytes:
        """keccak256 of the history's chain: equal chains, equal weights (given the base)."""
        from eth_utils import keccak  # the [ledger] extra

        return keccak(self.engine.chain)

    def save(self, run_dir: Path) -> None:
        """ferret/history.bin (the round payloads: the whole run, given the initial weights); with
        ferret.params=lora adapter/ (loads with PeftModel.from_pretrained) and, on request, merged/;
        with ferret.params=all merged/ (loads with AutoModelForCausalLM)."""
        from fedllm.methods.adapters import engine as lora

        (run_dir / "ferret").mkdir(exist_ok=True)
        (run_dir / "ferret" / "history.bin").write_bytes(
            b"".join(struct.pack("<I", len(p)) + p for p in self.downlink.history))
        if self.cfg.ferret.params == "lora":
            lora.save_adapter(lora.adapter_state(self.engine.model), self.cfg.model, self.cfg.lora,
                              run_dir / "adapter")
        if self.cfg.ferret.params == "all" or self.cfg.server.merge:
            save_merged(self.engine.model, self.tokenizer, run_dir / "merged")

    def state_dict(self) -> dict[str, Any]:
        return {"downlink": self.downlink.state_dict(), "generator": rng.NAME,
                "fingerprint": self.engine.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the checkpoint's history from the initial weights.

        Raises:
            ConfigError: the checkpoint's bases came from another generator or other trained tensors."""
        if state.get("generator") != rng.NAME or state.get("fingerprint") != self.engine.fingerprint:
            raise ConfigError("server.resume: this ferret checkpoint was made with other bases (generator, "
                              "ferret.*, lora.* or model.*); resume with the run's own config")
        self.downlink.load_state_dict(state["downlink"])
        self.engine.reset()
        for payload in self.downlink.history:
            self.engine.apply(payload)
