"""The server's side of the ledger: each round, score and flag the clients, share the round's
reward by score, record one Merkle root on chain, and slash the flagged clients' stake.

Files under RUN_DIR/ledger/ (what `fedllm ledger RUN_DIR` shows, and what a client needs to
claim): chain.json (chain, contract, roles, deploy gas), round-NNNN.json (each client's leaf
and Merkle proof, score, flags, reward and penalty), evidence/ (the JSON whose keccak256 is a
penalty's on-chain evidence hash), accounts.json (stake, rewards claimed and pending, at the
end of the run).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fedllm.ledger import chain as ledger, scoring as contribution
from fedllm.ledger.commit import commitment
from fedllm.ledger.dispute import Disputes, rules_of
from fedllm.config import Config
from fedllm.ledger.artifacts import Trail
from fedllm.ledger.merkle import Leaf, MerkleTree
from fedllm.protocol import METRICS, RoundResult

log = logging.getLogger(__name__)

UtilityOf = Callable[[list[int]], float]  # indices of accepted updates -> minus validation loss


def flag_rules(cfg: Config) -> contribution.FlagRules:
    """The flags' thresholds for a run (the server's and `fedllm verify`'s)."""
    # zo updates live on the clients' own draws from the seed pool, which barely overlap, so
    # an honest update is as unaligned with the others as noise: no noise test there
    lc = cfg.ledger
    return contribution.FlagRules(lc.free_rider_ratio, lc.noise_z if cfg.train.method == "lora" else 0.0,
                                  oversize_ratio=lc.oversize_ratio, harmful_ratio=lc.harmful_ratio)


class LedgerSession:
    """One run's ledger: deploys (or attaches to) FedLedger and keeps the round bookkeeping."""

    def __init__(self, cfg: Config, run_dir: Path, cursor: dict[str, Any] | None = None) -> None:
        """`cursor` (from `cursor()`, kept in a checkpoint) continues a run's ledger: the same
        contract, accounts and flag history; the chain must have recorded exactly its rounds.

        Raises:
            ConfigError: naming server.resume when the chain cannot continue from `cursor`.
        """
        self.lc = cfg.ledger
        self.secagg = cfg.secagg.enabled  # updates hidden: the ledger records participation only
        self.dir = run_dir / "ledger"
        (self.dir / "evidence").mkdir(parents=True, exist_ok=True)
        self.w3 = ledger.connect(self.lc.chain)
        if self.lc.owner_key:
            self.owner = ledger.read_key(self.lc.owner_key, "ledger.owner-key")
        else:
            self.owner = ledger.dev_account(self.w3, self.lc.seed, "owner", ether=2 * self.lc.pool + 64 * (
                self.lc.stake + 1) + 10 + (self.lc.aggregator_bond if self.lc.challenge_window else 0))
        self.aggregator = (ledger.read_key(self.lc.aggregator_key, "ledger.aggregator-key")
                           if self.lc.aggregator_key else self.owner)
        deploy_gas = 0
        if cursor is not None:
            self.contract = self.resume(cursor)
        elif self.lc.contract:
            self.contract = ledger.Ledger(self.w3, self.lc.contract)
        else:
            self.contract = ledger.Ledger.deploy(
                self.w3, self.owner, self.aggregator.address, ledger.to_wei(self.lc.min_stake),
                self.lc.unbonding_seconds, self.lc.slashed_to == "burn", ledger.to_wei(self.lc.pool),
                disputes=rules_of(self.lc))
            deploy_gas = self.contract.deploy_gas
        self.disputes = Disputes(self.contract)
        self.disputes.top_up(self.aggregator)  # with disputes on, recordRound needs the aggregator's bond
        if self.lc.client_keys == "simulated" and ledger.to_wei(self.lc.stake) < self.contract.min_stake:
            from fedllm.errors import ConfigError

            raise ConfigError(f"ledger.stake: {self.lc.stake} ether is below the minStake of FedLedger at "
                              f"{self.contract.address} ({self.contract.min_stake / 1e18} ether)")
        self.rules = flag_rules(cfg)
        self.penalties = self.lc.penalty_map()
        self.history = contribution.History()
        self.seen: dict[int, tuple[set[int], dict[int, int]]] = {}  # server round -> commitments()
        self.trail: Trail | None = None  # the rounds' artifacts, once `watch` names the strategy
        self.accounts: dict[str, dict[str, Any]] = {}  # address -> partition, node, cumulative, leaf
        if cursor is not None:
            self.history = contribution.History.from_state(cursor["history"])
            # a resumed run has new SuperNodes: each account binds to its node again on first sight
            self.accounts = {a: {k: v for k, v in acct.items() if k != "node"} for a, acct in cursor["accounts"].items()}
            log.info("ledger: resumed FedLedger at %s after round %d", self.contract.address, cursor["round"])
            return
        self.write("chain.json", {"chain": self.lc.chain, "contract": self.contract.address,
                                  "owner": self.owner.address, "aggregator": self.aggregator.address,
                                  "deploy-gas": deploy_gas, "slashed-to": self.lc.slashed_to,
                                  "disputes": self.disputes.rules()._asdict()})
        log.info("ledger: FedLedger at %s on %s", self.contract.address, self.lc.chain)

    @property
    def address(self) -> str:
        return self.contract.address

    def resume(self, cursor: dict[str, Any]) -> Any:
        """The contract of a checkpointed run, checked to be at the checkpoint's round."""
        from fedllm.errors import ConfigError

        if self.lc.chain == "tester":
            raise ConfigError("server.resume: the run's ledger lived on the in-process chain (ledger.chain=tester), "
                              "which ended with the server; only runs on a chain node (ledger.chain=URL) resume "
                              "with the ledger on")
        try:
            contract = ledger.Ledger(self.w3, cursor["contract"])
        except ledger.LedgerError as err:
            raise ConfigError(f"server.resume: {err}") from err
        last = contract.view("lastRound")
        if last != cursor["round"]:
            raise ConfigError(f"server.resume: FedLedger {cursor['contract']} has recorded up to round {last}, the "
                              f"checkpoint up to round {cursor['round']}; the chain and the checkpoint disagree")
        return contract

    def cursor(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue this ledger: the contract, the last round it
        recorded, the accounts and the flags' history."""
        return {"contract": self.address, "round": self.contract.view("lastRound"), "accounts": self.accounts,
                "history": self.history.state_dict()}

    def write(self, name: str, data: Any) -> None:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)

    # --- what a verifier needs ------------------------------------------------------------------
    def watch(self, strategy: Any, cfg: Config, validation: list[dict[str, str]]) -> None:
        """From now on, write each round's inputs (`strategy`'s state before it, its updates; the
        config and the validation examples the scorers use) as content-addressed artifacts under
        RUN_DIR/ledger/artifacts/, and post their manifest's sha256 with the round."""
        self.trail = Trail(self.dir / "artifacts", strategy, cfg.to_flat(), validation)

    @classmethod
    def replica(cls, cfg: Config, history: contribution.History,
                seen: tuple[set[int], dict[int, int]], server_round: int) -> "LedgerSession":
        """A session with no chain that recomputes a recorded round's rows (`assess`) from its
        manifest: the flags' history before the round and the commitments the round read."""
        self = cls.__new__(cls)
        self.lc, self.secagg, self.rules = cfg.ledger, cfg.secagg.enabled, flag_rules(cfg)
        self.penalties, self.history, self.accounts = self.lc.penalty_map(), history, {}
        self.seen = {server_round: seen}
        return self

    # --- one round ----------------------------------------------------------------------------
    def record(self, server_round: int, signers: dict[int, tuple[str, bytes]], result: RoundResult,
               model_hash: bytes, utility_of: UtilityOf | None = None) -> dict[str, Any]:
        """Score, reward and penalise the round's clients (`signers`: node -> (account, update
        hash), from `signers()`; `result`: the round's accepted and dropped replies); returns
        the metrics row's "ledger"."""
        t0 = time.perf_counter()
        history = self.history.state_dict()  # what the flags compare with, for the round's manifest
        rows, digests, mean = self.assess(server_round, signers, result, utility_of)
        t1 = time.perf_counter()
        inputs = None if self.trail is None else self.trail.inputs(
            server_round, self.address, signers, result, history, self.commitments(server_round, signers))
        kept = time.perf_counter() - t1
        out = self._post(server_round, rows, model_hash, inputs)
        self.history.add([d for d in digests if d], mean)
        out["seconds"] = round(time.perf_counter() - t0, 3)
        out["artifact-seconds"] = round(kept, 3)  # writing the round's artifacts (part of `seconds`)
        log.info("ledger: round %d: %d clients, %.4f ETH shared, %d flagged; gas %d (record) + %d (slash), %.2f s",
                 server_round, len(rows), sum(out["rewards"].values()) / 1e18, len(out["flags"]), out["gas-record"],
                 out["gas-slash"], out["seconds"])
        return out

    def assess(self, server_round: int, signers: dict[int, tuple[str, bytes]], result: RoundResult,
               utility_of: UtilityOf | None = None) -> tuple[list[contribution.Row], list[bytes], torch.Tensor | None]:
        """The round's rows (node, account, update hash, score, flags: one per signed reply), the
        accepted updates' hashes and the example-weighted mean of the unflagged ones; what `record`
        posts, and what `fedllm verify` recomputes with a `replica`."""
        updates = list(result.updates)
        digests = [signers.get(u.node_id, (None, b""))[1] for u in updates]
        vectors = None if self.secagg else (  # under secagg: no update to score or flag
            torch.stack([contribution.flatten(u.delta) for u in updates]) if updates
            else torch.zeros(0, 1, dtype=torch.float64))
        flags = self._flags(server_round, signers, result, vectors, digests, utility_of)
        scores, mean = self._scores(server_round, updates, flags, vectors, utility_of)
        # clients: (node, account, digest, score, flags) for every signed reply
        rows = [(u.node_id, *signers[u.node_id], scores[i], flags[i]) for i, u in enumerate(updates)
                if u.node_id in signers]
        rows += [(node, *signers[node], 0.0, ["invalid"]) for node, reason in result.dropped
                 if node in signers and not reason.startswith("client error")]
        return rows, digests, mean

    def _flags(self, server_round: int, signers: dict[int, tuple[str, bytes]], result: RoundResult,
               vectors: torch.Tensor | None, digests: list[bytes],
               utility_of: UtilityOf | None = None) -> list[list[str]]:
        """Each accepted update's flags: the scorers' tests (with `utility_of`, the method's
        validation utility, each update's validation gain for `harmful`), a robust rule's
        outliers, and an upload that is not the one its client committed to on chain ("invalid")."""
        updates = result.updates
        broken, order = self.commitments(server_round, signers)
        gains = (contribution.validation_gains(lambda chosen: utility_of(sorted(chosen)), len(updates))
                 if utility_of is not None and vectors is not None and self.rules.harmful_ratio > 0 else None)
        if gains is not None:
            log.debug("ledger: round %d: validation gains %s", server_round,
                      {u.node_id: round(g, 6) for u, g in zip(updates, gains)})
        flags = ([[] for _ in updates] if vectors is None
                 else contribution.flag_updates(vectors, digests, self.history, self.rules,
                                                order=[order.get(u.node_id, 0) for u in updates], gains=gains))
        for i, u in enumerate(updates):
            if u.node_id in result.outliers:
                flags[i].append("outlier")
            if u.node_id in broken:
                flags[i].append("invalid")
        return flags

    def _scores(self, server_round: int, updates: list[Any], flags: list[list[str]], vectors: torch.Tensor | None,
                utility_of: UtilityOf | None) -> tuple[list[float], torch.Tensor | None]:
        """Each update's score (0 when flagged; equal shares under secagg, where every survivor's
        masked upload is in the sum) and the example-weighted mean of the unflagged updates."""
        honest = [i for i in range(len(updates)) if not flags[i]]
        scores = [0.0] * len(updates)
        if honest and vectors is None:
            for i in honest:
                scores[i] = 1.0 / len(honest)
            return scores, None
        if not honest:
            return scores, None
        weights = [updates[i].num_examples for i in honest]
        mean = sum(w * vectors[i] for w, i in zip(weights, honest)) / sum(weights)
        utility = (lambda s: utility_of([honest[j] for j in s])) if utility_of else None
        entry = contribution.SCORERS.get(self.lc.scorer)
        opts = {"options": contribution.ShapleyOptions(self.lc.shapley_permutations, seed=server_round)} \
            if entry.meta.get("options") else {}
        for i, s in zip(honest, entry.impl(vectors[honest], weights, mean, utility, **opts)):
            scores[i] = s
        return scores, mean

    def _post(self, server_round: int, rows: list[contribution.Row], model_hash: bytes,
              inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Shares of the round's reward by score, the round's Merkle root (and, with `inputs`, its
        manifest: fedllm.ledger.artifacts) on chain, the slashes, and RUN_DIR/ledger/round-N.json
        with every client's leaf and proof."""
        budget = min(ledger.to_wei(self.lc.reward_per_round), self.contract.view("pool"))
        before = {account: self.accounts[account]["cumulative"] for _, account, *_ in rows}
        leaves = contribution.settle(server_round, rows, budget, before)
        shares = [leaf.cumulative - before[leaf.client] for leaf in leaves]
        for leaf in leaves:
            self.accounts[leaf.client]["cumulative"] = leaf.cumulative
        out: dict[str, Any] = {"scores": {}, "flags": {}, "rewards": {}, "slashed": {}, "gas-record": 0, "gas-slash": 0}
        if not leaves:
            return out
        tree = MerkleTree(leaves)
        manifest = "" if inputs is None else self.trail.manifest(inputs, budget, before, rows, leaves, tree.root,
                                                                model_hash)
        out["gas-record"] = self.contract.record_round(self.aggregator, server_round, tree.root, model_hash,
                                                       sum(shares), len(leaves),
                                                       manifest=bytes.fromhex(manifest or "00" * 32)).gas_used
        entries = []
        for k, ((node, account, digest, score, fl), share, leaf) in enumerate(zip(rows, shares, leaves)):
            taken, evidence = 0, None
            fraction = max((self.penalties.get(f, 0.0) for f in fl), default=0.0)
            if fraction > 0:
                taken, evidence, gas = self.slash(server_round, node, account, digest, fl, fraction)
                out["gas-slash"] += gas
            self.accounts[account].update(leaf=k, round=server_round, node=node)
            self.accounts[account]["slashed"] += taken
            entries.append({"node": str(node), "account": account, "partition": self.accounts[account]["partition"],
                            "score": score, "score-fixed": leaf.score, "flags": fl, "reward": share,
                            "cumulative": leaf.cumulative, "update-hash": digest.hex(), "slashed": taken,
                            "evidence": evidence, "proof": [p.hex() for p in tree.proof(k)]})
            out["scores"][str(node)] = round(score, 6)
            out["rewards"][str(node)] = share
            if fl:
                out["flags"][str(node)] = fl
            if taken:
                out["slashed"][str(node)] = taken
        self.write(f"round-{server_round:04d}.json", {"round": server_round, "root": tree.root.hex(),
                                                      "model-hash": model_hash.hex(), "manifest": manifest,
                                                      "reward": sum(shares),
                                                      "gas-record": out["gas-record"], "clients": entries})
        return out

    def signers(self, server_round: int, replies: list[Any]) -> dict[int, tuple[str, bytes]]:
        """node id -> (account, update hash) for every reply with a valid signature; simulated
        clients are registered (and staked) on first sight."""
        out = {}
        for msg in replies:
            if msg.has_error():
                continue
            node = msg.metadata.src_node_id
            try:
                account, digest = ledger.reply_account(msg.content, self.address, server_round)
            except ledger.LedgerError as err:
                log.warning("ledger: round %d: node %d: %s (no reward, no penalty)", server_round, node, err)
                continue
            metrics = msg.content.metric_records.get(METRICS, {})
            if account not in self.accounts and not self.enrol(account, int(metrics.get("partition-id", -1))):
                continue
            bound = self.accounts[account].setdefault("node", node)
            if bound != node:  # one account, one SuperNode: a second node cannot earn (or lose) for it
                log.warning("ledger: round %d: node %d signs as %s, which belongs to node %d: ignored", server_round,
                            node, account, bound)
                continue
            out[node] = (account, digest)
        return out

    def commitments(self, server_round: int, signers: dict[int, tuple[str, bytes]]) -> tuple[set[int], dict[int, int]]:
        """(nodes whose reveal breaks their commitment, node -> order index of a kept one).

        A node breaks it by committing on chain to anything but `chain.commitment` of the update
        it sent, or, with ledger.commit-reveal, by not committing at all. The order index (1 =
        first committed this round) tells an original from its copies. What a round read is kept
        (`seen`): the round's manifest records it, and a replica reads it from there."""
        if server_round in self.seen:
            return self.seen[server_round]
        broken, order = set(), {}
        for node, (account, digest) in signers.items():
            committed = self.contract.view("commitments", account, server_round)
            if committed == commitment(self.address, server_round, account, digest):
                order[node] = self.contract.view("commitOrder", account, server_round)
            elif committed != bytes(32) or self.lc.commit_reveal:
                log.warning("ledger: round %d: node %d %s", server_round, node,
                            "sent an update other than the one it committed" if committed != bytes(32)
                            else "sent an update it had not committed (ledger.commit-reveal)")
                broken.add(node)
        self.seen = {server_round: (broken, order)}
        return broken, order

    def enrol(self, account: str, pid: int) -> bool:
        """Start tracking an account: register a simulated client (partition `pid`) with its
        stake, or check that a real one registered itself."""
        if self.contract.stake_of(account) == 0:
            if self.lc.client_keys != "simulated":
                log.warning("ledger: %s has no stake on %s (register first): no reward", account, self.address)
                return False
            client = ledger.derived_account(self.lc.seed, f"client-{pid}")
            if client.address != account:
                return False
            stake = ledger.to_wei(self.lc.stake)
            ledger.transfer(self.w3, self.owner, account, stake + ledger.to_wei(0.1))  # stake and gas
            self.contract.register(client, ledger.simulated_identity(self.address, pid), stake)
        self.accounts[account] = {"partition": pid, "cumulative": self.contract.claimed_of(account), "slashed": 0,
                                  "stake-start": self.contract.stake_of(account)}
        return True

    def slash(self, server_round: int, node: int, account: str, digest: bytes, flags: list[str],
              fraction: float) -> tuple[int, str, int]:
        """Take `fraction` of the account's starting stake, with the evidence file's hash."""
        from eth_utils import keccak

        evidence = {"round": server_round, "node": str(node), "account": account, "flags": flags,
                    "update-hash": digest.hex(), "fraction": fraction, "contract": self.address}
        text = json.dumps(evidence, sort_keys=True)
        evidence_hash = keccak(text=text)
        (self.dir / "evidence" / f"{evidence_hash.hex()}.json").write_text(text + "\n")
        amount = int(self.accounts[account]["stake-start"] * fraction)
        before = self.contract.stake_of(account)
        if before == 0:
            log.warning("ledger: round %d: %s (node %s) flagged %s, no stake left to slash", server_round, account,
                        node, ", ".join(flags))
            return 0, evidence_hash.hex(), 0
        receipt = self.contract.slash(self.aggregator, account, server_round, amount, evidence_hash)
        taken = before - self.contract.stake_of(account)
        log.warning("ledger: round %d: slashed %s (node %s) %.4f ETH for %s", server_round, account, node,
                    taken / 1e18, ", ".join(flags))
        return taken, evidence_hash.hex(), receipt.gas_used

    # --- end of run ---------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Simulated clients claim what they are owed (with their latest leaf's proof); then the
        accounts' stake, claimed and pending rewards are written to accounts.json."""
        if self.lc.client_keys == "simulated":
            for account, acct in self.accounts.items():
                if (acct["cumulative"] > self.contract.claimed_of(account) and "round" in acct
                        and self.disputes.is_final(acct["round"])):  # else its challenge window is open: pending
                    entry = json.loads((self.dir / f"round-{acct['round']:04d}.json").read_text())["clients"][acct["leaf"]]
                    leaf = Leaf(acct["round"], account, entry["score-fixed"], entry["cumulative"],
                                bytes.fromhex(entry["update-hash"]))
                    client = ledger.derived_account(self.lc.seed, f"client-{acct['partition']}")
                    self.contract.claim(client, leaf, [bytes.fromhex(p) for p in entry["proof"]])
        snapshot = {"contract": self.address, "pool": self.contract.view("pool"),
                    "allocated": self.contract.view("allocated"), "burned": self.contract.view("burned"),
                    "accounts": {}}
        for account, acct in self.accounts.items():
            claimed = self.contract.claimed_of(account)
            snapshot["accounts"][account] = {
                "partition": acct["partition"], "node": str(acct.get("node", "")), "stake": self.contract.stake_of(account),
                "stake-start": acct["stake-start"], "slashed": acct["slashed"], "earned": acct["cumulative"],
                "claimed": claimed, "pending": acct["cumulative"] - claimed}
        self.write("accounts.json", snapshot)
        return snapshot
