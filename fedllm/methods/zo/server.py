"""FedKSeed's server half: the global state is the K per-seed accumulators.

Each round the server sends every sampled node what it needs to sync (the round payloads
since the version it holds, or the full state when smaller), decodes each client's per-seed
scalar sums, and applies the rule chain's aggregate quantized with shared scales and
stochastic rounding: the same bytes every client applies next round, so all parties hold the
same model. Qin et al., ICML 2024, https://arxiv.org/abs/2312.06353. The first zo.warmup-rounds
rounds' replies are dense float32 deltas of the perturbed weights instead, and their aggregate is
applied as a float32 payload (engine.encode_warm).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from flwr.app import ConfigRecord, Message

from fedllm.config import Config
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods.base import UtilityOf
from fedllm.methods.downlink import Downlink
from fedllm.methods.zo import engine as zo
from fedllm.methods import counter_rng as rng
from fedllm.model import save_merged
from fedllm.protocol import LEDGER, METRICS, ZO, ZO_SUMS, State, Update, check_like, read_arrays, reply_metrics

SUMS = "sums"  # the one tensor of a zo update: (K,) per-seed scalar sums
WARM = "warm"  # the one tensor of a warm-up round's update: (n,) dense delta of the perturbed weights


class ZOServer:
    """The accumulators; the server's engine follows them to evaluate, and gives the
    perturbation fingerprint every client must match."""

    reply_records = frozenset({ZO, ZO_SUMS, METRICS, LEDGER})

    def __init__(self, cfg: Config, fingerprint: int | None = None) -> None:
        """`fingerprint`: aggregate for clients of this perturbation fingerprint without a
        model of its own (nothing to evaluate or merge with)."""
        self.cfg = cfg
        self.k = cfg.zo.num_seeds
        if fingerprint is None:
            self.engine, self.tokenizer = zo.engine_for(cfg)
            self.fingerprint = self.engine.fingerprint
            self.state = self.engine.empty_state()
        else:
            if cfg.zo.warmup_rounds:
                raise ConfigError("zo.warmup-rounds: a server without the model cannot size the warm-up's "
                                  "dense state; set zo.warmup-rounds=0")
            self.engine = self.tokenizer = None
            self.fingerprint = fingerprint
            self.state = zo.Accumulators(self.k)
        self.downlink = Downlink(True, cfg.server.node_state)  # every party starts from zero accumulators

    def encode_down(self, node: int) -> dict[str, Any]:
        down = zo.encode_down(self.state, self.downlink.history, self.downlink.version_of(node))
        self.downlink.sent(node)
        return {ZO: ConfigRecord({"down": down, "fingerprint": self.fingerprint, "version": self.state.version})}

    def decode(self, msg: Message) -> Update:
        n, metrics = reply_metrics(msg)
        warming = self.state.warm_rounds < self.cfg.zo.warmup_rounds
        if warming:  # a warm-up round: the dense delta of the perturbed weights, float32
            reference = {WARM: torch.zeros(self.state.n)}
            delta, nbytes = read_arrays(msg, reference, ZO_SUMS)
            check_like(delta, reference)
            sums = delta
        elif ZO_SUMS in msg.content.array_records:  # secagg.enabled: the dense sums (the mean of the clients')
            reference = {SUMS: torch.zeros(self.k)}
            sums, nbytes = read_arrays(msg, reference, ZO_SUMS)
            check_like(sums, reference)
        else:
            record = msg.content.config_records.get(ZO)
            up = record.get("up") if record is not None else None
            if not isinstance(up, bytes):
                raise PayloadError("reply lacks the zo 'up' payload")
            sums = None
        if metrics.get("zo-fingerprint") != self.fingerprint:
            raise PayloadError("perturbation fingerprint differs from the server's "
                               "(fedllm version, dtype or model)")
        trained = metrics.get("zo-version")
        if self.cfg.server.mode == "async":  # a stale reply's sums join the newer version (FedBuff)
            if not isinstance(trained, (int, float)) or not 0 <= trained <= self.state.version:
                raise PayloadError(f"update trained at version {trained!r}, global is {self.state.version}")
        elif trained != self.state.version:
            raise PayloadError(f"stale update: trained at version {trained}, global is {self.state.version}")
        self.downlink.accepted(msg.metadata.src_node_id)  # it holds the version it was sent
        if sums is None:  # decoded once the cheap checks have passed
            sums, nbytes = {SUMS: zo.decode(up, self.k)}, len(up)
        return Update(msg.metadata.src_node_id, sums, n, metrics, nbytes)

    def largest_reply(self) -> int:
        """The zo upload's bound; during a warm-up, a float32 delta of the perturbed weights (and
        the array record's framing)."""
        if self.cfg.zo.warmup_rounds:
            return max(zo.max_upload_bytes(self.k), 4 * self.state.n + 4096)
        return zo.max_upload_bytes(self.k)

    def apply(self, aggregate: State, updates: list[Update], server_round: int) -> dict[str, float]:
        """Quantize the aggregate (zo.bits, stochastic rounding seeded by the round) into the
        round's payload, the exact bytes every party applies to its accumulators."""
        for u in updates:
            self.downlink.accepted(u.node_id)
        if WARM in aggregate:  # a warm-up round: the mean dense delta, float32, as every party applies it
            payload = zo.encode_warm(aggregate[WARM])
        else:
            payload = round_payload(aggregate[SUMS], self.k, self.cfg.zo.bits, server_round)
        self.state.apply(payload)
        self.downlink.append(payload)
        return {"zo-version": self.state.version}

    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        self.engine.sync(self.state)
        yield self.engine.model

    def utility(self, updates: list[Update], examples: list[dict[str, str]]) -> UtilityOf | None:
        return None

    def digest(self) -> bytes:
        from eth_utils import keccak  # the [ledger] extra

        return keccak(self.state.to_bytes())

    def save(self, run_dir: Path) -> None:
        """zo/accumulators.bin (K scalars: the whole fine-tuned model, given the base) and,
        on request, merged/ (the rebuilt model, loadable with AutoModelForCausalLM)."""
        (run_dir / "zo").mkdir(exist_ok=True)
        (run_dir / "zo" / "accumulators.bin").write_bytes(self.state.to_bytes())
        if self.cfg.server.merge:
            with self.model() as net:
                save_merged(net, self.tokenizer, run_dir / "merged")

    def state_dict(self) -> dict[str, Any]:
        return {"accumulators": self.state.to_bytes(), "downlink": self.downlink.state_dict(), "generator": rng.NAME}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Raises:
            ConfigError: the accumulators were learnt with another generator's z (a checkpoint of
                fedllm before the device-independent one): replayed on these z they are noise."""
        if state.get("generator") != rng.NAME:
            raise ConfigError(f"server.resume: this zo checkpoint's perturbations came from the generator "
                              f"{state.get('generator') or 'of an earlier fedllm (torch and numpy streams)'}, this fedllm "
                              f"draws them with {rng.NAME}; its accumulators cannot be replayed: start a new run")
        self.state = zo.Accumulators.from_bytes(state["accumulators"], self.k, self.state.n)
        self.downlink.load_state_dict(state["downlink"])


def round_payload(mean: Any, k: int, bits: int, server_round: int) -> bytes:
    """A round's aggregate per-seed sums (K,) as the payload every party applies."""
    mean = mean.double()
    idx = mean.nonzero().flatten()
    return zo.encode(k, idx, mean[idx], bits, server_round, zo.SUMS)
