"""Asynchronous buffered rounds (server.mode=async, FedBuff) against synchronous rounds, with one
client 8 times slower and with equal speeds.

    python bench/async.py [--engine ray|inprocess] [--cpus-per-client 0.5] [--only ROW,...] [--fresh] [--out FILE]

SmolLM2-135M-Instruct, LoRA r=8 on q,v, the built-in suite (7 families, 24 training and 4 held-out
examples each, split IID over 4 clients), 2 local steps of batch 2 at lr 1e-3 per message.
server.simulate-delay=3=8 makes partition 3 wait 7 x its own work (the model's first load aside)
before it replies (a site 8 times slower). The clients run in parallel on Ray (the default engine, --cpus-per-client 0.5: 4 actors at
once sharing this machine's cores), as a federation's sites would.
Rows:
- sync-slow: 4 rounds of all 4 clients; each round waits for the slow one.
- async-slow: server.concurrency=4, server.buffer-size=2, 24 versions (48 accepted replies, three times
  sync-slow's 16: the fast clients keep training while the slow one works).
- sync-equal / async-equal: equal speeds, 4 rounds against 4 versions of buffer 4 (the same 16
  accepted replies, i.e. the same client steps).
- async-equal-nowait: async-equal with server.version-wait=0 (FedBuff as published: a client whose
  reply is in trains at once on the current version, even when the version is a moment from being
  replaced). Every async row else keeps the default 0.5.
Columns: versions, accepted replies, eval loss after, the seconds of training until the eval loss first
reaches sync-slow's final one (`to-target`, the rows' train-seconds summed: evaluation excluded in
both modes, though asynchronous clients go on training while the server evaluates, so this flatters
async), the same in round seconds (evaluation included: an async run evaluates every version, so this
is async's worst case), the run's wall seconds (Ray's start included), and the staleness histogram of
the accepted replies.
Goals: async-slow reaches sync-slow's final eval loss in <= 0.5 x sync-slow's training seconds;
async-equal's eval loss within 2% of sync-equal's.
Each finished row is kept in the JSON (an interrupted bench continues; --fresh reruns --only rows).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rows import kept, run_rows, save

OUT = Path(__file__).with_suffix(".json")
COMMON = {"data.partition": "iid", "data.train-per-family": 24, "data.eval-per-family": 4,
          "server.exact-match-examples": 0, "train.batch-size": 2, "train.local-steps": 2, "train.lr": 1e-3,
          "lora.rank": 8, "lora.alpha": 16, "server.min-clients": 4, "server.checkpoint": False,
          "server.round-timeout": 900.0}
SLOW = {"server.simulate-delay": "3=8"}
ROWS = {
    "sync-slow": {**SLOW, "server.num-rounds": 4},
    "async-slow": {**SLOW, "server.mode": "async", "server.concurrency": 4, "server.buffer-size": 2,
                   "server.num-rounds": 24},
    "sync-equal": {"server.num-rounds": 4},
    "async-equal": {"server.mode": "async", "server.concurrency": 4, "server.buffer-size": 4, "server.num-rounds": 4},
    "async-equal-nowait": {"server.mode": "async", "server.concurrency": 4, "server.buffer-size": 4,
                           "server.num-rounds": 4, "server.version-wait": 0.0},
}
CLIENTS = 4


def one_run(name: str, engine: str, cpus: float, workdir: Path) -> dict[str, Any]:
    from fedllm.reporting.runlog import read_metrics, summary
    from fedllm.simulation import simulate

    over = {**COMMON, **ROWS[name], "server.run-dir": str(workdir), "server.run-name": name}
    t0 = time.perf_counter()
    run_dir = simulate(over, CLIENTS, engine=engine, cpus_per_client=cpus if engine == "ray" else None)
    wall = time.perf_counter() - t0
    rows = read_metrics(run_dir)
    s = summary(rows)
    trained = [r for r in rows if r["round"] > 0]
    stale: collections.Counter[int] = collections.Counter()
    for r in trained:
        stale.update({int(k): v for k, v in r.get("staleness", {"0": r["clients-ok"]}).items()})
    curve, clock, wall_clock = [], 0.0, 0.0
    for r in trained:
        clock += r["train-seconds"]
        wall_clock += r["round-seconds"]
        curve.append((round(clock, 2), r.get("eval-loss"), round(wall_clock, 2)))
    return {"row": name, "engine": engine, "versions": len(trained),
            "accepted": sum(r["clients-ok"] for r in trained), "eval-loss-before": s["eval-loss-before"],
            "eval-loss": s["eval-loss-after"], "train-seconds": round(clock, 2), "wall-seconds": round(wall, 1),
            "staleness": {str(k): stale[k] for k in sorted(stale)}, "curve": curve}


def to_target(run: dict[str, Any], target: float, wall: bool = False) -> float | None:
    """Seconds until the eval loss first reaches `target` (None: never): training seconds, or with
    `wall` the rounds' whole seconds (evaluation included)."""
    for point in run["curve"]:
        if point[1] is not None and point[1] <= target:
            return point[2] if wall else point[0]
    return None


def seconds(run: dict[str, Any], wall: bool = False) -> float:
    """The run's training seconds, or with `wall` its rounds' whole seconds."""
    return run["curve"][-1][2] if wall else run["train-seconds"]


def table(done: dict[str, Any]) -> dict[str, Any]:
    target = done.get("sync-slow", {}).get("eval-loss")
    print(f"{'row':<12} {'versions':>8} {'accepted':>8} {'eval loss':>9} {'to-target s':>11} {'train s':>8} "
          f"{'wall s':>7}  staleness")
    for name in ROWS:
        r = done.get(name)
        if r is None:
            continue
        reach = to_target(r, target) if target is not None else None
        print(f"{name:<12} {r['versions']:>8} {r['accepted']:>8} {r['eval-loss']:>9.4f} "
              f"{'-' if reach is None else f'{reach:.1f}':>11} {r['train-seconds']:>8.1f} {r['wall-seconds']:>7.1f}  "
              f"{r['staleness']}")
    goals: dict[str, Any] = {}
    if target is not None and "async-slow" in done:
        for wall, name in ((False, "async-slow time to sync-slow's loss / sync-slow's"),
                           (True, "async-slow round seconds to sync-slow's loss / sync-slow's")):
            if wall and min(len(done[k]["curve"][0]) for k in ("sync-slow", "async-slow")) < 3:
                continue  # recorded before the bench kept the rounds' whole seconds
            reach = to_target(done["async-slow"], target, wall)
            goals[name] = None if reach is None else round(reach / seconds(done["sync-slow"], wall), 3)
    if "sync-equal" in done and "async-equal" in done:
        goals["async-equal eval loss / sync-equal's"] = round(done["async-equal"]["eval-loss"]
                                                              / done["sync-equal"]["eval-loss"], 4)
    for k, v in goals.items():
        print(f"{k}: {v}")
    return goals


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", default="ray", choices=("ray", "inprocess"))
    ap.add_argument("--cpus-per-client", type=float, default=0.5, help="Ray: CPUs an actor reserves (0.5: 4 at once on "
                    "2 cores)")
    ap.add_argument("--only", default="", help="rows to run, comma separated")
    ap.add_argument("--fresh", action="store_true", help="run the --only rows (all without --only) again")
    ap.add_argument("--out", type=Path, default=OUT)
    opts = ap.parse_args(argv)
    setup = {"common": COMMON, "rows": ROWS, "clients": CLIENTS, "engine": opts.engine, "cpus-per-client": opts.cpus_per_client}
    wanted = [r for r in (opts.only.split(",") if opts.only else ROWS) if r]
    unknown = sorted(set(wanted) - set(ROWS))
    if unknown:
        sys.exit(f"--only: unknown row(s) {', '.join(unknown)}; rows: {', '.join(ROWS)}")
    done = kept(opts.out, setup, False)
    if opts.fresh:
        for name in wanted:
            done.pop(name, None)
    with tempfile.TemporaryDirectory() as tmp:
        run_rows(wanted, done, lambda name: one_run(name, opts.engine, opts.cpus_per_client, Path(tmp)), opts.out, setup)
    goals = table(done)
    save(opts.out, setup, done, goals=goals)


if __name__ == "__main__":
    main()
