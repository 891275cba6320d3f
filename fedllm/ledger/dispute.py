"""Disputes on FedLedger (ledger.challenge-window > 0): challenge a posted round, vote the root
that `fedllm verify` recomputed, resolve by stake-weighted majority (docs/ledger.md, Disputes).

    rules = DisputeRules(window=3600, voting=600, dispute_bond=to_wei(0.1), aggregator_bond=to_wei(1))
    ledger = Ledger.deploy(w3, owner, agg.address, to_wei(0.5), disputes=rules)
    court = Disputes(ledger)
    court.bond_aggregator(agg, to_wei(1))                # before the aggregator records rounds
    court.challenge(client, 3, to_wei(0.1))              # within the window after round 3's record
    court.vote(verifier, 3, root, model_hash)            # what it recomputed, within the vote
    advance_time(w3, 600)                                # tester and anvil only
    court.resolve(anyone, 3).outcome                     # "upheld", "overturned" or "undecided"
    court.collect(client)                                # the challenger's bond (and reward)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from fedllm.config.federation import LedgerConfig
from fedllm.ledger.chain import Ledger, LedgerError, Receipt, to_wei

log = logging.getLogger(__name__)
STATUS = ("posted", "disputed", "upheld", "overturned", "undecided")  # FedLedger.Status, in order


class DisputeRules(NamedTuple):
    """FedLedger's dispute settings, fixed at deployment (its constructor's last five
    arguments); window 0 turns disputes off and the rest is ignored."""
    window: int = 0  # seconds after a round's record during which it may be disputed
    voting: int = 0  # seconds a dispute's vote stays open
    dispute_bond: int = 0  # wei, the least a challenger bonds
    aggregator_bond: int = 0  # wei, the least bond to record rounds; what an overturned round costs it
    quorum_bps: int = 5000  # share of the stake (in 1/10000) the votes must carry for a decision


def rules_of(lc: LedgerConfig) -> DisputeRules:
    """The DisputeRules a run deploys with, from its [ledger] config."""
    if lc.challenge_window == 0:
        return DisputeRules()
    return DisputeRules(lc.challenge_window, lc.voting_seconds, to_wei(lc.dispute_bond), to_wei(lc.aggregator_bond),
                        round(lc.dispute_quorum * 10_000))


@dataclass(frozen=True)
class RoundRecord:
    """A recorded round as the chain holds it now (root and model hash replaced if overturned)."""
    root: bytes
    model_hash: bytes
    manifest: bytes
    aggregator: str
    posted_at: int  # block time; 0: not recorded
    status: str  # one of STATUS
    final_at: int  # when its window closes (its leaves claimable, if no dispute is open)


@dataclass(frozen=True)
class DisputeState:
    challenger: str
    voting_ends: int
    bond: int
    quorum: int  # stake the votes must carry
    voted_weight: int
    top_weight: int
    top_root: bytes  # the answer with the most stake so far
    top_model_hash: bytes
    tied: bool


@dataclass(frozen=True)
class Resolution:
    outcome: str  # upheld, overturned or undecided
    root: bytes  # the round's root after resolution
    model_hash: bytes
    slashed: int  # wei taken from the aggregator's bond
    gas_used: int


class Disputes:
    """The dispute calls of one deployed FedLedger; each sends a signed transaction from the
    account it is given and raises LedgerError with the contract's error name on a revert."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.w3 = ledger.w3

    def rules(self) -> DisputeRules:
        view = self.ledger.view
        return DisputeRules(view("challengeWindow"), view("votingPeriod"), view("disputeBond"),
                            view("aggregatorBond"), view("quorumBps"))

    # --- transactions ---------------------------------------------------------------------------
    def bond_aggregator(self, aggregator: Any, value: int) -> Receipt:
        return self.ledger.send(aggregator, "bondAggregator", value=value)

    def top_up(self, aggregator: Any) -> int:
        """With disputes on, bond what `aggregator` lacks of the contract's aggregatorBond (which
        recordRound requires); returns the wei bonded."""
        rules = self.rules()
        short = rules.aggregator_bond - self.bond_of(aggregator.address)
        if not rules.window or short <= 0:
            return 0
        self.bond_aggregator(aggregator, short)
        log.info("ledger: aggregator %s bonded %.4f ETH (disputes on, %d s window)", aggregator.address, short / 1e18,
                 rules.window)
        return short

    def withdraw_aggregator_bond(self, aggregator: Any) -> Receipt:
        return self.ledger.send(aggregator, "withdrawAggregatorBond")

    def challenge(self, challenger: Any, server_round: int, bond: int) -> Receipt:
        """Dispute `server_round` (a registered client, not its aggregator), bonding `bond` wei."""
        return self.ledger.send(challenger, "dispute", server_round, value=bond)

    def vote(self, verifier: Any, server_round: int, root: bytes, model_hash: bytes) -> Receipt:
        """Post the root and model hash `verifier` recomputed for a disputed round."""
        return self.ledger.send(verifier, "vote", server_round, root, model_hash)

    def resolve(self, sender: Any, server_round: int) -> Resolution:
        """Close the dispute once its vote has closed; anyone may send it."""
        receipt = self.ledger.send(sender, "resolve", server_round)
        tx = self.w3.eth.get_transaction_receipt(receipt.tx_hash)
        event = self.ledger.contract.events.Resolved().process_receipt(tx)[0]["args"]
        return Resolution(STATUS[event["outcome"]], bytes(event["root"]), bytes(event["modelHash"]),
                          event["slashed"], receipt.gas_used)

    def collect(self, account: Any) -> Receipt:
        """Pull what resolved disputes owe `account` (a challenger's bond and reward)."""
        return self.ledger.send(account, "collect")

    # --- views ----------------------------------------------------------------------------------
    def round(self, server_round: int) -> RoundRecord:
        manifest, aggregator, posted_at, status = self.ledger.view("rounds", server_round)
        window = self.ledger.view("challengeWindow")
        return RoundRecord(bytes(self.ledger.view("roundRoot", server_round)),
                           bytes(self.ledger.view("modelHash", server_round)), bytes(manifest), aggregator,
                           posted_at, STATUS[status], posted_at + window if posted_at else 0)

    def dispute(self, server_round: int) -> DisputeState:
        challenger, ends, tied, bond, quorum, voted, top, root, model = self.ledger.view("disputes", server_round)
        return DisputeState(challenger, ends, bond, quorum, voted, top, bytes(root), bytes(model), tied)

    def weight_of(self, server_round: int, root: bytes, model_hash: bytes) -> int:
        """The stake that voted (root, model hash) in the round's dispute."""
        from eth_abi import encode
        from eth_utils import keccak

        return self.ledger.view("weightOf", server_round, keccak(encode(["bytes32", "bytes32"], [root, model_hash])))

    def is_final(self, server_round: int) -> bool:
        """Whether the round's leaves may be claimed now (its window passed, no dispute open)."""
        return self.ledger.view("isFinal", server_round)

    def owed(self, address: str) -> int:
        return self.ledger.view("owed", self.w3.to_checksum_address(address))

    def bond_of(self, address: str) -> int:
        return self.ledger.view("bondOf", self.w3.to_checksum_address(address))


def chain_time(w3: Any) -> int:
    """The latest block's timestamp."""
    return w3.eth.get_block("latest")["timestamp"]


def advance_time(w3: Any, seconds: int) -> None:
    """Move a dev chain's clock `seconds` ahead and mine a block: the in-process tester chain
    (time travel) or anvil/hardhat (evm_increaseTime, evm_mine). A real chain refuses."""
    if seconds <= 0:
        return
    tester = getattr(w3.provider, "ethereum_tester", None)
    if tester is not None:
        tester.time_travel(chain_time(w3) + seconds)
        tester.mine_blocks(1)  # so that calls (which read the latest block) see the new time too
        return
    for method, params in (("evm_increaseTime", [seconds]), ("evm_mine", [])):
        reply = w3.provider.make_request(method, params)
        if "error" in reply:
            raise LedgerError(f"{method}: {reply['error']} (only dev chains move their clock)")
