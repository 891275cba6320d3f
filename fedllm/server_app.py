"""Flower ServerApp: rounds of sample -> local update -> aggregate -> evaluate -> log.

Started by Flower (`flwr run .`) or by `fedllm simulate`. The round reads top to bottom: the
method's server half encodes what each node needs, the clients train, the strategy validates
the replies into Updates, the rule chain aggregates them and the method applies the aggregate;
the round's `RoundResult` goes to the metrics row, the ledger and the checkpoint. Writes a run
directory: config.json, metrics.jsonl (one line per round), checkpoint.safetensors (after every round,
for server.resume), summary.json, and the method's result: adapter/ (PEFT format) for LoRA and
exact-lora, zo/accumulators.bin for zo, merged/ on request; with server.eval-tasks lm-eval/, with
server.trackers the trackers' files (fedllm.tracking). A round goes on without the clients that fail,
time out or send invalid replies, as long as server.min-replies valid ones arrive; otherwise it
is tried again (server.round-retries) and then the run stops with RoundFailed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedllm import checkpoint
from fedllm.config import Config
from fedllm.contribution import SCORERS
from fedllm.errors import FedLLMError
from fedllm.evaluate import em_subset, evaluate
from fedllm.harness import parse_tasks, run_tasks, task_manager, write_tasks
from fedllm.methods import data_splits
from fedllm.protocol import CONFIG, RoundResult, payload_bytes, receive, short_reason
from fedllm.secagg.server import check as check_secagg, secure_round
from fedllm.report import MetricsLog, format_summary, make_run_dir, render_report, summary, write_atomically, write_config
from fedllm.tracking import Trackers
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
    method = strategy.method
    _, held_out = data_splits(cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    n_rounds = cfg.server.num_rounds
    books = None
    if cfg.ledger.enabled:
        from fedllm.accounting import LedgerSession  # web3 is the optional [ledger] extra

        books = LedgerSession(cfg, run_dir, ckpt["ledger"] if ckpt else None)
    validation = em_subset(held_out, cfg.ledger.validation_examples)

    tasks = parse_tasks(cfg.server.eval_tasks)
    # fedllm's own lm-eval tasks from this run's held-out split, in a fresh folder (nothing planted in a
    # run directory is read as a task); unknown tasks fail here
    tasks_dir = tempfile.TemporaryDirectory(prefix="fedllm-tasks-") if tasks else None
    if tasks_dir is not None:
        manager = eval_tasks(cfg, Path(tasks_dir.name), held_out, method.tokenizer)

    def evaluate_state(server_round: int) -> dict[str, Any]:
        every = cfg.server.eval_every
        if not cfg.server.evaluate or (
                server_round not in (0, n_rounds) and (every <= 0 or server_round % every)):
            return {}
        with method.model() as model:
            out = evaluate(model, method.tokenizer, held_out, cfg.data, cfg.server.eval_batch_size,
                           cfg.server.exact_match_examples, cfg.server.max_new_tokens)
            if hasattr(method, "evaluate"):  # a method's own figures (dpo: held-out rewards)
                out.update(method.evaluate(model, held_out))
            if tasks:
                out["lm-eval"] = run_tasks(model, method.tokenizer, tasks, cfg.data, limit=cfg.server.eval_limit,
                                           batch_size=cfg.server.eval_batch_size, manager=manager)
        return out

    trackers = Trackers(cfg, run_dir, ckpt["metrics"] if ckpt else [])
    try:
        return _rounds(cfg, run_dir, ckpt, strategy, grid, metrics, books, evaluate_state, validation, trackers)
    finally:
        trackers.finish()
        if tasks_dir is not None:
            tasks_dir.cleanup()


def eval_tasks(cfg: Config, folder: Path, examples: list[dict[str, str]], tokenizer: Any = None) -> Any:
    """fedllm's own lm-eval tasks over `examples` written into `folder`, and lm-eval's task manager
    for server.eval-tasks with them and server.eval-include-path.

    Raises:
        ConfigError: naming server.eval-tasks (an unknown task) or server.eval-include-path.
    """
    write_tasks(folder, examples, cfg.data, cfg.server.max_new_tokens, tokenizer)
    includes = [Path(p.strip()).expanduser() for p in cfg.server.eval_include_path.split(",") if p.strip()]
    return task_manager(parse_tasks(cfg.server.eval_tasks), [Path(folder), *includes], key="server.eval-tasks",
                        include_key="server.eval-include-path")


def _rounds(cfg: Config, run_dir: Path, ckpt: dict[str, Any] | None, strategy: FedLLMStrategy, grid: Grid,
            metrics: MetricsLog, books: Any, evaluate_state: Any, validation: list[dict[str, str]],
            trackers: Trackers) -> Path:
    method, n_rounds = strategy.method, cfg.server.num_rounds
    round_extra = {"ledger-contract": books.address} if books else {}
    if ckpt:
        first = ckpt["round"] + 1
        strategy.load_state_dict(ckpt["strategy"])
        checkpoint.set_rng_state(ckpt["rng"])
        metrics.reset(ckpt["metrics"])
        write_config(run_dir, cfg)  # server.num-rounds may have grown
        log.info("resumed %s after round %d of %d", run_dir, ckpt["round"], n_rounds)
    else:
        first = 1
        prepared = prepare(strategy, grid, cfg)
        start = evaluate_state(0)
        metrics.write({"round": 0, **start, **({"prepare": prepared} if prepared else {})})
        trackers.log({"round": 0, **start})
        log.info("round 0/%d: eval loss %s, exact match %s", n_rounds, _fmt(start.get("eval-loss")),
                 _fmt(start.get("exact-match")))
    for server_round in range(first, n_rounds + 1):
        t0 = time.perf_counter()
        run_config = ConfigRecord({**cfg.to_flat(), **round_extra})
        down, replies, result, missing, attempts = train_round(server_round, cfg, strategy, run_config, grid, run_dir,
                                                               keep_replies=books is not None)
        train_seconds = time.perf_counter() - t0
        accounts = {}
        if books is not None:
            utility = method.utility(list(result.updates), validation) if needs_utility(cfg) else None
            signers = books.signers(server_round, replies)
            accounts = {"ledger": books.record(server_round, signers, result, method.digest(), utility)}
        ev = evaluate_state(server_round)
        row: dict[str, Any] = {
            "round": server_round,
            **result.metrics,
            **ev,
            "clients-missing": len(missing),
            "attempts": attempts,
            "bytes-down": down,
            "bytes-up": {str(u.node_id): u.bytes_up for u in result.updates},
            "clients": {str(u.node_id): u.metrics for u in result.updates},
            "dropped": [{"node": str(n), "reason": r} for n, r in result.dropped]
            + [{"node": str(n), "reason": "no reply within server.round-timeout"} for n in missing],
            "train-seconds": round(train_seconds, 3),
            "round-seconds": round(time.perf_counter() - t0, 3),
            **accounts,
        }
        metrics.write(row)
        trackers.log(row)
        if cfg.server.checkpoint:
            checkpoint.save(run_dir, {
                "round": server_round, "config": cfg.to_flat(), "strategy": strategy.state_dict(),
                "rng": checkpoint.rng_state(), "ledger": books.cursor() if books is not None else None,
                "metrics": metrics.rows})
        log.info("round %d/%d: train loss %s, eval loss %s, exact match %s (%.1f s)", server_round,
                 n_rounds, _fmt(row.get("train-loss")), _fmt(row.get("eval-loss")),
                 _fmt(row.get("exact-match")), row["round-seconds"])
    method.save(run_dir)
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


ERROR_FILE = "error.txt"  # why a run stopped, for the CLI to print
# Why this process's ServerApp failed, if it did: `fedllm simulate` runs the ServerApp in its
# engine process and ends the engine when this fills (Flower's engine would wait on).
SERVER_FAILED: list[str] = []


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


def train_round(server_round: int, cfg: Config, strategy: FedLLMStrategy, run_config: ConfigRecord, grid: Grid,
                run_dir: Path, keep_replies: bool = False) -> tuple[dict[str, int], list[Any], RoundResult, list[int], int]:
    """Send the round's train messages and aggregate the replies as they arrive, trying again
    while fewer than server.min-replies are valid. Returns (bytes down per node, the replies
    when `keep_replies` (the ledger reads their signatures), else [], the round's result, nodes
    that never replied, attempts).

    Raises:
        RoundFailed: after server.round-retries retries (the reason also goes to error.txt).
    """
    failures: list[str] = []
    reasons: list[str] = []  # why replies were dropped, over the attempts
    for attempt in range(cfg.server.round_retries + 1):
        if cfg.secagg.enabled:  # the four-stage protocol around the train round
            secure = secure_round(strategy, server_round, run_config, grid, cfg.server.round_timeout)
            result = secure.result
            if result.applied:
                return secure.down, secure.replies if keep_replies else [], result, secure.missing, attempt + 1
            failures.append(secure.failure)
            reasons.extend(r for _, r in result.dropped)
            log.warning("round %d, attempt %d: %s%s", server_round, attempt + 1, secure.failure,
                        "; trying again" if attempt < cfg.server.round_retries else "")
            continue
        messages = list(strategy.configure_train(server_round, ArrayRecord(), run_config, grid))
        down = {str(m.metadata.dst_node_id): payload_bytes(m.content) for m in messages}
        answered: set[int] = set()
        replies: list[Message] = []

        def arrivals() -> Iterator[Message]:
            for reply in receive(grid, messages, cfg.server.round_timeout):
                answered.add(reply.metadata.src_node_id)
                if keep_replies:
                    replies.append(reply)
                yield reply

        result = strategy.round(server_round, arrivals(), messages)
        missing = sorted(m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered)
        if missing:
            log.warning("round %d: no reply within server.round-timeout=%gs from node(s) %s", server_round,
                        cfg.server.round_timeout, ", ".join(map(str, missing)))
        if result.applied:
            return down, replies, result, missing, attempt + 1
        valid = len(result.updates)
        failures.append(f"{valid} valid of {len(messages)} sent")
        reasons.extend(r for _, r in result.dropped)
        reasons.extend("no reply within server.round-timeout" for _ in missing)
        log.warning("round %d, attempt %d: %d valid replies of %d sent, server.min-replies=%d%s", server_round,
                    attempt + 1, valid, len(messages), cfg.server.min_replies,
                    "; trying again" if attempt < cfg.server.round_retries else "")
    hint = (f"resume from round {server_round - 1}'s checkpoint with --resume {run_dir}"
            if (run_dir / checkpoint.FILE).exists() else f"run directory {run_dir}")
    common = ""
    if reasons:
        reason, count = collections.Counter(reasons).most_common(1)[0]
        common = f"; most common drop reason ({count} of {len(reasons)}): {reason}"
    err = RoundFailed(f"round {server_round}: too few valid replies ({'; '.join(failures)}; server.min-replies="
                      f"{cfg.server.min_replies}, server.round-retries={cfg.server.round_retries}){common}; {hint}")
    (run_dir / ERROR_FILE).write_text(str(err) + "\n")
    raise err


def evaluate_run(run_dir: Path, tasks: list[str], include_path: list[Path] = (), limit: int = 0,
                 batch_size: int = 16) -> dict[str, dict[str, float]]:
    """lm-eval figures of a run's result (the global model of its last checkpoint: the adapter on
    its base, or the zo-rebuilt model), on `tasks`; fedllm's own tasks are written from the run's
    held-out split into a fresh temporary folder. Writes RUN_DIR/lm-eval/results.json.

    Raises:
        FedLLMError: for a folder that is not a run, one without a checkpoint, an unknown task, or a
            task whose data cannot be loaded.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FedLLMError(f"{run_dir}: not a fedllm run directory (no config.json)")
    if not (run_dir / checkpoint.FILE).is_file():
        raise FedLLMError(f"{run_dir}: no {checkpoint.FILE} to rebuild the result from (server.checkpoint was off, "
                          "or no round finished)")
    out = run_dir / "lm-eval"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FedLLMError(f"{out}: not a folder of this run (a link or a file); remove it")
    ckpt = checkpoint.read(run_dir / checkpoint.FILE)
    # the adapter comes from the checkpoint: server.init-from's folder may be gone by now
    cfg = Config.from_flat(checkpoint.saved_config(ckpt)).replace(server__init_from="")
    _, held_out = data_splits(cfg)
    with tempfile.TemporaryDirectory(prefix="fedllm-tasks-") as tmp:
        folder = write_tasks(Path(tmp), held_out, cfg.data, cfg.server.max_new_tokens)
        manager = task_manager(tasks, [folder, *include_path])  # unknown tasks fail before the model loads
        strategy = build(cfg)
        strategy.load_state_dict(ckpt["strategy"])
        write_tasks(folder, held_out, cfg.data, cfg.server.max_new_tokens, strategy.method.tokenizer)  # its prompts
        with strategy.method.model() as model:
            figures = run_tasks(model, strategy.method.tokenizer, tasks, cfg.data, limit=limit,
                                batch_size=batch_size, manager=manager)
    out.mkdir(exist_ok=True)
    write_atomically(out / "results.json", json.dumps(
        {"round": ckpt["round"], "tasks": tasks, "limit": limit, "results": figures}, indent=2) + "\n")
    return figures


def needs_utility(cfg: Config) -> bool:
    """Whether ledger.scorer calls the method's validation utility."""
    return bool(SCORERS.get(cfg.ledger.scorer).meta.get("needs_utility"))


class RoundFailed(FedLLMError):
    """A round ended with too few valid replies, retries included."""


def _log_through_flower() -> None:
    """Under `flwr run` nobody configures logging: send fedllm's progress to Flower's handler,
    so that it shows in the run's log stream."""
    ours = logging.getLogger("fedllm")
    if not ours.handlers and not logging.getLogger().handlers:
        ours.handlers = list(logging.getLogger("flwr").handlers)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is the run_config with `overrides` on top."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_through_flower()
        cfg = Config.from_flat({**dict(context.run_config), **dict(overrides or {})})
        try:
            run(grid, cfg)
        except Exception as err:  # why the run stopped, in one line beside its results (if the disk lets us)
            if isinstance(err, RoundFailed):  # it wrote error.txt itself
                SERVER_FAILED.append(str(err))
                raise
            said = str(err) if isinstance(err, FedLLMError) else f"{type(err).__name__}: {err}"
            reason = f"the server stopped: {short_reason(said)}"
            run_dir = Path(cfg.server.resume or Path(cfg.server.run_dir).expanduser() / cfg.server.run_name)
            if cfg.server.run_name and run_dir.is_dir():
                with contextlib.suppress(OSError):
                    (run_dir / ERROR_FILE).write_text(reason + "\n")
            SERVER_FAILED.append(reason)  # for `fedllm simulate`'s engine, which Flower would keep waiting
            raise

    return server_app


app = make_app()
