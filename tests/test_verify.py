"""Verifiable rounds: every posted round recomputes from its content-addressed artifacts alone
(`fedllm verify`), and a tampered artifact, score or aggregate is caught."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from conftest import tiny_run_config
from fedllm.cli import main
from fedllm.ledger.verify import verify
from fedllm.server.grid import LocalGrid
from fedllm.server.loop import run

LEDGER = {"ledger.enabled": True, "ledger.reward-per-round": 0.1, "ledger.validation-examples": 2}


def ledger_run(tiny_model_dir, tmp_path, clients=3, **over):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**LEDGER, **over})
    return run(LocalGrid(clients), cfg)


def test_a_lora_run_reproduces_bit_for_bit(tiny_model_dir, tmp_path):
    out = ledger_run(tiny_model_dir, tmp_path, **{"ledger.scorer": "loo"})
    checks = verify(out)
    assert [c.round for c in checks] == [1, 2]
    assert all(c.status == "reproduced" for c in checks), [c.line() for c in checks]
    for c in checks:
        record = json.loads((out / "ledger" / f"round-{c.round:04d}.json").read_text())
        assert c.recomputed["root"] == record["root"] and c.recomputed["model-hash"] == record["model-hash"]


@pytest.mark.parametrize("keys", [
    {"train.method": "zo"},
    {"train.method": "dpo"},
    {"server.strategy": "scaffold", "compression.up": "int8"},  # control variates beside the state; a codec
    {"server.strategy": "fedadam"},  # a server optimizer's moments in the state before each round
    {"server.mode": "async", "server.concurrency": 3, "server.buffer-size": 2},  # stale, down-weighted updates
], ids=["zo", "dpo", "scaffold-int8", "fedadam", "async"])
def test_other_methods_rules_and_modes_reproduce(keys, tiny_model_dir, tmp_path):
    out = ledger_run(tiny_model_dir, tmp_path, **keys)
    checks = verify(out)
    assert len(checks) == 2 and all(c.status == "reproduced" for c in checks), [c.line() for c in checks]


@pytest.fixture(scope="module")
def honest_run(tiny_model_dir, tmp_path_factory):
    """A 2-round LoRA run with the ledger (GTG-Shapley scores, so the recomputation evaluates the
    model), kept for the tampering tests, which each work on a copy."""
    return ledger_run(tiny_model_dir, tmp_path_factory.mktemp("honest"), **{"ledger.scorer": "shapley"})


def copy_of(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / "copy")


def manifest_of(run_dir, n):
    sha = json.loads((run_dir / "ledger" / f"round-{n:04d}.json").read_text())["manifest"]
    return json.loads((run_dir / "ledger" / "artifacts" / f"{sha}.json").read_text())


def test_an_altered_or_deleted_artifact_makes_the_round_unverifiable(honest_run, tmp_path):
    out = copy_of(honest_run, tmp_path)
    delta = out / "ledger" / "artifacts" / f"{manifest_of(out, 2)['updates'][0]['delta']}.safetensors"
    data = bytearray(delta.read_bytes())
    data[-1] ^= 1  # one bit of one update's tensors
    delta.write_bytes(bytes(data))
    first, second = verify(out)
    assert first.status == "reproduced"
    assert second.status == "unverifiable" and "artifact altered" in second.problems[0]
    delta.unlink()
    assert "artifact missing" in verify(out, [2])[0].problems[0]
    state = out / "ledger" / "artifacts" / f"{manifest_of(out, 1)['state-before']}.safetensors"
    state.unlink()
    assert verify(out, [1])[0].status == "unverifiable"


def test_a_manifest_rewritten_after_posting_is_not_the_posted_one(honest_run, tmp_path):
    out = copy_of(honest_run, tmp_path)
    record = json.loads((out / "ledger" / "round-0001.json").read_text())
    path = out / "ledger" / "artifacts" / f"{record['manifest']}.json"
    manifest = json.loads(path.read_text())
    manifest["budget"] += 1
    path.write_text(json.dumps(manifest))  # same name, other bytes
    check = verify(out, [1])[0]
    assert check.status == "unverifiable" and "altered" in check.problems[0]


def test_a_dishonest_aggregators_score_reward_or_aggregate_is_caught(tiny_model_dir, tmp_path, monkeypatch):
    """Three servers that each post something other than what their inputs give: a score raised,
    the reward shared out unevenly, the aggregate scaled. verify names the difference."""
    from fedllm.ledger import scoring, session
    from fedllm.methods.adapters.server import LoraServer

    honest_scores, honest_settle, honest_apply = session.LedgerSession._scores, scoring.settle, LoraServer.apply

    def raised(self, *args, **kwargs):
        scores, mean = honest_scores(self, *args, **kwargs)
        return [s + 0.5 if i == 0 else s for i, s in enumerate(scores)], mean

    def uneven(server_round, rows, budget, before):
        leaves = honest_settle(server_round, rows, budget, before)
        return [dataclasses.replace(leaves[0], cumulative=leaves[0].cumulative + 1), *leaves[1:]]

    def scaled(self, aggregate, updates, server_round):
        return honest_apply(self, {k: 2 * t for k, t in aggregate.items()}, updates, server_round)

    for name, (owner, attr, dishonest) in {"score": (session.LedgerSession, "_scores", raised),
                                           "reward": (scoring, "settle", uneven),
                                           "aggregate": (LoraServer, "apply", scaled)}.items():
        with monkeypatch.context() as m:
            m.setattr(owner, attr, dishonest)
            out = ledger_run(tiny_model_dir, tmp_path / name, **{"server.num-rounds": 1})
        check = verify(out)[0]  # the honest code again
        assert check.status == "mismatch", name
        text = "\n".join(check.problems)
        if name == "aggregate":
            assert "model-hash: posted" in text and "root" not in text.split("model-hash")[0]
        else:
            assert text.startswith("root: posted")
            assert ("score-fixed recorded" if name == "score" else "cumulative recorded") in text


def test_the_cli_exits_0_1_or_2(honest_run, tmp_path, capsys):
    assert main(["verify", str(honest_run)]) == 0
    assert "round 2: reproduced" in capsys.readouterr().out
    assert main(["verify", str(honest_run), "--round", "2", "--json"]) == 0
    votes = json.loads(capsys.readouterr().out)
    assert [v["round"] for v in votes] == [2] and len(votes[0]["recomputed"]["root"]) == 64
    assert main(["verify", str(honest_run), "--round", "7"]) == 2
    assert "round(s) 7 were not posted" in capsys.readouterr().err
    assert main(["verify", str(tmp_path)]) == 2
    out = copy_of(honest_run, tmp_path)
    next((out / "ledger" / "artifacts").glob("*.safetensors")).unlink()
    assert main(["verify", str(out)]) == 1


def test_disputes_end_to_end_on_anvil(tiny_model_dir, tmp_path, monkeypatch):
    """On a real node: (1) a server that raised one client's score posts its round; a client
    runs verify and disputes it, the other clients vote the recomputed root, and the round is
    overturned: the aggregator's bond is slashed, the challenger repaid with a share, and the
    chain now holds the root everybody recomputes. (2) An honest round whose artifacts are
    deleted afterwards: the verifiers vote `unavailable`, and the aggregator loses its bond too.
    (3) An honest round disputed anyway: the votes uphold it and the challenger's bond is lost."""
    from fedllm.ledger import chain as ledger, session
    from fedllm.ledger.anvil import ANVIL, anvil
    from fedllm.ledger.dispute import Disputes, advance_time
    from fedllm.ledger.merkle import Leaf

    if not ANVIL.exists():
        pytest.fail(f"{ANVIL} missing: run `make` (npm install --prefix contracts)")
    honest = session.LedgerSession._scores

    def raised(self, *args, **kwargs):
        scores, mean = honest(self, *args, **kwargs)
        return [s + 0.5 if i == 0 else s for i, s in enumerate(scores)], mean

    with anvil() as url:
        keys = {"ledger.chain": url, "ledger.challenge-window": 3600, "ledger.voting-seconds": 600,
                "ledger.dispute-bond": 0.01, "ledger.aggregator-bond": 1.0, "server.num-rounds": 1}
        w3 = ledger.connect(url)
        outcomes = {}
        for case in ("dishonest", "deleted", "honest"):
            with monkeypatch.context() as m:
                if case == "dishonest":
                    m.setattr(session.LedgerSession, "_scores", raised)
                out = ledger_run(tiny_model_dir, tmp_path / case, **{**keys, "ledger.seed": len(outcomes)})
            if case == "deleted":
                for blob in (out / "ledger" / "artifacts").glob("*.safetensors"):
                    blob.unlink()
            check = verify(out)[0]
            assert check.source.startswith("FedLedger") and check.status == {
                "dishonest": "mismatch", "deleted": "unverifiable", "honest": "reproduced"}[case], check.line()
            meta = json.loads((out / "ledger" / "chain.json").read_text())
            court = Disputes(ledger.Ledger(w3, meta["contract"]))
            clients = [ledger.derived_account(len(outcomes), f"client-{p}") for p in range(3)]
            bond = court.bond_of(meta["aggregator"])
            court.challenge(clients[0], 1, ledger.to_wei(0.01))
            vote = check.vote()
            for c in clients[1:]:
                court.vote(c, 1, bytes.fromhex(vote["root"]), bytes.fromhex(vote["model-hash"]))
            advance_time(w3, 601)
            resolution = court.resolve(clients[0], 1)
            outcomes[case] = resolution.outcome
            if case == "honest":
                assert court.bond_of(meta["aggregator"]) == bond and court.owed(clients[0].address) == 0
                continue
            assert resolution.slashed == ledger.to_wei(1.0)
            assert court.bond_of(meta["aggregator"]) == bond - resolution.slashed
            assert court.owed(clients[0].address) == ledger.to_wei(0.01) + resolution.slashed // 2
            assert court.round(1).root.hex() == vote["root"]
            if case == "dishonest":  # the chain now holds what everybody recomputes, and pays by it
                assert verify(out)[0].status == "reproduced"
                advance_time(w3, 3600)  # the round's window closes
                mine = next(e for e in check.leaves if e["account"] == clients[1].address)
                leaf = Leaf(1, mine["account"], mine["score-fixed"], mine["cumulative"],
                            bytes.fromhex(mine["update-hash"]))
                court.ledger.claim(clients[1], leaf, [bytes.fromhex(p) for p in mine["proof"]])
                assert court.ledger.claimed_of(clients[1].address) == mine["cumulative"] > 0
    assert outcomes == {"dishonest": "overturned", "deleted": "overturned", "honest": "upheld"}
