"""Deployment with real processes: a SuperLink (TLS, SuperNode authentication) and two
SuperNodes on 127.0.0.1 at free ports, each training on its own data file, via the walkthrough's
examples/deployment/deploy.py: a LoRA run, a SecAgg+ run and asynchronous versions, and a SuperNode
whose key is not registered is refused; in the heavy tier (`make test-all`) also a ZO run with the ledger on, a
Streaming DiLoCo run and a DPO run on the sites' pair files, on the same federation (each method's
own path is covered in the simulation tests)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from conftest import is_loopback, listening

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _deploy():
    spec = importlib.util.spec_from_file_location("deploy", ROOT / "examples" / "deployment" / "deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def federation(tiny_model_dir, tmp_path_factory):
    """(deploy module, running processes, work folder, runs folder, base run config): one TLS
    federation of two sites for every test here, stopped after the last."""
    deploy = _deploy()
    tmp_path = tmp_path_factory.mktemp("deployment")
    work = tmp_path / "work"
    sites = []
    for i, families in enumerate(["parity,units", "arithmetic"]):
        from fedllm.config import DataConfig
        from fedllm.data import load_splits

        rows, _ = load_splits(DataConfig(families=families, train_per_family=8), preference=True)  # + "rejected"
        path = tmp_path / f"site{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        sites.append(str(path))
    run_config = (f'model.name="{tiny_model_dir}" server.run-dir="{tmp_path / "runs"}" server.run-name="deployed" '
                  'server.num-rounds=2 server.min-clients=2 train.local-steps=4 train.lr=0.02 '
                  'data.families="parity,units,arithmetic" data.train-per-family=8 data.eval-per-family=4 '
                  'server.exact-match-examples=2 server.max-new-tokens=2 lora.dropout=0.0')
    with deploy.local_federation(work, 2, sites) as procs:
        yield deploy, procs, work, tmp_path / "runs", run_config
    assert all(p.poll() is not None for p in procs.procs.values())  # everything stopped


def _run(federation, name: str, extra: str, replace: tuple[tuple[str, str], ...] = ()) -> list[dict]:
    """Submit the base config renamed to `name` (+ `extra`), wait for it; its metrics rows."""
    deploy, _, work, runs, run_config = federation
    config = run_config.replace('server.run-name="deployed"', f'server.run-name="{name}"') + extra
    for old, new in replace:
        config = config.replace(old, new)
    run_id = deploy.submit(work, config)
    status = deploy.wait_run(work, run_id, timeout=600)
    assert status == "finished:completed", deploy.flwr(work, "log", str(run_id), "fedllm", "--show").stdout[-3000:]
    return [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]


def test_two_sites_with_tls_and_node_auth(federation):
    deploy, procs, work, runs, _ = federation
    assert "--enable-supernode-auth" in " ".join(procs.procs["superlink"].args)
    assert (work / "certs" / "superlink.crt").exists() and (work / "keys" / "site-0.pub").exists()
    # a SuperNode with a key nobody registered is turned away, and exits
    rogue = procs.start("rogue", deploy.supernode_cmd(work, "rogue", f"127.0.0.1:{procs.port}",
                                                      deploy.free_port()))
    try:
        rogue.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the unregistered SuperNode was not refused within 60 s")
    assert rogue.returncode != 0
    assert "Failed to activate SuperNode" in procs.log("rogue"), procs.log("rogue")[-2000:]
    assert deploy.online_nodes(work) == 2
    # a federation on 127.0.0.1 listens there only: the SuperLink's API port, the SuperNodes' own
    listens = listening([p.pid for p in procs.procs.values() if p.poll() is None])
    assert any(port == procs.port for _, _, port in listens), sorted(listens)
    assert all(is_loopback(address) for _, address, _ in listens), sorted(listens)
    rows = _run(federation, "deployed", "")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["eval-loss"] < rows[0]["eval-loss"]
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["dropped"] == []
        # each site trained on its own file: 16 and 8 examples, whatever its partition would hold
        assert sorted(c["num-examples"] for c in r["clients"].values()) == [8, 16]
    # round 2 found each site's warm worker with the model loaded: its first step came at once
    assert all(c["start-seconds"] < 1.0 for c in rows[2]["clients"].values()), rows[2]["clients"]
    assert all(c["model-loads"] == 1 for c in rows[2]["clients"].values())  # loaded in round 1 only
    assert (runs / "deployed" / "adapter" / "adapter_config.json").exists()


def test_secagg_across_sites(federation):
    """SecAgg: four messages a round per site, the keys and shares kept in each SuperNode's context."""
    rows = _run(federation, "secagg", ' secagg.enabled=true compression.down="int8"')
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["eval-loss"] < rows[0]["eval-loss"]
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["dropped"] == [] and r["secagg-clipped"] == 0
        assert r["secagg-weight"] == pytest.approx(24, abs=1e-3)  # 16 + 8 examples, summed under the masks
        assert all("num-examples" not in c for c in r["clients"].values())  # no site's count in the clear


def test_async_versions_across_sites(federation):
    """server.mode=async through a real SuperLink: each accepted reply is a version (buffer 1), the
    other site's reply lands on a newer version than it trained on."""
    rows = _run(federation, "async", ' server.mode="async" server.buffer-size=1',
                replace=(("server.num-rounds=2", "server.num-rounds=4"),))
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and rows[4]["eval-loss"] < rows[0]["eval-loss"]
    assert all(r["clients-ok"] == 1 and r["dropped"] == [] for r in rows[1:])
    assert any(int(s) > 0 for r in rows[1:] for s in r["staleness"])


@pytest.mark.heavy
def test_zo_with_the_ledger_across_sites(federation):
    rows = _run(federation, "zo", ' train.method="zo" zo.num-seeds=256 zo.lr=1e-4 ledger.enabled=true')
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["zo-version"] == r["round"] for r in rows[1:])
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and all(b < 1000 for b in r["bytes-up"].values())
        assert r["ledger"]["gas-record"] > 0 and len(r["ledger"]["rewards"]) == 2 and not r["ledger"]["flags"]
    accounts = json.loads((federation[3] / "zo" / "ledger" / "accounts.json").read_text())["accounts"]
    assert sorted(a["partition"] for a in accounts.values()) == [0, 1]
    assert all(a["claimed"] == a["earned"] > 0 for a in accounts.values())


@pytest.mark.heavy
def test_streaming_diloco_across_sites(federation):
    """Overlapped and 4-bit both ways: each site keeps its state in its SuperNode."""
    rows = _run(federation, "diloco", ' train.method="diloco" diloco.fragments=2 diloco.inner-steps=4 diloco.tau=1 '
                'diloco.alpha=0.5 compression.up="quantize(4)" compression.down="quantize(4)"',
                (("server.num-rounds=2", "server.num-rounds=4"), ("train.lr=0.02", "train.lr=0.002")))
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and rows[4]["eval-loss"] < rows[0]["eval-loss"]
    assert [r["diloco-fragment"] for r in rows[1:]] == [1, 0, 1, -1]  # the last round syncs every fragment
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["dropped"] == []
        # every site kept its state from round to round: nobody was sent the whole model again
        assert all(c["diloco-resynced"] == 0 for c in r["clients"].values())
    # tau = 1: a fragment synced in round t is merged before round t + 2's steps; the last round merges
    # round 3's early too, so that nothing is left pending
    assert [sorted({c["diloco-merged"] for c in r["clients"].values()}) for r in rows[1:]] == [[0], [0], [1], [2]]
    assert (federation[3] / "diloco" / "model" / "config.json").is_file()


@pytest.mark.heavy
def test_dpo_across_sites(federation):
    """DPO on the same files: each site's pairs are its rows' response (chosen) and rejected answers."""
    rows = _run(federation, "dpo", ' train.method="dpo" data.prompt-field="instruction" '
                'data.chosen-field="response" compression.up="int8"')
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["reward-margin"] > 0
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["dropped"] == []
        assert sorted(c["num-examples"] for c in r["clients"].values()) == [8, 16]
