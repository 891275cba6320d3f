"""Robustness: FedAvg and each robust strategy under each attack, and how well the flags find
the attackers.

    python bench/robustness.py [--quick] [--rounds 2] [--steps 2] [--attacks A,B] [--strategies S,T] [--out FILE]

10 clients (SmolLM2-135M-Instruct, LoRA), of which partitions 7, 8 and 9 attack with one kind
per run (zero, noise, sign-flip, scale, replay, duplicate, label-flip; see fedllm/client/attacks.py),
plus a clean run. Every run goes through fedllm's server (`fedllm.server.loop.run`: reply
validation, the strategy, server-side evaluation, the ledger on the in-process chain for the
flags) with the clients in this process (`fedllm.server.grid.LocalGrid`). A client's reply
depends only on its request, so replies are reused across runs whose request is the same
(all of round 1). Reported per attack and strategy: the final eval loss relative to the clean
FedAvg run (goal: some robust strategy within 5% for every attack); per attack: precision and
recall of the ledger's flags (any flag but the strategies' own "outlier") over the rounds the
attack is active (replay from round 2), in the FedAvg run (goal >= 0.9 each), with the ledger's
defaults (validation gains on: `harmful`, and no noise/opposed for an update the data vouches
for). The duplicate attack runs on anvil with ledger.commit-reveal, so that the copies can be
told from the original (without commitments every copy is flagged, the victim too).
`--quick` runs a tiny random model: it checks the script, its figures mean nothing.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedllm.config import Config  # noqa: E402
from fedllm.server.grid import LocalGrid  # noqa: E402

OUT = Path(__file__).with_suffix(".json")
CLIENTS, ATTACKERS = 10, (7, 8, 9)
ATTACKS = ("none", "zero", "noise", "sign-flip", "scale", "replay", "duplicate", "label-flip")
STRATEGIES = ("fedavg", "median", "trimmed-mean", "krum", "multikrum", "norm-bounded")


class MemoGrid(LocalGrid):
    """LocalGrid that reuses a reply when the same node kind gets the same request again."""

    cache: dict[tuple, object] = {}

    def __init__(self, attack: str) -> None:
        super().__init__(CLIENTS)
        self.attack = attack

    def reply(self, message):
        node = message.metadata.dst_node_id
        kind = self.attack if node - 1 in ATTACKERS else "honest"
        config = message.content.config_records["config"]
        if kind in ("replay", "duplicate") or config.get("ledger.commit-reveal"):
            return super().reply(message)  # state between rounds (replay), another's update, a commit on chain
        content = message.content
        digest = hashlib.sha1()
        for name in sorted(content.array_records):
            for key, arr in sorted(content.array_records[name].items()):
                digest.update(key.encode() + bytes(arr.data))
        config = content.config_records["config"]
        digest.update(str(config["server-round"]).encode() + str(config.get("ledger-contract", "")).encode())
        key = (node, kind, digest.hexdigest())
        if key not in self.cache:
            self.cache[key] = super().reply(message)
        return self.cache[key]


def run_one(base: dict, attack: str, strategy: str, run_dir: Path) -> dict:
    """One run; the duplicate attack runs on anvil with ledger.commit-reveal (the in-process
    engine runs clients in node order, so the victim, partition 0, commits before its copiers):
    without commitments who copied whom cannot be told, and every copy is flagged."""
    import contextlib

    from fedllm.server.loop import run

    flat = {**base, "server.strategy": strategy, "server.run-dir": str(run_dir),
            "server.run-name": f"{attack}-{strategy}",
            "attack.clients": ",".join(f"{p}={attack}" for p in ATTACKERS) if attack != "none" else ""}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if attack == "duplicate":
            from fedllm.ledger.anvil import anvil

            flat.update({"ledger.chain": stack.enter_context(anvil()), "ledger.commit-reveal": True})
        out = run(MemoGrid(attack), Config.from_flat(flat))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"attack": attack, "strategy": strategy, "eval-loss": rows[-1]["eval-loss"],
            "eval-loss-start": rows[0]["eval-loss"], "seconds": round(time.perf_counter() - t0, 1),
            "ledger-seconds": [r.get("ledger", {}).get("seconds") for r in rows[1:]],
            "flags": [{node: flags for node, flags in r.get("ledger", {}).get("flags", {}).items()} for r in rows[1:]]}


def detection(result: dict, attack: str) -> dict:
    """Precision and recall of the flags (not "outlier") against the attacker nodes, over the
    rounds the attack is active, with the counts and who was flagged wrongly or missed."""
    attackers = {str(p + 1) for p in ATTACKERS} if attack != "none" else set()
    tp = fp = positives = 0
    wrong, missed = [], []
    for rnd, flags in enumerate(result["flags"], start=1):
        if attack == "replay" and rnd == 1:
            continue  # a replayer has nothing to replay in its first round: it trains honestly
        flagged = {node for node, fl in flags.items() if set(fl) - {"outlier"}}
        tp += len(flagged & attackers)
        fp += len(flagged - attackers)
        positives += len(attackers)
        wrong += [f"round {rnd} node {n}: {'+'.join(flags[n])}" for n in sorted(flagged - attackers)]
        missed += [f"round {rnd} node {n}" for n in sorted(attackers - flagged)]
    precision = tp / (tp + fp) if tp + fp else (1.0 if positives == 0 else 0.0)
    recall = tp / positives if positives else 1.0
    return {"precision": precision, "recall": recall, "true-positives": tp, "false-positives": fp,
            "attacker-rounds": positives, "flagged-honest": wrong, "missed": missed}


def summarize(results: list[dict], attacks: list[str]) -> tuple[float, dict, list[dict]]:
    """(the clean FedAvg run's final eval loss, the table by attack, its rows for the README)."""
    clean = next(r["eval-loss"] for r in results if r["attack"] == "none" and r["strategy"] == "fedavg")
    table, rows = {}, []
    for attack in attacks:
        rel = {r["strategy"]: r["eval-loss"] / clean for r in results if r["attack"] == attack}
        fedavg = next(r for r in results if r["attack"] == attack and r["strategy"] == "fedavg")
        found = detection(fedavg, attack)
        table[attack] = {"relative-eval-loss": rel, "best": min(rel, key=rel.get), **found}
        seconds = [s for s in fedavg.get("ledger-seconds", []) if s is not None]
        rows.append({"attack": attack, "precision": found["precision"], "recall": found["recall"],
                     "flagged attackers": f"{found['true-positives']}/{found['attacker-rounds']}",
                     "flagged honest": found["false-positives"],
                     "best strategy": table[attack]["best"],
                     "its eval loss / clean": rel[table[attack]["best"]],
                     "ledger s / round": sum(seconds) / len(seconds) if seconds else None})
    return clean, table, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model: checks the script runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="local steps per round")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help="comma separated; 'none' (the clean run) is always in")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="comma separated; fedavg is always in")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    attacks = ["none"] + [a for a in args.attacks.split(",") if a in ATTACKS and a != "none"]
    strategies = ["fedavg"] + [x for x in args.strategies.split(",") if x in STRATEGIES and x != "fedavg"]
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="fedllm-robustness-"))
    base = {"server.num-rounds": args.rounds, "server.min-clients": 1, "server.eval-every": 0,
            "server.exact-match-examples": 1, "server.max-new-tokens": 1, "train.local-steps": args.steps,
            "train.batch-size": 2, "data.max-length": 96, "data.train-per-family": 20, "data.eval-per-family": 4,
            "lora.dropout": 0.0, "strategy.byzantine": len(ATTACKERS), "strategy.trim-fraction": 0.3,
            "ledger.enabled": True, "ledger.reward-per-round": 0.1, "ledger.penalties": ""}
    if args.quick:
        from compression import tiny_model

        base.update({"model.name": tiny_model(tmp / "tiny"), "ledger.noise-z": 0.0})
    results, honest_norm = [], 1.0
    for attack in attacks:
        for strategy in strategies:  # fedavg first: its clean run gives norm-bounded's bound
            flat = {**base, "strategy.max-norm": honest_norm} if strategy == "norm-bounded" else base
            results.append(run_one(flat, attack, strategy, tmp))
            r = results[-1]
            print(f"  {attack:10} {strategy:13} eval loss {r['eval-loss']:.4f} ({r['seconds']:.0f} s)", flush=True)
            if attack == "none" and strategy == "fedavg":
                honest_norm = median_update_norm(tmp / "none-fedavg")
    clean, table, rows = summarize(results, attacks)
    print(f"\nfinal eval loss / clean FedAvg's ({clean:.4f}); {CLIENTS} clients, attackers {list(ATTACKERS)}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"{'attack':11}" + "".join(f"{s:>13}" for s in strategies) + f"{'best':>14}{'precision':>10}{'recall':>8}")
    for attack, t in table.items():
        best = t["relative-eval-loss"][t["best"]]
        print(f"{attack:11}" + "".join(f"{t['relative-eval-loss'][s]:>13.4f}" for s in strategies)
              + f"{t['best']:>14}{t['precision']:>10.2f}{t['recall']:>8.2f}" + ("" if best <= 1.05 else "  (> 1.05)"))
    setup = {"rounds": args.rounds, "steps": args.steps, "attacks": ",".join(attacks[1:]),
             "strategies": ",".join(strategies)}
    args.out.write_text(json.dumps({"rounds": args.rounds, "steps": args.steps, "quick": args.quick, "setup": setup,
                                    "clean-eval-loss": clean, "rows": rows, "table": table, "runs": results},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


def median_update_norm(run_dir: Path) -> float:
    """The median L2 norm of the clean run's round-1 updates (norm-bounded's bound: honest
    updates pass about unchanged, scaled ones are cut down)."""
    import statistics

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(c["update-norm"] for c in rows[1]["clients"].values())


if __name__ == "__main__":
    main()
