"""Flower ServerApp: rounds of sample -> local update -> aggregate -> evaluate -> log.

Started by Flower (`flwr run .`) or by `fedllm simulate`. Writes a run directory:
config.json, metrics.jsonl (one line per round), checkpoint.pt (after every round, for
server.resume), summary.json, and the result: adapter/ (PEFT format) for LoRA or
zo/accumulators.bin for ZO, merged/ on request. A round goes on without the clients that fail,
time out or send invalid replies, as long as server.min-replies valid ones arrive; otherwise it
is tried again (server.round-retries) and then the run stops with RoundFailed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedllm import checkpoint
from fedllm.config import Config
from fedllm.data import load_splits
from fedllm.errors import ConfigError, FedLLMError
from fedllm.evaluate import em_subset, eval_loss, evaluate
from fedllm.report import MetricsLog, format_summary, make_run_dir, render_report, summary, write_config
from fedllm.updates import lora, zo
from strategies import get_strategy
from strategies.base import payload_bytes

log = logging.getLogger(__name__)


class LoraGlobal:
    """The global adapter. The server holds the base model only to evaluate or merge."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if cfg.server.evaluate or cfg.server.merge or needs_validation(cfg):
            self.model, self.tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
            lora.reset_adapter(self.model, cfg.train.seed)  # the cached model may hold an earlier run's adapter
            self.state = lora.adapter_state(self.model)
        else:
            self.model = self.tokenizer = None
            self.state = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)

    def strategy(self, cls: type) -> Any:
        return cls(self.cfg)

    def arrays(self) -> ArrayRecord:
        return ArrayRecord(self.state)

    def absorb(self, arrays: ArrayRecord | None, strategy: Any) -> None:
        if arrays is not None:
            self.state = arrays.to_torch_state_dict()

    def checkpoint(self) -> dict[str, torch.Tensor]:
        return self.state

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    @contextlib.contextmanager
    def ready(self, strategy: Any) -> Iterator[Any]:
        """The model at the global state: the global adapter, or for exact-lora a zero adapter
        over the frozen delta."""
        frozen = getattr(strategy, "frozen", None)
        if frozen is None:
            lora.set_adapter_state(self.model, self.state)
            yield self.model
        else:
            lora.reset_adapter(self.model, self.cfg.train.seed)  # B = 0: the adapter adds nothing
            with lora.frozen_delta(self.model, frozen):
                yield self.model

    def digest(self, strategy: Any) -> bytes:
        """keccak256 of the global state (the model hash on the ledger)."""
        from eth_utils import keccak

        state = getattr(strategy, "frozen", None) or self.state
        return keccak(b"".join(k.encode() + state[k].numpy().tobytes() for k in sorted(state)))

    def utility(self, strategy: Any, before: dict[str, torch.Tensor], examples: list[dict[str, str]]) -> Any:
        """For the loo and shapley scorers: minus the validation loss of the global adapter moved
        by the example-weighted mean of the chosen updates' deltas."""
        from strategies import weighted_mean

        def utility_of(indices: list[int]) -> float:
            ups = [strategy.updates[i] for i in indices]
            delta = weighted_mean([u.delta for u in ups], [u.num_examples for u in ups]) if ups else {}
            lora.set_adapter_state(self.model, {k: t + delta[k].to(t.dtype) if delta else t for k, t in before.items()})
            return -eval_loss(self.model, self.tokenizer, examples, self.cfg.data, self.cfg.server.eval_batch_size)

        return utility_of

    def save(self, run_dir: Path, strategy: Any) -> None:
        """adapter/ loads with PeftModel.from_pretrained; merged/ with AutoModelForCausalLM."""
        frozen = getattr(strategy, "frozen", None)
        if frozen:
            state, rank = pad_ranks(frozen)  # scaling 1: lora_alpha = r
            lora.save_adapter(state, self.cfg.model, dataclasses.replace(self.cfg.lora, rank=rank, alpha=float(rank)),
                              run_dir / "adapter")
        else:
            lora.save_adapter(self.state, self.cfg.model, self.cfg.lora, run_dir / "adapter")
        if self.cfg.server.merge:
            with self.ready(strategy) as model:
                save_merged(model, self.tokenizer, run_dir / "merged")


class ZOGlobal:
    """The global accumulators live in the strategy; the server's engine follows them to
    evaluate, and gives the perturbation fingerprint every client must match."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.engine, self.tokenizer = zo.engine_for(cfg)
        self.model = self.engine.model

    def strategy(self, cls: type) -> Any:
        strategy = cls(self.cfg)
        strategy.fingerprint = self.engine.fingerprint
        return strategy

    def arrays(self) -> ArrayRecord:
        return ArrayRecord()

    def absorb(self, arrays: ArrayRecord | None, strategy: Any) -> None:
        pass

    def checkpoint(self) -> None:
        return None  # the accumulators are the strategy's state

    def restore(self, state: None) -> None:
        pass

    @contextlib.contextmanager
    def ready(self, strategy: Any) -> Iterator[Any]:
        self.engine.sync(strategy.state)
        yield self.model

    def digest(self, strategy: Any) -> bytes:
        from eth_utils import keccak

        return keccak(strategy.state.to_bytes())

    def save(self, run_dir: Path, strategy: Any) -> None:
        """zo/accumulators.bin (K scalars: the whole fine-tuned model, given the base) and,
        on request, merged/ (the rebuilt model, loadable with AutoModelForCausalLM)."""
        (run_dir / "zo").mkdir(exist_ok=True)
        (run_dir / "zo" / "accumulators.bin").write_bytes(strategy.state.to_bytes())
        if self.cfg.server.merge:
            with self.ready(strategy) as model:
                save_merged(model, self.tokenizer, run_dir / "merged")


def pad_ranks(factors: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Zero-pad every module's factors to the largest rank (B @ A is unchanged), as one PEFT
    rank r needs; returns the padded factors and r."""
    rank = max(1, max(t.shape[0] for k, t in factors.items() if k.endswith(".lora_A.weight")))
    out = {}
    for k, t in factors.items():
        pad = rank - (t.shape[0] if k.endswith(".lora_A.weight") else t.shape[1])
        out[k] = torch.nn.functional.pad(t, (0, 0, 0, pad) if k.endswith(".lora_A.weight") else (0, pad))
    return out, rank


def run(grid: Grid, cfg: Config) -> Path:
    """Run the federated rounds; returns the run directory.

    With server.resume set, continues that run from its checkpoint (same config; only
    server.num-rounds may grow).

    Raises:
        RoundFailed: when a round has fewer than server.min-replies valid replies after
            server.round-retries retries (the last round's checkpoint stays for --resume).
    """
    ckpt = checkpoint.load(Path(cfg.server.resume), cfg.to_flat()) if cfg.server.resume else None
    run_dir = Path(cfg.server.resume) if ckpt else make_run_dir(cfg)
    log.info("run directory: %s", run_dir)
    gstate = ZOGlobal(cfg) if cfg.train.method == "zo" else LoraGlobal(cfg)
    strategy = gstate.strategy(strategy_class(cfg))
    outer = with_dp(strategy, cfg)
    _, held_out = load_splits(cfg.data)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    n_rounds = cfg.server.num_rounds
    books = None
    if cfg.ledger.enabled:
        from fedllm.accounting import LedgerSession  # web3 is the optional [ledger] extra

        books = LedgerSession(cfg, run_dir, ckpt["ledger"] if ckpt else None)
    round_extra = {"ledger-contract": books.address} if books else {}
    validation = em_subset(held_out, cfg.ledger.validation_examples)

    def evaluate_state(server_round: int) -> dict[str, float]:
        every = cfg.server.eval_every
        if not cfg.server.evaluate or (
                server_round not in (0, n_rounds) and (every <= 0 or server_round % every)):
            return {}
        with gstate.ready(strategy) as model:
            return evaluate(model, gstate.tokenizer, held_out, cfg.data, cfg.server.eval_batch_size,
                            cfg.server.exact_match_examples, cfg.server.max_new_tokens)

    if ckpt:
        first = ckpt["round"] + 1
        gstate.restore(ckpt["global"])
        checkpoint.restore(strategy, ckpt["strategy"])
        if outer is not strategy:
            checkpoint.restore(outer, ckpt["wrapper"])
        checkpoint.set_rng_state(ckpt["rng"])
        metrics.reset(ckpt["metrics"])
        write_config(run_dir, cfg)  # server.num-rounds may have grown
        log.info("resumed %s after round %d of %d", run_dir, ckpt["round"], n_rounds)
    else:
        first = 1
        start = evaluate_state(0)
        metrics.write({"round": 0, **start})
        log.info("round 0/%d: eval loss %s, exact match %s", n_rounds, _fmt(start.get("eval-loss")),
                 _fmt(start.get("exact-match")))
    for server_round in range(first, n_rounds + 1):
        t0 = time.perf_counter()
        run_config = ConfigRecord({**cfg.to_flat(), **round_extra})
        down, replies, arrays, agg, missing, attempts = train_round(server_round, cfg, outer, strategy, gstate,
                                                                     run_config, grid, run_dir)
        before = getattr(gstate, "state", None)
        gstate.absorb(arrays, strategy)
        train_seconds = time.perf_counter() - t0
        accounts = {}
        if books is not None:
            utility = gstate.utility(strategy, before, validation) if needs_validation(cfg) else None
            signers = books.signers(server_round, replies)
            accounts = {"ledger": books.record(server_round, signers, strategy, gstate.digest(strategy), utility)}
        ev = evaluate_state(server_round)
        row: dict[str, Any] = {
            "round": server_round,
            **{k: v for k, v in (agg or {}).items()},
            **ev,
            "clients-missing": len(missing),
            "attempts": attempts,
            "bytes-down": down,
            "bytes-up": {str(u.node_id): u.bytes_up for u in getattr(strategy, "updates", [])},
            "clients": {str(u.node_id): u.metrics for u in getattr(strategy, "updates", [])},
            "dropped": [{"node": str(n), "reason": r} for n, r in getattr(strategy, "dropped", [])]
            + [{"node": str(n), "reason": "no reply within server.round-timeout"} for n in missing],
            "train-seconds": round(train_seconds, 3),
            "round-seconds": round(time.perf_counter() - t0, 3),
            **accounts,
        }
        metrics.write(row)
        if cfg.server.checkpoint:
            save_checkpoint(run_dir, cfg, server_round, gstate, strategy, outer, books, metrics.rows)
        log.info("round %d/%d: train loss %s, eval loss %s, exact match %s (%.1f s)", server_round,
                 n_rounds, _fmt(row.get("train-loss")), _fmt(row.get("eval-loss")),
                 _fmt(row.get("exact-match")), row["round-seconds"])
    gstate.save(run_dir, strategy)
    s = summary(metrics.rows)
    if books is not None:
        s["ledger"] = books.finish()
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    log.info("summary of %s\n%s", run_dir, format_summary(s))
    try:
        log.info("report: %s", render_report(run_dir))
    except Exception as err:  # the run's results are saved: a plotting failure must not fail it
        log.warning("report: not written (%s: %s); `fedllm report %s` retries", type(err).__name__, err, run_dir)
    return run_dir


ERROR_FILE = "error.txt"  # why a run stopped, for the CLI to print


def train_round(server_round: int, cfg: Config, outer: Any, strategy: Any, gstate: Any, run_config: ConfigRecord,
                grid: Grid, run_dir: Path) -> tuple[dict[str, int], list[Any], Any, Any, list[int], int]:
    """Send the round's train messages and aggregate the replies, trying again while fewer than
    server.min-replies are valid. Returns (bytes down per node, replies, arrays, metrics,
    nodes that never replied, attempts).

    Raises:
        RoundFailed: after server.round-retries retries (the reason also goes to error.txt).
    """
    failures = []
    for attempt in range(cfg.server.round_retries + 1):
        messages = list(outer.configure_train(server_round, gstate.arrays(), run_config, grid))
        down = {str(m.metadata.dst_node_id): payload_bytes(m.content) for m in messages}
        replies = list(grid.send_and_receive(messages, timeout=cfg.server.round_timeout))
        answered = {r.metadata.src_node_id for r in replies}
        missing = sorted(m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered)
        if missing:
            log.warning("round %d: no reply within server.round-timeout=%gs from node(s) %s", server_round,
                        cfg.server.round_timeout, ", ".join(map(str, missing)))
        strategy.updates, strategy.dropped = [], []  # a wrapper may refuse the replies before the strategy sees them
        arrays, agg = outer.aggregate_train(server_round, replies)
        if strategy.enough() if hasattr(strategy, "enough") else arrays is not None:
            return down, replies, arrays, agg, missing, attempt + 1
        valid = len(strategy.updates)
        failures.append(f"{valid} valid of {len(messages)} sent")
        log.warning("round %d, attempt %d: %d valid replies of %d sent, server.min-replies=%d%s", server_round,
                    attempt + 1, valid, len(messages), cfg.server.min_replies,
                    "; trying again" if attempt < cfg.server.round_retries else "")
    hint = (f"resume from round {server_round - 1}'s checkpoint with --resume {run_dir}"
            if (run_dir / checkpoint.FILE).exists() else f"run directory {run_dir}")
    err = RoundFailed(f"round {server_round}: too few valid replies ({'; '.join(failures)}; server.min-replies="
                      f"{cfg.server.min_replies}, server.round-retries={cfg.server.round_retries}); {hint}")
    (run_dir / ERROR_FILE).write_text(str(err) + "\n")
    raise err


class RoundFailed(FedLLMError):
    """A round ended with too few valid replies, retries included."""


def save_checkpoint(run_dir: Path, cfg: Config, server_round: int, gstate: Any, strategy: Any, outer: Any,
                    books: Any, rows: list[dict[str, Any]]) -> None:
    checkpoint.save(run_dir, {
        "round": server_round,
        "config": cfg.to_flat(),
        "global": gstate.checkpoint(),
        "strategy": checkpoint.object_state(strategy),
        "wrapper": checkpoint.object_state(outer) if outer is not strategy else {},
        "rng": checkpoint.rng_state(),
        "ledger": books.cursor() if books is not None else None,
        "metrics": rows,
    })


def needs_validation(cfg: Config) -> bool:
    """Whether the ledger's scorer evaluates subsets of updates on held-out examples."""
    return cfg.ledger.enabled and cfg.ledger.scorer != "cosine"


def save_merged(model: Any, tokenizer: Any, path: Path) -> None:
    """Save a full model that loads with AutoModelForCausalLM; a PEFT model's adapters are
    merged into a copy, so the cached model keeps them."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def with_dp(strategy: Any, cfg: Config) -> Any:
    """Wrap in Flower's client-side fixed-clipping DP strategy when dp.clipping-norm > 0: each
    client clips its update to that norm, the server adds Gaussian noise to the aggregate."""
    if cfg.dp.clipping_norm <= 0:
        return strategy
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    return DifferentialPrivacyClientSideFixedClipping(
        strategy, cfg.dp.noise_multiplier, cfg.dp.clipping_norm, cfg.dp.sampled_clients or cfg.server.min_clients)


def strategy_class(cfg: Config) -> type:
    """The strategy class for server.strategy, checked against the update kind.

    Raises:
        ConfigError: naming server.strategy for an unknown name or the wrong update kind.
    """
    from strategies import FedKSeed

    name, cls = strategy_name(cfg), get_strategy(strategy_name(cfg))
    seeds = isinstance(cls, type) and issubclass(cls, FedKSeed)
    if seeds != (cfg.train.method == "zo"):
        raise ConfigError(f"server.strategy: {name!r} aggregates {'seed scalars' if seeds else 'LoRA updates'}, "
                          f"but train.method={cfg.train.method}")
    return cls


def strategy_name(cfg: Config) -> str:
    """server.strategy, or the default for the update kind (fedavg for lora, fedkseed for zo)."""
    return cfg.server.strategy or {"lora": "fedavg", "zo": "fedkseed"}[cfg.train.method]


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
        run(grid, cfg)

    return server_app


app = make_app()
