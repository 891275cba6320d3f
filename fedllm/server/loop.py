"""The server's recipe: set up, then per round: outcome = train_round(...); its row; log, track,
checkpoint; at the end save the result, the summary and the report.

Writes a run directory: config.json, metrics.jsonl (one line per round), checkpoint.safetensors
(after every round, for server.resume), summary.json, and the method's result: adapter/ (PEFT
format) for LoRA and exact-lora, zo/accumulators.bin for zo, merged/ on request; with
server.eval-tasks lm-eval/, with server.trackers the trackers' files (fedllm.reporting.tracking). A round goes
on without the clients that fail, time out or send invalid replies, as long as server.min-replies
valid ones arrive; otherwise it is tried again (server.round-retries) and then the run stops with
RoundFailed.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from fedllm import rng
from fedllm.server import checkpoint
from fedllm.config import Config
from fedllm.ledger.scoring import needs_utility
from fedllm.evaluation.held_out import em_subset
from fedllm.methods import data_splits
from fedllm.protocol import METRICS
from fedllm.reporting.runlog import MetricsLog, format_summary, make_run_dir, summary, write_atomically, write_config
from fedllm.reporting.report import render_report
from fedllm.secagg.server import check as check_secagg
from fedllm.server.evaluator import Evaluator
from fedllm.server.buffered import Buffered
from fedllm.server.round import ERROR_FILE, RoundFailed, RoundOutcome, prepare, train_round
from fedllm.reporting.tracking import Trackers
from strategies import FedLLMStrategy, build

log = logging.getLogger(__name__)


def run(grid: Grid, cfg: Config) -> Path:
    """Run the federated rounds; returns the run directory.

    With server.resume set, continues that run from its checkpoint (same config; only
    server.num-rounds may grow).

    Raises:
        RoundFailed: when a round has fewer than server.min-replies valid replies after
            server.round-retries retries (the last round's checkpoint stays for --resume).
    """
    ckpt = checkpoint.load(Path(cfg.server.resume), cfg.to_flat()) if cfg.server.resume else None
    strategy = build(cfg)  # checks the config's combinations before anything is written
    if cfg.secagg.enabled:  # threshold and bits against the round size, before any round
        check_secagg(cfg, cfg.server.clients_per_round or cfg.server.min_clients)
    run_dir = Path(cfg.server.resume) if ckpt else make_run_dir(cfg)
    log.info("run directory: %s", run_dir)
    _, held_out = data_splits(cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    books = _books(cfg, run_dir, ckpt)
    trackers = Trackers(cfg, run_dir, ckpt["metrics"] if ckpt else [])
    try:
        with Evaluator(cfg, strategy.method, held_out) as evaluate:
            first = _resume(cfg, run_dir, ckpt, strategy, metrics) if ckpt else 1
            if not ckpt:
                _round_zero(cfg, strategy, grid, metrics, trackers, evaluate)
            validation = em_subset(held_out, cfg.ledger.validation_examples)
            if books is not None:  # each round's inputs as artifacts, for `fedllm verify`
                books.watch(strategy, cfg, validation)
            extra = {"ledger-contract": books.address} if books else {}
            pump = Buffered(cfg, strategy, grid) if cfg.server.mode == "async" else None
            if pump is not None and ckpt:
                log.info("server.mode=async: replies in flight before the restart are not awaited; clients are "
                         "sent version %d", first - 1)
            for server_round in range(first, cfg.server.num_rounds + 1):
                t0 = time.perf_counter()
                run_config = ConfigRecord({**cfg.to_flat(), **extra})
                if pump is not None:
                    outcome = _version(pump, server_round, run_config, run_dir, books is not None)
                else:
                    outcome = train_round(server_round, cfg, strategy, run_config, grid, run_dir,
                                          keep_replies=books is not None)
                accounts = _account(cfg, books, server_round, outcome, strategy, validation)
                figures = evaluate(server_round)
                row = round_row(server_round, outcome, figures, accounts, time.perf_counter() - t0)
                metrics.write(row)
                trackers.log(row)
                if cfg.server.checkpoint:
                    checkpoint.save(run_dir, {
                        "round": server_round, "config": cfg.to_flat(), "strategy": strategy.state_dict(),
                        "rng": rng.rng_state(), "ledger": books.cursor() if books is not None else None,
                        "metrics": metrics.rows})
                log.info("round %d/%d: train loss %s, eval loss %s, exact match %s (%.1f s)", server_round,
                         cfg.server.num_rounds, _fmt(row.get("train-loss")), _fmt(row.get("eval-loss")),
                         _fmt(row.get("exact-match")), row["round-seconds"])
        return _finish(run_dir, strategy, metrics, books, trackers)
    finally:
        trackers.finish()


def _version(pump: Buffered, server_round: int, run_config: ConfigRecord, run_dir: Path,
             keep_replies: bool) -> RoundOutcome:
    """An asynchronous version (fedllm.server.buffered); why it failed also goes to error.txt."""
    try:
        return pump.version(server_round, run_config, keep_replies)
    except RoundFailed as err:
        hint = (f"; resume from version {server_round - 1}'s checkpoint with --resume {run_dir}"
                if (run_dir / checkpoint.FILE).exists() else "")
        failed = RoundFailed(f"{err}{hint}")
        (run_dir / ERROR_FILE).write_text(str(failed) + "\n")
        raise failed from None


def round_row(server_round: int, outcome: RoundOutcome, figures: dict[str, Any], accounts: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    """The round's line of metrics.jsonl: the result's metrics, the evaluation's figures, the
    clients, bytes, drops and times (`seconds`: the whole round, evaluation and ledger included),
    and the ledger's record."""
    result = outcome.result
    return {
        "round": server_round,
        **result.metrics,
        **figures,
        "clients-missing": len(outcome.missing),
        "attempts": outcome.attempts,
        "bytes-down": outcome.down,
        "bytes-up": {str(u.node_id): u.bytes_up for u in result.updates},
        "clients": {str(u.node_id): u.metrics for u in result.updates},
        "dropped": [{"node": str(n), "reason": r} for n, r in result.dropped]
        + [{"node": str(n), "reason": "no reply within server.round-timeout"} for n in outcome.missing],
        "train-seconds": round(outcome.seconds, 3),
        "round-seconds": round(seconds, 3),
        **outcome.extra,
        **accounts,
    }


def _books(cfg: Config, run_dir: Path, ckpt: dict[str, Any] | None) -> Any:
    """The ledger session (ledger.enabled), continued from the checkpoint's cursor on a resume."""
    if not cfg.ledger.enabled:
        return None
    from fedllm.ledger.session import LedgerSession  # web3 is the optional [ledger] extra

    return LedgerSession(cfg, run_dir, ckpt["ledger"] if ckpt else None)


def _resume(cfg: Config, run_dir: Path, ckpt: dict[str, Any], strategy: FedLLMStrategy, metrics: MetricsLog) -> int:
    """The strategy, RNG and metrics as the checkpoint left them; returns the first round to run."""
    checkpoint.restore(strategy, ckpt, str(Path(cfg.server.resume) / checkpoint.FILE))
    rng.set_rng_state(ckpt["rng"])
    metrics.reset(ckpt["metrics"])
    write_config(run_dir, cfg)  # server.num-rounds may have grown
    log.info("resumed %s after round %d of %d", run_dir, ckpt["round"], cfg.server.num_rounds)
    return ckpt["round"] + 1


def _round_zero(cfg: Config, strategy: FedLLMStrategy, grid: Grid, metrics: MetricsLog, trackers: Trackers,
                evaluate: Evaluator) -> None:
    """A new run's row 0: the method's preparation (if any) and the starting state's figures."""
    prepared = prepare(strategy, grid, cfg)
    start = evaluate(0)
    metrics.write({"round": 0, **start, **({"prepare": prepared} if prepared else {})})
    trackers.log({"round": 0, **start})
    log.info("round 0/%d: eval loss %s, exact match %s", cfg.server.num_rounds, _fmt(start.get("eval-loss")),
             _fmt(start.get("exact-match")))


def _account(cfg: Config, books: Any, server_round: int, outcome: RoundOutcome, strategy: FedLLMStrategy,
             validation: list[dict[str, str]]) -> dict[str, Any]:
    """The ledger's record of the round ({} without the ledger)."""
    if books is None:
        return {}
    method, result = strategy.method, outcome.result
    utility = method.utility(list(result.updates), validation) if needs_utility(cfg.ledger) else None
    signers: dict[int, Any] = {}
    for trained, replies in _by_round(outcome.replies, server_round).items():  # async: stale replies signed theirs
        signers.update(books.signers(trained, replies))
    return {"ledger": books.record(server_round, signers, result, method.digest(), utility)}


def _by_round(replies: tuple[Any, ...], server_round: int) -> dict[int, list[Any]]:
    """Replies by the round their message carried (all `server_round` in a synchronous round; an
    asynchronous version's stale replies answer earlier ones, checked when they were accepted)."""
    out: dict[int, list[Any]] = {}
    for reply in replies:
        said = reply.content.metric_records.get(METRICS, {}).get("server-round", server_round)
        out.setdefault(int(said), []).append(reply)
    return out


def _finish(run_dir: Path, strategy: FedLLMStrategy, metrics: MetricsLog, books: Any, trackers: Trackers) -> Path:
    """The method's result, summary.json (with the ledger's totals) and the report."""
    strategy.method.save(run_dir)
    s = summary(metrics.rows)
    if books is not None:
        s["ledger"] = books.finish()
    write_atomically(run_dir / "summary.json", json.dumps(s, indent=2) + "\n")
    log.info("summary of %s\n%s", run_dir, format_summary(s))
    report = None
    try:
        report = render_report(run_dir)
        log.info("report: %s", report)
    except Exception as err:  # the run's results are saved: a plotting failure must not fail it
        log.warning("report: not written (%s: %s); `fedllm report %s` retries", type(err).__name__, err, run_dir)
    trackers.finish(report, s)
    return run_dir


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"
