"""ledger.commit-reveal: clients commit keccak256(contract, round, account, update hash) on chain
before their reply leaves, so that of identical uploads the first committed is the original and
only the copies are flagged `duplicate`; a reveal that differs from its commitment, or (with
commit-reveal) has none, is `invalid`."""

from __future__ import annotations

import shutil

import pytest
import torch

from fedllm.config import Config
from fedllm.ledger import chain as ledger
from fedllm.ledger.commit import commit_upload, commitment
from fedllm.ledger.anvil import ANVIL, anvil
from fedllm.ledger.scoring import History, flag_updates
from fedllm.ledger.session import LedgerSession
from fedllm.methods.adapters.server import LoraServer
from strategies import build

pytestmark = pytest.mark.usefixtures("task_identity")
from test_accounting import _collected, _global, _honest, _reply  # noqa: E402

ETH = 10**18


def test_duplicates_by_commit_order_flag_the_copies_only():
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(64, generator=gen)
    rows = [common + 0.3 * torch.randn(64, generator=gen) for _ in range(4)]
    vectors = torch.stack([rows[0], rows[1], rows[0], rows[2], rows[0]]).double()  # rows 0, 2, 4: one update
    hashes = [b"a", b"b", b"a", b"c", b"a"]

    def dup(order):
        return [i for i, f in enumerate(flag_updates(vectors, hashes, History(), order=order)) if "duplicate" in f]

    assert dup(None) == [0, 2, 4]  # no commitments: who copied whom cannot be told
    assert dup([2, 1, 3, 4, 5]) == [2, 4]  # row 0 committed first: the original
    assert dup([5, 1, 2, 3, 4]) == [0, 4]  # row 2 committed first, even if row 0 sent first
    assert dup([0, 1, 3, 4, 0]) == [0, 4]  # the only committed copy is the original


def test_the_copier_is_flagged_not_its_victim_and_a_broken_commitment_is_invalid(tmp_path):
    cfg = Config.from_flat({"ledger.enabled": True, "ledger.commit-reveal": True})
    session = LedgerSession(cfg, tmp_path)
    g = _global()
    strategy = build(cfg, LoraServer(cfg, g))
    gen = torch.Generator().manual_seed(0)
    common = {k: torch.randn(t.shape, generator=gen) for k, t in g.items()}
    victim_update = _honest(g, 1, common)
    replies = [
        _reply(session, 10, 0, victim_update),  # the victim
        _reply(session, 11, 1, _honest(g, 2, common)),
        _reply(session, 12, 2, _honest(g, 3, common)),
        _reply(session, 13, 3, {k: t.clone() for k, t in victim_update.items()}),  # the copier: the same bytes
        _reply(session, 14, 4, _honest(g, 4, common)),  # commits to another update than it reveals
        _reply(session, 15, 5, _honest(g, 5, common)),  # reveals without committing
    ]
    keys = {pid: ledger.derived_account(session.lc.seed, f"client-{pid}") for pid in range(6)}
    for pid, key in keys.items():
        assert session.enrol(key.address, pid)
    digest = {pid: ledger.update_hash(r.content) for pid, r in enumerate(replies)}

    def commit(pid, value=None):
        session.contract.commit(keys[pid], 1, value or commitment(session.address, 1, keys[pid].address,
                                                                            digest[pid]))

    commit(0)  # the original commits before it reveals
    commit(1)
    commit(2)
    commit(3)  # the copier has the bytes only once the victim revealed them: it commits later
    commit(4, commitment(session.address, 1, keys[4].address, digest[1]))
    with pytest.raises(ledger.LedgerError, match="AlreadyCommitted"):
        commit(4)  # a commitment cannot be changed once made
    # a commitment copied from the mempool is bound to the victim's account: it is no use to the copier
    session.contract.commit(keys[5], 2, commitment(session.address, 2, keys[0].address, digest[0]))
    assert digest[3] == digest[0]
    assert [session.contract.view("commitOrder", keys[p].address, 1) for p in range(6)] == [1, 2, 3, 4, 5, 0]

    result = _collected(strategy, 1, replies)
    signers = session.signers(1, replies)
    out = session.record(1, signers, result, b"\x02" * 32)
    assert out["flags"] == {"13": ["duplicate"], "14": ["invalid"], "15": ["invalid"]}
    assert out["rewards"]["10"] > 0 and out["rewards"]["13"] == 0
    assert set(out["slashed"]) == {"13", "14", "15"}
    with pytest.raises(ledger.LedgerError, match="RoundClosed"):
        commit(5)  # the round is recorded: its commitments are closed


def test_without_commit_reveal_every_copy_is_flagged_and_an_absent_commitment_is_fine(tmp_path):
    cfg = Config.from_flat({"ledger.enabled": True})
    session = LedgerSession(cfg, tmp_path)
    g = _global()
    strategy = build(cfg, LoraServer(cfg, g))
    gen = torch.Generator().manual_seed(0)
    common = {k: torch.randn(t.shape, generator=gen) for k, t in g.items()}
    same = _honest(g, 1, common)
    replies = [_reply(session, 10 + p, p, u) for p, u in
               enumerate([same, _honest(g, 2, common), _honest(g, 3, common), same])]
    out = session.record(1, session.signers(1, replies), _collected(strategy, 1, replies), b"\x02" * 32)
    assert out["flags"] == {"10": ["duplicate"], "13": ["duplicate"]}


def test_commit_reveal_needs_a_chain_the_clients_reach():
    cfg = Config.from_flat({"ledger.enabled": True, "ledger.commit-reveal": True})
    with pytest.raises(ledger.LedgerError, match="ledger.commit-reveal: .*not the server's in-process 'tester'"):
        ledger.preflight(cfg)
    with pytest.raises(ledger.LedgerError, match="ledger.commit-reveal: .*not the server's in-process 'tester'"):
        commit_upload(cfg.ledger, ledger.derived_account(0, "client-0"), "0x" + "12" * 20, 1, bytes(32), 0)
    cfg = Config.from_flat({"ledger.enabled": True, "ledger.commit-reveal": True, "ledger.chain": "http://127.0.0.1:9",
                            "server.mode": "async"})
    with pytest.raises(ledger.LedgerError, match="ledger.commit-reveal: not with server.mode=async"):
        ledger.preflight(cfg)


def test_clients_register_and_commit_in_order_on_anvil(tmp_path):
    """The client's half (what `signed` calls before its reply leaves): a simulated client
    registers itself on first sight, then commits; the order index ranks the round's commitments."""
    if not ANVIL.exists():
        if shutil.which("npm"):
            pytest.fail(f"{ANVIL} missing although npm is here: run `make` (npm install --prefix contracts)")
        pytest.skip("npm is not installed, so anvil (@foundry-rs/anvil) cannot be")
    with anvil() as url:
        cfg = Config.from_flat({"ledger.enabled": True, "ledger.commit-reveal": True, "ledger.chain": url})
        ledger.preflight(cfg)
        session = LedgerSession(cfg, tmp_path)
        keys = [ledger.derived_account(cfg.ledger.seed, f"client-{p}") for p in range(2)]
        digest = b"\x33" * 32
        gas = []
        for pid, key in enumerate(keys):
            assert commit_upload(cfg.ledger, key, session.address, 1, digest, pid) == pid + 1
        assert commit_upload(cfg.ledger, keys[0], session.address, 2, digest, 0) == 1
        assert session.contract.stake_of(keys[1].address) == ETH
        assert session.enrol(keys[1].address, 1)  # the server finds it registered, with its stake
        fed = session.contract
        gas.append(fed.commit(keys[1], 2, commitment(session.address, 2, keys[1].address, digest)).gas_used)
        assert fed.view("commitOrder", keys[1].address, 2) == 2
        assert gas[0] < 100_000, gas


def test_a_tiny_run_on_anvil_flags_the_copier_only(tiny_model_dir, tmp_path):
    """End to end through the in-process engine, which runs the clients in node order: the victim
    (partition 0) commits and replies before its copier (partition 3) does."""
    if not ANVIL.exists():
        if shutil.which("npm"):
            pytest.fail(f"{ANVIL} missing although npm is here: run `make` (npm install --prefix contracts)")
        pytest.skip("npm is not installed, so anvil (@foundry-rs/anvil) cannot be")
    import json

    from conftest import tiny_run_config
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    with anvil() as url:
        cfg = tiny_run_config(tiny_model_dir, tmp_path, **{
            "ledger.enabled": True, "ledger.chain": url, "ledger.commit-reveal": True, "ledger.noise-z": 0.0,
            "attack.clients": "3=duplicate", "attack.victim": 0, "server.exact-match-examples": 0})
        ledger.preflight(cfg)
        run_dir = run(LocalGrid(4), cfg)
        for r in (1, 2):
            clients = json.loads((run_dir / "ledger" / f"round-{r:04d}.json").read_text())["clients"]
            flags = {c["partition"]: c["flags"] for c in clients}
            assert flags == {0: [], 1: [], 2: [], 3: ["duplicate"]}, (r, flags)
            assert {c["partition"] for c in clients if c["reward"] > 0} == {0, 1, 2}
