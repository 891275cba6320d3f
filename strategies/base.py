"""The base strategy: Flower plumbing around one aggregation method.

`FedLLMStrategy` samples clients, sends the global adapter state with the run config, and
turns replies (each client's local adapter state) into validated `Update`s holding the delta
local - global. Every reply is checked before it touches the global state (`screen`: error,
record names, metrics, round number, payload size; `parse`: tensor names, shapes, dtypes,
finite values; then the update's norm); a bad reply is dropped with its reason, never raised.
A subclass overrides only `aggregate(server_round, updates) -> delta`.

    class Mean(FedLLMStrategy):
        def aggregate(self, server_round, updates):
            return weighted_mean([u.delta for u in updates], [1.0] * len(updates))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedllm.compression import Codec, Feedback, compress, decode, parse
from fedllm.config import Config
from fedllm.errors import PayloadError

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
UPDATE, DOWN = "update", "down"  # the encoded upload; the encoded global deltas a node lacks
LEDGER = "ledger"  # the client's account and signature (fedllm.ledger.LEDGER_RECORD)
MAX_EXAMPLES = 10**9  # a larger claimed example count is a lie meant to outweigh the others


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


def parse_reply(msg: Message, reference: State, codec: Codec | None = None) -> Update:
    """Validate a train reply against the global state's names, shapes and dtypes.

    The reply carries either the client's local state as arrays (no upload codec; the update
    is local - reference), or, with `codec`, the encoded delta in the "update" record.

    Raises:
        PayloadError: with the reason, for an error reply or any malformed content.
    """
    n, metrics = reply_metrics(msg)
    content = msg.content
    if codec is not None:
        payload = content.config_records.get(UPDATE, {}).get("payload")
        if not isinstance(payload, bytes):
            raise PayloadError(f"reply lacks the {UPDATE!r} payload bytes")
        delta = decode(codec, payload, sorted(reference))
        check_like(delta, reference, check_dtype=False)
        return Update(msg.metadata.src_node_id, delta, n, metrics, len(payload))
    local, nbytes = read_arrays(msg, reference)
    check_like(local, reference)
    delta = {k: t - reference[k] for k, t in local.items()}
    return Update(msg.metadata.src_node_id, delta, n, metrics, nbytes)


def read_arrays(msg: Message, reference: State) -> tuple[State, int]:
    """The reply's arrays record as tensors, and its size in bytes; the names must be those of
    `reference` (shapes and dtypes are the caller's to check).

    Raises:
        PayloadError: for a missing record, other names, or undecodable array bytes.
    """
    if ARRAYS not in msg.content.array_records:
        raise PayloadError(f"reply lacks the {ARRAYS!r} record")
    record = msg.content.array_records[ARRAYS]
    if set(record) != set(reference):
        raise PayloadError(f"tensor names differ from the global state ({len(record)} vs {len(reference)})")
    try:
        return record.to_torch_state_dict(), record.count_bytes()
    except Exception as err:  # numpy refuses malformed array bytes in many ways
        raise PayloadError(f"cannot decode arrays: {err}") from err


def check_like(tensors: State, reference: State, check_dtype: bool = True) -> None:
    """Same names and shapes as `reference` (and dtypes, if asked), all values finite.

    Raises:
        PayloadError: naming the first tensor that differs.
    """
    if set(tensors) != set(reference):
        raise PayloadError(f"tensor names differ from the global state ({len(tensors)} vs {len(reference)})")
    for k, t in tensors.items():
        ref = reference[k]
        if t.shape != ref.shape or (check_dtype and t.dtype != ref.dtype):
            raise PayloadError(f"{k}: got {t.dtype}{list(t.shape)}, expected {ref.dtype}{list(ref.shape)}")
        if not torch.isfinite(t).all():
            raise PayloadError(f"{k}: non-finite values")


def reply_metrics(msg: Message) -> tuple[float, dict[str, float]]:
    """(num-examples, numeric metrics) of a reply, checked.

    Raises:
        PayloadError: for an error reply, a missing metrics record, a bad example count or a
            non-finite metric.
    """
    if msg.has_error():
        raise PayloadError(f"client error: {msg.error.reason}")
    if METRICS not in msg.content.metric_records:
        raise PayloadError(f"reply lacks the {METRICS!r} record")
    metrics = dict(msg.content.metric_records[METRICS])
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or not 0 < n <= MAX_EXAMPLES:
        raise PayloadError(f"num-examples must be a number in (0, {MAX_EXAMPLES}], got {n!r}")
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            if not math.isfinite(v):
                raise PayloadError(f"metric {k}: non-finite value {v}")
            out[k] = float(v)
    return float(n), out


def payload_bytes(content: RecordDict) -> int:
    """Bytes of what a message carries besides its run config: arrays and byte values (a train
    message's global state, a reply's update: what the reply size limit bounds)."""
    total = sum(record.count_bytes() for record in content.array_records.values())
    for name, record in content.config_records.items():
        if name != CONFIG:
            for value in record.values():
                total += sum(len(x) for x in (value if isinstance(value, list) else [value]) if isinstance(x, bytes))
    return total


def update_norm(delta: State) -> float:
    """L2 norm of an update over all its tensors."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


class FedLLMStrategy(Strategy):
    """Samples clients, validates replies, applies `aggregate`'s delta to the global state.

    With compression.up set, clients send encoded deltas; with compression.down set, the
    server sends each client the encoded round deltas it has not applied yet (or the full
    state when that is smaller or its state is unknown) and applies the same decoded delta to
    its own global state, so every party holds identical weights.
    """

    def __init__(self, cfg: Config | None = None) -> None:
        self.cfg = cfg or Config()
        self.global_state: State = {}
        self.dropped: list[tuple[int, str]] = []  # (node id, reason) of the last round
        self.updates: list[Update] = []  # accepted updates of the last round
        self.up = parse(self.cfg.compression.up) if self.cfg.compression.up else None
        self.down = parse(self.cfg.compression.down) if self.cfg.compression.down else None
        self.history: list[bytes] = []  # compression.down: the encoded delta of every round
        self.node_version: dict[int, int | None] = {}  # history length each node has applied
        self.feedback = Feedback({}) if self.cfg.compression.error_feedback else None

    reply_records = frozenset({ARRAYS, UPDATE, METRICS, LEDGER})  # the record names a reply may hold
    # not in checkpoints: the codecs are rebuilt from the config, and what each node holds is
    # unknown after a restart (a resumed run is a new Flower run: its nodes start empty)
    transient = frozenset({"up", "down", "node_version"})

    # --- the one method to override -------------------------------------------------------
    def aggregate(self, server_round: int, updates: list[Update]) -> State:
        """The global delta from the round's accepted updates."""
        raise NotImplementedError

    # --- hooks ------------------------------------------------------------------------------
    def round_config(self, server_round: int) -> dict[str, Any]:
        """Per-round values sent beside the run config (keys without a dot)."""
        return {"server-round": server_round}

    # --- Flower Strategy plumbing ---------------------------------------------------------
    def summary(self) -> None:
        log.info("%s: fraction-train %.2f, min-clients %d, compression up %r down %r", type(self).__name__,
                 self.cfg.server.fraction_train, self.cfg.server.min_clients,
                 self.cfg.compression.up, self.cfg.compression.down)

    def sample(self, grid: Grid) -> list[int]:
        """Node ids for this round (waits until server.min-clients are connected)."""
        connected = len(list(grid.get_node_ids()))
        size = max(int(connected * self.cfg.server.fraction_train), self.cfg.server.min_clients)
        node_ids, _ = sample_nodes(grid, self.cfg.server.min_clients, size)
        return node_ids

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        config = ConfigRecord({**dict(config), **self.round_config(server_round)})  # never mutate the caller's
        messages = []
        for node in self.sample(grid):
            record = RecordDict({CONFIG: config, **self.global_records(node, arrays)})
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        return messages

    def global_records(self, node: int, arrays: ArrayRecord) -> dict[str, Any]:
        """What brings `node` to the global state: the arrays, or the encoded deltas it lacks."""
        if self.down is None:
            return {ARRAYS: arrays}
        version, known = len(self.history), self.node_version.get(node)
        self.node_version[node] = None  # unknown until it replies
        missing = self.history[known:] if known is not None else None
        if missing is None or sum(map(len, missing)) >= arrays.count_bytes():
            return {ARRAYS: arrays, DOWN: ConfigRecord({"version": version})}
        return {DOWN: ConfigRecord({"version": version, "base": known, "deltas": missing})}

    def parse(self, msg: Message) -> Update:
        """A reply as a validated Update; raises PayloadError."""
        return parse_reply(msg, self.global_state, self.up)

    def max_reply_bytes(self) -> int:
        """server.max-reply-bytes, or else `largest_reply()`."""
        return self.cfg.server.max_reply_bytes or self.largest_reply()

    def largest_reply(self) -> int:
        """The default size limit: three times the dense float32 global state (a codec's indices
        and headers stay well inside it) plus 64 KiB."""
        return 3 * 4 * sum(t.numel() for t in self.global_state.values()) + 65536

    def screen(self, msg: Message, server_round: int) -> None:
        """The checks every reply passes before its update is decoded.

        Raises:
            PayloadError: for an error reply, unexpected records, bad metrics, another round's
                number, or a payload over the size limit.
        """
        reply_metrics(msg)
        unexpected = set(msg.content.keys()) - self.reply_records
        if unexpected:
            raise PayloadError(f"unexpected records {sorted(unexpected)}")
        claimed = msg.content.metric_records[METRICS].get("server-round")
        if claimed != server_round:
            raise PayloadError(f"reply is for round {claimed!r}, this is round {server_round}")
        size, limit = payload_bytes(msg.content), self.max_reply_bytes()
        if size > limit:
            raise PayloadError(f"payload of {size} bytes exceeds the limit of {limit} (server.max-reply-bytes)")

    def accept(self, msg: Message, server_round: int) -> Update:
        """screen, parse, then bound the update's norm (server.max-update-norm)."""
        self.screen(msg, server_round)
        update = self.parse(msg)
        norm, bound = update_norm(update.delta), self.cfg.server.max_update_norm
        if bound > 0 and norm > bound:
            raise PayloadError(f"update norm {norm:.4g} exceeds server.max-update-norm={bound:g}")
        update.metrics["update-norm"] = norm  # measured by the server, beside what the client reports
        return update

    def collect(self, server_round: int, replies: Iterable[Message]) -> MetricRecord:
        """Validate every reply into self.updates (in partition order, so that sums are taken in
        the same order every run) or self.dropped (with the reason)."""
        self.updates, self.dropped = [], []
        for msg in replies:
            try:
                self.updates.append(self.accept(msg, server_round))
            except PayloadError as err:
                self.dropped.append((msg.metadata.src_node_id, str(err)))
                log.warning("round %d: dropped reply of node %d: %s", server_round,
                            msg.metadata.src_node_id, err)
            except Exception as err:  # a validation bug must not end the round: log it loudly
                self.dropped.append((msg.metadata.src_node_id, f"unexpected {type(err).__name__}: {err}"))
                log.exception("round %d: reply of node %d could not be checked", server_round,
                              msg.metadata.src_node_id)
        self.updates.sort(key=lambda u: (u.metrics.get("partition-id", 0.0), u.node_id))
        metrics = MetricRecord({"clients-ok": len(self.updates), "clients-dropped": len(self.dropped)})
        if self.updates:
            weights = [u.num_examples for u in self.updates]
            metrics["train-loss"] = sum(
                w * u.metrics.get("train-loss", 0.0) for w, u in zip(weights, self.updates)) / sum(weights)
        return metrics

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics = self.collect(server_round, replies)
        if not self.enough():
            return None, metrics
        delta = self.aggregate(server_round, self.updates)
        if self.down is not None:
            for u in self.updates:
                self.node_version[u.node_id] = len(self.history)
            payload, self.feedback = compress(self.down, delta, self.feedback, seed=server_round)
            self.history.append(payload)
            delta = decode(self.down, payload, sorted(delta))
        new_state = {k: self.global_state[k] + delta[k].to(self.global_state[k].dtype) for k in self.global_state}
        return ArrayRecord(new_state), metrics

    def enough(self) -> bool:
        """Whether the round has server.min-replies valid updates to aggregate."""
        return len(self.updates) >= self.cfg.server.min_replies

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is server-side, on the held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
