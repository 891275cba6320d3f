"""Verifiable rounds: do the LoRA, zo and DPO benches' runs reproduce bit for bit from their
artifacts alone, and what does keeping the artifacts cost?

    python bench/verify.py [--quick] [--rounds 2] [--only lora,zo,dpo] [--out FILE]

Each row is a run of one bench's setting on SmolLM2-135M-Instruct with the ledger on (the
in-process chain), then `fedllm verify` (fedllm.ledger.verify) on every round it posted:
- lora: bench/quality.py's setting (8 clients, a task each, FedAvg, lr 2e-3), scored with
  leave-one-out, so the verifier re-evaluates the model on the validation examples;
- zo: bench/quality.py's zo row (K=4096 Rademacher seeds), scored by cosine;
- dpo: bench/dpo.py's federated row (4 clients, beta 0.1, the demo's data), scored by cosine.
Reported per row: rounds reproduced of rounds posted (goal: all), the server's seconds a round
writing artifacts against its whole ledger seconds a round, the artifacts' megabytes a round, and
the verifier's seconds a round (model load included).
`--quick` runs a tiny random model: it checks the script, its figures mean nothing.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_suffix(".json")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dpo import DPO, DEMO_COMMON  # noqa: E402  (bench/dpo.py's federated setting)
from quality import CLIENTS, EPOCHS, ZO  # noqa: E402  (bench/quality.py's setting)

LEDGER = {"ledger.enabled": True, "ledger.reward-per-round": 0.1, "server.eval-every": 0}
ROWS: dict[str, tuple[int, dict[str, Any]]] = {
    "lora": (CLIENTS, {**EPOCHS, "server.strategy": "fedavg", "train.lr": 2e-3, "train.local-steps": 3,
                       "ledger.scorer": "loo"}),
    "zo": (CLIENTS, {**EPOCHS, **ZO, "train.local-steps": 6}),
    "dpo": (4, {**DEMO_COMMON, **DPO, "train.local-steps": 2}),
}


def one_row(name: str, rounds: int, workdir: Path, quick_model: str | None) -> dict[str, Any]:
    from fedllm.config import Config
    from fedllm.ledger.verify import verify
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    clients, keys = ROWS[name]
    flat = {**keys, **LEDGER, "server.num-rounds": rounds, "server.run-dir": str(workdir), "server.run-name": name}
    if quick_model:
        flat["model.name"] = quick_model
    t0 = time.perf_counter()
    run_dir = run(LocalGrid(clients), Config.from_flat(flat))
    run_seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    t0 = time.perf_counter()
    checks = verify(run_dir)
    verify_seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (run_dir / "ledger" / "artifacts").iterdir())
    return {"row": name, "clients": clients, "rounds": len(checks),
            "reproduced": sum(c.status == "reproduced" for c in checks),
            "problems": [p for c in checks for p in c.problems][:10],
            "run-seconds": round(run_seconds, 1),
            "ledger-seconds-per-round": round(sum(r["ledger"]["seconds"] for r in rows) / len(rows), 3),
            "artifact-seconds-per-round": round(sum(r["ledger"]["artifact-seconds"] for r in rows) / len(rows), 3),
            "artifact-mb-per-round": round(size / 1e6 / len(rows), 2),
            "verify-seconds-per-round": round(verify_seconds / max(len(checks), 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model: checks the script runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default=",".join(ROWS), help="comma separated rows")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="fedllm-verify-"))
    quick_model = None
    if args.quick:
        from compression import tiny_model

        quick_model = tiny_model(tmp / "tiny")
    results = []
    for name in [n for n in args.only.split(",") if n in ROWS]:
        results.append(one_row(name, args.rounds, tmp, quick_model))
        r = results[-1]
        print(f"  {name}: {r['reproduced']}/{r['rounds']} reproduced ({r['run-seconds']:.0f} s run)", flush=True)
    head = ("row", "clients", "rounds", "reproduced", "ledger s/round", "artifacts s/round", "MB/round",
            "verify s/round")
    print("\n" + " | ".join(head))
    for r in results:
        print(" | ".join(str(x) for x in (r["row"], r["clients"], r["rounds"], r["reproduced"],
                                          r["ledger-seconds-per-round"], r["artifact-seconds-per-round"],
                                          r["artifact-mb-per-round"], r["verify-seconds-per-round"])))
    met = all(r["reproduced"] == r["rounds"] for r in results)
    print(f"goal: every posted round reproduces bit for bit: {'met' if met else 'MISSED'}")
    args.out.write_text(json.dumps({"rounds": args.rounds, "quick": args.quick, "results": results,
                                    "all-reproduced": met}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
