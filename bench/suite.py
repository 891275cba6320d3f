"""Every benchmark in a short mode, one table of the headline figures with their goals.

    python bench/suite.py [--out bench/results.json]      # what `make bench` runs

Each script runs as its own process with short settings (fewer rounds, steps and repeats
than its defaults: the figures are indicative, the full runs are the scripts without
arguments); the table shows each headline figure beside its goal, and bench/results.json
keeps the table, the settings and every script's own JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results.json"
Row = tuple[str, float, str, Callable[[float], bool]]  # figure, value, goal, met?


def overhead(d: dict[str, Any]) -> list[Row]:
    r = d["ratios"]
    return [("wall time, Ray engine / centralized", r["ray"]["time"], "<= 1.10", lambda v: v <= 1.10),
            ("wall time, in-process engine / centralized", r["inprocess"]["time"], "<= 1.05", lambda v: v <= 1.05),
            ("peak RSS, in-process engine / centralized", r["inprocess"]["memory"], "<= 1.2", lambda v: v <= 1.2),
            ("peak RSS, Ray engine / centralized", r["ray"]["memory"], "", lambda v: True)]


def zo(d: dict[str, Any]) -> list[Row]:
    wire = d["wire"]
    return [("upload per client per round (B)", wire[0]["up_bytes"], "<= 700", lambda v: v <= 700),
            ("download per client per round, most clients (B)", max(w["down_bytes"] for w in wire), "<= 4096",
             lambda v: v <= 4096),
            ("Rademacher z vs torch.randn (x)", d["throughput"]["results"]["fedllm rademacher"]["speedup"], ">= 5",
             lambda v: v >= 5),
            ("device-independent Gaussian z vs torch.randn (x)",
             d["throughput"]["results"]["fedllm gaussian"]["vs_before"], ">= 1.0", lambda v: v >= 1.0),
            ("device-independent Rademacher z vs SFC64 signs (x)",
             d["throughput"]["results"]["fedllm rademacher"]["vs_before"], ">= 1.0", lambda v: v >= 1.0)]


def compression(d: dict[str, Any]) -> list[Row]:
    r = next(x for x in d["results"] if x["label"] == "randk10-int2-unbiased")
    return [("randk(0.1) > quantize(2) > zstd: uploads smaller (x)", r["upload_ratio"], ">= 100", lambda v: v >= 100),
            ("the same: relative eval-loss gap", r["relative_gap"], "<= 0.01", lambda v: v <= 0.01)]


def ledger(d: dict[str, Any]) -> list[Row]:
    most = max(d["results"], key=lambda r: r["clients"])
    return [("gas per round, most / fewest clients", max(d["gas-growth"].values()), "<= 1.01", lambda v: v <= 1.01),
            (f"ledger seconds per round, {most['clients']} clients", most["ledger-s-per-round"], "", lambda v: True)]


def client_start(d: dict[str, Any]) -> list[Row]:
    return [("message to first step, warm worker (s)", d["rows"]["worker-warm"]["to-first-step"], "<= 2",
             lambda v: v <= 2)]


def verified(d: dict[str, Any]) -> list[Row]:
    rounds = sum(r["rounds"] for r in d["results"])
    return [("posted rounds that fedllm verify reproduces bit for bit (share)",
             sum(r["reproduced"] for r in d["results"]) / max(rounds, 1), "= 1", lambda v: v == 1)]


def robustness(d: dict[str, Any]) -> list[Row]:
    table = {a: t for a, t in d["table"].items() if a != "none"}
    return [("worst attack: best strategy's eval loss / clean", max(t["relative-eval-loss"][t["best"]]
                                                                    for t in table.values()), "<= 1.05",
             lambda v: v <= 1.05),
            ("flags: lowest precision over the attacks", min(t["precision"] for t in table.values()), ">= 0.9",
             lambda v: v >= 0.9),
            ("flags: lowest recall over the attacks", min(t["recall"] for t in table.values()), ">= 0.9",
             lambda v: v >= 0.9)]


def quality(d: dict[str, Any]) -> list[Row]:
    rows = [r for r in d.get("rows", []) if r["epochs"] == 2]
    best = max((r for r in rows if r["row"] != "centralized" and r["fraction"] == r["best-rule-fraction"]),
               key=lambda r: r["fraction"], default=None)
    out: list[Row] = []
    if best is not None:
        out.append((f"best rule ({best['row']}) at 2 epochs: gain / centralized gain", best["fraction"], ">= 0.98",
                    lambda v: v >= 0.98))
    for r in rows:
        if r["row"] == "defaults":
            out.append(("defaults at 2 epochs: gain / the best rule's", r["fraction"] / r["best-rule-fraction"],
                        ">= 0.95", lambda v: v >= 0.95))
    for s in d.get("equal_seconds", []):
        out.append((f"{s['row']}: gain / the best rule's at equal client seconds",
                    s["gain / best rule's at equal client seconds"], ">= 0.5", lambda v: v >= 0.5))
    return out


def diloco(d: dict[str, Any]) -> list[Row]:
    g = d["goals"]
    return [("streaming peak upload round / diloco's, / largest fragment share",
             g["peak-up-ratio / largest fragment's share"], "= 1", lambda v: abs(v - 1) < 0.005),
            ("largest of 4 fragments' share of the model", g["largest fragment's share"], "", lambda v: True),
            ("total bytes, fedavg-full / streaming-4bit", g["total-bytes fedavg-full/streaming-4bit"], ">= 100",
             lambda v: v >= 100),
            ("eval loss, streaming / diloco", g["eval-loss streaming/diloco"], "<= 1.02", lambda v: v <= 1.02)]


def buffered(d: dict[str, Any]) -> list[Row]:
    g, nan = d["goals"], float("nan")
    return [("async time to sync's final loss / sync's, 1 client 8x slower",
             g.get("async-slow time to sync-slow's loss / sync-slow's", nan), "<= 0.5", lambda v: v <= 0.5),
            ("async eval loss / sync's, equal speeds and client steps",
             g.get("async-equal eval loss / sync-equal's", nan), "<= 1.02", lambda v: v <= 1.02)]


def aggregation(d: dict[str, Any]) -> list[Row]:
    g = d["goals"]
    return [("streaming peak RSS, 64 / 4 clients, 538 MB updates", g["stream peak RSS 64/4 clients (full)"],
             "<= 1.10", lambda v: v <= 1.10),
            ("streaming peak RSS, 64 / 4 clients, 1.8 MB updates", g["stream peak RSS 64/4 clients (lora)"],
             "<= 1.10", lambda v: v <= 1.10),
            ("streaming fold / memcpy, lowest, 538 MB updates", g["stream throughput / memcpy, lowest (full)"],
             ">= 0.5", lambda v: v >= 0.5),
            ("streaming fold / memcpy, lowest, 1.8 MB updates", g["stream throughput / memcpy, lowest (lora)"],
             ">= 0.5", lambda v: v >= 0.5)]


def scale(d: dict[str, Any]) -> list[Row]:
    g = d["goals"]
    return [("server seconds per round, most / fewest registered",
             g["server seconds per round, most / fewest registered"], "<= 1.10", lambda v: v <= 1.10),
            ("round seconds (clients' training included), most / fewest", g["round seconds, most / fewest registered"],
             "", lambda v: True),
            ("peak RSS, most / fewest registered", g["peak RSS, most / fewest registered"], "<= 1.10",
             lambda v: v <= 1.10)]


def peft(d: dict[str, Any]) -> list[Row]:
    g = d["goals"]
    return [("4-bit client peak RSS / fp32 client's", g["qlora / fp32 client peak RSS"], "<= 0.5", lambda v: v <= 0.5),
            ("4-bit client RSS above the imports / fp32 client's", g["qlora / fp32 client RSS above imports"], "",
             lambda v: True),
            ("4-bit eval loss / fp32 LoRA's", g["qlora / fp32 eval loss"], "<= 1.03", lambda v: v <= 1.03),
            ("auto modules (half the parameters) eval loss / all modules'", g["auto-modules / fp32 eval loss"],
             "<= 1.02", lambda v: v <= 1.02)]


def dpo(d: dict[str, Any]) -> list[Row]:
    g = d["goals"]
    return [("federated / centralized DPO reward-accuracy gain, from the base",
             g["base: reward-accuracy gain fed / central"], ">= 0.9", lambda v: v >= 0.9),
            ("federated DPO exact match - its start, from the base", g["base: exact match fed - start"], ">= -0.02",
             lambda v: v >= -0.02)]


def secagg(d: dict[str, Any]) -> list[Row]:
    g = d["goals"]
    return [("SecAgg, LoRA, 16 clients: extra upload / plain upload", g["lora-16 extra upload / plain upload (goal <= 2)"],
             "<= 2", lambda v: v <= 2),
            ("SecAgg, LoRA, 16 clients: server seconds per round",
             g["lora-16 server seconds per secure round (goal <= 1)"], "<= 1", lambda v: v <= 1)]


def gpu(d: dict[str, Any]) -> list[Row]:
    """On the CPU the tiny config only runs the code paths: its figures carry no goal (GPU figures do)."""
    rows = d["sizes"].get("tiny") or next(iter(d["sizes"].values()))
    out: list[Row] = [("LoRA round / plain PEFT loop, same steps (x)", rows["lorax1"]["round_vs_plain"],
                       "<= 1.05" if d["device"] != "cpu" else "", lambda v: v <= 1.05)]
    if d["z_agreement"]["checked"]:
        out.append(("z on the GPU equals z on the CPU (1 = yes)", float(d["z_agreement"]["equal"]), "= 1",
                    lambda v: v == 1))
    return out


# script, short arguments, headline figures
SUITE: list[tuple[str, list[str], Callable[[dict[str, Any]], list[Row]]]] = [
    ("simulation_overhead", ["--rounds", "1", "--steps", "5"], overhead),
    ("zo", ["--quick"], zo),
    ("compression", ["--only", "none", "randk10-int2-unbiased", "--rounds", "1", "--steps", "3"], compression),
    ("ledger", ["--quick"], ledger),
    ("client_start", ["--repeats", "1"], client_start),
    ("robustness", ["--attacks", "sign-flip,scale", "--strategies", "median", "--rounds", "2", "--steps", "1"],
     robustness),
    ("verify", ["--only", "zo,dpo", "--rounds", "1"], verified),
    ("quality", ["--seeds", "0", "--epochs", "2", "--only", "fedavg,defaults", "--fresh"], quality),
    ("diloco", ["--clients", "2", "--steps", "16", "--inner-steps", "16", "--fresh"], diloco),
    ("async", ["--engine", "inprocess", "--only", "sync-equal,async-equal", "--fresh"], buffered),
    ("aggregation", ["--clients", "4", "64", "--modes", "stream", "tree"], aggregation),
    ("scale", [], scale),
    ("adapters", ["--rounds", "1", "--steps", "4", "--only", "fp32-lora,qlora,auto-modules", "--fresh"], peft),
    ("dpo", ["--rounds", "1", "--steps", "4", "--only", "central-base,fed-base", "--fresh"], dpo),
    ("secagg", ["--clients", "16", "--rounds", "1", "--only", "lora-16-plain,lora-16-secagg", "--fresh"], secagg),
    ("gpu", ["--clients", "1,4"], gpu),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", nargs="*", help="script names to run (default: all)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedllm-bench-"))
    rows, raw, failed = [], {}, []
    for name, short, headline in SUITE:
        if args.only and name not in args.only:
            continue
        out = tmp / f"{name}.json"
        cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *short, "--out", str(out)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0 or not out.exists():
            failed.append(name)
            print(f"== {name}: failed (exit {proc.returncode})", flush=True)
            continue
        raw[name] = {"arguments": short, "seconds": round(seconds, 1), "result": json.loads(out.read_text())}
        for figure, value, goal, met in headline(raw[name]["result"]):
            rows.append({"bench": name, "figure": figure, "value": value, "goal": goal,
                         "met": None if not goal else bool(met(value))})
    print(f"\n{'bench':20} {'figure':52} {'value':>10}  {'goal':>8}  met")
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        print(f"{r['bench']:20} {r['figure']:52} {r['value']:>10.4g}  {r['goal']:>8}  {met}")
    args.out.write_text(json.dumps({"mode": "short", "date": time.strftime("%Y-%m-%d %H:%M"), "headline": rows,
                                    "failed": failed, "runs": raw}, indent=2) + "\n")
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
