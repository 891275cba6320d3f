"""What crosses the wire and what a round returns: record names, `Update`, `RoundResult`,
and the checks every reply passes before a method decodes it.

Record names live here and nowhere else: a train message holds CONFIG (the run config and the
round's values) plus the records the method's server half sends; a reply holds METRICS, the
method's upload records, and LEDGER when the ledger is on.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

from typing import TYPE_CHECKING, Any, Iterator

from flwr.app import Message, RecordDict

from fedllm.errors import PayloadError

if TYPE_CHECKING:
    import torch

State = dict[str, "torch.Tensor"]  # torch is imported where tensors are touched: client_app's mods import none

CONFIG, METRICS, LEDGER = "config", "metrics", "ledger"
ARRAYS = "arrays"  # LoRA: the global adapter down, the local adapter up (no upload codec)
UPDATE = "update"  # LoRA with compression.up: the encoded delta
DOWN = "down"  # LoRA with compression.down: the version and the encoded global deltas a node lacks
FROZEN = "frozen"  # exact-lora: the frozen global delta's factors
ZO = "zo"  # zo: the accumulators' sync bytes down, the encoded scalars up
ZO_SUMS = "zo-sums"  # zo with secagg.enabled: the dense (K,) per-seed sums up, as float32 arrays
DILOCO = "diloco"  # diloco: the round's fragment, versions and (compression.down) encoded steps down
PEFT = "peft"  # lora with lora.target-modules=auto: the modules the server chose for the run, down
SCORES = "scores"  # a query's reply (before round 1): per-module importance scores, up
MAX_EXAMPLES = 10**9  # a larger claimed example count is a lie meant to outweigh the others


@dataclass
class Update:
    """One client's validated reply: its update as named tensors (a LoRA delta, exact-lora's
    factors, zo's per-seed sums), its example count and metrics."""

    node_id: int
    delta: State
    num_examples: float
    metrics: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0


@dataclass(frozen=True)
class RoundResult:
    """What one round of aggregation produced, as a value: the accepted updates (in partition
    order), the dropped replies with their reasons, the clients a robust rule left out or cut
    down, and the round's aggregate metrics. `applied` is False when too few replies were valid
    (nothing touched the global state)."""

    server_round: int
    updates: tuple[Update, ...] = ()
    dropped: tuple[tuple[int, str], ...] = ()
    outliers: tuple[int, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    applied: bool = False


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * s_i / sum_i w_i, per tensor."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return {k: sum(w * s[k] for s, w in zip(states, weights)) / total for k in states[0]}


def update_norm(delta: State) -> float:
    """L2 norm of an update over all its tensors."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in delta.values()))


def reply_metrics(msg: Message) -> tuple[float, dict[str, float]]:
    """(num-examples, numeric metrics) of a reply, checked.

    Raises:
        PayloadError: for an error reply, a missing metrics record, a bad example count or a
            non-finite metric.
    """
    if msg.has_error():
        raise PayloadError(f"client error: {short_reason(msg.error.reason)}")
    if METRICS not in msg.content.metric_records:
        raise PayloadError(f"reply lacks the {METRICS!r} record")
    metrics = dict(msg.content.metric_records[METRICS])
    n = metrics.get("num-examples")
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or not 0 < n <= MAX_EXAMPLES:
        raise PayloadError(f"num-examples must be a number in (0, {MAX_EXAMPLES}], got {n!r}")
    return float(n), finite_metrics(metrics)


def finite_metrics(metrics: Any) -> dict[str, float]:
    """The numeric values of a metrics record as floats.

    Raises:
        PayloadError: for a non-finite value.
    """
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)):
            if not math.isfinite(v):
                raise PayloadError(f"metric {k}: non-finite value {v}")
            out[k] = float(v)
    return out


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def short_reason(text: str, limit: int = 300) -> str:
    """One line for a drop reason: a client's error text (often a whole traceback, sometimes
    coloured) cut to its last meaningful line, the exception, without ANSI codes."""
    lines = [line.strip() for line in ANSI.sub("", str(text)).splitlines() if line.strip()]
    line = lines[-1] if lines else "no reason given"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_arrays(msg: Message, reference: State, name: str = ARRAYS) -> tuple[State, int]:
    """The reply's arrays record as tensors, and its size in bytes; the names must be those of
    `reference` (shapes and dtypes are the caller's to check).

    Raises:
        PayloadError: for a missing record, other names, or undecodable array bytes.
    """
    if name not in msg.content.array_records:
        raise PayloadError(f"reply lacks the {name!r} record")
    record = msg.content.array_records[name]
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
    import torch

    if set(tensors) != set(reference):
        raise PayloadError(f"tensor names differ from the global state ({len(tensors)} vs {len(reference)})")
    for k, t in tensors.items():
        ref = reference[k]
        if t.shape != ref.shape or (check_dtype and t.dtype != ref.dtype):
            raise PayloadError(f"{k}: got {t.dtype}{list(t.shape)}, expected {ref.dtype}{list(ref.shape)}")
        if not torch.isfinite(t).all():
            raise PayloadError(f"{k}: non-finite values")


def receive(grid: Any, messages: list[Message], timeout: float | None, interval: float = 0.1) -> Iterator[Message]:
    """Push `messages` and yield each reply as it arrives (polling every `interval` seconds while
    none is waiting), until every message is answered or `timeout` seconds have passed."""
    waiting = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    while waiting:
        got = False
        for reply in grid.pull_messages(list(waiting)):
            waiting.discard(reply.metadata.reply_to_message_id)
            got = True
            yield reply
        if not waiting or (end is not None and time.monotonic() >= end):
            return
        if not got:
            time.sleep(interval)


def payload_bytes(content: RecordDict) -> int:
    """Bytes of what a message carries besides its run config: arrays and byte values (a train
    message's global state, a reply's update: what the reply size limit bounds)."""
    total = sum(record.count_bytes() for record in content.array_records.values())
    for name, record in content.config_records.items():
        if name != CONFIG:
            for value in record.values():
                total += sum(len(x) for x in (value if isinstance(value, list) else [value]) if isinstance(x, bytes))
    return total


def screen(msg: Message, server_round: int, records: frozenset[str], limit: int,
           sent: frozenset[str] = frozenset()) -> None:
    """The checks every reply passes before a method decodes its update.

    The round a reply belongs to is the message it answers (Flower links a reply to its
    request): with `sent`, the ids of this round's messages, a reply to any other message is
    refused. A client need not say the round; one that does (the metric server-round, as
    fedllm's client does) must say this one.

    Raises:
        PayloadError: for an error reply, a reply to another message, records other than
            `records`, bad metrics, another round's number, or a payload over `limit` bytes.
    """
    reply_metrics(msg)
    if sent and msg.metadata.reply_to_message_id not in sent:
        raise PayloadError("reply to a message this round did not send")
    unexpected = set(msg.content.keys()) - records
    if unexpected:
        raise PayloadError(f"unexpected records {sorted(unexpected)}")
    claimed = msg.content.metric_records[METRICS].get("server-round", server_round)
    if claimed != server_round:
        raise PayloadError(f"reply is for round {claimed!r}, this is round {server_round}")
    size = payload_bytes(msg.content)
    if size > limit:
        raise PayloadError(f"payload of {size} bytes exceeds the limit of {limit} (server.max-reply-bytes)")
