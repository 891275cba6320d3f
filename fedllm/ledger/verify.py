"""`fedllm verify RUN_DIR [--round N]`: recompute posted rounds from their artifacts alone and
compare them with what was posted.

For each round, the manifest posted on chain (its sha256, FedLedger's `rounds(N)`) names the
round's inputs (fedllm.ledger.artifacts). The verifier reads them, checking every blob against
its name, then recomputes as the server did, with the same code, on the CPU with the thread count
the server used:
- the aggregate: the run's strategy (rule chain and method, built from the recorded config) is
  loaded with the recorded state before the round and concludes the round on the recorded
  updates; the global state's digest must equal the posted model hash;
- the flags and scores (`LedgerSession.assess` on a replica holding the recorded flag history
  and commitments), the reward shares and cumulative rewards (`scoring.settle`) and the Merkle
  root over the leaves, which must equal the posted root.

What was posted is read from the chain (ledger.chain in the run's config, or `--chain URL`).
The in-process chain (ledger.chain=tester) ended with its server: its runs are compared with the
run's own records of what it posted (RUN_DIR/ledger/round-NNNN.json), which says so.

A round is `reproduced` (the recomputed root and model hash equal the posted ones; after a
dispute overturned a round, the chain holds the committee's root), `mismatch` (with each
difference named: the root, the model hash, and which client's score, flags or reward differs
from what the manifest says the server computed) or `unverifiable` (an artifact missing or altered, a
manifest that is not the posted one). A dispute's verifier votes the recomputed root and model
hash (`--json` prints them as `vote`, with each recomputed leaf and its Merkle proof: what the
clients claim with once a dispute has overturned the round); for an unverifiable round it votes `unavailable()`, a
root no leaf proves against: the aggregator must keep the artifacts it committed to.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm.errors import FedLLMError
from fedllm.ledger.artifacts import MANIFEST_FORMAT, ArtifactError, Store
from fedllm.ledger.merkle import MerkleTree

ZERO = "00" * 32


def unavailable() -> str:
    """What a verifier votes for a round it cannot recompute (an artifact missing or altered): a
    root and model hash no leaf can prove against, so an overturned round pays nothing and its
    aggregator, who had to keep the artifacts it committed to, loses its bond."""
    from eth_utils import keccak

    return keccak(text="fedllm: the round's artifacts are unavailable").hex()


@dataclass
class Check:
    """One round's verdict: `status` is reproduced, mismatch or unverifiable."""

    round: int
    status: str
    posted: dict[str, str]  # root, model-hash, manifest (hex)
    recomputed: dict[str, str] = field(default_factory=dict)  # root, model-hash (hex)
    leaves: list[dict[str, Any]] = field(default_factory=list)  # each recomputed leaf and its Merkle proof
    problems: list[str] = field(default_factory=list)
    source: str = "chain"  # where `posted` came from: chain, or the run's records

    def vote(self) -> dict[str, str]:
        """The root and model hash to vote in a dispute of this round."""
        if self.status == "unverifiable":
            return {"root": unavailable(), "model-hash": unavailable()}
        return {"root": self.recomputed["root"], "model-hash": self.recomputed["model-hash"]}

    def line(self) -> str:
        head = f"round {self.round}: {self.status}"
        if self.status == "reproduced":
            root, model = self.recomputed["root"], self.recomputed["model-hash"]
            return f"{head}: root 0x{root[:16]}…, model hash 0x{model[:16]}…"
        return head + "".join(f"\n  - {p}" for p in self.problems)


def posted_rounds(run_dir: Path, chain: str | None = None) -> tuple[dict[int, dict[str, str]], str]:
    """Round -> the root, model hash and manifest posted for it, and where they were read.

    Raises:
        FedLLMError: naming the run directory when it has no ledger.
    """
    ledger_dir = run_dir / "ledger"
    try:
        meta = json.loads((ledger_dir / "chain.json").read_text())
    except (OSError, ValueError):
        raise FedLLMError(f"{run_dir}: no readable ledger/chain.json (ledger.enabled was off?)") from None
    records = {}
    for path in sorted(ledger_dir.glob("round-*.json")):
        try:
            r = json.loads(path.read_text())
            records[int(r["round"])] = {"root": r["root"], "model-hash": r["model-hash"],
                                        "manifest": r.get("manifest") or ""}
        except (OSError, ValueError, KeyError, TypeError):
            raise FedLLMError(f"{path}: not a round record") from None
    url = chain or meta.get("chain", "tester")
    if url == "tester":
        return records, "the run's records (ledger.chain=tester ended with its server)"
    from fedllm.ledger import chain as ledger
    from fedllm.ledger.dispute import Disputes

    court = Disputes(ledger.Ledger(ledger.connect(url), meta["contract"]))
    out = {}
    for n in range(1, court.ledger.view("lastRound") + 1):
        record = court.round(n)  # after an overturn: the committee's root and model hash
        if record.root != bytes(32):
            out[n] = {"root": record.root.hex(), "model-hash": record.model_hash.hex(),
                      "manifest": record.manifest.hex()}
    return out, f"FedLedger {meta['contract']} on {url}"


class Verifier:
    """Recomputes rounds of one run; keeps the strategy it built between rounds of one config."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.store = Store(self.run_dir / "ledger" / "artifacts")
        self.built: tuple[str, Any, Any] | None = None  # config sha, Config, strategy

    def check(self, n: int, posted: dict[str, str], source: str) -> Check:
        out = Check(n, "unverifiable", posted, source=source)
        if not posted.get("manifest") or posted["manifest"] == ZERO:
            out.problems.append("no manifest was posted for this round (a run without `watch`, or before "
                                "verifiable rounds)")
            return out
        try:
            manifest = self.store.get_json(posted["manifest"])
            if manifest.get("format") != MANIFEST_FORMAT or manifest.get("round") != n:
                raise ArtifactError(f"manifest {posted['manifest']}: not round {n}'s manifest (format "
                                    f"{manifest.get('format')!r}, round {manifest.get('round')!r})")
            out.recomputed = self.recompute(n, manifest)
        except ArtifactError as err:
            out.problems.append(str(err))
            return out
        out.leaves = out.recomputed.pop("clients")
        clients = out.leaves
        for key in ("root", "model-hash"):
            if out.recomputed[key] != posted[key]:
                out.problems.append(f"{key}: posted 0x{posted[key]}, recomputed 0x{out.recomputed[key]}")
        if out.problems:  # what the server says it computed, client by client, against the recomputation
            out.problems += client_differences(manifest.get("clients", []), clients)
        out.status = "mismatch" if out.problems else "reproduced"
        return out

    def strategy(self, config_sha: str) -> tuple[Any, Any]:
        """The run's Config and strategy (built once per config), on the CPU."""
        if self.built is None or self.built[0] != config_sha:
            from fedllm.config import Config
            from strategies import build

            flat = self.store.get_json(config_sha)
            if not isinstance(flat, dict):
                raise ArtifactError(f"config {config_sha}: not a flat config")
            for key in ("model.device", "server.device"):
                if key in flat:
                    flat[key] = "cpu"
            flat["server.resume"] = ""
            cfg = Config.from_flat(flat)
            if cfg.secagg.enabled:
                raise ArtifactError("secagg.enabled: the ledger saw masked uploads only; nothing to recompute")
            self.built = (config_sha, cfg, build(cfg))
        return self.built[1], self.built[2]

    def recompute(self, n: int, m: dict[str, Any]) -> dict[str, Any]:
        """The round's root, model hash and client rows, from the manifest's artifacts alone."""
        import torch

        from fedllm.ledger import scoring
        from fedllm.ledger.session import LedgerSession
        from fedllm.protocol import Update

        try:
            cfg, strategy = self.strategy(m["config"])
            if strategy.chain.noise_std > 0:
                raise ArtifactError("the rule chain adds DP noise from the server's random state, which no "
                                    "artifact holds: not reproducible")
            torch.set_num_threads(int(m["threads"]))
            strategy.load_state_dict(self.store.get_state(m["state-before"]))
            updates = [Update(int(u["node"]), self.store.get_state(u["delta"]), u["num-examples"], dict(u["metrics"]),
                              int(u["bytes-up"])) for u in m["updates"]]
            dropped = [(int(node), str(reason)) for node, reason in m["dropped"]]
            result = strategy.conclude(n, updates, dropped, None, 0)
            model_hash = strategy.method.digest()
            utility = (strategy.method.utility(list(result.updates), self.store.get_json(m["validation"]))
                       if scoring.needs_utility(cfg.ledger) else None)
            seen = ({int(x) for x in m["commitments"]["broken"]},
                    {int(k): int(v) for k, v in m["commitments"]["order"].items()})
            history = scoring.History.from_state(self.store.get_state(m["history-before"]))
            signers = {int(k): (a, bytes.fromhex(d)) for k, (a, d) in m["signers"].items()}
            rows, _, _ = LedgerSession.replica(cfg, history, seen, n).assess(n, signers, result, utility)
            leaves = scoring.settle(n, rows, int(m["budget"]), {a: int(c) for a, c in m["cumulative-before"].items()})
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"manifest of round {n}: malformed ({type(err).__name__}: {err})") from None
        tree = MerkleTree(leaves) if leaves else None
        clients = [{"node": str(node), "account": account, "score-fixed": leaf.score, "flags": fl,
                    "cumulative": leaf.cumulative, "update-hash": leaf.update_hash.hex(),
                    "proof": [p.hex() for p in tree.proof(k)]}
                   for k, ((node, account, _, _, fl), leaf) in enumerate(zip(rows, leaves))]
        return {"root": tree.root.hex() if tree else ZERO, "model-hash": model_hash.hex(), "clients": clients}


def client_differences(recorded: list[dict[str, Any]], recomputed: list[dict[str, Any]]) -> list[str]:
    """What differs, client by client, between the manifest's rows and the recomputed ones."""
    out = []
    mine = {c["account"]: c for c in recomputed}
    for c in recorded:
        other = mine.pop(c.get("account"), None)
        if other is None:
            out.append(f"node {c.get('node')} ({c.get('account')}): recorded, but not among the recomputed rows")
            continue
        for key in ("score-fixed", "flags", "cumulative"):
            if c.get(key) != other[key]:
                out.append(f"node {c.get('node')}: {key} recorded {c.get(key)}, recomputed {other[key]}")
    out += [f"node {c['node']} ({c['account']}): recomputed, but not recorded" for c in mine.values()]
    return out


def verify(run_dir: Path, rounds: list[int] | None = None, chain: str | None = None) -> list[Check]:
    """Each posted round's check (or only `rounds`).

    Raises:
        FedLLMError: for a run directory without a ledger, or a round that was never posted.
    """
    posted, source = posted_rounds(Path(run_dir), chain)
    wanted = sorted(posted) if rounds is None else rounds
    missing = [n for n in wanted if n not in posted]
    if missing:
        raise FedLLMError(f"--round: round(s) {', '.join(map(str, missing))} were not posted "
                          f"(posted: {', '.join(map(str, sorted(posted))) or 'none'})")
    verifier = Verifier(Path(run_dir))
    return [verifier.check(n, posted[n], source) for n in wanted]
