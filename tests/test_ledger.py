"""FedLedger through web3: on the in-process chain (py-evm) and on a real node (anvil from npm,
started on 127.0.0.1 at a free port). Also the Merkle tree and the artifacts' freshness."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from fedllm.ledger.scoring import reward_shares
from fedllm.ledger.anvil import ANVIL, anvil
from fedllm.ledger.chain import ARTIFACTS, Ledger, LedgerError, artifact, connect, dev_account, to_wei
from fedllm.ledger.merkle import Leaf, MerkleTree, verify

ETH = 10**18
UNBONDING = 3600


@pytest.fixture(scope="module", params=["tester", "anvil"])
def chain(request):
    if request.param == "tester":
        yield connect("tester")
        return
    if not ANVIL.exists():
        if shutil.which("npm"):
            pytest.fail(f"{ANVIL} missing although npm is here: run `make` (npm install --prefix contracts)")
        pytest.skip("npm is not installed, so anvil (@foundry-rs/anvil) cannot be")
    with anvil() as url:
        yield connect(url)


_deployments = iter(range(10**6))


@pytest.fixture
def world(chain):
    """A fresh ledger (pool 10 ETH, min stake 1) with three registered clients."""
    n = next(_deployments)
    owner, agg = dev_account(chain, n, "owner", 50), dev_account(chain, n, "aggregator", 5)
    ledger = Ledger.deploy(chain, owner, agg.address, min_stake=ETH, unbonding_seconds=UNBONDING, pool=10 * ETH)
    clients = [dev_account(chain, n, f"client-{i}", 5) for i in range(3)]
    for i, c in enumerate(clients):
        ledger.register(c, bytes([i + 1]) * 32, 2 * ETH)
    return ledger, owner, agg, clients


def record(ledger, agg, server_round, clients, cumulative, reward=None):
    leaves = [Leaf(server_round, c.address, 1000, cum, bytes([7]) * 32) for c, cum in zip(clients, cumulative)]
    tree = MerkleTree(leaves)
    ledger.record_round(agg, server_round, tree.root, bytes(32), sum(cumulative) if reward is None else reward,
                        len(leaves))
    return leaves, tree


def advance(w3, seconds):
    if hasattr(w3.provider, "ethereum_tester"):
        tester = w3.provider.ethereum_tester
        tester.time_travel(w3.eth.get_block("latest")["timestamp"] + seconds)
    else:
        w3.provider.make_request("evm_increaseTime", [seconds])
        w3.provider.make_request("evm_mine", [])


def test_privileged_functions_reject_other_accounts(world):
    ledger, owner, agg, clients = world
    leaves, tree = record(ledger, agg, 1, clients, [ETH // 10] * 3)
    for sender in [clients[0], agg]:
        with pytest.raises(LedgerError, match="NotOwner"):
            ledger.send(sender, "setAggregator", sender.address)
        with pytest.raises(LedgerError, match="NotOwner"):
            ledger.fund(sender, ETH)
    for sender in [clients[0], owner]:
        with pytest.raises(LedgerError, match="NotAggregator"):
            ledger.record_round(sender, 2, tree.root, bytes(32), 0, 3)
        with pytest.raises(LedgerError, match="NotAggregator"):
            ledger.slash(sender, clients[1].address, 1, ETH, bytes(32))
    assert ledger.view("lastRound") == 1 and ledger.stake_of(clients[1].address) == 2 * ETH
    ledger.send(owner, "setAggregator", clients[2].address)  # the owner may hand the role on
    assert ledger.view("aggregator") == clients[2].address


def test_claim_pays_once_and_only_with_own_leaf(world):
    ledger, owner, agg, clients = world
    leaves, tree = record(ledger, agg, 1, clients, [ETH // 10, 2 * ETH // 10, 3 * ETH // 10])
    with pytest.raises(LedgerError, match="BadProof"):  # another client's leaf and proof
        ledger.claim(clients[1], leaves[0], tree.proof(0))
    with pytest.raises(LedgerError, match="BadProof"):  # own leaf, inflated amount
        ledger.claim(clients[0], Leaf(1, clients[0].address, 1000, ETH, bytes([7]) * 32), tree.proof(0))
    before = ledger.w3.eth.get_balance(clients[0].address)
    receipt = ledger.claim(clients[0], leaves[0], tree.proof(0))
    assert ledger.claimed_of(clients[0].address) == ETH // 10
    fee = before + ETH // 10 - ledger.w3.eth.get_balance(clients[0].address)
    assert 0 < fee <= receipt.gas_used * 3 * 10**9  # paid the reward, less gas
    with pytest.raises(LedgerError, match="NothingToClaim"):
        ledger.claim(clients[0], leaves[0], tree.proof(0))
    # a later round carries the cumulative reward: only the difference is paid
    leaves2, tree2 = record(ledger, agg, 2, clients, [3 * ETH // 10, 2 * ETH // 10, 3 * ETH // 10], reward=ETH // 5)
    ledger.claim(clients[0], leaves2[0], tree2.proof(0))
    assert ledger.claimed_of(clients[0].address) == 3 * ETH // 10
    with pytest.raises(LedgerError, match="NothingToClaim"):  # an older leaf pays nothing more
        ledger.claim(clients[0], leaves[0], tree.proof(0))


def test_reentrant_claimer_fails(world):
    ledger, owner, agg, clients = world
    w3 = ledger.w3
    art = artifact("ReentrantClaimer")
    factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
    tx = factory.constructor(ledger.address).build_transaction(
        {"from": owner.address, "nonce": w3.eth.get_transaction_count(owner.address)})
    from fedllm.ledger.chain import _send

    attacker = w3.eth.contract(address=_send(w3, owner, tx).contractAddress, abi=art["abi"])

    def call(fn, *args, value=0):
        tx = getattr(attacker.functions, fn)(*args).build_transaction(
            {"from": owner.address, "value": value, "nonce": w3.eth.get_transaction_count(owner.address)})
        return _send(w3, owner, tx)

    call("join", b"\x99" * 32, value=2 * ETH)
    leaf = Leaf(1, attacker.address, 1000, ETH // 2, bytes(32))
    others = [Leaf(1, c.address, 1000, ETH // 2, bytes(32)) for c in clients]
    tree = MerkleTree([leaf] + others)
    ledger.record_round(agg, 1, tree.root, bytes(32), 2 * ETH, 4)
    with pytest.raises(Exception):
        call("attack", 1, 1000, ETH // 2, bytes(32), tree.proof(0))
    assert ledger.claimed_of(attacker.address) == 0
    assert w3.eth.get_balance(attacker.address) == 0
    assert ledger.view("allocated") == 2 * ETH
    ledger.claim(clients[0], others[0], tree.proof(1))  # honest claims are unaffected
    assert ledger.view("allocated") == 2 * ETH - ETH // 2


def test_slashing_is_capped_and_goes_where_configured(world, chain):
    ledger, owner, agg, clients = world
    pool = ledger.view("pool")
    ledger.slash(agg, clients[0].address, 1, ETH // 2, b"\x01" * 32)
    assert ledger.stake_of(clients[0].address) == 2 * ETH - ETH // 2
    ledger.slash(agg, clients[0].address, 1, 100 * ETH, b"\x02" * 32)  # more than the stake
    assert ledger.stake_of(clients[0].address) == 0
    assert ledger.view("pool") == pool + 2 * ETH
    assert ledger.view("totalStaked") == 4 * ETH
    # burn: slashed funds leave the pool's reach for good
    burner = Ledger.deploy(chain, owner, agg.address, min_stake=ETH, burn_slashed=True, pool=ETH)
    burner.register(clients[1], b"\x05" * 32, ETH)
    burner.slash(agg, clients[1].address, 1, 5 * ETH, b"\x03" * 32)
    assert (burner.view("burned"), burner.view("pool"), burner.stake_of(clients[1].address)) == (ETH, ETH, 0)


def test_paid_rewards_never_exceed_the_pool(world):
    ledger, owner, agg, clients = world
    w3 = ledger.w3
    with pytest.raises(LedgerError, match="PoolTooSmall"):
        ledger.record_round(agg, 1, b"\x01" * 32, bytes(32), 11 * ETH, 3)
    funded, paid, cumulative = 10 * ETH, 0, [0, 0, 0]
    scores = [[3, 1, 1], [7, 0, 2], [1, 1, 1], [5, 5, 9]]
    for r, s in enumerate(scores, start=1):
        shares = reward_shares(3 * ETH + 1, s)  # 4 x 3 ETH > 10 ETH: the last round gets the rest
        budget = min(sum(shares), ledger.view("pool"))
        shares = reward_shares(budget, s) if budget < sum(shares) else shares
        cumulative = [c + x for c, x in zip(cumulative, shares)]
        leaves, tree = record(ledger, agg, r, clients, cumulative, reward=sum(shares))
        for i, c in enumerate(clients):
            if r % 2 == 0 or i == 0:
                before = ledger.claimed_of(c.address)
                if cumulative[i] > before:
                    ledger.claim(c, leaves[i], tree.proof(i))
                    paid += cumulative[i] - before
    assert paid <= funded
    assert ledger.view("pool") + ledger.view("allocated") + paid == funded  # dust stays in the pool
    assert w3.eth.get_balance(ledger.address) == (ledger.view("pool") + ledger.view("allocated")
                                                  + ledger.view("totalStaked"))
    # an aggregator that writes leaves above what it allocated cannot pay them out
    greedy = Leaf(5, clients[1].address, 1, cumulative[1] + 50 * ETH, bytes(32))
    tree = MerkleTree([greedy])
    ledger.record_round(agg, 5, tree.root, bytes(32), 0, 1)
    with pytest.raises(LedgerError, match="OverAllocated"):
        ledger.claim(clients[1], greedy, tree.proof(0))


def test_unbonding_and_registration_rules(world):
    ledger, owner, agg, clients = world
    c = clients[0]
    with pytest.raises(LedgerError, match="StillBonded"):
        ledger.send(c, "withdraw")
    ledger.send(c, "requestUnbond")
    with pytest.raises(LedgerError, match="StillBonded"):
        ledger.send(c, "withdraw")
    ledger.slash(agg, c.address, 1, ETH // 4, bytes(32))  # penalties still apply while unbonding
    advance(ledger.w3, UNBONDING + 1)
    before = ledger.w3.eth.get_balance(c.address)
    ledger.send(c, "withdraw")
    assert ledger.stake_of(c.address) == 0
    assert ledger.w3.eth.get_balance(c.address) - before > 2 * ETH - ETH // 4 - ETH // 100
    with pytest.raises(LedgerError, match="NotRegistered"):
        ledger.send(c, "withdraw")
    late = dev_account(ledger.w3, 999, "late", 5)
    with pytest.raises(LedgerError, match="StakeTooLow"):
        ledger.register(late, b"\x42" * 32, ETH // 2)
    with pytest.raises(LedgerError, match="IdentityTaken"):
        ledger.register(late, bytes([2]) * 32, ETH)
    with pytest.raises(LedgerError, match="AlreadyRegistered"):
        ledger.register(clients[1], b"\x43" * 32, ETH)
    ledger.commit(clients[1], 3, b"\x11" * 32)
    with pytest.raises(LedgerError, match="AlreadyCommitted"):
        ledger.commit(clients[1], 3, b"\x12" * 32)
    assert ledger.view("commitments", clients[1].address, 3) == b"\x11" * 32
    with pytest.raises(LedgerError, match="NotRegistered"):
        ledger.commit(late, 3, b"\x11" * 32)


def test_round_gas_does_not_grow_with_clients(world):
    ledger, owner, agg, clients = world
    record(ledger, agg, 1, clients, [0, 0, 0])  # the first round also sets lastRound from zero
    gas = []
    for r, n in enumerate([4, 64, 512], start=2):
        tree = MerkleTree([Leaf(r, clients[0].address, i, i, bytes(32)) for i in range(n)])
        gas.append(ledger.record_round(agg, r, tree.root, b"\x01" * 32, 0, n).gas_used)
    assert max(gas) - min(gas) <= 64, gas  # calldata differs by the size of n alone


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_merkle_proofs_verify_here_and_on_chain(n, world):
    ledger = world[0]
    leaves = [Leaf(3, f"0x{i + 1:040x}", i * 10, i * ETH, bytes([i]) * 32) for i in range(n)]
    tree = MerkleTree(leaves)
    for i, leaf in enumerate(leaves):
        proof = tree.proof(i)
        assert verify(proof, tree.root, leaf.hash())
        assert ledger.view("verify", proof, tree.root, leaf.hash())
        other = leaves[(i + 1) % n] if n > 1 else Leaf(3, leaf.client, 1, 1, bytes(32))
        assert not verify(proof, tree.root, other.hash()) or other == leaf
        assert not ledger.view("verify", proof, tree.root, Leaf(3, leaf.client, leaf.score + 1, leaf.cumulative,
                                                                 leaf.update_hash).hash())


def test_artifacts_match_the_sources():
    """A fresh solcjs build equals the committed artifacts (fails when a source changed alone)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot rebuild the contracts")
    if not (ARTIFACTS.parent / "node_modules" / "solc").exists():
        pytest.fail("contracts/node_modules/solc missing although node is here: run `make` (npm install --prefix contracts)")
    result = subprocess.run([node, "build.js", "--check"], cwd=ARTIFACTS.parent, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_clear_errors_for_bad_settings(tmp_path, monkeypatch):
    from fedllm.ledger.chain import read_key

    with pytest.raises(LedgerError, match="ledger.chain"):
        connect("ftp://x")
    with pytest.raises(LedgerError, match="no JSON-RPC node"):
        connect("http://127.0.0.1:9")
    with pytest.raises(LedgerError, match="ledger.owner-key: environment variable NOPE_KEY"):
        monkeypatch.delenv("NOPE_KEY", raising=False)
        read_key("env:NOPE_KEY", "ledger.owner-key")
    (tmp_path / "k").write_text("not a key\n")
    with pytest.raises(LedgerError, match="ledger.owner-key: not a private key"):
        read_key(f"file:{tmp_path / 'k'}", "ledger.owner-key")
    (tmp_path / "k").write_text("0x" + "11" * 32 + "\n")
    assert read_key(f"file:{tmp_path / 'k'}", "ledger.owner-key").address.startswith("0x")
    with pytest.raises(LedgerError, match="ledger.contract: no contract"):
        Ledger(connect("tester"), "0x" + "12" * 20)
    assert to_wei(0.1) == ETH // 10 and to_wei("1.5") == 3 * ETH // 2


def test_signed_reply_names_its_account_and_tampering_is_caught():
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedllm.ledger.chain import LEDGER_RECORD, derived_account, reply_account, sign_update, update_hash

    contract = "0x" + "ab" * 20
    client, other = derived_account(0, "client-0"), derived_account(0, "client-1")

    def reply(values, signer=client, account=None, server_round=3):
        content = RecordDict({"arrays": ArrayRecord({"w": torch.tensor(values)}),
                              "metrics": MetricRecord({"num-examples": 4})})
        sig = sign_update(signer, contract, server_round, update_hash(content))
        content[LEDGER_RECORD] = ConfigRecord({"account": account or signer.address, "signature": sig})
        return content

    content = reply([1.0, 2.0])
    account, digest = reply_account(content, contract, 3)
    assert account == client.address and digest == update_hash(reply([1.0, 2.0], other))
    assert update_hash(reply([1.0, 2.5])) != digest
    with pytest.raises(LedgerError, match="not the named account"):  # replayed into another round
        reply_account(content, contract, 4)
    with pytest.raises(LedgerError, match="not the named account"):  # signed by one, naming another
        reply_account(reply([1.0], other, account=client.address), contract, 3)
    tampered = reply([1.0, 2.0])
    tampered["arrays"] = ArrayRecord({"w": torch.tensor([9.0, 2.0])})
    with pytest.raises(LedgerError, match="not the named account"):
        reply_account(tampered, contract, 3)
    del tampered[LEDGER_RECORD]
    with pytest.raises(LedgerError, match="lacks the ledger signature"):
        reply_account(tampered, contract, 3)


def test_addresses_chains_and_foreign_contracts_are_refused_up_front():
    from fedllm.ledger import chain as L
    from fedllm.config import Config
    from fedllm.errors import ConfigError

    for flat, message in (({"ledger.chain": "ws://127.0.0.1:8546"}, "ws(s):// needs web3's async API"),
                          ({"ledger.chain": "ftp://x"}, "neither 'tester' nor an http(s):// URL"),
                          ({"ledger.contract": "0x12"}, "ledger.contract: '0x12' is not an address")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            Config.from_flat(flat)
    good = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    assert L.check_address(good.lower(), "ledger.contract") == good
    with pytest.raises(L.LedgerError, match="wrong checksum"):
        L.check_address(good.replace("a", "A", 1), "ledger.contract")
    w3 = connect("tester")
    owner = dev_account(w3, 0, "owner", 10)
    real = Ledger.deploy(w3, owner, owner.address, to_wei(0.1))
    assert Ledger(w3, real.address).address == real.address  # immutables differ, the rest is FedLedger
    other = artifact("ReentrantClaimer")
    tx = w3.eth.contract(abi=other["abi"], bytecode=other["bytecode"]).constructor(real.address).build_transaction(
        {"from": owner.address, "nonce": w3.eth.get_transaction_count(owner.address)})
    foreign = L._send(w3, owner, tx).contractAddress
    with pytest.raises(LedgerError, match="is not this fedllm's FedLedger"):
        Ledger(w3, foreign)


def test_a_zero_stake_is_refused_so_no_account_is_ever_locked(world, chain):
    """With minStake 0 a zero-stake registration used to pass, then commit and requestUnbond
    failed (NotRegistered) and a second registration too (AlreadyRegistered): locked for good."""
    ledger, owner, agg, clients = world
    with pytest.raises(LedgerError, match="ZeroMinStake"):
        Ledger.deploy(chain, owner, agg.address, min_stake=0)
    newcomer = dev_account(chain, 4242, "zero-stake", 5)
    identity = b"\x77" * 32
    with pytest.raises(LedgerError, match="StakeTooLow"):
        ledger.register(newcomer, identity, 0)
    assert ledger.view("clients", newcomer.address)[0] == bytes(32)  # nothing recorded: free to try again
    ledger.register(newcomer, identity, ETH)  # the same account and identity, now with a stake
    ledger.commit(newcomer, 1, b"\x55" * 32)
    ledger.send(newcomer, "requestUnbond")
    advance(chain, UNBONDING + 1)
    ledger.send(newcomer, "withdraw")
    assert ledger.stake_of(newcomer.address) == 0


@pytest.mark.parametrize("flat, message", [
    ({"ledger.stake": 0.0, "ledger.min-stake": 0.0}, "ledger.stake: must be at least 1 wei"),
    ({"ledger.min-stake": 0.0}, "ledger.min-stake: must be at least 1 wei"),
    ({"ledger.stake": 1e-20}, "ledger.stake: must be at least 1 wei"),
    ({"ledger.stake": -1.0}, "ledger.stake: must be at least 1 wei"),
    ({"ledger.stake": 0.25}, r"ledger.stake: 0.25 is below ledger.min-stake \(0.5\)"),
])
def test_config_refuses_a_stake_the_contract_would_refuse(flat, message):
    from fedllm.config import Config
    from fedllm.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        Config.from_flat(flat)
    assert "\n" not in str(err.value)
    Config.from_flat({"ledger.stake": 0.25, "ledger.contract": "0x" + "12" * 20})  # the contract's minStake decides


def test_a_run_refuses_a_stake_below_an_existing_contracts_minimum(tmp_path, monkeypatch):
    from fedllm.config import Config
    from fedllm.errors import ConfigError
    from fedllm.ledger import chain as chain_module
    from fedllm.ledger.session import LedgerSession

    w3 = connect("tester")
    monkeypatch.setattr(chain_module, "connect", lambda url: w3)  # the session attaches on this chain
    owner = dev_account(w3, 0, "owner", 50)
    deployed = Ledger.deploy(w3, owner, owner.address, min_stake=ETH)
    cfg = Config.from_flat({"ledger.enabled": True, "ledger.contract": deployed.address, "ledger.stake": 0.5})
    with pytest.raises(ConfigError, match="ledger.stake: 0.5 ether is below the minStake"):
        LedgerSession(cfg, tmp_path)


def test_commitments_are_ranked_per_round_and_close_with_it(world):
    ledger, owner, agg, clients = world
    with pytest.raises(LedgerError, match="EmptyCommitment"):
        ledger.commit(clients[0], 1, bytes(32))  # would read as "no commitment"
    for i in (2, 0, 1):
        ledger.commit(clients[i], 1, bytes([i + 1]) * 32)
    assert [ledger.view("commitOrder", c.address, 1) for c in clients] == [2, 3, 1]
    assert ledger.view("commitCount", 1) == 3 and ledger.view("commitOrder", clients[0].address, 2) == 0
    ledger.commit(clients[0], 2, b"\x09" * 32)  # a later round ranks on its own
    assert ledger.view("commitOrder", clients[0].address, 2) == 1
    record(ledger, agg, 2, clients, [0, 0, 0])
    with pytest.raises(LedgerError, match="RoundClosed"):
        ledger.commit(clients[1], 2, b"\x0a" * 32)  # recorded: too late to commit
    with pytest.raises(LedgerError, match="RoundClosed"):
        ledger.commit(clients[1], 1, b"\x0a" * 32)  # and so are the rounds before it
    ledger.commit(clients[1], 3, b"\x0a" * 32)
