"""The base strategy: Flower plumbing around one aggregation method.

`FedLLMStrategy` samples clients, sends the global adapter state with the run config, and
turns replies (each client's local adapter state) into validated `Update`s holding the delta
local - global. A bad reply is dropped with its reason, never raised.
A subclass overrides only `aggregate(server_round, updates) -> delta`.

    class Mean(FedLLMStrategy):
        def aggregate(self, server_round, updates):
            return weighted_mean([u.delta for u in updates], [1.0] * len(updates))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedllm.config import Config
from fedllm.errors import PayloadError

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


@dataclass
class Update:
    """One client's validated reply."""

    node_id: int
    delta: State
    num_examples: float
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * s_i / sum_i w_i, per tensor."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return {k: sum(w * s[k] for s, w in zip(states, weights)) / total for k in states[0]}


def parse_reply(msg: Message, reference: State) -> Update:
    """Validate a train reply against the global state's names, shapes and dtypes.

    The reply's arrays are the client's local state; the returned update holds local - reference.

    Raises:
        PayloadError: with the reason, for an error reply or any malformed content.
    """
    n, metrics = reply_metrics(msg)
    content = msg.content
    if ARRAYS not in content.array_records:
        raise PayloadError(f"reply lacks the {ARRAYS!r} record")
    record = content.array_records[ARRAYS]
    if set(record) != set(reference):
        raise PayloadError(f"tensor names differ from the global state ({len(record)} vs {len(reference)})")
    try:
        local = record.to_torch_state_dict()
    except Exception as err:  # numpy refuses malformed array bytes in many ways
        raise PayloadError(f"cannot decode arrays: {err}") from err
    for k, t in local.items():
        ref = reference[k]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise PayloadError(f"{k}: got {t.dtype}{list(t.shape)}, expected {ref.dtype}{list(ref.shape)}")
        if not torch.isfinite(t).all():
            raise PayloadError(f"{k}: non-finite values")
    delta = {k: t - reference[k] for k, t in local.items()}
    return Update(msg.metadata.src_node_id, delta, n, metrics, record.count_bytes())


def reply_metrics(msg: Message) -> tuple[float, dict[str, float]]:
    """(num-examples, numeric metrics) of a reply, checked.

    Raises:
        PayloadError: for an error reply, a missing metrics record, or a bad example count.
    """
    if msg.has_error():
        raise PayloadError(f"client error: {msg.error.reason}")
    if METRICS not in msg.content.metric_records:
        raise PayloadError(f"reply lacks the {METRICS!r} record")
    metrics = dict(msg.content.metric_records[METRICS])
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
        raise PayloadError(f"num-examples must be a positive number, got {n!r}")
    return float(n), {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


class FedLLMStrategy(Strategy):
    """Samples clients, validates replies, applies `aggregate`'s delta to the global state."""

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg or Config()
        self.global_state: State = {}
        self.dropped: list[tuple[int, str]] = []  # (node id, reason) of the last round
        self.updates: list[Update] = []  # accepted updates of the last round

    # --- the one method to override -------------------------------------------------------
    def aggregate(self, server_round: int, updates: list[Update]) -> State:
        """The global delta from the round's accepted updates."""
        raise NotImplementedError

    # --- Flower Strategy plumbing ---------------------------------------------------------
    def summary(self) -> None:
        log.info("%s: fraction-train %.2f, min-clients %d", type(self).__name__,
                 self.cfg.server.fraction_train, self.cfg.server.min_clients)

    def sample(self, grid: Grid) -> list[int]:
        """Node ids for this round (waits until server.min-clients are connected)."""
        connected = len(list(grid.get_node_ids()))
        size = max(int(connected * self.cfg.server.fraction_train), self.cfg.server.min_clients)
        node_ids, _ = sample_nodes(grid, self.cfg.server.min_clients, size)
        return node_ids

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        config = ConfigRecord({**dict(config), "server-round": server_round})  # never mutate the caller's
        record = RecordDict({ARRAYS: arrays, CONFIG: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in self.sample(grid)]

    def parse(self, msg: Message) -> Update:
        """A reply as a validated Update; raises PayloadError."""
        return parse_reply(msg, self.global_state)

    def collect(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Parse every reply into self.updates or self.dropped (with the reason)."""
        self.updates, self.dropped = [], []
        for msg in replies:
            try:
                self.updates.append(self.parse(msg))
            except PayloadError as err:
                self.dropped.append((msg.metadata.src_node_id, str(err)))
                log.warning("round %d: dropped reply of node %d: %s", server_round,
                            msg.metadata.src_node_id, err)
        metrics = MetricRecord({"clients-ok": len(self.updates), "clients-dropped": len(self.dropped)})
        if self.updates:
            weights = [u.num_examples for u in self.updates]
            metrics["train-loss"] = sum(
                w * u.metrics.get("train-loss", 0.0) for w, u in zip(weights, self.updates)) / sum(weights)
        return metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics = self.collect(server_round, replies)
        if not self.updates:
            return None, metrics
        delta = self.aggregate(server_round, self.updates)
        new_state = {k: self.global_state[k] + delta[k].to(self.global_state[k].dtype) for k in self.global_state}
        return ArrayRecord(new_state), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is server-side, on the held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
