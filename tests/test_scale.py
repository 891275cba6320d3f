"""Scale: streaming and tree aggregation against the list rules, bounded per-node state, many
registered clients, and the engines (in-process, Ray, a Ray cluster joined by address)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import is_loopback, listening, tiny_run_config
from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.methods.downlink import Downlink
from fedllm.protocol import Update
from fedllm.simulation import LOCAL_RAY
from strategies import RULES, resolve
from strategies.fold import MEAN, Running, fold_all
from strategies.tree import SumTree


def _updates(n: int, seed: int = 0) -> list[Update]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.lora_A": (8, 64), "a.lora_B": (64, 8), "b": (1000,)}
    return [Update(i + 1, {k: torch.randn(s, generator=g) for k, s in shapes.items()}, float(1 + (i * 7) % 5))
            for i in range(n)]


STREAMING = [e for e in RULES.entries() if e.meta.get("streams")]


def test_the_table_has_sum_rules_and_list_rules():
    assert {"fedavg", "fedprox", "fedkseed"} <= {e.name for e in STREAMING}
    assert {"median", "krum", "trimmed-mean"} <= {e.name for e in RULES.entries() if not e.meta.get("streams")}


@pytest.mark.parametrize("entry", STREAMING, ids=lambda e: e.name)
def test_a_streaming_rule_folds_to_its_list_result(entry):
    """Same order: bit-identical. Another order: equal to float32 rounding."""
    ups = _updates(9)
    cfg = Config()
    listed = entry.impl(ups, cfg)
    fold = entry.meta["fold"]
    running = Running(fold)
    for u in ups:
        running.add(u.delta, u.num_examples)
    folded = running.result()
    assert folded.keys() == listed.keys() and all(torch.equal(folded[k], listed[k]) for k in listed)
    shuffled = ups[:]
    random.Random(1).shuffle(shuffled)
    other = fold_all(fold, [u.delta for u in shuffled], [u.num_examples for u in shuffled])
    for k in listed:
        torch.testing.assert_close(other[k], listed[k], rtol=1e-6, atol=1e-6)
    # the weighted mean by hand
    total = sum(u.num_examples for u in ups)
    by_hand = sum(u.num_examples * u.delta["b"].double() for u in ups) / total
    torch.testing.assert_close(listed["b"].double(), by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("workers", [2, 3])
def test_the_shared_memory_tree_equals_the_flat_sum(workers):
    ups = _updates(11, seed=workers)
    flat = fold_all(MEAN, [u.delta for u in ups], [u.num_examples for u in ups])
    with SumTree(workers) as tree:
        for u in ups:
            tree.add(u.delta, u.num_examples)
        out = tree.result()
    assert out.keys() == flat.keys()
    for k in flat:
        assert out[k].shape == flat[k].shape
        torch.testing.assert_close(out[k], flat[k], rtol=1e-6, atol=1e-6)  # partial sums associate differently


def test_a_tree_refuses_a_different_layout_and_nothing_added():
    ups = _updates(2)
    with SumTree(2) as tree:
        tree.add(ups[0].delta, 1.0)
        with pytest.raises(ValueError, match="differ"):
            tree.add({"other": torch.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="positive"):
        SumTree(2).result()


@pytest.mark.parametrize("over, message", [
    ({"server.aggregation": "stream", "server.strategy": "median"}, "server.aggregation: cannot stream (rule 'median'"),
    ({"server.aggregation": "stream", "ledger.enabled": True}, "ledger's scorers"),
    ({"server.aggregation": "sometimes"}, "server.aggregation: must be one of"),
    ({"server.aggregators": "two"}, "server.aggregators: must be auto or a whole number"),
    ({"server.aggregators": "0"}, "server.aggregators"),
])
def test_bad_aggregation_settings_are_one_line_errors(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve(Config.from_flat(over))


def test_auto_streams_large_rounds_of_sum_rules_without_the_ledger(tiny_model_dir, tmp_path):
    from strategies import build

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.evaluate": False})
    strategy = build(cfg)
    reply = strategy.method.largest_reply()
    limit = cfg.server.stream_bytes
    assert not strategy.streams(limit // reply) and strategy.streams(limit // reply + 1)
    assert not build(cfg.replace(server__strategy="median")).streams(10**6)
    assert not build(cfg.replace(ledger__enabled=True)).streams(10**6)
    assert build(cfg.replace(server__aggregation="stream")).streams(1)
    assert not build(cfg.replace(server__aggregation="list")).streams(10**6)


def test_auto_aggregators_grow_with_the_round_and_stop_at_half_the_cores():
    cfg = Config.from_flat({"server.aggregators": "auto"})
    cores = os.cpu_count() or 1
    assert cfg.server.aggregator_count(1) == 1
    assert cfg.server.aggregator_count(10_000) == max(1, cores // 2)


def test_the_downlink_table_is_bounded_and_forgets_the_oldest_node():
    dl = Downlink(start_known=True, capacity=2)
    assert dl.version_of(9) == 0  # never contacted, all start from the same state
    dl.append(b"r1")
    for node in (1, 2):
        dl.sent(node)
        dl.accepted(node)
    assert dl.version_of(1) == 1 and dl.version_of(2) == 1
    dl.sent(3)  # node 1 is forgotten
    assert dl.version_of(1) is None and dl.missing(1) is None  # the full state next time
    assert dl.version_of(9) is None  # a node not in the table may be a forgotten one now
    dl.accepted(3)
    assert dl.version_of(3) == 1 and len(dl._node) == 2


@pytest.mark.usefixtures("task_identity")
def test_a_thousand_registered_clients_with_four_per_round(tiny_model_dir, tmp_path):
    """2 tiny rounds of 4 sampled clients out of 1000: contexts and downlink entries only for the
    sampled ones, partitions computed once."""
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{
        "server.clients-per-round": 4, "data.partition": "iid", "data.train-per-family": 520,
        "server.evaluate": False, "server.aggregation": "stream", "server.aggregators": "2",
        "compression.up": "int8"})
    grid = LocalGrid(1000)
    run_dir = run(grid, cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients-ok"] for r in rows[1:]] == [4, 4]
    assert len(grid.contexts) <= 8 and grid.sent == 8
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def _fedllm(*args, timeout=900, env=None):
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "fedllm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


TINY = {"server.num-rounds": 2, "server.min-clients": 1, "data.families": "parity,arithmetic,units",
        "data.train-per-family": 16, "data.eval-per-family": 2, "train.local-steps": 4, "train.lr": 0.02,
        "lora.dropout": 0.0, "server.exact-match-examples": 2, "server.max-new-tokens": 2}


def _sets(tiny_model_dir, tmp_path, name, **over):
    sets = {"model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": name, **TINY, **over}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.slow
def test_the_inprocess_engine_and_ray_give_the_same_adapter(tiny_model_dir, tmp_path):
    """Same seeds, same config: the in-process engine (no Ray) and Flower's Ray simulation
    end with the same adapter, bit for bit (two replies a round: a float32 sum of two terms
    does not depend on their order)."""
    for engine in ("inprocess", "ray"):
        proc = _fedllm("simulate", "--engine", engine, "--num-clients", "2", *_sets(tiny_model_dir, tmp_path, engine))
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(tmp_path / "inprocess" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ray" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "inprocess" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]


def _in_session(proc, temp: str) -> bool:
    """Whether `proc` is one of the Ray processes started with --temp-dir=`temp` (their command lines
    name their session folder in it)."""
    try:
        return any(temp in arg for arg in proc.cmdline())
    except psutil.Error:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_joining_a_local_ray_head(tiny_model_dir, tmp_path):
    """`ray start --head` on 127.0.0.1 with two logical GPUs, listening on loopback only, a simulation
    that joins it by address (its clients get a GPU each by default, the cluster's), a share no node has
    refused in one line, then the head is stopped and gone."""
    ray = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    # Ray's local mode: else it turns --node-ip-address=127.0.0.1 into the machine's address and
    # its services listen on every address; the driver joins in the same mode
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **LOCAL_RAY}
    start = subprocess.run([str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--num-gpus=2", "--include-dashboard=false", "--disable-usage-stats",
                            "--dashboard-host=127.0.0.1", f"--temp-dir={temp}"],
                           capture_output=True, text=True, env=env, timeout=300)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        head = [p.pid for p in psutil.process_iter() if _in_session(p, temp)]
        listens = listening(head)
        assert any(p == port for _, _, p in listens) and all(is_loopback(a) for _, a, _ in listens), sorted(listens)
        proc = _fedllm("simulate", "--ray-address", f"127.0.0.1:{port}", "--num-clients", "2",
                       *_sets(tiny_model_dir, tmp_path, "cluster", **{"server.num-rounds": 1}), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / "cluster" / "adapter").is_dir()
        rows = [json.loads(line) for line in (tmp_path / "cluster" / "metrics.jsonl").read_text().splitlines()]
        assert {c["gpu"] for c in rows[1]["clients"].values()} <= {0, 1}  # Ray gave each client a GPU
        proc = _fedllm("simulate", "--ray-address", f"127.0.0.1:{port}", "--num-clients", "2", "--gpus-per-client", "3",
                       *_sets(tiny_model_dir, tmp_path, "too-many"), env=env)
        assert proc.returncode == 2 and "--gpus-per-client: 3 GPUs a client, but the largest node of the Ray cluster" in proc.stderr, \
            proc.stderr[-2000:]
    finally:
        stop = subprocess.run([str(ray), "stop", "--force"], capture_output=True, text=True, env=env, timeout=300)
    assert stop.returncode == 0
    with socket.socket() as s:  # nothing listens on the head's port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    shutil.rmtree(temp, ignore_errors=True)


def test_the_tree_only_takes_the_weighted_mean(tiny_model_dir, tmp_path):
    """A rule registered with a fold of its own is folded in the server's process, never
    averaged by the tree."""
    from strategies import build
    from strategies.fold import Fold

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.aggregation": "stream", "server.aggregators": "2"})
    strategy = build(cfg)
    assert isinstance(strategy.accumulator(4), SumTree)
    own = Fold(MEAN.init, MEAN.add, lambda acc: {k: 2 * t for k, t in MEAN.result(acc).items()})
    strategy.chain.rule = strategy.chain.rule.__class__("doubled", strategy.chain.rule.impl, None,
                                                        {"streams": True, "fold": own})
    running = strategy.accumulator(4)
    assert isinstance(running, Running) and running.fold is own
