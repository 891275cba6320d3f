"""The server's ledger rounds on the in-process chain, fed with signed replies as Flower's grid
hands them to a strategy: who is credited, flagged, slashed, and what a client can claim."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm.ledger import chain as ledger
from fedllm.ledger.anvil import anvil
from fedllm.ledger.session import LedgerSession
from fedllm.config import Config
from fedllm.ledger.merkle import Leaf, verify
from fedllm.methods.adapters.server import LoraServer
from fedllm.protocol import RoundResult
from strategies import build

pytestmark = pytest.mark.usefixtures("task_identity")
from conftest import reply_to  # noqa: E402

ETH = 10**18


def _global():
    return {"m.lora_A.weight": torch.zeros(8, 256), "m.lora_B.weight": torch.zeros(256, 8)}


def _reply(session, node, pid, local, server_round=1, sign=True, key=None):
    content = RecordDict({"arrays": ArrayRecord(local),
                          "metrics": MetricRecord({"num-examples": 10, "partition-id": pid, "server-round": server_round})})
    if sign:
        account = key or ledger.derived_account(session.lc.seed, f"client-{pid}")
        sig = ledger.sign_update(account, session.address, server_round, ledger.update_hash(content))
        content[ledger.LEDGER_RECORD] = ConfigRecord({"account": account.address, "signature": sig})
    return reply_to(node, content)


def _collected(strategy, server_round, replies) -> RoundResult:
    """The round's validated replies as the RoundResult the ledger reads (nothing applied)."""
    updates, dropped = strategy.collect(server_round, replies)
    return RoundResult(server_round, tuple(updates), tuple(dropped))


def _honest(g, seed, common):
    gen = torch.Generator().manual_seed(seed)
    return {k: t + common[k] + 0.5 * torch.randn(t.shape, generator=gen) for k, t in g.items()}


def test_a_round_credits_signed_honest_clients_and_penalises_the_rest(tmp_path):
    cfg = Config.from_flat({"ledger.enabled": True, "ledger.reward-per-round": 3.0})
    session = LedgerSession(cfg, tmp_path)
    g = _global()
    strategy = build(cfg, LoraServer(cfg, g))
    gen = torch.Generator().manual_seed(0)
    common = {k: torch.randn(t.shape, generator=gen) for k, t in g.items()}
    # node 15 commits on chain to one update, then sends another
    liar = ledger.derived_account(session.lc.seed, "client-5")
    assert session.enrol(liar.address, 5)
    session.contract.commit(liar, 1, b"\x01" * 32)
    bad_shape = {"m.lora_A.weight": torch.zeros(8, 255), "m.lora_B.weight": torch.zeros(256, 8)}
    replies = [
        _reply(session, 10, 0, _honest(g, 1, common)),
        _reply(session, 11, 1, _honest(g, 2, common)),
        _reply(session, 12, 2, _honest(g, 3, common)),
        _reply(session, 13, 3, _honest(g, 4, common), sign=False),  # unsigned: neither reward nor penalty
        _reply(session, 14, 4, bad_shape),  # dropped by the strategy: invalid
        _reply(session, 15, 5, _honest(g, 5, common)),
        _reply(session, 16, 6, _honest(g, 6, common), key=ledger.derived_account(session.lc.seed, "client-0")),
    ]
    result = _collected(strategy, 1, replies)
    assert sorted(n for n, _ in result.dropped) == [14]
    signers = session.signers(1, replies)
    # node 16 signs with client 0's key: the account belongs to node 10, so node 16 gets nothing
    assert sorted(signers) == [10, 11, 12, 14, 15]
    out = session.record(1, signers, result, b"\x02" * 32)
    assert out["flags"] == {"14": ["invalid"], "15": ["invalid"]}
    assert set(out["slashed"]) == {"14", "15"} and out["slashed"]["14"] == ETH // 10  # invalid: 0.1 of 1 ETH
    assert all(out["rewards"][n] > 0 for n in ("10", "11", "12"))
    assert out["rewards"]["14"] == out["rewards"]["15"] == 0
    assert 3 * ETH - 3 <= sum(out["rewards"].values()) <= 3 * ETH
    assert out["gas-record"] > 0 and out["gas-slash"] > 0
    # the round file holds each leaf's proof: a client claims with it
    rnd = json.loads((tmp_path / "ledger" / "round-0001.json").read_text())
    entry = next(c for c in rnd["clients"] if c["node"] == "11")
    leaf = Leaf(1, entry["account"], entry["score-fixed"], entry["cumulative"], bytes.fromhex(entry["update-hash"]))
    proof = [bytes.fromhex(p) for p in entry["proof"]]
    assert verify(proof, bytes.fromhex(rnd["root"]), leaf.hash())
    client = ledger.derived_account(session.lc.seed, "client-1")
    session.contract.claim(client, leaf, proof)
    snapshot = session.finish()  # the other simulated clients claim theirs
    acct = snapshot["accounts"][client.address]
    assert acct["claimed"] == acct["earned"] == entry["reward"] and acct["pending"] == 0
    assert snapshot["accounts"][liar.address]["stake"] == ETH - ETH // 10  # invalid: 0.1 of its stake
    assert snapshot["allocated"] == 0  # the round allocated exactly its shares, and all were claimed


def test_node_keys_need_their_own_registration(tmp_path):
    cfg = Config.from_flat({"ledger.enabled": True, "ledger.client-keys": "node"})
    session = LedgerSession(cfg, tmp_path)
    key = ledger.dev_account(session.w3, 7, "site-a", 5)
    reply = _reply(session, 21, 0, _honest(_global(), 1, _global()), key=key)
    assert session.signers(1, [reply]) == {}  # not registered: no reward
    session.contract.register(key, b"\x0a" * 32, ETH)
    assert session.signers(1, [reply])[21][0] == key.address


def test_a_resumed_ledger_continues_on_a_chain_node_and_refuses_the_in_process_chain(tmp_path):
    import shutil

    from fedllm.errors import ConfigError

    with pytest.raises(ConfigError, match="in-process chain"):
        LedgerSession(Config.from_flat({"ledger.enabled": True}), tmp_path / "t",
                      {"contract": "0x" + "00" * 20, "round": 1, "accounts": {}, "history": None})
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed, so anvil (@foundry-rs/anvil) cannot be")
    with anvil() as url:
        cfg = Config.from_flat({"ledger.enabled": True, "ledger.chain": url})
        first = LedgerSession(cfg, tmp_path)
        g = _global()
        strategy = build(cfg, LoraServer(cfg, g))
        gen = torch.Generator().manual_seed(0)
        common = {k: torch.randn(t.shape, generator=gen) for k, t in g.items()}
        replies = [_reply(first, 10 + p, p, _honest(g, p, common)) for p in range(3)]
        first.record(1, first.signers(1, replies), _collected(strategy, 1, replies), b"\x01" * 32)
        cursor = first.cursor()
        assert cursor["round"] == 1 and len(cursor["accounts"]) == 3
        with pytest.raises(ConfigError, match="recorded up to round 1, the checkpoint up to round 0"):
            LedgerSession(cfg, tmp_path, {**cursor, "round": 0})
        again = LedgerSession(cfg, tmp_path, cursor)  # new SuperNode ids after a restart: 20, 21, 22
        assert again.address == first.address
        replies = [_reply(again, 20 + p, p, _honest(g, 10 + p, common), server_round=2) for p in range(3)]
        row = again.record(2, again.signers(2, replies), _collected(strategy, 2, replies), b"\x02" * 32)
        assert sorted(row["rewards"]) == ["20", "21", "22"] and sum(row["rewards"].values()) > 0
        owed = {a: acct["cumulative"] for a, acct in again.accounts.items()}
        snapshot = again.finish()  # the claims of both rounds, through the resumed session
        assert all(snapshot["accounts"][a]["claimed"] == owed[a] > 0 for a in owed)
