"""Secure aggregation's cost: SecAgg+ rounds against plain FedAvg rounds, side by side.

    python bench/secagg.py [--clients 4,8,16] [--rounds 2] [--only ROW,...] [--fresh] [--out FILE]

SmolLM2-135M-Instruct on the built-in suite (IID partition), LoRA r=8 on q_proj,v_proj (the
float32 adapter up) and zo (FedKSeed, K=4096 seeds; plain: its encoded per-seed scalars up, a
few bytes; secagg: the dense K sums), each with `--clients` clients, every client sampled every
round, one local step of batch 2 per round (the protocol's cost does not depend on the steps).
secagg rows: the default keys (SecAgg: every node a neighbour, threshold 0.67, 32 bits).
Runs go through `fedllm.server.loop.run` on an in-process grid, so a client's seconds are
measured around its ClientApp call, and the server's as the round's wall time less its
clients'. Columns, per round: bytes one client sends and receives (the payloads: arrays and
byte values, for secagg all four stages), a client's seconds outside training (secagg: its
setup, share and unmask stages, and decrypting and masking around the train call), the server's
seconds (screening, routing, unmasking, decoding, applying), and the eval loss after the last
round with secagg's bound on the quantization error of the mean.
The masked vector is one uint32 array (no tensor names), so a LoRA client's secure upload can be a
little smaller than its plain one; the keys and shares column is the protocol's own bytes.
Goals: for LoRA at 16 clients, secagg's extra upload <= 2x the plain upload; the server's
seconds per secure round at 16 clients <= 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from rows import kept, run_rows, save

OUT = Path(__file__).with_suffix(".json")
COMMON = {"data.train-per-family": 16, "data.eval-per-family": 4, "server.exact-match-examples": 0,
          "train.local-steps": 1, "train.batch-size": 2, "server.checkpoint": False, "server.eval-every": 0,
          "lora.rank": 8, "lora.target-modules": "q_proj,v_proj", "zo.bits": 0}


def row_names(clients: list[int]) -> list[str]:
    return [f"{m}-{n}-{mode}" for m in ("lora", "zo") for n in clients for mode in ("plain", "secagg")]


def one_run(name: str, rounds: int, workdir: Path) -> dict[str, Any]:
    from fedllm.config import Config
    from fedllm.server.grid import LocalGrid
    from fedllm.protocol import payload_bytes
    from fedllm.secagg import core
    from fedllm.server.loop import run

    method, n, mode = name.split("-")
    n = int(n)

    class Timed(LocalGrid):
        """Records each reply's client seconds with its stage."""

        def __init__(self) -> None:
            super().__init__(n)
            self.log: list[tuple[str, int, float]] = []
            self.sizes: list[tuple[str, int]] = []  # each reply's payload bytes, by stage

        def reply(self, message):
            stage = message.content.config_records.get(core.SECAGG, {}).get("stage", "plain")
            t0 = time.perf_counter()
            content = super().reply(message)
            self.log.append((stage, message.metadata.dst_node_id, time.perf_counter() - t0))
            self.sizes.append((stage, payload_bytes(content)))
            return content

    grid = Timed()
    cfg = Config.from_flat({**COMMON, "train.method": method, "server.num-rounds": rounds,
                            "server.clients-per-round": n, "server.min-clients": n, "secagg.enabled": mode == "secagg",
                            "server.run-dir": str(workdir), "server.run-name": name})
    t0 = time.perf_counter()
    run_dir = run(grid, cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = rows[1:]
    per_round = len(grid.log) // rounds  # every round sends the same messages
    out: dict[str, Any] = {"clients": n, "rounds": rounds, "seconds": round(wall, 1),
                           "eval-loss": rows[-1]["eval-loss"], "eval-loss-start": rows[0]["eval-loss"]}
    out["bytes-up"] = sum(sum(r["bytes-up"].values()) for r in train_rows) / rounds / n
    out["bytes-down"] = sum(sum(r["bytes-down"].values()) for r in train_rows) / rounds / n
    server, client_extra = [], []
    for i, r in enumerate(train_rows):
        log = grid.log[i * per_round:(i + 1) * per_round]
        server.append(r["train-seconds"] - sum(s for _, _, s in log))
        stages = sum(s for stage, _, s in log if stage in ("setup", "share", "unmask"))
        masking = sum(c.get("secagg-seconds", 0.0) for c in r["clients"].values())
        client_extra.append((stages + masking) / n)
    out["server-seconds"] = sum(server) / rounds
    out["client-extra-seconds"] = sum(client_extra) / rounds
    out["client-train-seconds"] = sum(s for stage, _, s in grid.log if stage in ("train", "plain")) / rounds / n
    for stage in ("setup", "share", "train", "unmask"):
        if mode == "secagg":  # bytes one client sends per round in each stage
            out[f"bytes-up-{stage}"] = sum(b for st, b in grid.sizes if st == stage) / rounds / n
    if mode == "secagg":
        last = train_rows[-1]
        out.update({k: last[k] for k in ("secagg-error-bound", "secagg-threshold", "secagg-clipped")})
        out["unmask-sum-seconds"] = sum(r.get("secagg-seconds-unmask-sum", 0.0) for r in train_rows) / rounds
    return out


def table(results: dict[str, dict[str, Any]], clients: list[int]) -> tuple[dict[str, Any], str]:
    lines = [f"{'method':6} {'n':>3} {'up plain':>10} {'up secagg':>10} {'masked':>10} {'keys+shares':>11} "
             f"{'extra/plain':>11} {'down extra':>10} "
             f"{'client +s':>9} {'server s plain':>14} {'server s secagg':>15} {'eval plain':>10} {'eval secagg':>11} "
             f"{'|diff|':>8} {'bound':>8}"]
    goals: dict[str, Any] = {}
    for m in ("lora", "zo"):
        for n in clients:
            p, s = results.get(f"{m}-{n}-plain"), results.get(f"{m}-{n}-secagg")
            if not p or not s:
                continue
            extra = (s["bytes-up"] - p["bytes-up"]) / p["bytes-up"]
            diff = abs(s["eval-loss"] - p["eval-loss"])
            protocol = s["bytes-up-setup"] + s["bytes-up-share"] + s["bytes-up-unmask"]
            lines.append(f"{m:6} {n:>3} {p['bytes-up']:>10.0f} {s['bytes-up']:>10.0f} {s['bytes-up-train']:>10.0f} "
                         f"{protocol:>11.0f} {extra:>11.3f} "
                         f"{s['bytes-down'] - p['bytes-down']:>10.0f} {s['client-extra-seconds']:>9.3f} "
                         f"{p['server-seconds']:>14.3f} {s['server-seconds']:>15.3f} {p['eval-loss']:>10.5f} "
                         f"{s['eval-loss']:>11.5f} {diff:>8.1e} {s['secagg-error-bound']:>8.1e}")
            if m == "lora" and n == 16:
                goals["lora-16 extra upload / plain upload (goal <= 2)"] = round(extra, 4)
                goals["lora-16 keys and shares up / plain upload"] = round(protocol / p["bytes-up"], 4)
                goals["lora-16 server seconds per secure round (goal <= 1)"] = round(s["server-seconds"], 3)
            if m == "zo" and n == 16:
                goals["zo-16 server seconds per secure round (goal <= 1)"] = round(s["server-seconds"], 3)
    lines.append("bytes per client per round; seconds per round (client: per client, outside training)")
    return goals, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="4,8,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="rows, comma separated (e.g. lora-16-secagg)")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows already in --out")
    ap.add_argument("--out", type=Path, default=OUT)
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    clients = [int(c) for c in opts.clients.split(",") if c]
    setup = {"clients": clients, "rounds": opts.rounds, "common": COMMON}
    done = kept(opts.out, setup, opts.fresh)
    wanted = [n for n in opts.only.split(",") if n] or row_names(clients)
    with tempfile.TemporaryDirectory(prefix="fedllm-secagg-") as tmp:
        run_rows(wanted, done, lambda name: one_run(name, opts.rounds, Path(tmp)), opts.out, setup)
    goals, text = table(done, clients)
    print(text)
    print(json.dumps(goals, indent=1))
    save(opts.out, setup, done, goals=goals, table=text)


if __name__ == "__main__":
    main()
