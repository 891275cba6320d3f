"""Federated DPO against centralized DPO on the same preference pairs and steps, from the base and
from the demo's SFT adapter.

    python bench/dpo.py [--rounds 3] [--steps 8] [--clients 4] [--only ROW,...] [--fresh] [--out FILE]

SmolLM2-135M-Instruct, LoRA r=8 on q_proj and v_proj, the built-in preference suite (every
built-in example with a plausible wrong answer as the rejected one), partitioned by task family
(non-IID). Rows:
- sft: the demo's SFT run (`make demo`'s settings: 4 clients, 4 rounds x 10 steps, FedAvg); its
  adapter is where the *-sft rows start (server.init-from);
- central-base / central-sft: one client holding every pair, `--rounds` rounds of `--clients` x
  `--steps` DPO steps;
- fed-base / fed-sft: `--clients` clients, `--rounds` rounds of `--steps` DPO steps each, FedAvg
  (the same pairs and the same number of optimizer steps of the same batch size as central);
- central-sft-rpo / fed-sft-rpo: the *-sft rows with dpo.loss-type=sigmoid,sft (DPO plus the
  chosen answers' token NLL, RPO: Pang et al., 2024), which keeps the chosen answers likely.
DPO: TRL's sigmoid loss, beta 0.1, lr 5e-4, batch 4, reference = the round's global adapter.
Runs go through `fedllm.server.loop.run` on an in-process grid. Columns (held-out split, after the
last round, round 0 in parentheses where it differs): reward accuracy and margin (implicit rewards
against the run's starting model), preference accuracy (the policy's own likelihoods), exact match,
eval loss, total bytes up and down, wall time.
Goals: a federated row's reward-accuracy gain over its start >= 0.9 x the centralized row's from
the same start; its exact match not below its start's by more than 0.02.
Each finished row is kept in the JSON, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_suffix(".json")
sys.path.insert(0, str(ROOT / "examples" / "simulation"))
from rows import kept, run_rows, save  # noqa: E402
from run_demo import COMMON as DEMO_COMMON, PRESETS  # noqa: E402  (the demo's SFT settings)

DPO = {"train.method": "dpo", "dpo.beta": 0.1, "train.lr": 5e-4, "train.batch-size": 4, "lora.rank": 8,
       "server.min-clients": 1, "server.checkpoint": False, "server.eval-every": 0}


def rows(clients: int, rounds: int, steps: int, sft_adapter: str) -> dict[str, dict[str, Any]]:
    """Row name -> (grid clients, overrides)."""
    central = {**DPO, "server.num-rounds": rounds, "train.local-steps": clients * steps}
    fed = {**DPO, "server.num-rounds": rounds, "train.local-steps": steps}
    sft = {"server.init-from": sft_adapter}
    rpo = {"dpo.loss-type": "sigmoid,sft"}  # DPO plus the chosen answers' NLL (RPO, Pang et al., 2024)
    return {
        "central-base": {"clients": 1, **central},
        "fed-base": {"clients": clients, **fed},
        "central-sft": {"clients": 1, **central, **sft},
        "fed-sft": {"clients": clients, **fed, **sft},
        "central-sft-rpo": {"clients": 1, **central, **sft, **rpo},
        "fed-sft-rpo": {"clients": clients, **fed, **sft, **rpo},
    }


def one_run(name: str, over: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from fedllm.config import Config
    from fedllm.server.grid import LocalGrid
    from fedllm.reporting.runlog import read_metrics, summary
    from fedllm.server.loop import run

    over = dict(over)
    clients = over.pop("clients")
    cfg = Config.from_flat({**DEMO_COMMON, **over, "server.run-dir": str(workdir), "server.run-name": name})
    t0 = time.perf_counter()
    run_dir = run(LocalGrid(clients), cfg)
    seconds = time.perf_counter() - t0
    metrics = read_metrics(run_dir)
    s = summary(metrics)
    out = {"row": name, "clients": clients, "rounds": cfg.server.num_rounds, "local-steps": cfg.train.local_steps,
           "seconds": round(seconds, 1), "bytes": s["bytes-total"], "run-dir": str(run_dir)}
    for key in ("eval-loss", "exact-match", "reward-accuracy", "reward-margin", "preference-accuracy"):
        out[key], out[f"{key}-start"] = s.get(f"{key}-after"), s.get(f"{key}-before")
    return out


def sft_run(workdir: Path) -> dict[str, Any]:
    """The demo's SFT run, in process; its adapter folder is what the *-sft rows start from."""
    from fedllm.config import Config
    from fedllm.server.grid import LocalGrid
    from fedllm.reporting.runlog import read_metrics, summary
    from fedllm.server.loop import run

    cfg = Config.from_flat({**DEMO_COMMON, **PRESETS["lora"], "server.min-clients": 1, "server.eval-every": 0,
                            "server.run-dir": str(workdir), "server.run-name": "sft"})
    t0 = time.perf_counter()
    run_dir = run(LocalGrid(4), cfg)
    s = summary(read_metrics(run_dir))
    return {"row": "sft", "seconds": round(time.perf_counter() - t0, 1), "adapter": str(run_dir / "adapter"),
            "eval-loss": s["eval-loss-after"], "exact-match": s["exact-match-after"], "bytes": s["bytes-total"]}


def table(results: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    lines = [f"{'row':15} {'reward acc':>16} {'margin':>8} {'pref acc':>14} {'exact match':>14} "
             f"{'eval loss':>16} {'MB':>7} {'seconds':>8}"]
    for name, r in results.items():
        if name == "sft":
            lines.append(f"{name:15} {'':>16} {'':>8} {'':>14} {r['exact-match']:>14.3f} {r['eval-loss']:>16.4f} "
                         f"{r['bytes'] / 1e6:>7.1f} {r['seconds']:>8.1f}")
            continue
        lines.append(f"{name:15} {r['reward-accuracy']:>6.3f} ({r['reward-accuracy-start']:.3f}) "
                     f"{r['reward-margin']:>8.3f} {r['preference-accuracy']:>6.3f} ({r['preference-accuracy-start']:.3f})"
                     f" {r['exact-match']:>6.3f} ({r['exact-match-start']:.3f}) {r['eval-loss']:>7.4f} "
                     f"({r['eval-loss-start']:.4f}) {r['bytes'] / 1e6:>7.1f} {r['seconds']:>8.1f}")
    goals: dict[str, Any] = {}
    for start in ("base", "sft", "sft-rpo"):
        fed, central = results.get(f"fed-{start}"), results.get(f"central-{start}")
        if fed is None or central is None:
            continue
        gain_c = central["reward-accuracy"] - central["reward-accuracy-start"]
        gain_f = fed["reward-accuracy"] - fed["reward-accuracy-start"]
        goals[f"{start}: reward-accuracy gain fed / central"] = gain_f / gain_c if gain_c else float("nan")
        goals[f"{start}: exact match fed - start"] = fed["exact-match"] - fed["exact-match-start"]
        goals[f"{start}: exact match central - start"] = central["exact-match"] - central["exact-match-start"]
    lines += [f"{k}: {v:.4g}" for k, v in goals.items()]
    return goals, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="DPO steps per client per round (federated rows)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--only", default="", help="rows, comma separated (sft is run when a *-sft row needs it)")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows already in --out")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run directories here (default: temporary)")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup = {"rounds": opts.rounds, "steps": opts.steps, "clients": opts.clients, "dpo": DPO}
    done = kept(opts.out, setup, opts.fresh)
    names = list(rows(opts.clients, opts.rounds, opts.steps, ""))
    wanted = [n for n in opts.only.split(",") if n] or names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        sys.exit(f"--only: unknown rows {', '.join(unknown)} (rows: {', '.join(names)})")
    with tempfile.TemporaryDirectory(prefix="fedllm-dpo-") as tmp:
        workdir = opts.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        needs_sft = any(n.endswith("-sft") and n not in done for n in wanted)
        adapter = done.get("sft", {}).get("adapter")
        if needs_sft and not (adapter and Path(adapter).is_dir()):  # (again: its folder was temporary)
            done.pop("sft", None)
            run_rows(["sft"], done, lambda _: sft_run(workdir), opts.out, setup)
        plan = rows(opts.clients, opts.rounds, opts.steps, done.get("sft", {}).get("adapter", ""))
        run_rows(wanted, done, lambda name: one_run(name, plan[name], workdir), opts.out, setup)
    results = {n: done[n] for n in ["sft", *names] if n in done}
    goals, text = table(results)
    print(text)
    save(opts.out, setup, done, goals=goals, table=text)


if __name__ == "__main__":
    main()
