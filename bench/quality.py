"""Does federation match centralized training? At equal epochs, and on the same samples.

    python bench/quality.py [--table epochs|samples] [--seeds 0,1,2] [--epochs 1,2,4] [--only ROW,...] [--out FILE]

SmolLM2-135M-Instruct, the built-in suite (7 families), LoRA r=8 on q,v, 8 clients. Runs go
through `fedllm.server.loop.run` on an in-process grid (the ServerApp and client code of a
simulation, without Ray: this measures learning, not system overhead). Seeds vary the generated
data, the partition and the training seed.

**Equal epochs** (`--table epochs`, the default): 8 training examples a family (56 in all; 6 a
family held out), batch 1, so one epoch over the pooled data is 56 optimizer steps of the
centralized run, and 7 local steps of each of the 8 clients (8 x 7 = 56 examples). A federated row at E epochs runs
R rounds of s local steps with R x s = 7 E, every client in every round; centralized LoRA is one
client holding the pooled data for 56 E steps (one AdamW, its own tuned lr). Every row takes its
best (lowest eval loss) of a small grid, searched at 2 epochs with seed 0 and then used for every
seed and epoch count; rows marked "from" start from another row's best and search only their own
keys (GRID below states every grid). Evaluation every few rounds gives each run a curve of eval
loss against the bytes it had sent and the seconds its clients had worked; seed 0's runs at
2 epochs are drawn in bench/quality.png (one line per row). The zeroth-order rows
take twice the local steps of an epoch (two forward passes a step: about the client seconds of a
rule's round, on twice the samples). The zeroth-order and Ferret rows are also compared with the
best rule at equal client seconds: the best rule's gain
read off its curve at the row's client seconds (linear between evaluations; its final gain when
the row worked longer than the best rule's whole run). Client seconds are measured on whatever else
the machine was doing: compare them only between runs made under the same load.

**Same samples** (`--table samples`): the earlier setting: 48 examples a family, batch 4, 2 rounds
of 2 local steps, against one client taking the same 32 steps (rows FedAvg, FedProx, FedAdam and
exact-lora by IID, Dirichlet 0.3 and task partitions; FedKSeed, also with 10x steps).

**Personal adapters** (row personal, run by name): fedavg's best keys with `lora.personal=dual`, a
private LoRA adapter per client that never leaves it (its own steps at `lora.personal-lr=5e-4`).
Each client reports, on its own share of the held-out split, the loss of its personalised model
(global + private) and of the global adapter alone, at the last global state it received (the run's
last round). Goals: each client's personalised loss <= 0.9 of the global adapter's; the global
adapter's eval loss within 2% of fedavg's. It is no rule, and not compared at equal client seconds.

Per row: the eval-loss gain (before - after, held-out split) as a fraction of the centralized
gain of the same seed (and epochs), mean and 95% t-interval over the seeds; exact match and Rouge-L
after; bytes on the wire; the clients' seconds (summed). For zo, a one-sided paired t-test of eval
loss before vs after over the seeds. Goals: the best rule >= 0.98 of the centralized gain at 2
epochs (lower end of the interval >= 0.95); Ferret or the best zeroth-order row >= 0.5 of the best
rule's gain at equal client seconds with >= 100x fewer bytes; the defaults row (every learning
key at its default) >= 0.95 of the best rule's gain; SCAFFOLD (rows scaffold, scaffold step) >= the
gain of FedAvg on the same Dirichlet 0.1 partition (row fedavg dirichlet-0.1) with fedavg's keys. Each
finished run is kept in the JSON, so an interrupted bench continues where it stopped.
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
PLOT = Path(__file__).with_suffix(".png")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

# --- equal epochs --------------------------------------------------------------------------------
CLIENTS, PER_EPOCH = 8, 7  # clients; each one's local steps in an epoch (8 x 7 / 8 / 1)
EPOCHS = {"data.train-per-family": 8, "data.eval-per-family": 6, "server.exact-match-examples": 14,
          "train.batch-size": 1, "lora.rank": 8, "server.min-clients": 1, "server.checkpoint": False,
          "data.partition": "task"}
ZO = {"train.method": "zo", "zo.num-seeds": 4096, "zo.dist": "rademacher", "zo.lr": 6e-6, "zo.eps": 1e-3}
# row -> (the row whose best it starts from, its fixed keys, its grid: a list of variants; "steps" is s)
GRID: dict[str, tuple[str | None, dict[str, Any], list[dict[str, Any]]]] = {
    "centralized": (None, {}, [{"train.lr": lr} for lr in (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3)]),
    "fedavg": (None, {"server.strategy": "fedavg"},
               [{"steps": 7, "train.lr": 2e-3}, {"steps": 7, "train.lr": 4e-3}, {"steps": 1, "train.lr": 4e-3}]),
    "fedavg moments or cosine": ("fedavg", {}, [{"train.lr-schedule": "cosine"}, {"train.keep-optimizer": True}]),
    "fedadam": ("fedavg", {"server.strategy": "fedadam"}, [{"strategy.server-lr": 1e-2}]),
    # FedAvg's mean of deltas trained on different tasks moves each task by about 1 / clients of its
    # client's step: a server step larger than the mean (FedAvgM without momentum) restores it
    "fedavgm": ("fedavg moments or cosine", {},
                [{"server.strategy": f"fedavgm(lr={v}, momentum=0.0)"} for v in (1.5, 3.0)]),
    "fedprox": ("fedavg", {"server.strategy": "fedprox", "strategy.proximal-mu": 0.01}, [{}]),
    "exact-lora": ("fedavg", {"train.method": "exact-lora"}, [{}]),
    "fedavg dirichlet-0.3": ("fedavg", {"data.partition": "dirichlet", "data.alpha": 0.3}, [{}]),
    # SCAFFOLD against FedAvg at fedavg's best steps and lr, on a skewed Dirichlet partition; "scaffold" is
    # the brief's option II with the correction added to the gradient before AdamW, "scaffold step" adds
    # -lr (c - c_i) after AdamW's step (NVFlare's way: the units of (x - y) / sum eta); each the best of 2 or 7
    # local steps a round (7 or 2 rounds: the variates act from the second round on)
    "fedavg dirichlet-0.1": ("fedavg", {"data.partition": "dirichlet", "data.alpha": 0.1}, [{}, {"steps": 2}]),
    "scaffold": ("fedavg dirichlet-0.1", {"server.strategy": "scaffold"}, [{"steps": 7}, {"steps": 2}]),
    "scaffold step": ("fedavg dirichlet-0.1", {"server.strategy": "scaffold(correct=step)"},
                      [{"steps": 7}, {"steps": 2}]),
    "defaults": (None, {"steps": PER_EPOCH}, [{}]),  # every learning key at its default (lr 1e-3, fedavg)
    "zo": (None, {**ZO, "steps": PER_EPOCH, "step-multiple": 2}, [{}]),
    "zo sparse": (None, {**ZO, "zo.mask": 0.001, "steps": PER_EPOCH, "step-multiple": 2},
                  [{"zo.lr": v} for v in (1e-3, 1e-2)]),
    "zo sparse warm-up": ("zo sparse", {"zo.warmup-rounds": 1, "zo.warmup-lr": 1e-3}, [{}]),  # half the run first-order
    "ferret": ("fedavg", {"train.method": "ferret", "ferret.num-bases": 4096}, [{}]),
    # FedAvg's best with a private LoRA adapter per client (lora.personal=dual): each client's held-out share
    # under its personalised model against the global adapter alone, and the global adapter against fedavg's;
    # the private steps at 5e-4 (seed 0: 1e-3 gave a mean ratio 0.735, worst client 1.394; 4e-3 1.461, 3.773)
    "personal": ("fedavg", {"lora.personal": "dual", "lora.personal-lr": 5e-4}, [{}]),
}
# the best of these is "the best rule"
RULES = ("fedavg", "fedavg moments or cosine", "fedadam", "fedavgm", "fedprox", "exact-lora")
ORDER = ["centralized", "fedavg", "fedavg moments or cosine", "fedadam", "fedavgm", "defaults", "zo sparse", "ferret"]
# rows run by name (--only); plain FedKSeed perturbs all 135 M weights three times a step (about 10 s a step
# on 2 cores), which this table cannot afford: its figures are in the same-samples table
MORE = ["fedprox", "exact-lora", "fedavg dirichlet-0.3", "zo", "zo sparse warm-up", "fedavg dirichlet-0.1", "scaffold",
        "scaffold step"]
SKEWED = ("fedavg dirichlet-0.1", "scaffold", "scaffold step")  # rules on another partition: no equal-seconds row
MORE += ["personal"]

# --- same samples (the earlier table) -----------------------------------------------------------
SAMPLES = {"data.train-per-family": 48, "data.eval-per-family": 8, "server.exact-match-examples": 14,
           "train.batch-size": 4, "train.lr": 0.002, "lora.rank": 8, "server.min-clients": 1,
           "server.checkpoint": False, "server.eval-every": 0}
PARTITIONS = {"iid": {"data.partition": "iid"}, "dirichlet-0.3": {"data.partition": "dirichlet", "data.alpha": 0.3},
              "task": {"data.partition": "task"}}
STRATEGIES = {"fedavg": {"server.strategy": "fedavg"},
              "fedprox": {"server.strategy": "fedprox", "strategy.proximal-mu": 0.01},
              "fedadam": {"server.strategy": "fedadam", "strategy.server-lr": 0.01},
              "exact-lora": {"train.method": "exact-lora"}}


def sample_rows(rounds: int = 2, steps: int = 2) -> dict[str, tuple[int, dict[str, Any]]]:
    """The same-samples table: row -> (clients, overrides)."""
    out = {"centralized": (1, {**SAMPLES, "server.num-rounds": 1, "train.local-steps": rounds * CLIENTS * steps})}
    for s, s_over in STRATEGIES.items():
        for p, p_over in PARTITIONS.items():
            out[f"{s} {p}"] = (CLIENTS, {**SAMPLES, "server.num-rounds": rounds, "train.local-steps": steps,
                                         **s_over, **p_over})
    out["zo task"] = (CLIENTS, {**SAMPLES, "server.num-rounds": rounds, "train.local-steps": steps, **ZO,
                                **PARTITIONS["task"]})
    out["zo task 10x steps"] = (CLIENTS, {**SAMPLES, "server.num-rounds": rounds, "train.local-steps": 10 * steps,
                                          **ZO, **PARTITIONS["task"]})
    return out


def epoch_run(row: str, keys: dict[str, Any], epochs: int) -> tuple[int, dict[str, Any]]:
    """(clients, overrides) of `row` with its chosen keys at `epochs` epochs."""
    keys = dict(keys)
    if row == "centralized":
        return 1, {**EPOCHS, **keys, "server.num-rounds": 1, "train.local-steps": CLIENTS * PER_EPOCH * epochs,
                   "server.eval-every": 0}
    steps = keys.pop("steps")
    rounds = PER_EPOCH * epochs // steps
    steps *= keys.pop("step-multiple", 1)  # zo: more, cheaper steps, about the rules' client seconds
    return CLIENTS, {**EPOCHS, **keys, "server.num-rounds": rounds, "train.local-steps": steps,
                     "server.eval-every": max(1, rounds // 3)}


def one_run(name: str, clients: int, over: dict[str, Any], seed: int, workdir: Path) -> dict[str, Any]:
    from fedllm.config import Config
    from fedllm.reporting.runlog import client_seconds, personal_figures, read_metrics, summary
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = Config.from_flat({**over, "data.seed": seed, "train.seed": seed, "server.run-dir": str(workdir),
                            "server.run-name": f"{name.replace(' ', '-')}-seed{seed}-{time.time_ns()}"})
    t0 = time.perf_counter()
    rows = read_metrics(run(LocalGrid(clients), cfg))
    s = summary(rows)
    curve, sent, worked = [], 0, 0.0
    for r in rows:
        if r["round"] > 0:
            sent += sum(r.get("bytes-up", {}).values()) + sum(r.get("bytes-down", {}).values())
            worked += client_seconds(r)
        if "eval-loss" in r:
            curve.append([r["round"], sent, round(worked, 2), r["eval-loss"]])
    return {"row": name, "seed": seed, "before": s["eval-loss-before"], "after": s["eval-loss-after"],
            "exact-match": s["exact-match-after"], "rouge-l": s["rouge-l-after"], "bytes": s["bytes-total"],
            "client-seconds": round(s["client-seconds-total"], 1), "curve": curve,
            "seconds": round(time.perf_counter() - t0, 1), "overrides": over, **personal_of(rows, s, personal_figures)}


def personal_of(rows: list[dict[str, Any]], s: dict[str, Any], figures: Any) -> dict[str, Any]:
    """lora.personal: the clients' held-out figures of the last round they reported them (means, and
    each partition's [personalised, global adapter alone]); {} without them."""
    held = [r for r in rows if figures(r)]
    if not held:
        return {}
    clients = {str(int(m["partition-id"])): [m["personal-eval-loss"], m["global-eval-loss"]]
               for m in held[-1]["clients"].values() if "personal-eval-loss" in m}
    return {"personal": {"round": held[-1]["round"], "clients": clients,
                         **{k: s[f"{k}-after"] for k in ("personal-eval-loss", "global-eval-loss-clients",
                                                         "personal-ratio")}}}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def gain_at(curve: list[list[float]], seconds: float) -> float:
    """A run's eval-loss gain after `seconds` client seconds, linear between its evaluations (its
    final gain past its end)."""
    before = curve[0][3]
    for (_, _, s0, l0), (_, _, s1, l1) in zip(curve, curve[1:]):
        if s0 <= seconds <= s1:
            return before - (l0 + (l1 - l0) * (seconds - s0) / max(s1 - s0, 1e-9))
    return before - curve[-1][3]


class Bench:
    """The runs done so far (kept in --out) and the choices they imply."""

    def __init__(self, out: Path, setup: dict[str, Any], fresh: bool) -> None:
        self.out, self.setup = out, setup
        old = json.loads(out.read_text()) if out.exists() and not fresh else {}
        self.runs: list[dict[str, Any]] = old.get("runs", []) if old.get("setup") == setup else []
        self.tmp = tempfile.TemporaryDirectory()

    def find(self, kind: str, row: str, seed: int, epochs: int, keys: dict[str, Any]) -> dict[str, Any] | None:
        return next((r for r in self.runs if r["kind"] == kind and r["row"] == row and r["seed"] == seed
                     and r["epochs"] == epochs and r["keys"] == keys), None)

    def get(self, kind: str, row: str, seed: int, epochs: int, keys: dict[str, Any], clients: int,
            over: dict[str, Any]) -> dict[str, Any]:
        done = self.find(kind, row, seed, epochs, keys)
        if done is None:
            done = {**one_run(row, clients, over, seed, Path(self.tmp.name)), "kind": kind, "epochs": epochs,
                    "keys": keys}
            self.runs.append(done)
            self.save()
            print(f"{kind:7} seed {seed} {epochs}ep {row:22} {json.dumps(keys):60} eval loss {done['before']:.4f} -> "
                  f"{done['after']:.4f}, EM {done['exact-match']:.3f}, {done['client-seconds']:.0f} client s, "
                  f"{done['seconds']:.0f} s", flush=True)
        return done

    def save(self, **extra: Any) -> None:
        old = json.loads(self.out.read_text()) if self.out.exists() else {}
        kept = {k: v for k, v in old.items() if k not in ("setup", "runs")} if old.get("setup") == self.setup else {}
        self.out.write_text(json.dumps({"setup": self.setup, "runs": self.runs, **kept, **extra}, indent=1) + "\n")

    def best(self, row: str, grid_epochs: int = 2, run: bool = True) -> dict[str, Any] | None:
        """`row`'s chosen keys: its base row's best, its fixed keys, then the best of its grid (each
        variant run at `grid_epochs` epochs, seed 0). With `run` false, None when a run is missing."""
        base, fixed, variants = GRID[row]
        start = self.best(base, grid_epochs, run) if base else {}
        if start is None:
            return None
        tried = []
        for variant in variants:
            keys = {**start, **fixed, **variant}
            clients, over = epoch_run(row, keys, grid_epochs)
            done = self.get("grid", row, 0, grid_epochs, keys, clients, over) if run else \
                self.find("grid", row, 0, grid_epochs, keys)
            if done is None:
                return None
            tried.append((done["after"], keys))
        return min(tried, key=lambda t: t[0])[1]


def epochs_table(bench: Bench, rows: list[str], seeds: list[int], epochs: list[int]) -> tuple[list[dict], str]:
    """Run what the table needs and summarise it: per row and epoch count, the gain as a fraction of
    centralized's (same seed and epochs)."""
    for e in epochs:
        for row in ["centralized", *rows]:
            keys = bench.best(row)
            for seed in seeds:
                clients, over = epoch_run(row, keys, e)
                bench.get(*kind_of(seed, e), row, seed, e, keys, clients, over)
    # the table holds every row, epoch count and seed run so far with the row's chosen keys (earlier
    # calls may have run other rows, seeds and epochs)
    chosen = {row: keys for row in ["centralized", *ORDER, *MORE] if (keys := bench.best(row, run=False)) is not None}
    rows = [row for row in [*ORDER, *MORE] if row in chosen and row != "centralized"]
    epochs = sorted({r["epochs"] for r in bench.runs if r["kind"] in ("grid", "run")})
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for e in epochs:
        for row in ["centralized", *rows]:
            results[(row, e)] = sorted((r for r in bench.runs if r["row"] == row and r["epochs"] == e
                                        and r["keys"] == chosen[row] and r["kind"] in ("grid", "run")),
                                       key=lambda r: r["seed"])
    epochs = [e for e in epochs if results[("centralized", e)]]
    summary, lines = [], ["| row | epochs | gain / centralized (95% CI) | eval loss after | exact match | Rouge-L | "
                          "MB on the wire | client s | seeds | chosen keys |", "|---|---|---|---|---|---|---|---|---|---|"]
    for e in epochs:
        central = {r["seed"]: r["before"] - r["after"] for r in results[("centralized", e)]}
        best_rule = max((statistics.fmean(central_fraction(results[(r, e)], central)) for r in RULES
                         if r in rows and results[(r, e)]), default=math.nan)
        for row in ["centralized", *rows]:
            mine = results[(row, e)]
            if not mine:
                continue
            frac, half = interval(central_fraction(mine, central))
            item = {"row": row, "epochs": e, "keys": chosen[row], "seeds": [r["seed"] for r in mine],
                    "fraction": frac, "fraction-ci95": half, "after": statistics.fmean(r["after"] for r in mine),
                    "before": statistics.fmean(r["before"] for r in mine),
                    "exact-match": statistics.fmean(r["exact-match"] for r in mine),
                    "rouge-l": statistics.fmean(r["rouge-l"] or 0.0 for r in mine),
                    "megabytes": statistics.fmean(r["bytes"] for r in mine) / 1e6,
                    "client-seconds": statistics.fmean(r["client-seconds"] for r in mine)}
            if len(mine) >= 2:
                from scipy import stats

                test = stats.ttest_rel([r["before"] for r in mine], [r["after"] for r in mine], alternative="greater")
                item["paired-p"] = float(test.pvalue)
            item["best-rule-fraction"] = best_rule
            summary.append(item)
            ci = f"{frac:.3f} ± {half:.3f}" if not math.isnan(half) else f"{frac:.3f}"
            lines.append(f"| {row} | {e} | {ci} | {item['after']:.4f} (before {item['before']:.4f}) | "
                         f"{item['exact-match']:.3f} | {item['rouge-l']:.3f} | {item['megabytes']:.3f} | "
                         f"{item['client-seconds']:.0f} | {len(mine)} | {keys_text(chosen[row])} |")
    return summary, "\n".join(lines)


def central_fraction(mine: list[dict[str, Any]], central: dict[int, float]) -> list[float]:
    return [(r["before"] - r["after"]) / central[r["seed"]] for r in mine if r["seed"] in central]


def keys_text(keys: dict[str, Any]) -> str:
    shown = {k: v for k, v in keys.items() if k not in ZO or k == "zo.lr"}
    return ", ".join(f"{k.removeprefix('train.').removeprefix('strategy.')}={v}" for k, v in shown.items()) or "-"


def equal_seconds(bench: Bench, summary: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """Rows that are not rules against the best rule at the same client seconds (seed by seed)."""
    rules = [s for s in summary if s["epochs"] == epochs and s["row"] in RULES]
    if not rules:
        return []
    best = max(rules, key=lambda s: s["fraction"])
    out = []
    for s in summary:
        if s["epochs"] != epochs or s["row"] in RULES or s["row"] in ("centralized", "defaults", "personal",
                                                                         *SKEWED):
            continue
        ratios, bytes_ratio = [], []
        for seed in s["seeds"]:
            mine = bench.find(*kind_of(seed, epochs), s["row"], seed, epochs, s["keys"])
            ref = bench.find(*kind_of(seed, epochs), best["row"], seed, epochs, best["keys"])
            if mine and ref:
                ratios.append((mine["before"] - mine["after"]) / gain_at(ref["curve"], mine["client-seconds"]))
                bytes_ratio.append(ref["bytes"] / max(mine["bytes"], 1))
        if ratios:
            out.append({"row": s["row"], "against": best["row"], "epochs": epochs,
                        "gain / best rule's at equal client seconds": statistics.fmean(ratios),
                        "bytes, best rule / row": statistics.fmean(bytes_ratio)})
    return out


def kind_of(seed: int, epochs: int) -> tuple[str]:
    """Seed 0 at 2 epochs is the grid's own run."""
    return ("grid" if seed == 0 and epochs == 2 else "run",)


def plot(bench: Bench, rows: list[str], epochs: int, chosen: dict[str, dict[str, Any]], path: Path = PLOT) -> None:
    """`path` (bench/quality.png; beside --out): eval loss against bytes and against client seconds, seed 0,
    one line a row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for row in rows:
        run = bench.find(*kind_of(0, epochs), row, 0, epochs, chosen[row])
        if not run or row == "centralized":
            continue
        curve = run["curve"]
        for ax, i in zip(axes, (1, 2)):
            ax.plot([c[i] for c in curve], [c[3] for c in curve], "-", marker="o", label=row)
    axes[0].set_xscale("symlog", linthresh=1e3)
    axes[0].set_xlabel("bytes up + down, all clients")
    axes[1].set_xlabel("seconds the clients worked, summed")
    for ax, title in zip(axes, ("eval loss against bytes on the wire", "eval loss against client seconds")):
        ax.set_title(f"{title} ({epochs} epochs, seed 0)")
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=80, bbox_inches="tight")


def samples_table(bench: Bench, names: list[str], seeds: list[int]) -> str:
    plan = sample_rows()
    results: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:
        for name in ["centralized", *[n for n in names if n != "centralized"]]:
            clients, over = plan[name]
            results.setdefault(name, []).append(bench.get("samples", name, seed, 0, {}, clients, over))
    central = {r["seed"]: r["before"] - r["after"] for r in results["centralized"]}
    lines = ["| row | gain / centralized (95% CI) | eval loss after | exact match | MB on the wire | seeds |",
             "|---|---|---|---|---|---|"]
    for name, mine in results.items():
        frac, half = interval(central_fraction(mine, central))
        lines.append(f"| {name} | {frac:.3f} ± {half:.3f} | {statistics.fmean(r['after'] for r in mine):.4f} | "
                     f"{statistics.fmean(r['exact-match'] for r in mine):.3f} | "
                     f"{statistics.fmean(r['bytes'] for r in mine) / 1e6:.2f} | {len(mine)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=("epochs", "samples"), default="epochs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", default="1,2,4", help="epoch counts of the equal-epochs table")
    ap.add_argument("--only", default="", help="comma-separated rows (default: all); centralized always runs")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fresh", action="store_true", help="ignore the runs already in --out")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    seeds = [int(s) for s in opts.seeds.split(",")]
    names = [n.strip() for n in opts.only.split(",") if n.strip()]
    known = ORDER + MORE if opts.table == "epochs" else list(sample_rows())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(known)}")
    bench = Bench(opts.out, {"clients": CLIENTS, "epochs-common": EPOCHS, "samples-common": SAMPLES}, opts.fresh)
    if opts.table == "samples":
        text = samples_table(bench, names or known, seeds)
        bench.save(samples_table=text)
        print(text)
        return
    rows = [n for n in (names or ORDER) if n != "centralized"]
    epochs = [int(e) for e in opts.epochs.split(",")]
    summary, text = epochs_table(bench, rows, seeds, epochs)
    chosen = {s["row"]: s["keys"] for s in summary}
    seconds = equal_seconds(bench, summary, 2)
    plot(bench, list(chosen), 2, chosen, opts.out.with_suffix(".png"))
    bench.save(rows=summary, table=text, equal_seconds=seconds)
    print(text)
    for s in seconds:
        print(f"{s['row']}: {s['gain / best rule' + chr(39) + 's at equal client seconds']:.3f} of {s['against']}'s "
              f"gain at equal client seconds, {s['bytes, best rule / row']:.0f}x fewer bytes")
    for s in summary:
        if s["epochs"] == 2 and s["row"] in RULES and s["fraction"] == s["best-rule-fraction"]:
            low = s["fraction"] - (0 if math.isnan(s["fraction-ci95"]) else s["fraction-ci95"])
            print(f"goal best rule ({s['row']}) >= 0.98 of centralized at 2 epochs, interval >= 0.95: "
                  f"{s['fraction']:.3f} (low {low:.3f}) ({'met' if s['fraction'] >= 0.98 and low >= 0.95 else 'missed'})")
        if s["row"].startswith("scaffold"):
            scaffold_goal(bench, s, summary)
        if s["row"] == "personal":
            personal_goals(bench, s, summary)
        if s["epochs"] == 2 and s["row"] == "defaults":
            ratio = s["fraction"] / s["best-rule-fraction"]
            print(f"goal defaults >= 0.95 of the best rule at 2 epochs: {ratio:.3f} ({'met' if ratio >= 0.95 else 'missed'})")


def personal_goals(bench: Bench, s: dict[str, Any], summary: list[dict[str, Any]]) -> None:
    """The personal row's goals: each client's held-out loss under its personalised model <= 0.9 of the
    global adapter's (the mean of the clients' ratios, and the worst client), the global adapter's eval
    loss within 2% of fedavg's (same epochs, mean over the seeds)."""
    ratios = [p / g for seed in s["seeds"]
              if (run := bench.find(*kind_of(seed, s["epochs"]), "personal", seed, s["epochs"], s["keys"]))
              and run.get("personal") for p, g in run["personal"]["clients"].values()]
    if ratios:
        mean, worst = statistics.fmean(ratios), max(ratios)
        print(f"goal personal ({s['epochs']} epochs) per-client held-out loss <= 0.9 of the global adapter's: mean "
              f"{mean:.3f}, worst client {worst:.3f} "
              f"({'met' if worst <= 0.9 else 'met on the mean' if mean <= 0.9 else 'missed'})")
    base = next((b for b in summary if b["row"] == "fedavg" and b["epochs"] == s["epochs"]), None)
    if base is not None:
        ratio = s["after"] / base["after"]
        print(f"goal personal ({s['epochs']} epochs) global eval loss within 2% of fedavg's: {s['after']:.4f} vs "
              f"{base['after']:.4f} ({ratio:.3f}, {'met' if abs(ratio - 1) <= 0.02 else 'missed'})")


def scaffold_goal(bench: Bench, s: dict[str, Any], summary: list[dict[str, Any]]) -> None:
    """A scaffold row's goal, its gain >= FedAvg's on the same partition (row fedavg dirichlet-0.1), paired
    seed by seed: the ratio of the mean gains over the seeds both rows ran, and the mean per-seed
    difference of the gains with its 95% t-interval."""
    base = next((b for b in summary if b["row"] == "fedavg dirichlet-0.1" and b["epochs"] == s["epochs"]), None)
    if base is None:
        return
    pairs = []
    for seed in sorted(set(s["seeds"]) & set(base["seeds"])):
        mine = bench.find(*kind_of(seed, s["epochs"]), s["row"], seed, s["epochs"], s["keys"])
        theirs = bench.find(*kind_of(seed, s["epochs"]), base["row"], seed, s["epochs"], base["keys"])
        if mine and theirs:
            pairs.append((seed, mine["before"] - mine["after"], theirs["before"] - theirs["after"]))
    if not pairs:
        return
    ratio = statistics.fmean(p[1] for p in pairs) / statistics.fmean(p[2] for p in pairs)
    diff, half = interval([p[1] - p[2] for p in pairs])
    each = ", ".join(f"seed {seed} {m / f:.3f}" for seed, m, f in pairs)
    print(f"goal {s['row']} >= fedavg's gain (dirichlet 0.1, {s['epochs']} epochs): {ratio:.3f} of it ({each}); "
          f"gain difference {diff:+.4f} +- {half:.4f} ({'met' if ratio >= 1 else 'missed'})")


if __name__ == "__main__":
    main()
