"""The pre-flight's config checks (fedllm.server.checks): what the config alone decides is refused
in one line naming the key, by `fedllm simulate` before any engine and by the ServerApp before it
waits for a node; no model is needed."""

import os
import re
import sys
import threading
import time
import types

import pytest

import strategies  # noqa: F401  (the rule chain's imports, once, outside the timings below)
from fedllm import Config, ConfigError
from fedllm.server.checks import check_config, check_machine, round_size

# (config, clients of the simulation or None for a deployment, the error's start)
REFUSED = [
    ({"lora.peft": "prompt", "server.merge": True}, None, "server.merge: lora.peft=prompt adds virtual tokens"),
    ({"lora.peft": "prefix", "server.merge": True}, 4, "server.merge: lora.peft=prefix"),
    ({"lora.client-ranks": "4,16"}, None, "lora.client-ranks: 16 is above lora.rank=8"),
    ({"secagg.enabled": True, "secagg.threshold": 5}, 3, "secagg.threshold: 5 share holders needed, but each node has 3"),
    ({"secagg.enabled": True, "secagg.threshold": 5, "server.clients-per-round": 4}, None,
     "secagg.threshold: 5 share holders needed"),
    ({"secagg.enabled": True, "secagg.bits": 20}, 8192, "secagg.bits: 2^20 / 8192 clients"),
    ({"server.clients-per-round": 5}, 2, "server.clients-per-round: 5 clients a round, but the simulation has 2"),
    ({"server.min-clients": 3}, 2, "server.min-clients: 3 clients a round, but the simulation has 2"),
    ({"server.clients-per-round": 2, "server.min-replies": 3}, None, "server.min-replies: 3 valid replies needed, "
     "but a round samples 2 clients (server.clients-per-round)"),
    ({"server.fraction-train": 0.5, "server.min-replies": 3}, 4, "server.min-replies: 3 valid replies needed, but a "
     "round samples 2 clients (server.fraction-train=0.5"),
    ({"lora.policy": "resources"}, 2, "lora.policy: resources reads each SuperNode's node config memory-mb"),
    ({"attack.clients": "1=zero,7=noise"}, 4, "attack.clients: partition 7 is not among the simulation's 4"),
    ({"attack.clients": "1=duplicate", "attack.victim": 4}, 4, "attack.victim: partition 4"),
    ({"server.aggregators": "100000"}, 2, "server.aggregators: 100000 worker processes, but this machine has"),
    ({"train.method": "zo", "compression.up": "int8"}, 2, "compression"),  # the rule chain's checks, last
]


@pytest.mark.parametrize("flat, clients, message", REFUSED)
def test_what_the_config_alone_decides_is_one_line_naming_the_key(flat, clients, message):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        check_config(Config.from_flat(flat), clients)
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("flat, clients", [
    ({}, 2),
    ({"lora.policy": "resources", "server.clients-per-round": 5}, None),  # a deployment: nodes bring resources
    ({"server.min-clients": 4, "server.min-replies": 4}, None),  # its round size depends on who connects
    ({"secagg.enabled": True, "server.min-clients": 3}, 3),
    ({"lora.peft": "prompt"}, 2),
    ({"attack.clients": "3=zero"}, 4),
    ({"server.aggregators": "auto"}, 1000),
])
def test_configs_that_fit_pass(flat, clients):
    check_config(Config.from_flat(flat), clients)


def test_exact_lora_takes_client_ranks_above_the_global_rank():
    from fedllm.methods import spec_of

    cfg = Config.from_flat({"train.method": "exact-lora", "lora.client-ranks": "4,16"})
    spec_of(cfg).check(cfg, spec_of(cfg))  # it stacks factors of any rank (its rule's import is seconds: not here)


def test_round_size_is_what_the_strategy_samples():
    assert round_size(Config.from_flat({"server.clients-per-round": 3}), None) == 3
    assert round_size(Config.from_flat({}), None) is None
    assert round_size(Config.from_flat({"server.fraction-train": 0.5}), 10) == 5
    assert round_size(Config.from_flat({"server.fraction-train": 0.1, "server.min-clients": 2}), 10) == 2


def test_process_counts_are_bounded_by_the_machines_cores():
    check_machine(Config.from_flat({"server.aggregators": "4"}), cores=4)
    check_machine(Config.from_flat({"server.aggregators": "auto"}), cores=1)
    with pytest.raises(ConfigError, match=r"^server.aggregators: 5 worker processes, but this machine has 4 cores; "
                                          r"use auto or at most 4$"):
        check_machine(Config.from_flat({"server.aggregators": "5"}), cores=4)
    Config.from_flat({"server.aggregators": "100000"})  # a client's smaller machine still reads the server's config


def test_the_server_app_refuses_at_once_instead_of_waiting_for_nodes(tmp_path):
    from flwr.app import Context, RecordDict

    from fedllm.server.app import SERVER_FAILED, make_app
    from fedllm.server.grid import LocalGrid

    app = make_app({"server.clients-per-round": 5, "server.run-dir": str(tmp_path)})
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="^server.clients-per-round: 5 clients a round, but the simulation has 2"):
        app(LocalGrid(2), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    assert time.perf_counter() - t0 < 1.0 and SERVER_FAILED[-1].startswith("the server stopped: server.clients-per")
    assert list(tmp_path.iterdir()) == []


def test_flowers_simulation_grid_is_counted_once_its_nodes_are_registered(monkeypatch):
    from fedllm.server.app import simulated_nodes

    class InMemoryGrid:  # stands in for Flower's (its module takes seconds to import)
        def __init__(self) -> None:
            self.nodes: list[int] = []

        def get_node_ids(self) -> list[int]:
            return list(self.nodes)

    monkeypatch.setitem(sys.modules, "flwr.superlink.grid.inmemory_grid", types.SimpleNamespace(InMemoryGrid=InMemoryGrid))
    grid = InMemoryGrid()
    register = threading.Timer(0.05, lambda: grid.nodes.extend(range(1, 8)))
    register.start()
    assert simulated_nodes(grid, settle=0.1, wait=2.0) == 7
    assert simulated_nodes(InMemoryGrid(), settle=0.02, wait=0.1) is None  # no nodes: nothing to check against
    assert simulated_nodes(object()) is None  # a deployment's grid


def test_the_cli_refuses_before_any_engine_starts(tmp_path, capsys):
    from fedllm.cli import main

    argv = ["simulate", "--engine", "inprocess", "--num-clients", "2", "--set", f"server.run-dir={tmp_path}"]
    assert main([*argv, "--set", "server.clients-per-round=3"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedllm: error: server.clients-per-round: 3 clients a round, but the simulation has 2 (--num-clients, or "
        "options.num-supernodes under flwr run): the round would wait for nodes that never come"]
    cores = os.cpu_count() or 1
    assert main([*argv, "--engine", "ray", "--cpus-per-client", str(cores + 1)]) == 2  # Ray's actor pool: empty
    assert capsys.readouterr().err.strip() == (f"fedllm: error: --cpus-per-client in (0, {cores}] (at most a Ray "
                                               f"node's CPUs); got {cores + 1.0}")
    assert list(tmp_path.iterdir()) == []
