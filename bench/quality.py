"""How much does federation give up against centralized training on the same samples?

    python bench/quality.py [--seeds 0,1,2] [--clients 8] [--rounds 2] [--steps 2] [--only ROW,...] [--out FILE]

SmolLM2-135M-Instruct, the built-in suite (7 families), `--clients` clients. Every row trains
on the same pooled samples with the same number of optimizer steps per sample: the federated
rows run `rounds x clients x steps` client steps of `batch` examples; the centralized row is
one client holding the pooled data and taking the same `rounds x clients x steps` steps in one
go (one AdamW state, the same learning rate). Rows: centralized LoRA; FedAvg, FedProx, FedAdam
and exact-lora with IID, Dirichlet (alpha 0.3) and by-task partitions; FedKSeed (zo, by task),
also with ten times the local steps (ten times the samples: outside the same-samples rule, said so).
Seeds vary the generated data, the partition and the training seed. Runs go through
`fedllm.server.loop.run` on an in-process grid (the same ServerApp and client code as a
simulation, without Ray: this measures learning, not system overhead).

Per row: the eval-loss gain (before - after, held-out split) as a fraction of the centralized
gain of the same seed, mean and 95% t-interval over the seeds; exact match and Rouge-L after;
bytes on the wire. For zo, a one-sided paired t-test of eval loss before vs after over the seeds.
Goals: FedAvg by task >= 0.95 of the centralized gain; zo's gain real at p < 0.05.
Each finished run is kept in the JSON, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_suffix(".json")

COMMON = {"data.train-per-family": 48, "data.eval-per-family": 8, "server.exact-match-examples": 14,
          "train.batch-size": 4, "train.lr": 0.002, "lora.rank": 8, "server.min-clients": 1,
          "server.checkpoint": False, "server.eval-every": 0}
PARTITIONS = {"iid": {"data.partition": "iid"}, "dirichlet-0.3": {"data.partition": "dirichlet", "data.alpha": 0.3},
              "task": {"data.partition": "task"}}
STRATEGIES = {"fedavg": {"server.strategy": "fedavg"},
              "fedprox": {"server.strategy": "fedprox", "strategy.proximal-mu": 0.01},
              "fedadam": {"server.strategy": "fedadam", "strategy.server-lr": 0.01},
              "exact-lora": {"train.method": "exact-lora"}}
ZO = {"train.method": "zo", "data.partition": "task", "zo.num-seeds": 4096, "zo.dist": "rademacher",
      "zo.lr": 6e-6, "zo.eps": 1e-3}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def rows(clients: int, rounds: int, steps: int) -> dict[str, tuple[int, dict[str, Any]]]:
    """Row name -> (clients, overrides)."""
    out = {"centralized": (1, {"server.num-rounds": 1, "train.local-steps": rounds * clients * steps})}
    for s, s_over in STRATEGIES.items():
        for p, p_over in PARTITIONS.items():
            out[f"{s} {p}"] = (clients, {"server.num-rounds": rounds, "train.local-steps": steps, **s_over, **p_over})
    # what closes FedAvg's gap at the same samples and steps: a server step larger than the mean
    # delta (FedAvg with server learning rate 4, no momentum: the mean of 8 clients' deltas x 4)
    out["fedavg task server-lr 4"] = (clients, {"server.num-rounds": rounds, "train.local-steps": steps,
                                                 "server.strategy": "fedavgm", "strategy.server-lr": 4.0,
                                                 "strategy.momentum": 0.0, **PARTITIONS["task"]})
    # the same samples through more, smaller rounds: a quarter of the clients per round (sampled),
    # four times the rounds: more sequential steps, which is what FedAvg gives up
    out["fedavg task 4x rounds quarter clients"] = (clients, {
        "server.num-rounds": 4 * rounds, "server.fraction-train": 0.25, "train.local-steps": steps,
        "server.strategy": "fedavg", **PARTITIONS["task"]})
    out["zo task"] = (clients, {"server.num-rounds": rounds, "train.local-steps": steps, **ZO})
    # zo's steps are two forward passes each, and one random direction learns little: the same
    # rounds with ten times the local steps (ten times the samples) shows what zo needs
    out["zo task 10x steps"] = (clients, {"server.num-rounds": rounds, "train.local-steps": 10 * steps, **ZO})
    return out


def one_run(name: str, clients: int, over: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
    from fedllm.config import Config
    from fedllm.server.grid import LocalGrid
    from fedllm.reporting.runlog import read_metrics, summary
    from fedllm.server.loop import run

    cfg = Config.from_flat({**COMMON, **over, "data.seed": seed, "train.seed": seed, "server.run-dir": str(workdir),
                            "server.run-name": f"{name.replace(' ', '-')}-seed{seed}"})
    t0 = time.perf_counter()
    run_dir = run(LocalGrid(clients), cfg)
    s = summary(read_metrics(run_dir))
    last = read_metrics(run_dir)[-1]
    return {"row": name, "seed": seed, "before": s["eval-loss-before"], "after": s["eval-loss-after"],
            "exact-match": s["exact-match-after"], "exact-match-before": s["exact-match-before"],
            "rouge-l": last.get("rouge-l"), "families": last.get("families"),
            "bytes": s["bytes-up-total"] + s["bytes-down-total"], "seconds": round(time.perf_counter() - t0, 1)}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def table(results: list[dict[str, Any]], names: list[str]) -> tuple[list[dict[str, Any]], str]:
    from scipy import stats

    central = {r["seed"]: r["before"] - r["after"] for r in results if r["row"] == "centralized"}
    lines = ["| row | gain / centralized (95% CI) | eval loss after | exact match | Rouge-L | MB on the wire | seeds |",
             "|---|---|---|---|---|---|---|"]
    summary_rows = []
    for name in names:
        mine = sorted((r for r in results if r["row"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        fractions = [(r["before"] - r["after"]) / central[r["seed"]] for r in mine if r["seed"] in central]
        frac, half = interval(fractions) if fractions else (math.nan, math.nan)
        row = {"row": name, "seeds": [r["seed"] for r in mine], "fraction": frac, "fraction-ci95": half,
               "fractions": fractions, "after": statistics.fmean(r["after"] for r in mine),
               "before": statistics.fmean(r["before"] for r in mine),
               "exact-match": statistics.fmean(r["exact-match"] for r in mine),
               "rouge-l": statistics.fmean(r["rouge-l"] or 0.0 for r in mine),
               "megabytes": statistics.fmean(r["bytes"] for r in mine) / 1e6}
        if len(mine) >= 2:
            test = stats.ttest_rel([r["before"] for r in mine], [r["after"] for r in mine], alternative="greater")
            row["paired-p"] = float(test.pvalue)
        summary_rows.append(row)
        ci = f"{frac:.3f} ± {half:.3f}" if not math.isnan(half) else f"{frac:.3f}"
        lines.append(f"| {name} | {ci} | {row['after']:.4f} (before {row['before']:.4f}) | {row['exact-match']:.3f} | "
                     f"{row['rouge-l']:.3f} | {row['megabytes']:.2f} | {len(mine)} |")
    return summary_rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="local steps per client per round")
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    plan = rows(opts.clients, opts.rounds, opts.steps)
    names = [n.strip() for n in opts.only.split(",") if n.strip()] or list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(plan)}")
    setup = {"clients": opts.clients, "rounds": opts.rounds, "steps": opts.steps, "common": COMMON}
    done: list[dict[str, Any]] = []
    if opts.out.exists() and not opts.fresh:
        old = json.loads(opts.out.read_text())
        if old.get("setup") == setup:
            done = old["runs"]
    seeds = [int(s) for s in opts.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name in ["centralized"] + [n for n in names if n != "centralized"]:  # the reference first
                if any(r["row"] == name and r["seed"] == seed for r in done):
                    continue
                clients, over = plan[name]
                result = one_run(name, clients, over, seed, Path(tmp))
                done.append(result)
                print(f"seed {seed} {name:24} eval loss {result['before']:.4f} -> {result['after']:.4f}, exact match "
                      f"{result['exact-match']:.3f}, {result['seconds']:.0f} s", flush=True)
                summary_rows, _ = table(done, list(plan))
                opts.out.write_text(json.dumps({"setup": setup, "runs": done, "rows": summary_rows}, indent=1) + "\n")
    summary_rows, text = table(done, list(plan))
    opts.out.write_text(json.dumps({"setup": setup, "runs": done, "rows": summary_rows}, indent=1) + "\n")
    print(text)
    for row in summary_rows:
        if row["row"] == "fedavg task":
            print(f"goal FedAvg by task >= 0.95 of the centralized gain: {row['fraction']:.3f} "
                  f"({'met' if row['fraction'] >= 0.95 else 'missed'})")
        if row["row"] == "zo task" and "paired-p" in row:
            print(f"goal zo gain real (paired one-sided t-test p < 0.05): p = {row['paired-p']:.4f} "
                  f"({'met' if row['paired-p'] < 0.05 else 'missed'})")


if __name__ == "__main__":
    main()
