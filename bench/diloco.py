"""Streaming DiLoCo against full-parameter FedAvg and plain DiLoCo, at the same inner steps.

    python bench/diloco.py [--steps 32] [--inner-steps 16] [--clients 4] [--only ROW,...] [--out FILE]

SmolLM2-135M-Instruct, full parameters, the built-in suite, `--clients` clients partitioned by
task (non-IID). Every row runs `--steps` inner AdamW steps per client (batch 4, lr 2e-5), the
clients keeping their AdamW states from round to round:
- fedavg-full: the parameters averaged after every inner step (diloco with H = 1, P = 1, outer
  lr 1, no momentum: FedAvg of the full model, one step a round);
- diloco: H = --inner-steps, P = 1, outer Nesterov SGD (lr 0.7, momentum 0.9);
- streaming: the same H, P = 4 strided fragments, tau = 0 (a round is H / 4 steps);
- streaming-overlap: P = 4, tau = 1, alpha = 0.5 (the fragment's global merged one round late);
- streaming-4bit: P = 4, tau = 0, outer gradients and outer steps as quantize(4) (4-bit codes,
  a float scale per 64 values) both ways, with error feedback.
In every streaming row the run's last round syncs every fragment (diloco.final-sync, the
default): each client first merges every global it holds (tau = 1: the fragment of the round
before, one round early), runs its H / P steps and uploads the whole model's local - snapshot;
the server takes each fragment's outer step with its own momentum. So no fragment ends without
the clients' last steps (at H = 16, P = 4, 32 steps: 12, 8 and 4 of them on three fragments), and
that one round uploads the whole model.
Runs go through `fedllm.server.loop.run` on an in-process grid (the ServerApp and client code of a
simulation, without Ray; each node's state waits on disk between its rounds, so that the 4
clients' full-model states do not all sit in memory). Columns: eval loss and exact match after (held-out split), total bytes
up and down, the most bytes on the wire in one round (up + down, all clients) except a streaming
row's last round, that last round's bytes, wall time, and a client's peak RSS: one client's first
two rounds run in a process of their own (its model, AdamW state, snapshot and held fragments; no
server), as a SuperNode's ClientApp would.
Goals: streaming's peak round except the last = diloco's / P (the largest fragment's share,
exact on the wire), total bytes at least 100x below fedavg-full, and streaming's eval loss
within 2% of diloco's.
Each finished row is kept in the JSON, so an interrupted bench continues where it stopped;
--fresh runs the --only rows (every row without --only) again and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rows import kept, peak_rss_mb, run_rows, save

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_suffix(".json")

COMMON = {"train.method": "diloco", "diloco.params": "full", "data.partition": "task", "data.train-per-family": 48,
          "data.eval-per-family": 8, "server.exact-match-examples": 14, "train.batch-size": 4, "train.lr": 2e-5,
          "server.min-clients": 1, "server.checkpoint": False, "server.eval-every": 0}
Q4 = "quantize(4)"


def rows(inner: int) -> dict[str, dict[str, Any]]:
    """Row name -> overrides."""
    return {
        "fedavg-full": {"diloco.inner-steps": 1, "diloco.fragments": 1, "diloco.outer-lr": 1.0, "diloco.momentum": 0.0,
                        "diloco.nesterov": False},
        "diloco": {"diloco.inner-steps": inner, "diloco.fragments": 1},
        "streaming": {"diloco.inner-steps": inner, "diloco.fragments": 4},
        "streaming-overlap": {"diloco.inner-steps": inner, "diloco.fragments": 4, "diloco.tau": 1, "diloco.alpha": 0.5},
        "streaming-4bit": {"diloco.inner-steps": inner, "diloco.fragments": 4, "compression.up": Q4,
                           "compression.down": Q4},
    }


def one_run(name: str, clients: int, steps: int, over: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from fedllm.config import Config
    from fedllm.server.grid import LocalGrid
    from fedllm.reporting.runlog import read_metrics, summary
    from fedllm.server.loop import run

    per_round = over["diloco.inner-steps"] // over["diloco.fragments"]
    cfg = Config.from_flat({**COMMON, **over, "server.num-rounds": steps // per_round,
                            "server.run-dir": str(workdir), "server.run-name": name})
    t0 = time.perf_counter()
    run_dir = run(LocalGrid(clients, spill=workdir / f"{name}-spill"), cfg)  # one node's state in memory at a time
    seconds = time.perf_counter() - t0
    metrics = read_metrics(run_dir)
    s = summary(metrics)
    rounds = [r for r in metrics if r["round"] > 0]
    up = [sum(r["bytes-up"].values()) for r in rounds]
    per = [u + sum(r["bytes-down"].values()) for u, r in zip(up, rounds)]
    # a streaming run's last round syncs every fragment (the whole model up): reported on its own
    ordinary = slice(0, -1) if cfg.diloco.final_sync and cfg.diloco.fragments > 1 else slice(None)
    return {"row": name, "rounds": cfg.server.num_rounds, "eval-loss-before": s["eval-loss-before"],
            "eval-loss": s["eval-loss-after"], "exact-match": s["exact-match-after"],
            "exact-match-before": s["exact-match-before"], "bytes-up": s["bytes-up-total"],
            "bytes-down": s["bytes-down-total"], "peak-round-bytes": max(per[ordinary], default=0),
            "peak-up-bytes": max(up[ordinary], default=0), "final-round-bytes": per[-1], "final-up-bytes": up[-1],
            "seconds": round(seconds, 1),
            "client-peak-rss-mb": client_rss(over)}


def client_rss(over: dict[str, Any]) -> float:
    """Peak RSS (MB) of a process that runs one client's first two rounds."""
    out = subprocess.run([sys.executable, __file__, "--client-rounds", json.dumps(over)], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    return float(out.strip().splitlines()[-1])


def client_rounds(over: dict[str, Any]) -> None:
    """One client's rounds 1 and 2, messages built as the server half builds them (round 2
    brings the global of the fragment round 1 synced); prints the peak RSS in MB."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from fedllm.client.round import handle
    from fedllm.config import Config
    from fedllm.methods.diloco import engine
    from fedllm.protocol import ARRAYS, CONFIG, DILOCO

    cfg = Config.from_flat({**COMMON, **over})
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 4})
    p = cfg.diloco.fragments
    for r in (1, 2):
        info = {"round": r, "fragment": engine.fragment_of(r, p), "version": r - 1, "base": 0,
                "rounds": [1] if r == 2 else [], "synced": [engine.fragment_of(1, p)] if r == 2 else [],
                "kind": "values"}
        state = engine.initial_state(cfg)
        keys = engine.fragments(state, p, cfg.diloco.pattern)[engine.fragment_of(1, p)] if r == 2 else []
        handle(RecordDict({CONFIG: ConfigRecord({**cfg.to_flat(), "server-round": r}), DILOCO: ConfigRecord(info),
                           ARRAYS: ArrayRecord({k: t.clone() for k, t in engine.take(state, keys, p).items()})}),
               context)
    print(peak_rss_mb())


def largest_share(fragments: int) -> float:
    """The largest of the P fragments' share of SmolLM2's parameters (by `engine.fragments`): what
    one streaming round moves at most, against a plain DiLoCo round."""
    from fedllm.config import Config
    from fedllm.methods.diloco import engine

    cfg = Config.from_flat({**COMMON, "diloco.fragments": fragments})
    state = engine.initial_state(cfg)
    sizes = [sum(t.numel() for t in engine.take(state, part, fragments).values())
             for part in engine.fragments(state, fragments, "strided")]
    return max(sizes) / sum(t.numel() for t in state.values())


def table(results: dict[str, dict[str, Any]], fragments: int) -> tuple[dict[str, Any], str]:
    lines = [f"{'row':18} {'rounds':>6} {'eval loss':>9} {'EM':>6} {'up MB':>9} {'down MB':>9} {'peak round MB':>13} "
             f"{'last round MB':>13} {'seconds':>8} {'client RSS MB':>13}"]
    for name, r in results.items():
        last = f"{r['final-round-bytes'] / 1e6:>13.2f}" if "final-round-bytes" in r else f"{'-':>13}"  # older rows
        lines.append(f"{name:18} {r['rounds']:>6} {r['eval-loss']:>9.4f} {r['exact-match']:>6.3f} "
                     f"{r['bytes-up'] / 1e6:>9.1f} {r['bytes-down'] / 1e6:>9.1f} {r['peak-round-bytes'] / 1e6:>13.2f} "
                     f"{last} {r['seconds']:>8.1f} {r['client-peak-rss-mb']:>13.0f}")
    goals: dict[str, Any] = {}
    if {"diloco", "streaming"} <= set(results):
        d, s = results["diloco"], results["streaming"]
        goals["peak-ratio streaming/diloco"] = s["peak-round-bytes"] / d["peak-round-bytes"]
        goals["largest fragment's share"] = largest_share(fragments)
        goals["peak-ratio / largest fragment's share"] = goals["peak-ratio streaming/diloco"] / goals[
            "largest fragment's share"]
        if "peak-up-bytes" in d and "peak-up-bytes" in s:  # one direction: also fair when diloco has one round
            goals["peak-up-ratio / largest fragment's share"] = s["peak-up-bytes"] / d["peak-up-bytes"] / goals[
                "largest fragment's share"]
        goals["peak-ratio ideal 1/P"] = 1 / fragments
        goals["streaming peak round bytes except the final round"] = s["peak-round-bytes"]
        if "final-round-bytes" in s:
            goals["streaming final round bytes"] = s["final-round-bytes"]
            goals["streaming final round / diloco's peak round"] = s["final-round-bytes"] / d["peak-round-bytes"]
        goals["eval-loss streaming/diloco"] = s["eval-loss"] / d["eval-loss"]
        if "streaming-overlap" in results:
            goals["eval-loss overlap/diloco"] = results["streaming-overlap"]["eval-loss"] / d["eval-loss"]
    if "fedavg-full" in results:
        full = results["fedavg-full"]
        total = full["bytes-up"] + full["bytes-down"]
        for name in ("diloco", "streaming", "streaming-4bit"):
            if name in results:
                goals[f"total-bytes fedavg-full/{name}"] = total / (results[name]["bytes-up"] + results[name]["bytes-down"])
    lines += [f"{k}: {v:.4g}" for k, v in goals.items()]
    checks = [("eval-loss streaming/diloco", "<= 1.02", lambda v: v <= 1.02),
              ("peak-up-ratio / largest fragment's share", "= 1 (except the final round)",
               lambda v: abs(v - 1) < 0.005)]
    lines += [f"goal {k} {want}: {'met' if ok(goals[k]) else 'missed'}" for k, want, ok in checks if k in goals]
    return goals, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32, help="inner steps per client, every row")
    ap.add_argument("--inner-steps", type=int, default=16, help="H of the diloco and streaming rows")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--only", default="", help="rows, comma separated")
    ap.add_argument("--fresh", action="store_true", help="run the --only rows (all rows without --only) again, "
                    "keeping the other rows of --out")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--rss-only", action="store_true", help="measure the client peak RSS of the rows in --out again")
    ap.add_argument("--client-rounds", default="", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.client_rounds:
        return client_rounds(json.loads(opts.client_rounds))
    logging.basicConfig(level=logging.WARNING)
    setup = {"steps": opts.steps, "inner-steps": opts.inner_steps, "clients": opts.clients, "common": COMMON}
    wanted = [n for n in opts.only.split(",") if n] or list(rows(opts.inner_steps))
    done = kept(opts.out, setup, False)
    if opts.fresh:
        done = {k: v for k, v in done.items() if k not in wanted}
    if opts.rss_only:
        for name in wanted:
            if name in done:
                done[name]["client-peak-rss-mb"] = client_rss(rows(opts.inner_steps)[name])
                print(name, done[name]["client-peak-rss-mb"], flush=True)
    with tempfile.TemporaryDirectory(prefix="fedllm-diloco-") as tmp:
        run_rows(wanted, done, lambda name: one_run(name, opts.clients, opts.steps, rows(opts.inner_steps)[name],
                                                    Path(tmp)), opts.out, setup)
    results = {n: done[n] for n in rows(opts.inner_steps) if n in done}
    goals, text = table(results, 4)
    print(text)
    save(opts.out, setup, done, goals=goals, table=text)


if __name__ == "__main__":
    main()
