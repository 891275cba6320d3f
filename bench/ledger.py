"""Ledger figures: on-chain gas per round for 4, 16 and 64 clients, and the time the ledger adds.

    python bench/ledger.py [--quick] [--out FILE]

For each chain (the in-process py-evm chain, and anvil from npm when installed) and client count,
a LedgerSession (the server's side, as in a run) records 3 rounds of synthetic updates the size
of SmolLM2-135M's LoRA r=8 q,v adapter (460,800 values): each round scores them (cosine), flags
one free rider and one noise client, shares 1 ETH by score, records one Merkle root and slashes
the two flagged clients. Reported: gas of recordRound (goal: flat in the client count), gas per
slash, one-off registration gas per client, seconds the ledger adds to a round (scoring, flags,
tree, transactions), and the server's per-reply signature check (update hash + ecrecover). The
session here writes no artifacts, so its rounds post a zero manifest hash (a real one fills one
more storage slot: the disputes table's recordRound).

Disputes (fedllm.ledger.dispute): recordRound with a real (non-zero) manifest hash, with
disputes off and on (ledger.challenge-window > 0), and claim; then a dispute of a round whose root
is wrong, resolved by committees of 1, 3 and 7 verifiers (every step's gas and the whole dispute:
dispute + votes + resolve + the challenger's collect), and one of a correct round (upheld).
Prints tables and writes JSON.
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
from fedllm.ledger.dispute import DisputeRules, Disputes, advance_time
from fedllm.ledger.merkle import Leaf, MerkleTree
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


def measure_disputes(chain: str, committees: tuple[int, ...] = (1, 3, 7)) -> dict:
    """Gas of recordRound and claim with disputes off and on, and of each dispute step."""
    eth = 10**18
    w3 = ledger.connect(chain)
    rules = DisputeRules(3600, 600, eth // 10, eth, 3000)
    out: dict = {"chain": "tester" if chain == "tester" else "anvil", "committees": {}}
    for name, r in (("off", DisputeRules()), ("on", rules)):
        owner, agg = ledger.dev_account(w3, 7, f"owner-{name}", 100), ledger.dev_account(w3, 7, f"agg-{name}", 10)
        fed = ledger.Ledger.deploy(w3, owner, agg.address, eth, 3600, pool=50 * eth, disputes=r)
        court = Disputes(fed)
        if r.window:
            out["gas-bond-aggregator"] = court.bond_aggregator(agg, eth).gas_used
        client = ledger.dev_account(w3, 7, f"claimer-{name}", 5)
        fed.register(client, b"\x01" * 32, eth)
        gas = []
        for k in range(1, 5):
            leaves = [Leaf(k, client.address, 1, k * eth // 10, b"\x02" * 32)] + [
                Leaf(k, f"0x{i + 1:040x}", 1, eth // 10, b"\x02" * 32) for i in range(15)]
            tree = MerkleTree(leaves)
            gas.append(fed.record_round(agg, k, tree.root, k.to_bytes(32, "big"), eth, 16,
                                        (k + 99).to_bytes(32, "big")).gas_used)
        advance_time(w3, r.window)
        out[f"gas-record-round1-{name}"], out[f"gas-record-{name}"] = gas[0], statistics.mean(gas[1:])
        out[f"gas-claim-{name}"] = fed.claim(client, leaves[0], tree.proof(0)).gas_used
        out[f"deploy-gas-{name}"] = fed.deploy_gas
    for size in committees:
        for wrong in (True, False) if size == 3 else (True,):
            owner, agg = ledger.dev_account(w3, size, "owner-d", 100), ledger.dev_account(w3, size, "agg-d", 10)
            fed = ledger.Ledger.deploy(w3, owner, agg.address, eth, 3600, pool=50 * eth, disputes=rules)
            court = Disputes(fed)
            court.bond_aggregator(agg, eth)
            verifiers = [ledger.dev_account(w3, size, f"verifier-{i}-{wrong}", 5) for i in range(size)]
            for i, v in enumerate(verifiers):
                fed.register(v, bytes([i + 1, wrong]) + bytes(30), eth)
            posted, honest = b"\x0b" * 32, (b"\x0c" if wrong else b"\x0b") * 32
            fed.record_round(agg, 1, posted, b"\x0d" * 32, 0, 16, b"\x0e" * 32)
            steps = {"dispute": court.challenge(verifiers[0], 1, eth // 10).gas_used,
                     "votes": [court.vote(v, 1, honest, b"\x0d" * 32).gas_used for v in verifiers]}
            advance_time(w3, rules.voting)
            resolution = court.resolve(owner, 1)
            steps["resolve"] = resolution.gas_used
            steps["outcome"] = resolution.outcome
            steps["collect"] = court.collect(verifiers[0]).gas_used if wrong else 0
            steps["total"] = steps["dispute"] + sum(steps["votes"]) + steps["resolve"] + steps["collect"]
            out["committees"][f"{size}-{resolution.outcome}"] = steps
    return out


def print_disputes(d: dict) -> None:
    print(f"\ndisputes ({d['chain']}): gas with a non-zero manifest hash")
    print(f"{'':22}{'off':>10}{'on':>10}{'on/86,715':>11}")
    for key, label in (("gas-record", "recordRound"), ("gas-record-round1", "recordRound, round 1"),
                       ("gas-claim", "claim"), ("deploy-gas", "deploy")):
        print(f"{label:22}{d[key + '-off']:>10.0f}{d[key + '-on']:>10.0f}{d[key + '-on'] / 86_715:>11.2f}")
    print(f"{'committee':>10}{'outcome':>12}{'dispute':>9}{'vote 1st':>9}{'vote':>8}{'resolve':>9}{'collect':>9}"
          f"{'total':>9}{'/86,715':>9}")
    for name, s in d["committees"].items():
        later = statistics.mean(s["votes"][1:]) if len(s["votes"]) > 1 else float("nan")
        print(f"{name.split('-')[0]:>10}{s['outcome']:>12}{s['dispute']:>9}{s['votes'][0]:>9}{later:>8.0f}"
              f"{s['resolve']:>9}{s['collect']:>9}{s['total']:>9}{s['total'] / 86_715:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tester chain only, 4 and 16 clients, small updates")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--disputes-only", action="store_true", help="only the dispute figures; the JSON keeps "
                        "the earlier run's session figures")
    args = parser.parse_args()
    logging.getLogger("fedllm").setLevel(logging.ERROR)  # the bench's cheaters are slashed every round
    counts, dim = ([4, 16], 10_000) if args.quick else ([4, 16, 64], DIM)
    results, disputes = [], []
    with contextlib.ExitStack() as stack:
        chains = ["tester"]
        if not args.quick and ANVIL.exists():
            chains.append(stack.enter_context(anvil(accounts=2)))
        for chain in chains:
            disputes.append(measure_disputes(chain))
            for n in [] if args.disputes_only else counts:
                results.append(measure(chain, n, dim))
                print(f"  {results[-1]['chain']:6} {n:3d} clients done", flush=True)
    for d in disputes:
        print_disputes(d)
    if args.disputes_only:
        data = json.loads(args.out.read_text()) if args.out.exists() else {}
        args.out.write_text(json.dumps({**data, "disputes": disputes}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
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
    args.out.write_text(json.dumps({"dim": dim, "results": results, "gas-growth": growth, "disputes": disputes},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
