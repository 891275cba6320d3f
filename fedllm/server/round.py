"""One federated round on the server, as a value: `train_round` tries a round until enough valid
replies arrive (server.round-retries) and returns its `RoundOutcome`.

    outcome = train_round(server_round, cfg, strategy, run_config, grid, run_dir, keep_replies=False)
    outcome.result          # RoundResult: the accepted updates, the dropped replies, the metrics

An attempt is a plain round (`plain_attempt`: the train messages out, the replies folded into the
rule chain as they arrive) or, with secagg.enabled, a secure one (`fedllm.secagg.server.secure_round`:
the four-stage SecAgg+ protocol around it); both return an `Attempt`, and this module's loop is the
same for either. `prepare` is the method's step before round 1 of a new run.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm.server import checkpoint
from fedllm.config import Config
from fedllm.errors import FedLLMError
from fedllm.protocol import CONFIG, RoundResult, payload_bytes, receive
from fedllm.secagg.server import Attempt, secure_round
from strategies import FedLLMStrategy

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"  # why a run stopped, for the CLI to print


class RoundFailed(FedLLMError):
    """A round ended with too few valid replies, retries included."""


@dataclass(frozen=True)
class RoundOutcome:
    """What a round gave: its result (applied), the bytes sent to each node, the replies (kept for
    the ledger, which reads their signatures; else empty), the nodes that never replied, the
    attempts it took, the seconds from the first message to the applied aggregate, and more of the
    round's row (an asynchronous version's staleness histogram)."""

    result: RoundResult
    down: dict[str, int]
    replies: tuple[Message, ...]
    missing: tuple[int, ...]
    attempts: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # more of the row (server.mode=async: staleness)


def plain_attempt(strategy: FedLLMStrategy, server_round: int, run_config: ConfigRecord, grid: Grid,
                  timeout: float, keep_replies: bool) -> Attempt:
    """One try at a round without secure aggregation: the replies are screened and folded into the
    rule chain as they arrive (`FedLLMStrategy.round`)."""
    messages = list(strategy.configure_train(server_round, ArrayRecord(), run_config, grid))
    out = Attempt(down={str(m.metadata.dst_node_id): payload_bytes(m.content) for m in messages})
    answered: set[int] = set()

    def arrivals() -> Iterator[Message]:
        for reply in receive(grid, messages, timeout):
            answered.add(reply.metadata.src_node_id)
            if keep_replies:
                out.replies.append(reply)
            yield reply

    out.result = strategy.round(server_round, arrivals(), messages)
    out.missing = sorted(m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered)
    if out.missing:
        log.warning("round %d: no reply within server.round-timeout=%gs from node(s) %s", server_round, timeout,
                    ", ".join(map(str, out.missing)))
    if not out.result.applied:
        out.failure = f"{len(out.result.updates)} valid of {len(messages)} sent"
    return out


def secure_attempt(strategy: FedLLMStrategy, server_round: int, run_config: ConfigRecord, grid: Grid,
                   timeout: float, keep_replies: bool) -> Attempt:
    """One try at a secure round (fedllm.secagg.server); it keeps the masked replies it summed."""
    return secure_round(strategy, server_round, run_config, grid, timeout)


def train_round(server_round: int, cfg: Config, strategy: FedLLMStrategy, run_config: ConfigRecord, grid: Grid,
                run_dir: Path, keep_replies: bool = False) -> RoundOutcome:
    """The round's attempts (secure ones with secagg.enabled) until one applies its aggregate.

    Raises:
        RoundFailed: after server.round-retries retries (the reason also goes to error.txt).
    """
    attempt = secure_attempt if cfg.secagg.enabled else plain_attempt
    t0 = time.perf_counter()
    failures: list[str] = []
    reasons: list[str] = []  # why replies were dropped, over the attempts
    for n in range(1, cfg.server.round_retries + 2):
        out = attempt(strategy, server_round, run_config, grid, cfg.server.round_timeout, keep_replies)
        if out.result.applied:
            return RoundOutcome(out.result, out.down, tuple(out.replies) if keep_replies else (), tuple(out.missing), n,
                                time.perf_counter() - t0)
        failures.append(out.failure)
        reasons.extend(r for _, r in out.result.dropped)
        if not cfg.secagg.enabled:
            reasons.extend("no reply within server.round-timeout" for _ in out.missing)
        log.warning("round %d, attempt %d: %s (server.min-replies=%d)%s", server_round, n, out.failure,
                    cfg.server.min_replies, "; trying again" if n <= cfg.server.round_retries else "")
    raise _failed(server_round, cfg, run_dir, failures, reasons)


def _failed(server_round: int, cfg: Config, run_dir: Path, failures: list[str], reasons: list[str]) -> RoundFailed:
    """The RoundFailed of a round out of attempts, its reason also in error.txt."""
    hint = (f"resume from round {server_round - 1}'s checkpoint with --resume {run_dir}"
            if (run_dir / checkpoint.FILE).exists() else f"run directory {run_dir}")
    common = ""
    if reasons:
        reason, count = collections.Counter(reasons).most_common(1)[0]
        common = f"; most common drop reason ({count} of {len(reasons)}): {reason}"
    err = RoundFailed(f"round {server_round}: too few valid replies ({'; '.join(failures)}; server.min-replies="
                      f"{cfg.server.min_replies}, server.round-retries={cfg.server.round_retries}){common}; {hint}")
    (run_dir / ERROR_FILE).write_text(str(err) + "\n")
    return err


def prepare(strategy: FedLLMStrategy, grid: Grid, cfg: Config) -> dict[str, Any]:
    """The method's step before round 1 of a new run, if it has one (LoRA's module choice with
    lora.target-modules=auto): its queries go to the sampled nodes with the run config."""
    method = strategy.method
    if not hasattr(method, "prepare"):
        return {}

    def ask(records: dict[str, Any]) -> Iterator[Message]:
        config = {**cfg.to_flat(), "server-round": 0}
        messages = [Message(content=RecordDict({CONFIG: ConfigRecord(config), **records}),
                            message_type=MessageType.QUERY, dst_node_id=node) for node in strategy.sample(grid)]
        yield from receive(grid, messages, cfg.server.round_timeout)

    out = method.prepare(ask)
    if out:
        log.info("before round 1: %s", ", ".join(f"{k} {v}" for k, v in out.items() if k != "dropped"))
        for node, reason in out.get("dropped", []):
            log.warning("before round 1: dropped node %s: %s", node, reason)
    return out
