"""Flower ServerApp: rounds of sample -> local LoRA -> aggregate -> evaluate -> log.

Started by Flower (`flwr run .`) or by `fedllm simulate`. Writes a run directory:
config.json, metrics.jsonl (one line per round), adapter/ (PEFT format), merged/ on request.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedllm.config import Config
from fedllm.data import load_splits
from fedllm.evaluate import evaluate
from fedllm.report import MetricsLog, format_summary, make_run_dir, summary
from fedllm.updates import lora
from strategies import get_strategy

log = logging.getLogger(__name__)


def run(grid: Grid, cfg: Config) -> Path:
    """Run the federated rounds; returns the run directory."""
    run_dir = make_run_dir(cfg)
    log.info("run directory: %s", run_dir)
    # The server holds the base model only to evaluate or merge; otherwise the adapter is all.
    if cfg.server.evaluate or cfg.server.merge:
        model, tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
        state = lora.adapter_state(model)
    else:
        model = tokenizer = None
        state = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)
    _, held_out = load_splits(cfg.data)
    strategy = get_strategy(cfg.server.strategy)(cfg)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    n_rounds = cfg.server.num_rounds

    def evaluate_state(server_round: int) -> dict[str, float]:
        every = cfg.server.eval_every
        if not cfg.server.evaluate or (
                server_round not in (0, n_rounds) and (every <= 0 or server_round % every)):
            return {}
        lora.set_adapter_state(model, state)
        return evaluate(model, tokenizer, held_out, cfg.data, cfg.server.eval_batch_size,
                        cfg.server.exact_match_examples, cfg.server.max_new_tokens)

    start = evaluate_state(0)
    metrics.write({"round": 0, **start})
    log.info("round 0/%d: eval loss %s, exact match %s", n_rounds, _fmt(start.get("eval-loss")),
             _fmt(start.get("exact-match")))
    for server_round in range(1, n_rounds + 1):
        t0 = time.perf_counter()
        messages = list(strategy.configure_train(
            server_round, ArrayRecord(state), ConfigRecord(cfg.to_flat()), grid))
        down = {str(m.metadata.dst_node_id): m.content.array_records["arrays"].count_bytes() for m in messages}
        replies = list(grid.send_and_receive(messages, timeout=cfg.server.round_timeout))
        arrays, agg = strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            state = arrays.to_torch_state_dict()
        train_seconds = time.perf_counter() - t0
        ev = evaluate_state(server_round)
        row: dict[str, Any] = {
            "round": server_round,
            **{k: v for k, v in (agg or {}).items()},
            **ev,
            "bytes-down": down,
            "bytes-up": {str(u.node_id): u.bytes_up for u in getattr(strategy, "updates", [])},
            "clients": {str(u.node_id): u.metrics for u in getattr(strategy, "updates", [])},
            "dropped": [{"node": str(n), "reason": r} for n, r in getattr(strategy, "dropped", [])],
            "train-seconds": round(train_seconds, 3),
            "round-seconds": round(time.perf_counter() - t0, 3),
        }
        metrics.write(row)
        log.info("round %d/%d: train loss %s, eval loss %s, exact match %s (%.1f s)", server_round,
                 n_rounds, _fmt(row.get("train-loss")), _fmt(row.get("eval-loss")),
                 _fmt(row.get("exact-match")), row["round-seconds"])
    lora.save_adapter(state, cfg.model, cfg.lora, run_dir / "adapter")
    if cfg.server.merge:
        merge(model, tokenizer, state, run_dir / "merged")
    s = summary(metrics.rows)
    (run_dir / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    log.info("summary of %s\n%s", run_dir, format_summary(s))
    return run_dir


def merge(model: Any, tokenizer: Any, state: dict, path: Path) -> None:
    """Save base + adapter as one model that loads with AutoModelForCausalLM."""
    lora.set_adapter_state(model, state)
    merged = copy.deepcopy(model).merge_and_unload()  # a copy: the cached model keeps its adapter
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is the run_config with `overrides` on top."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = Config.from_flat({**dict(context.run_config), **dict(overrides or {})})
        run(grid, cfg)

    return server_app


app = make_app()
