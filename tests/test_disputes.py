"""FedLedger's disputes (fedllm.ledger.dispute): every outcome and every refused move on the
in-process chain (py-evm), one whole overturned round on anvil, the config keys, and gas."""

from __future__ import annotations

import shutil

import pytest

from fedllm.config import ConfigError
from fedllm.config.federation import LedgerConfig
from fedllm.ledger.anvil import ANVIL, anvil
from fedllm.ledger.chain import Ledger, LedgerError, connect, dev_account
from fedllm.ledger.dispute import DisputeRules, Disputes, advance_time, chain_time, rules_of
from fedllm.ledger.merkle import Leaf, MerkleTree

ETH = 10**18
WINDOW, VOTING = 3600, 600
RULES = DisputeRules(WINDOW, VOTING, dispute_bond=ETH // 10, aggregator_bond=ETH, quorum_bps=5000)
STAKE = 2 * ETH  # each of four clients: 8 ETH staked, a quorum of 4 ETH (two votes)
HONEST = [ETH // 10] * 4  # what a round really owes each client
MODEL = b"\x0a" * 32


@pytest.fixture(scope="module")
def tester():
    return connect("tester")


_deployments = iter(range(10**6))


def make_world(w3, rules=RULES, clients=4):
    n = next(_deployments)
    owner, agg = dev_account(w3, n, "owner", 50), dev_account(w3, n, "aggregator", 5)
    ledger = Ledger.deploy(w3, owner, agg.address, min_stake=ETH, unbonding_seconds=VOTING, pool=10 * ETH,
                           disputes=rules)
    accounts = [dev_account(w3, n, f"client-{i}", 5) for i in range(clients)]
    for i, c in enumerate(accounts):
        ledger.register(c, bytes([i + 1]) * 32, STAKE)
    court = Disputes(ledger)
    if rules.window:
        court.bond_aggregator(agg, rules.aggregator_bond)
    return ledger, court, owner, agg, accounts


@pytest.fixture
def world(tester):
    return make_world(tester)


def tree_of(server_round, clients, cumulative):
    leaves = [Leaf(server_round, c.address, 1000, cum, bytes([7]) * 32) for c, cum in zip(clients, cumulative)]
    return leaves, MerkleTree(leaves)


def post(ledger, agg, server_round, clients, cumulative, reward):
    leaves, tree = tree_of(server_round, clients, cumulative)
    ledger.record_round(agg, server_round, tree.root, MODEL, reward, len(leaves), b"\x5e" * 32)
    return leaves, tree


def test_a_correct_round_disputed_is_upheld_and_the_challenger_loses_its_bond(world):
    ledger, court, owner, agg, c = world
    leaves, tree = post(ledger, agg, 1, c, HONEST, 4 * ETH // 10)
    assert court.round(1).status == "posted" and court.round(1).manifest == b"\x5e" * 32
    pool = ledger.view("pool")
    court.challenge(c[0], 1, ETH // 10)
    assert court.round(1).status == "disputed" and ledger.view("openDisputes") == 1
    court.vote(c[0], 1, b"\x66" * 32, MODEL)  # the challenger's own (wrong) answer
    court.vote(c[1], 1, tree.root, MODEL)
    court.vote(c[2], 1, tree.root, MODEL)
    assert court.weight_of(1, tree.root, MODEL) == 2 * STAKE and court.dispute(1).top_root == tree.root
    advance_time(ledger.w3, VOTING)
    result = court.resolve(owner, 1)
    assert (result.outcome, result.root, result.slashed) == ("upheld", tree.root, 0)
    assert ledger.view("pool") == pool + ETH // 10 and court.owed(c[0].address) == 0
    assert court.bond_of(agg.address) == ETH and ledger.view("openDisputes") == 0
    with pytest.raises(LedgerError, match="NotDisputed"):  # resolved once
        court.resolve(owner, 1)
    with pytest.raises(LedgerError, match="AlreadyDisputed"):  # and never disputed again
        court.challenge(c[1], 1, ETH // 10)
    advance_time(ledger.w3, WINDOW)
    ledger.claim(c[1], leaves[1], tree.proof(1))
    assert ledger.claimed_of(c[1].address) == ETH // 10


def test_a_wrong_root_is_overturned_the_aggregator_slashed_and_the_challenger_paid(world):
    ledger, court, owner, agg, c = world
    _, forged = post(ledger, agg, 1, c, [ETH // 10, ETH // 10, ETH // 10, ETH], 13 * ETH // 10)  # c3 overpaid
    honest_leaves, honest = tree_of(1, c, HONEST)
    pool, balance = ledger.view("pool"), ledger.w3.eth.get_balance(c[0].address)
    receipt = court.challenge(c[0], 1, ETH // 10)
    for verifier in c[:3]:
        court.vote(verifier, 1, honest.root, MODEL)
    court.vote(c[3], 1, forged.root, MODEL)  # the one it favoured backs the aggregator: outvoted
    with pytest.raises(LedgerError, match="VotingOpen"):
        court.resolve(c[3], 1)
    advance_time(ledger.w3, VOTING)
    result = court.resolve(c[3], 1)
    assert (result.outcome, result.root, result.slashed) == ("overturned", honest.root, ETH)
    record = court.round(1)
    assert (record.root, record.status) == (honest.root, "overturned")
    assert court.bond_of(agg.address) == 0 and ledger.view("pool") == pool + ETH // 2
    assert court.owed(c[0].address) == ETH // 10 + ETH // 2
    collected = court.collect(c[0])
    assert ledger.w3.eth.get_balance(c[0].address) > balance + ETH // 2 - 3 * 10**9 * (
        receipt.gas_used + collected.gas_used + 200_000)
    with pytest.raises(LedgerError, match="NothingToClaim"):
        court.collect(c[0])
    advance_time(ledger.w3, WINDOW)
    with pytest.raises(LedgerError, match="BadProof"):  # the forged leaf no longer pays
        ledger.claim(c[3], Leaf(1, c[3].address, 1000, ETH, bytes([7]) * 32), forged.proof(3))
    ledger.claim(c[3], honest_leaves[3], honest.proof(3))  # the committee's tree does
    assert ledger.claimed_of(c[3].address) == ETH // 10
    with pytest.raises(LedgerError, match="AggregatorBondTooLow"):  # no more rounds until it bonds again
        post(ledger, agg, 2, c, HONEST, 0)
    court.bond_aggregator(agg, ETH)
    post(ledger, agg, 2, c, HONEST, 0)


@pytest.mark.parametrize("votes, why", [([], "no votes"), ([1], "below the quorum"), ([0, 1, 2, 3], "a tie")])
def test_no_quorum_or_a_tie_leaves_the_round_standing_and_returns_the_bond(world, votes, why):
    ledger, court, owner, agg, c = world
    _, tree = post(ledger, agg, 1, c, HONEST, 4 * ETH // 10)
    court.challenge(c[0], 1, ETH // 5)
    for i in votes:  # a tie: two stakes for the posted root, two for another
        court.vote(c[i], 1, tree.root if i % 2 else b"\x66" * 32, MODEL)
    advance_time(ledger.w3, VOTING)
    result = court.resolve(owner, 1)
    assert (result.outcome, result.root, result.slashed) == ("undecided", tree.root, 0), why
    assert court.owed(c[0].address) == ETH // 5 and court.bond_of(agg.address) == ETH


def test_refused_disputes(world):
    ledger, court, owner, agg, c = world
    with pytest.raises(LedgerError, match="RoundNotRecorded"):
        court.challenge(c[0], 1, ETH // 10)
    post(ledger, agg, 1, c, HONEST, 4 * ETH // 10)
    with pytest.raises(LedgerError, match="NotRegistered"):  # a party without stake
        court.challenge(owner, 1, ETH // 10)
    with pytest.raises(LedgerError, match="DisputeBondTooLow"):
        court.challenge(c[0], 1, ETH // 10 - 1)
    ledger.register(agg, b"\xaa" * 32, STAKE)  # the aggregator as a client too
    with pytest.raises(LedgerError, match="Accused"):
        court.challenge(agg, 1, ETH // 10)
    with pytest.raises(LedgerError, match="NotDisputed"):
        court.vote(c[1], 1, b"\x01" * 32, MODEL)
    with pytest.raises(LedgerError, match="NotDisputed"):
        court.resolve(owner, 1)
    court.challenge(c[0], 1, ETH // 10)
    with pytest.raises(LedgerError, match="AlreadyDisputed"):
        court.challenge(c[1], 1, ETH // 10)
    post(ledger, agg, 2, c, HONEST, 0)
    advance_time(ledger.w3, WINDOW)
    with pytest.raises(LedgerError, match="WindowClosed"):  # round 2's window has passed
        court.challenge(c[1], 2, ETH // 10)


def test_refused_votes(world):
    ledger, court, owner, agg, c = world
    _, tree = post(ledger, agg, 1, c, HONEST, 4 * ETH // 10)
    court.challenge(c[0], 1, ETH // 10)
    court.vote(c[1], 1, tree.root, MODEL)
    with pytest.raises(LedgerError, match="AlreadyVoted"):  # also for another answer
        court.vote(c[1], 1, b"\x66" * 32, MODEL)
    with pytest.raises(LedgerError, match="NotRegistered"):
        court.vote(owner, 1, tree.root, MODEL)
    ledger.register(agg, b"\xaa" * 32, STAKE)
    with pytest.raises(LedgerError, match="Accused"):
        court.vote(agg, 1, tree.root, MODEL)
    with pytest.raises(LedgerError, match="EmptyRoot"):
        court.vote(c[2], 1, bytes(32), MODEL)
    ledger.send(c[3], "requestUnbond")
    with pytest.raises(LedgerError, match="Unbonding"):  # its stake could leave before the vote closes
        court.vote(c[3], 1, tree.root, MODEL)
    advance_time(ledger.w3, VOTING)
    with pytest.raises(LedgerError, match="VotingClosed"):  # a verifier posting late
        court.vote(c[2], 1, tree.root, MODEL)
    assert court.dispute(1).voted_weight == STAKE


def test_claims_wait_for_the_window_and_for_every_open_dispute(world):
    ledger, court, owner, agg, c = world
    leaves1, tree1 = post(ledger, agg, 1, c, HONEST, 4 * ETH // 10)
    with pytest.raises(LedgerError, match="NotFinal"):  # the window is open
        ledger.claim(c[1], leaves1[1], tree1.proof(1))
    assert not court.is_final(1)
    advance_time(ledger.w3, WINDOW)
    assert court.is_final(1)
    leaves2, tree2 = post(ledger, agg, 2, c, [2 * x for x in HONEST], 4 * ETH // 10)
    court.challenge(c[0], 2, ETH // 10)
    for leaf, tree, server_round in ((leaves2, tree2, 2), (leaves1, tree1, 1)):  # a final round waits too
        with pytest.raises(LedgerError, match="DisputeOpen"):
            ledger.claim(c[1], leaf[1], tree.proof(1))
        assert not court.is_final(server_round)
    court.vote(c[1], 2, tree2.root, MODEL)
    court.vote(c[2], 2, tree2.root, MODEL)
    advance_time(ledger.w3, max(VOTING, WINDOW))
    assert court.resolve(owner, 2).outcome == "upheld"
    ledger.claim(c[1], leaves2[1], tree2.proof(1))
    assert ledger.claimed_of(c[1].address) == 2 * ETH // 10


def test_the_aggregator_bond(world, tester):
    ledger, court, owner, agg, c = world
    fresh = dev_account(tester, 999, "aggregator", 5)
    ledger.send(owner, "setAggregator", fresh.address)
    with pytest.raises(LedgerError, match="AggregatorBondTooLow"):  # an unbonded aggregator records nothing
        post(ledger, fresh, 1, c, HONEST, 0)
    with pytest.raises(LedgerError, match="ZeroBond"):
        court.bond_aggregator(fresh, 0)
    court.bond_aggregator(fresh, ETH // 2)
    court.bond_aggregator(fresh, ETH // 2)  # bonds add up
    post(ledger, fresh, 1, c, HONEST, 0)
    with pytest.raises(LedgerError, match="BondLocked"):  # round 1 may still be disputed
        court.withdraw_aggregator_bond(fresh)
    court.challenge(c[0], 1, ETH // 10)
    advance_time(ledger.w3, WINDOW)
    with pytest.raises(LedgerError, match="BondLocked"):  # a dispute is open
        court.withdraw_aggregator_bond(fresh)
    court.resolve(owner, 1)
    court.withdraw_aggregator_bond(fresh)
    court.withdraw_aggregator_bond(agg)  # the first aggregator's bond, once its rounds are safe
    assert court.bond_of(fresh.address) == court.bond_of(agg.address) == 0


def test_disputes_off_by_default(tester):
    ledger, court, owner, agg, c = make_world(tester, rules=DisputeRules())
    leaves, tree = post(ledger, agg, 1, c, HONEST, 4 * ETH // 10)  # no aggregator bond needed
    with pytest.raises(LedgerError, match="DisputesOff"):
        court.challenge(c[0], 1, ETH)
    assert court.is_final(1) and court.round(1).final_at == court.round(1).posted_at
    ledger.claim(c[0], leaves[0], tree.proof(0))  # at once, as before disputes


@pytest.mark.parametrize("rules", [RULES._replace(voting=0), RULES._replace(dispute_bond=0),
                                   RULES._replace(aggregator_bond=0), RULES._replace(quorum_bps=0),
                                   RULES._replace(quorum_bps=10_001), RULES._replace(voting=VOTING + 1)])
def test_the_constructor_refuses_dispute_rules_without_teeth(tester, rules):
    owner = dev_account(tester, 0, "owner", 50)
    with pytest.raises(LedgerError, match="BadDisputeRules"):  # the last: unbonding shorter than the vote
        Ledger.deploy(tester, owner, owner.address, min_stake=ETH, unbonding_seconds=VOTING, disputes=rules)


@pytest.mark.parametrize("fields, key", [
    ({"challenge_window": -1}, "ledger.challenge-window"),
    ({"challenge_window": 60, "voting_seconds": 0}, "ledger.voting-seconds"),
    ({"challenge_window": 60, "dispute_bond": 0.0}, "ledger.dispute-bond"),
    ({"challenge_window": 60, "aggregator_bond": 1e-19}, "ledger.aggregator-bond"),
    ({"challenge_window": 60, "dispute_quorum": 0.0}, "ledger.dispute-quorum"),
    ({"challenge_window": 60, "dispute_quorum": 1.5}, "ledger.dispute-quorum"),
    ({"challenge_window": 60, "unbonding_seconds": 59, "voting_seconds": 60}, "ledger.unbonding-seconds"),
])
def test_config_names_the_bad_dispute_key(fields, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        LedgerConfig(**fields)
    assert rules_of(LedgerConfig(challenge_window=60)) == DisputeRules(60, 3600, ETH // 10, ETH, 5000)
    assert rules_of(LedgerConfig()) == DisputeRules()  # off: the contract ignores the rest


def test_gas_of_a_round_and_of_a_dispute(tester):
    """recordRound stays flat in the client count with disputes on; a whole dispute with three
    verifiers costs a few recordRounds (bench/ledger.py reports the figures)."""
    ledger, court, owner, agg, c = make_world(tester)
    post(ledger, agg, 1, c, HONEST, 0)
    gas = []
    for r, n in enumerate([4, 64, 512], start=2):
        tree = MerkleTree([Leaf(r, c[0].address, i, i, bytes(32)) for i in range(n)])
        gas.append(ledger.record_round(agg, r, tree.root, MODEL, 0, n, b"\x5e" * 32).gas_used)
    assert max(gas) - min(gas) <= 64 and max(gas) <= 2 * 86_715, gas
    steps = [court.challenge(c[0], 4, ETH // 10).gas_used]
    steps += [court.vote(v, 4, b"\x01" * 32, MODEL).gas_used for v in c[:3]]
    advance_time(ledger.w3, VOTING)
    steps.append(court.resolve(owner, 4).gas_used)
    assert sum(steps) < 6 * 86_715, steps


def test_a_wrong_round_is_overturned_on_anvil():
    if not ANVIL.exists():
        if shutil.which("npm"):
            pytest.fail(f"{ANVIL} missing although npm is here: run `make` (npm install --prefix contracts)")
        pytest.skip("npm is not installed, so anvil (@foundry-rs/anvil) cannot be")
    with anvil() as url:
        w3 = connect(url)
        ledger, court, owner, agg, c = make_world(w3, clients=3)
        _, forged = post(ledger, agg, 1, c, [ETH // 10, ETH // 10, ETH], 12 * ETH // 10)
        honest_leaves, honest = tree_of(1, c, HONEST[:3])
        start = chain_time(w3)
        court.challenge(c[0], 1, ETH // 10)
        court.vote(c[0], 1, honest.root, MODEL)
        court.vote(c[1], 1, honest.root, MODEL)
        with pytest.raises(LedgerError, match="DisputeOpen"):
            ledger.claim(c[1], honest_leaves[1], honest.proof(1))
        advance_time(w3, VOTING)
        assert chain_time(w3) >= start + VOTING
        with pytest.raises(LedgerError, match="VotingClosed"):
            court.vote(c[2], 1, forged.root, MODEL)
        result = court.resolve(c[2], 1)
        assert (result.outcome, result.root, result.slashed) == ("overturned", honest.root, ETH)
        court.collect(c[0])
        advance_time(w3, WINDOW)
        ledger.claim(c[2], honest_leaves[2], honest.proof(2))
        assert ledger.claimed_of(c[2].address) == ETH // 10


def test_a_run_deploys_with_its_dispute_keys_and_bonds_its_aggregator(tmp_path, monkeypatch):
    import json

    from fedllm.config import Config
    from fedllm.ledger import chain as chain_module
    from fedllm.ledger.session import LedgerSession

    w3 = connect("tester")
    monkeypatch.setattr(chain_module, "connect", lambda url: w3)
    flat = {"ledger.enabled": True, "ledger.challenge-window": 120, "ledger.voting-seconds": 30,
            "ledger.dispute-bond": 0.05, "ledger.aggregator-bond": 2.0, "ledger.dispute-quorum": 0.25}
    session = LedgerSession(Config.from_flat(flat), tmp_path)
    rules = DisputeRules(120, 30, ETH // 20, 2 * ETH, 2500)
    assert session.disputes.rules() == rules
    assert session.disputes.bond_of(session.aggregator.address) == 2 * ETH
    assert json.loads((tmp_path / "ledger" / "chain.json").read_text())["disputes"] == rules._asdict()
    again = LedgerSession(Config.from_flat({**flat, "ledger.contract": session.address}), tmp_path / "b")
    assert again.disputes.bond_of(session.aggregator.address) == 2 * ETH  # attached: bonded already, not twice
    off = LedgerSession(Config.from_flat({"ledger.enabled": True}), tmp_path / "c")
    assert off.disputes.rules() == DisputeRules() and off.disputes.bond_of(off.aggregator.address) == 0
