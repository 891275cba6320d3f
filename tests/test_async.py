"""server.mode=async: FedBuff's buffered versions (fedllm.server.buffered), its config checks, its
faults (a second reply, a pruned version, a vanished client, a buffer larger than the concurrency, a
resume mid-buffer) and tiny in-process runs of lora and zo."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from safetensors.torch import load_file

from conftest import tiny_run_config
from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.server.grid import LocalGrid


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, match", [
    ({"train.method": "ferret"}, "server.mode: train.method=ferret takes no asynchronous rounds .*random bases"),
    ({"train.method": "exact-lora", "server.strategy": "stack"}, "server.mode: train.method=exact-lora takes no"),
    ({"train.method": "diloco"}, "server.mode: train.method=diloco takes no asynchronous rounds .*clocked by rounds"),
    ({"secagg.enabled": True}, "secagg.enabled: SecAgg\\+'s masks cancel only"),
    ({"train.method": "zo", "zo.warmup-rounds": 1, "zo.params": "lora"}, "zo.warmup-rounds: a warm-up ends at a round"),
])
def test_what_async_refuses_names_the_key_and_why(over, match):
    from fedllm.methods import check_spec

    with pytest.raises(ConfigError, match=match):
        check_spec(Config.from_flat({"server.mode": "async", **over}))


@pytest.mark.parametrize("over, match", [
    ({"server.mode": "asynchronous"}, "server.mode"),
    ({"server.concurrency": 2, "server.buffer-size": 3}, "server.buffer-size: 3 replies per version cannot come from "
                                                         "server.concurrency=2"),
    ({"server.simulate-delay": "3=0.5"}, "server.simulate-delay: '3=0.5' is not partition=factor"),
    ({"server.simulate-delay": "x=2"}, "server.simulate-delay: 'x=2'"),
    ({"server.simulate-delay": "1=nan"}, "server.simulate-delay: '1=nan'"),
    ({"server.staleness-exponent": -1.0}, "server.staleness-exponent"),
])
def test_bad_async_values_are_one_line_errors(over, match):
    with pytest.raises(ConfigError, match=match):
        Config.from_flat({"server.mode": "async", **over})


def test_a_simulation_bounds_the_concurrency_and_the_buffer():
    from fedllm.server.checks import check_simulation

    with pytest.raises(ConfigError, match="server.concurrency: 5 clients in flight, but the simulation has 4"):
        check_simulation(Config.from_flat({"server.mode": "async", "server.concurrency": 5}), 4)
    with pytest.raises(ConfigError, match="server.buffer-size: 6 replies per version from 4 clients in flight"):
        check_simulation(Config.from_flat({"server.mode": "async", "server.buffer-size": 6}), 4)
    with pytest.raises(ConfigError, match="server.simulate-delay: partition 7 is not among"):
        check_simulation(Config.from_flat({"server.simulate-delay": "7=2"}), 4)
    cfg = Config.from_flat({"server.mode": "async", "server.simulate-delay": "3=8, 1=2"})
    check_simulation(cfg, 4)
    assert cfg.server.delays() == {3: 8.0, 1: 2.0}
    assert (cfg.server.in_flight(4), cfg.server.buffer(4), cfg.server.buffer(5)) == (4, 2, 3)


# --- the maths and one reply at a time ------------------------------------------------------------
def test_staleness_weights_by_hand():
    from fedllm.server.buffered import staleness_weight

    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == 0.5  # 1 / sqrt(4)
    assert staleness_weight(8, 0.5) == pytest.approx(1 / 3)
    assert staleness_weight(5, 0.0) == 1.0
    assert staleness_weight(1, 1.0) == 0.5


@pytest.fixture
def pump(task_identity):
    """A Buffered over a LoRA server half holding a 2x2 zero adapter (no model), async-lr 2."""
    from fedllm.methods.adapters.server import LoraServer
    from fedllm.server.buffered import Buffered, Flight
    from strategies import build

    cfg = Config.from_flat({"server.mode": "async", "server.async-lr": 2.0, "server.max-staleness": 4,
                            "server.evaluate": False})
    strategy = build(cfg, LoraServer(cfg, state={"w": torch.zeros(2, 2)}))
    out = Buffered(cfg, strategy, LocalGrid(2))
    out.flights.update({"m1": Flight(1, 0, 1, math.inf), "m2": Flight(2, 0, 1, math.inf)})
    return out


def reply(mid: str, node: int, delta: torch.Tensor, server_round: int = 1) -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    sent.metadata.__dict__["_message_id"] = mid
    return Message(RecordDict({"arrays": ArrayRecord({"w": delta}),
                               "metrics": MetricRecord({"num-examples": 4, "server-round": server_round})}),
                   reply_to=sent)


def test_a_stale_reply_weighs_less_and_a_second_one_is_dropped(pump):
    update, why, flight = pump.admit(reply("m1", 1, torch.ones(2, 2)), current=3)
    assert why is None and flight.node == 1
    assert update.metrics["staleness"] == 3
    assert torch.equal(update.delta["w"], torch.ones(2, 2))  # 2 (async-lr) x 1/sqrt(1 + 3)
    update, why, _ = pump.admit(reply("m1", 1, torch.ones(2, 2)), current=3)
    assert update is None and why == "a second reply to one message (answered before)"
    update, why, flight = pump.admit(reply("m9", 1, torch.ones(2, 2)), current=3)
    assert update is None and flight is None and why.startswith("answers no message in flight")


def test_an_idle_client_waits_only_for_a_version_about_to_be_made(pump):
    from fedllm.server.buffered import Flight

    pump.flights.clear()
    pump.work = {1: 10.0, 2: 10.0, 3: 80.0}  # node 3 is 8 times slower
    pump.flights.update({"a": Flight(2, 0, 1, math.inf, 100.0), "b": Flight(3, 0, 1, math.inf, 100.0)})
    assert pump.version_eta(1) == 110.0 and pump.version_eta(2) == 180.0 and pump.version_eta(3) == math.inf
    assert pump.holds(1, pump.version_eta(1), now=108.0)  # node 2's reply is 2 s away: half its own 10 s
    assert not pump.holds(1, pump.version_eta(1), now=100.0)  # 10 s away: train on the current version
    assert not pump.holds(1, pump.version_eta(1), now=120.0)  # node 2 is overdue: stop waiting
    assert not pump.holds(1, pump.version_eta(2), now=108.0)  # the slow client's reply is not waited for
    assert pump.work_of(4) == pytest.approx(100.0 / 3)  # a node not heard from yet: the others' mean
    pump.cfg = pump.cfg.replace(server__version_wait=0.0)
    assert not pump.holds(1, pump.version_eta(1), now=108.0)  # FedBuff as published


def test_a_reply_older_than_max_staleness_is_dropped_with_its_age(pump):
    update, why, flight = pump.admit(reply("m2", 2, torch.ones(2, 2)), current=5)
    assert update is None and flight.node == 2
    assert why == "trained on version 0, 5 versions old (server.max-staleness=4)"
    assert "m2" not in pump.flights  # its slot is free


def test_a_bad_reply_is_dropped_not_raised(pump):
    update, why, _ = pump.admit(reply("m1", 1, torch.ones(3, 2)), current=0)
    assert update is None and "expected torch.float32[2, 2]" in why
    update, why, _ = pump.admit(reply("m2", 2, torch.ones(2, 2), server_round=7), current=0)
    assert update is None and "round" in why


# --- tiny runs --------------------------------------------------------------------------------------
# version-wait 0: the in-process engine runs clients one after another, so the work times that decide a
# wait are not a parallel federation's; these runs check the published FedBuff, reproducibly
ASYNC = {"server.mode": "async", "server.num-rounds": 3, "server.concurrency": 3, "server.buffer-size": 2,
         "server.exact-match-examples": 0, "server.version-wait": 0.0}


@pytest.mark.usefixtures("task_identity")
def test_async_lora_versions_with_staleness_and_a_vanished_client(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**ASYNC, "server.round-timeout": 2.0})
    grid = LocalGrid(4, silent={4})  # node 4 takes its messages and never answers
    run_dir = run(grid, cfg)
    rows = rows_of(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and sum(r["staleness"].values()) == 2
        assert all("staleness" in c for c in r["clients"].values())
    assert any(int(s) > 0 for r in rows[1:] for s in r["staleness"])  # replies trained on an older version
    assert all(r["clients"].keys() <= {"1", "2", "3"} for r in rows[1:])  # the silent node holds a slot, no more
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_a_vanished_client_times_out_and_frees_its_slot(pump):
    from fedllm.server.buffered import Flight

    pump.flights["m3"] = Flight(3, 0, 1, 0.0)  # its deadline has passed
    missing: list[int] = []
    pump.expire(missing)
    assert missing == [3] and set(pump.flights) == {"m1", "m2"}
    update, why, _ = pump.admit(reply("m3", 3, torch.ones(2, 2)), current=0)  # a late reply after all
    assert update is None and why.startswith("answers no message in flight (timed out")


class DiesMidBuffer(LocalGrid):
    """A grid whose server process 'dies' when its `after`-th reply would be read."""

    def __init__(self, n: int, after: int) -> None:
        super().__init__(n)
        self.after, self.read = after, 0

    def reply(self, message):
        self.read += 1
        if self.read == self.after:
            raise KeyboardInterrupt  # not a client error: it ends the server's loop, as a kill would
        return super().reply(message)


@pytest.mark.usefixtures("task_identity")
def test_a_resume_mid_buffer_keeps_every_applied_version(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    over = {**ASYNC, "server.num-rounds": 4, "server.run-name": "cut"}
    with pytest.raises(KeyboardInterrupt):
        run(DiesMidBuffer(3, after=6), tiny_run_config(tiny_model_dir, tmp_path, **over))  # dies in version 3
    run_dir = tmp_path / "cut"
    before = rows_of(run_dir)
    assert [r["round"] for r in before] == [0, 1, 2]
    run(LocalGrid(3), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.resume": str(run_dir)}))
    after = rows_of(run_dir)
    assert [r["round"] for r in after] == [0, 1, 2, 3, 4]
    assert after[:3] == before  # nothing applied was lost
    assert load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.usefixtures("task_identity")
def test_async_zo_applies_stale_sums(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**ASYNC, "train.method": "zo", "zo.num-seeds": 8})
    rows = rows_of(run(LocalGrid(3), cfg))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert [r["zo-version"] for r in rows[1:]] == [1, 2, 3]
    assert any(int(s) > 0 for r in rows[1:] for s in r["staleness"])
    assert all(r["clients-dropped"] == 0 for r in rows[1:])


@pytest.mark.usefixtures("task_identity")
def test_async_with_codecs_both_ways_and_a_streamed_fold(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**ASYNC, "compression.up": "int8", "compression.down": "int8",
                                                      "server.aggregation": "stream"})
    rows = rows_of(run(LocalGrid(3), cfg))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert all(r["clients-dropped"] == 0 and r["clients-ok"] == 2 for r in rows[1:])
    sent = [b for r in rows[1:] for b in r["bytes-down"].values()]
    assert min(sent) < max(sent)  # a node holding a known version is sent deltas, not the full state


@pytest.mark.usefixtures("task_identity")
def test_async_dpo_on_the_ledger_records_every_version(tiny_model_dir, tmp_path, caplog):
    """dpo in asynchronous versions with the ledger on (in-process chain): one record per version,
    each signer credited, stale replies' signatures checked against the round their message carried."""
    pytest.importorskip("web3")
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**ASYNC, "train.method": "dpo", "ledger.enabled": True})
    with caplog.at_level("WARNING", logger="fedllm"):
        run_dir = run(LocalGrid(3), cfg)
    assert "no reward, no penalty" not in caplog.text  # every signature checked out, stale ones too
    rows = rows_of(run_dir)
    assert all((run_dir / "ledger" / f"round-{v:04d}.json").is_file() for v in (1, 2, 3))
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and set(r["ledger"]["scores"]) == set(r["clients"])
    assert any(int(s) > 0 for r in rows[1:] for s in r["staleness"])
