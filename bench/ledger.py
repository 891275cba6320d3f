"""Ledger figures: on-chain gas per round for 4, 16 and 64 clients, and the time the ledger adds.

    python bench/ledger.py [--quick] [--out FILE]

For each chain (the in-process py-evm chain, and anvil from npm when installed) and client count,
a LedgerSession (the server's side, as in a run) records 3 rounds of synthetic updates the size
of SmolLM2-135M's LoRA r=8 q,v adapter (460,800 values): each round scores them (cosine), flags
one free rider and one noise client, shares 1 ETH by score, records one Merkle root and slashes
the two flagged clients. Reported: gas of recordRound (goal: flat in the client count), gas per
slash, one-off registration gas per client, seconds the ledger adds to a round (scoring, flags,
tree, transactions), and the server's per-reply signature check (update hash + ecrecover).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.ledger import chain as ledger
from fedllm.ledger.anvil import ANVIL, anvil
from fedllm.ledger.session import LedgerSession
from fedllm.config import Config
from fedllm.protocol import RoundResult, Update

OUT = Path(__file__).with_suffix(".json")
DIM = 460_800  # SmolLM2-135M, LoRA r=8 on q_proj and v_proj


def synthetic_round(n: int, dim: int, server_round: int) -> list[Update]:
    gen = torch.Generator().manual_seed(server_round)
    common = torch.randn(dim, generator=gen)
    updates = [Update(i, {"w": common + 2.0 * torch.randn(dim, generator=gen)}, 16.0) for i in range(n)]
    updates[-1].delta["w"].zero_()  # a free rider
    updates[-2].delta["w"] = torch.randn(dim, generator=gen) * updates[0].delta["w"].norm() / dim**0.5  # noise
    return updates


def reply_check_ms(session: LedgerSession, dim: int, repeats: int = 5) -> tuple[float, float]:
    """Client: hash + sign a reply of `dim` float32 values; server: hash + recover, in ms."""
    account = ledger.derived_account(0, "client-0")
    content = RecordDict({"arrays": ArrayRecord({"w": torch.randn(dim)}), "metrics": MetricRecord({"num-examples": 1})})
    sign, check = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sig = ledger.sign_update(account, session.address, 1, ledger.update_hash(content))
        sign.append(time.perf_counter() - t0)
        content[ledger.LEDGER_RECORD] = ConfigRecord({"account": account.address, "signature": sig})
        t0 = time.perf_counter()
        ledger.reply_account(content, session.address, 1)
        check.append(time.perf_counter() - t0)
    return 1000 * statistics.median(sign), 1000 * statistics.median(check)


def measure(chain: str, n: int, dim: int, rounds: int = 3) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Config.from_flat({"ledger.enabled": True, "ledger.chain": chain, "ledger.pool": 1000.0})
        session = LedgerSession(cfg, Path(tmp))
        accounts = [ledger.derived_account(cfg.ledger.seed, f"client-{i}").address for i in range(n)]
        t0 = time.perf_counter()
        for i, account in enumerate(accounts):
            session.enrol(account, i)
        register_s = time.perf_counter() - t0
        rows = []
        for r in range(1, rounds + 1):
            updates = synthetic_round(n, dim, r)
            signers = {u.node_id: (accounts[u.node_id], r.to_bytes(16, "big") + u.node_id.to_bytes(16, "big"))
                       for u in updates}
            result = RoundResult(r, tuple(updates))
            rows.append(session.record(r, signers, result, r.to_bytes(32, "big")))  # a model hash: one SSTORE
        flagged = [sorted(row["flags"]) for row in rows]
        sign_ms, check_ms = reply_check_ms(session, dim)
    steady = rows[1:]  # round 1 also turns lastRound's storage slot from zero
    return {
        "chain": chain.split(":")[0] if chain == "tester" else "anvil",
        "clients": n,
        "gas-record-round1": rows[0]["gas-record"],
        "gas-record": statistics.mean(row["gas-record"] for row in steady),
        "gas-per-slash": statistics.mean(row["gas-slash"] / len(row["slashed"]) for row in rows if row["slashed"]),
        "slashed-per-round": statistics.mean(len(row["slashed"]) for row in rows),
        "flags-ok": all(len(f) == 2 for f in flagged),
        "register-s-per-client": register_s / n,
        "ledger-s-per-round": statistics.mean(row["seconds"] for row in steady),
        "sign-ms-per-reply": sign_ms,
        "check-ms-per-reply": check_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tester chain only, 4 and 16 clients, small updates")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.getLogger("fedllm").setLevel(logging.ERROR)  # the bench's cheaters are slashed every round
    counts, dim = ([4, 16], 10_000) if args.quick else ([4, 16, 64], DIM)
    results = []
    with contextlib.ExitStack() as stack:
        chains = ["tester"]
        if not args.quick and ANVIL.exists():
            chains.append(stack.enter_context(anvil(accounts=2)))
        for chain in chains:
            for n in counts:
                results.append(measure(chain, n, dim))
                print(f"  {results[-1]['chain']:6} {n:3d} clients done", flush=True)
    header = (f"{'chain':7}{'clients':>8}{'gas/round':>11}{'round 1':>9}{'gas/slash':>10}{'ledger s/round':>16}"
              f"{'sign ms':>9}{'check ms':>10}{'flags':>7}")
    print(header)
    for r in results:
        print(f"{r['chain']:7}{r['clients']:>8}{r['gas-record']:>11.0f}{r['gas-record-round1']:>9}"
              f"{r['gas-per-slash']:>10.0f}{r['ledger-s-per-round']:>16.3f}{r['sign-ms-per-reply']:>9.2f}"
              f"{r['check-ms-per-reply']:>10.2f}{'ok' if r['flags-ok'] else 'MISS':>7}")
    by_chain: dict[str, list[dict]] = {}
    for r in results:
        by_chain.setdefault(r["chain"], []).append(r)
    growth = {c: max(r["gas-record"] for r in rs) / min(r["gas-record"] for r in rs) for c, rs in by_chain.items()}
    for c, g in growth.items():
        print(f"{c}: gas per round, most / fewest clients = {g:.4f} (goal: flat, 1.00)")
    args.out.write_text(json.dumps({"dim": dim, "results": results, "gas-growth": growth}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
