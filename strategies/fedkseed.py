"""FedKSeed: the server side of zeroth-order, seed-based updates.

The global state is the K per-seed accumulators (fedllm.updates.zo.Accumulators). Each round
the server sends every sampled client what it needs to sync (the round payloads since that
client's last round, or the full state when smaller), gathers each client's per-seed scalar
sums, averages them weighted by examples (`aggregate`, the method to override), quantizes the
result with shared scales and stochastic rounding, and applies the decoded values: the same
bytes every client applies next round, so all parties hold the same model.

Qin et al., ICML 2024, https://arxiv.org/abs/2312.06353.
"""

from __future__ import annotations

from typing import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.updates import zo
from strategies.base import CONFIG, LEDGER, METRICS, FedLLMStrategy, State, Update, reply_metrics, weighted_mean
from strategies.registry import register

ZO = "zo"


@register("fedkseed")
class FedKSeed(FedLLMStrategy):
    """Example-weighted mean of per-seed scalar sums; the state is K accumulators."""

    def __init__(self, cfg: Config | None = None, fingerprint: int | None = None) -> None:
        super().__init__(cfg)
        self.k = self.cfg.zo.num_seeds
        self.state = zo.Accumulators(self.k)
        self.history: list[bytes] = []  # payload of every round, in order
        self.node_version: dict[int, int | None] = {}  # accumulator version each node holds
        self.fingerprint = fingerprint
        self.bytes_down: dict[int, int] = {}

    reply_records = frozenset({ZO, METRICS, LEDGER})

    def largest_reply(self) -> int:
        return zo.max_upload_bytes(self.k)

    def aggregate(self, server_round: int, updates: list[Update]) -> State:
        return weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fingerprint is None:
            raise PayloadError("fedkseed: the server's perturbation fingerprint is not set")
        config = ConfigRecord({**dict(config), "server-round": server_round})
        messages, self.bytes_down = [], {}
        for node in self.sample(grid):
            down = zo.encode_down(self.state, self.history, self.node_version.get(node, 0))
            self.bytes_down[node] = len(down)
            record = RecordDict({CONFIG: config, ZO: ConfigRecord(
                {"down": down, "fingerprint": self.fingerprint, "version": self.state.version})})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def parse(self, msg: Message) -> Update:
        n, metrics = reply_metrics(msg)
        record = msg.content.config_records.get(ZO)
        up = record.get("up") if record is not None else None
        if not isinstance(up, bytes):
            raise PayloadError("reply lacks the zo 'up' payload")
        if metrics.get("zo-fingerprint") != self.fingerprint:
            raise PayloadError("perturbation fingerprint differs from the server's "
                               "(torch version, device type, dtype or model)")
        if metrics.get("zo-version") != self.state.version:
            raise PayloadError(f"stale update: trained at version {metrics.get('zo-version')}, "
                               f"global is {self.state.version}")
        return Update(msg.metadata.src_node_id, {"sums": zo.decode(up, self.k)}, n, metrics, len(up))

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics = self.collect(server_round, replies)
        for node, _ in self.dropped:
            self.node_version[node] = None  # its state is unknown: send the full state next time
        if not self.enough():
            return None, metrics
        payload = self.round_payload(server_round, self.updates)
        for u in self.updates:
            self.node_version[u.node_id] = self.state.version
        self.state.apply(payload)
        self.history.append(payload)
        metrics["zo-version"] = self.state.version
        return None, metrics

    def round_payload(self, server_round: int, updates: list[Update]) -> bytes:
        """The round's aggregate, quantized (zo.bits, stochastic rounding seeded by the round):
        the exact bytes every party applies to its accumulators."""
        mean = self.aggregate(server_round, updates)["sums"].double()
        idx = mean.nonzero().flatten()
        return zo.encode(self.k, idx, mean[idx], self.cfg.zo.bits, server_round, zo.SUMS)
