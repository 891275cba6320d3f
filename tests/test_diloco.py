"""Streaming DiLoCo (train.method=diloco): the outer step, the fragment schedule and the merge by
hand; the method against a by-hand DiLoCo and against plain local training; the last round's sync
of every fragment; nodes that miss rounds or lose their state; checkpoints; malformed replies;
runs whose eval loss falls."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from conftest import reply_to, tiny_run_config
from fedllm.server import checkpoint
from fedllm.client.round import client_rows, handle, round_seed
from fedllm.compression import encode, parse
from fedllm.errors import ConfigError
from fedllm.server.grid import LocalGrid
from fedllm.methods.diloco import engine
from fedllm.methods.diloco.client import LOCAL, SNAPSHOT, DiLoCoClient
from fedllm.methods.adapters import engine as lora
from fedllm.protocol import ARRAYS, CONFIG
from strategies import build

pytestmark = pytest.mark.usefixtures("task_identity")
# server.num-rounds 10: the rounds a test drives by hand come before the last one (which syncs every
# fragment) unless the test says otherwise
DILOCO = {"train.method": "diloco", "diloco.fragments": 2, "diloco.inner-steps": 4, "server.evaluate": False,
          "server.checkpoint": False, "server.num-rounds": 10}


def _cfg(tiny_model_dir, tmp_path, **over):
    return tiny_run_config(tiny_model_dir, tmp_path, **{**DILOCO, **over})


def _round(strategy, cfg, contexts, rnd, nodes=None):
    """One round through the strategy and fedllm's client, for the nodes given (default: all)."""
    nodes = list(contexts) if nodes is None else nodes

    class Grid:
        def get_node_ids(self):
            return nodes

    msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(cfg.to_flat()), Grid()))
    replies = []
    for m in msgs:
        try:
            replies.append(Message(handle(m.content, contexts[m.metadata.dst_node_id]), reply_to=m))
        except Exception as err:  # as Flower reports a ClientApp's exception
            replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m))
    return strategy.round(rnd, replies), msgs


def _contexts(n):
    return {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": node - 1, "num-partitions": n}) for node in range(1, n + 1)}


# --- the parts, by hand ------------------------------------------------------------------------------
def test_outer_nesterov_step_by_hand():
    g1, g2 = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.5])}
    change, m = engine.outer_step(g1, None, lr=0.7, mu=0.9, nesterov=True)
    # m1 = g1; change = -lr (g1 + mu m1) = -0.7 * 1.9 g1
    assert torch.allclose(m["w"], torch.tensor([1.0, -2.0]))
    assert torch.allclose(change["w"], torch.tensor([-1.33, 2.66]))
    change, m = engine.outer_step(g2, m, lr=0.7, mu=0.9, nesterov=True)
    # m2 = 0.9 m1 + g2 = [1.4, -1.3]; change = -0.7 (g2 + 0.9 m2) = -0.7 [1.76, -0.67]
    assert torch.allclose(m["w"], torch.tensor([1.4, -1.3]))
    assert torch.allclose(change["w"], torch.tensor([-1.232, 0.469]))
    plain, _ = engine.outer_step(g2, {"w": torch.tensor([1.0, -2.0])}, lr=0.7, mu=0.9, nesterov=False)
    assert torch.allclose(plain["w"], torch.tensor([-0.98, 0.91]))  # -lr m2, without the look-ahead
    sgd, _ = engine.outer_step(g1, None, lr=1.0, mu=0.0, nesterov=True)
    assert torch.equal(sgd["w"], -g1["w"])  # lr 1, no momentum: the averaged local model


@pytest.mark.parametrize("h,p", [(8, 4), (12, 3), (6, 1), (40, 4)])
def test_each_fragment_syncs_once_per_h_steps_at_its_offset(h, p):
    total = 5 * h
    steps = {q: engine.sync_steps(q, h, p, total) for q in range(p)}
    for q, at in steps.items():
        offset = q * h // p if q else h
        assert at == list(range(offset, total + 1, h))  # p H / P, then every H steps
    every = sorted(s for at in steps.values() for s in at)
    assert every == list(range(h // p, total + 1, h // p))  # one fragment per round, none twice
    assert [engine.fragment_of(t, p) for t in range(1, p + 1)] == [*range(1, p), 0]


def test_the_last_round_syncs_every_fragment_so_no_tail_is_left():
    assert engine.synced_by(8, 4, 8) == engine.ALL and engine.synced_by(7, 4, 8) == 3
    assert engine.synced_by(8, 4, None) == 0 and engine.synced_by(8, 1, 8) == 0  # plain DiLoCo: as every round
    assert engine.members(engine.ALL, 3) == [0, 1, 2] and engine.members(1, 3) == [1]
    assert engine.keys_of([["a"], ["b", "c"]], engine.ALL) == ["a", "b", "c"]
    assert engine.keys_of([["a"], ["b", "c"]], 1) == ["b", "c"]
    # the bench's streaming row, H = 16, P = 4, 32 steps: fragments 1, 2, 3 last synced at steps
    # 20, 24, 28 would end without their last 12, 8, 4 steps; the last round syncs them at 32
    assert {q: engine.sync_steps(q, 16, 4, 32)[-1] for q in range(4)} == {0: 32, 1: 20, 2: 24, 3: 28}
    assert {q: engine.sync_steps(q, 16, 4, 32, final_sync=True) for q in range(4)} == {
        0: [16, 32], 1: [4, 20, 32], 2: [8, 24, 32], 3: [12, 28, 32]}


def _toy_model_state(blocks=6):
    state = {"model.embed_tokens.weight": torch.arange(40.0).reshape(10, 4)}
    for i in range(blocks):
        state[f"model.layers.{i}.mlp.weight"] = torch.full((4, 4), float(i))
    state["model.norm.weight"] = torch.arange(8.0)
    return state


def test_fragments_strided_and_sequential_and_the_rest_split_by_rows():
    state = _toy_model_state()
    strided = engine.fragments(state, 3, "strided")
    blocks = [[engine.block_of(k) for k in part if engine.block_of(k) is not None] for part in strided]
    assert blocks == [[0, 3], [1, 4], [2, 5]]
    sequential = engine.fragments(state, 3, "sequential")
    assert [[engine.block_of(k) for k in part if "#" not in k] for part in sequential] == [[0, 1], [2, 3], [4, 5]]
    # every tensor outside the blocks in P row slices, one per fragment: all of it, once
    pieces = [engine.take(state, part, 3) for part in strided]
    assert [pieces[q][f"model.embed_tokens.weight#{q}"].shape[0] for q in range(3)] == [4, 3, 3]
    rebuilt = {k: torch.zeros_like(t) for k, t in state.items()}
    for piece in pieces:
        engine.put(rebuilt, {k: v.clone() for k, v in piece.items()}, 3)
    assert all(torch.equal(rebuilt[k], state[k]) for k in state)
    assert engine.fragments(state, 1, "strided") == [list(state)]
    with pytest.raises(ConfigError, match="diloco.fragments: P=7 exceeds the model's 6 transformer blocks"):
        engine.fragments(state, 7, "strided")


def test_the_merge_by_hand():
    local, arrived = torch.tensor([1.0, 3.0]), torch.tensor([5.0, -1.0])
    assert torch.equal(engine.merge(local, arrived, 0.5), torch.tensor([3.0, 1.0]))
    assert torch.equal(engine.merge(local, arrived, 0.0), arrived)
    assert torch.equal(engine.merge(local, arrived, 1.0), local)


@pytest.mark.parametrize("over,match", [
    ({"diloco.inner-steps": 10, "diloco.fragments": 4}, "diloco.inner-steps: H=10 is not divisible by"),
    ({"diloco.tau": 2, "diloco.fragments": 2}, "diloco.tau: 2 must be below diloco.fragments=2"),
    ({"diloco.pattern": "random"}, "diloco.pattern: must be one of strided, sequential"),
    ({"diloco.alpha": 1.5}, r"diloco.alpha: must be in \[0, 1\]"),
    ({"server.strategy": "fedadam"}, "takes its own outer step"),
    ({"server.strategy": "median > fedavgm"}, "takes its own outer step"),
    ({"server.strategy": "stack"}, "stack"),
    ({"dp.clipping-norm": 1.0}, "dp.clipping-norm"),
    ({"ledger.enabled": True, "ledger.scorer": "loo"}, "ledger.scorer: loo"),
])
def test_combinations_that_make_no_sense_are_one_line_errors(over, match, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=match) as err:
        build(_cfg(tiny_model_dir, tmp_path, **over))
    assert "\n" not in str(err.value)


def test_more_fragments_than_blocks_is_refused_by_name(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="diloco.fragments: P=4 exceeds the model's 2 transformer blocks"):
        build(_cfg(tiny_model_dir, tmp_path, **{"diloco.fragments": 4}))


def test_robust_rules_that_vote_per_coordinate_are_fine(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, **{"server.strategy": "median"})
    strategy = build(cfg)
    result, _ = _round(strategy, cfg, _contexts(3), 1)
    assert result.applied and result.metrics["clients-ok"] == 3


# --- the method against DiLoCo by hand, and against local training ----------------------------------
def _rows(cfg, tok, pid, n):
    return client_rows(tuple(sorted(cfg.to_flat().items())), tok, pid, n)


def test_one_fragment_no_delay_no_mixing_is_diloco_by_hand(tiny_model_dir, tmp_path):
    """P = 1, tau = 0, alpha = 0 equals DiLoCo written out here: every client starts each outer
    round from the global model with its own AdamW state, H steps, the outer Nesterov step on
    the example-weighted mean outer gradient. Equal within float tolerance (the method averages
    local - global, the reference global - local: the same sums in another rounding order)."""
    h, clients, rounds = 2, 2, 3
    cfg = _cfg(tiny_model_dir, tmp_path, **{"diloco.fragments": 1, "diloco.inner-steps": h, "diloco.alpha": 0.0,
                                            "train.lr": 3e-3})
    strategy = build(cfg)
    contexts = _contexts(clients)
    for r in range(1, rounds + 1):
        assert _round(strategy, cfg, contexts, r)[0].applied
    net, tok = engine.trainable_model(cfg)
    glob = {k: t.clone() for k, t in engine.initial_state(cfg).items()}
    opts = {pid: torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.train.lr,
                                   weight_decay=cfg.train.weight_decay) for pid in range(clients)}
    momentum = None
    steps = dataclasses.replace(cfg.train, local_steps=h)
    for r in range(1, rounds + 1):
        locals_, weights = [], []
        for pid in range(clients):
            rows, n = _rows(cfg, tok, pid, clients)
            engine.set_state(net, "full", glob)
            lora.train(net, rows, steps, tok.pad_token_id, seed=round_seed(cfg, r, pid), optimizer=opts[pid])
            locals_.append(engine.get_state(net, "full"))
            weights.append(n)
        grad = {k: glob[k] - sum(w * loc[k] for w, loc in zip(weights, locals_)) / sum(weights) for k in glob}
        momentum = grad if momentum is None else {k: 0.9 * momentum[k] + grad[k] for k in grad}
        glob = {k: glob[k] - 0.7 * (grad[k] + 0.9 * momentum[k]) for k in glob}
    got = strategy.method.state
    assert max(float((got[k] - glob[k]).abs().max()) for k in glob) < 1e-5
    moved = max(float((glob[k] - engine.initial_state(cfg)[k]).abs().max()) for k in glob)
    assert moved > 1e-3  # and the comparison is not between two unmoved models


def test_one_client_one_step_outer_lr_1_no_momentum_is_local_training(tiny_model_dir, tmp_path):
    """One client, H = 1, outer lr 1, momentum 0: the global model follows plain local AdamW
    training (the same batches, one AdamW state) within float tolerance (global + (local -
    global) rounds once per round)."""
    rounds = 4
    cfg = _cfg(tiny_model_dir, tmp_path, **{"diloco.fragments": 1, "diloco.inner-steps": 1,
                                            "diloco.outer-lr": 1.0, "diloco.momentum": 0.0, "train.lr": 3e-3})
    strategy = build(cfg)
    contexts = _contexts(1)
    for r in range(1, rounds + 1):
        _round(strategy, cfg, contexts, r)
    net, tok = engine.trainable_model(cfg)
    engine.set_state(net, "full", engine.initial_state(cfg))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    rows, _ = _rows(cfg, tok, 0, 1)
    for r in range(1, rounds + 1):
        lora.train(net, rows, dataclasses.replace(cfg.train, local_steps=1), tok.pad_token_id,
                   seed=round_seed(cfg, r, 0), optimizer=opt)
    local = engine.get_state(net, "full")
    assert max(float((strategy.method.state[k] - local[k]).abs().max()) for k in local) < 1e-5


# --- the overlapped merge and the last round ---------------------------------------------------------------
def test_the_overlapped_merge_arrives_tau_rounds_late(tiny_model_dir, tmp_path):
    """tau = 1, alpha = 0.5: the fragment round 1 synced is held through round 2 and merged
    into the local model before round 3's steps: local = 0.5 local + 0.5 global, by hand."""
    cfg = _cfg(tiny_model_dir, tmp_path, **{"diloco.tau": 1, "diloco.alpha": 0.5})
    strategy = build(cfg)
    contexts = _contexts(2)
    _round(strategy, cfg, contexts, 1)
    synced = strategy.method.parts[engine.fragment_of(1, 2)]
    global_1 = {k: v.clone() for k, v in strategy.method.take(synced).items()}
    _round(strategy, cfg, contexts, 2)
    ctx = contexts[1]
    local_2 = engine.take(ctx.state.array_records[LOCAL].to_torch_state_dict(), synced, 2)
    # round 2 trained on the local fragment as it was: the global of round 1 not merged yet
    messages = list(strategy.configure_train(3, ArrayRecord(), ConfigRecord(cfg.to_flat()),
                                             type("G", (), {"get_node_ids": lambda self: [1]})()))
    half = DiLoCoClient(cfg, ctx, 0)
    stats = half.sync(messages[0].content, seed=1)
    assert stats["diloco-merged"] == 1
    merged = engine.take(half.local, synced, 2)
    assert all(torch.allclose(merged[k], 0.5 * local_2[k] + 0.5 * global_1[k], atol=1e-7) for k in synced)
    snap = engine.take(half.snapshot, synced, 2)
    assert all(torch.equal(snap[k], global_1[k]) for k in synced)  # the next outer gradient's reference


@pytest.mark.parametrize("over", [{}, {"diloco.tau": 1, "diloco.alpha": 0.5}], ids=["tau0", "overlapped"])
def test_the_last_round_takes_each_fragments_outer_step_on_all_local_progress(over, tiny_model_dir, tmp_path):
    """P = 2, 3 rounds: round 3 syncs both fragments. Every client first merges all it holds
    (with tau = 1 the fragment of round 2 one round early, beside round 1's that is due), so its
    snapshot is the global before round 3 for every tensor; its reply is the whole model's
    local - snapshot; the server's new global is, fragment by fragment, the outer step with that
    fragment's momentum on the example-weighted mean of those, computed here by hand."""
    cfg = _cfg(tiny_model_dir, tmp_path, **{"server.num-rounds": 3, "train.lr": 3e-3, **over})
    strategy = build(cfg)
    server, contexts = strategy.method, _contexts(2)
    for r in (1, 2):
        assert _round(strategy, cfg, contexts, r)[0].metrics["diloco-fragment"] == engine.fragment_of(r, 2)
    before = {k: t.clone() for k, t in server.state.items()}
    momentum = {k: t.clone() for k, t in server.momentum.items()}
    assert server.largest_reply() > 3 * 4 * sum(t.numel() for t in before.values())  # room for the whole model
    result, _ = _round(strategy, cfg, contexts, 3)
    assert result.applied and result.metrics["diloco-fragment"] == engine.ALL
    names = engine.keys_of(server.parts, engine.ALL)
    whole = sum(t.numel() * 4 for t in before.values())
    for u in result.updates:  # every fragment's tensors in float32, and their npy headers
        assert set(u.delta) == set(names) and whole <= u.bytes_up <= whole + 256 * len(names)
        assert u.metrics["diloco-fragment"] == engine.ALL
        assert u.metrics["diloco-merged"] == (2 if over else 1)
    deltas, weights = [], []
    for u in sorted(result.updates, key=lambda u: u.node_id):
        state = contexts[u.node_id].state.array_records
        local, snap = state[LOCAL].to_torch_state_dict(), state[SNAPSHOT].to_torch_state_dict()
        assert all(torch.equal(snap[k], before[k]) for k in before)  # nothing left held back
        deltas.append({k: local[k].float() - snap[k].float() for k in before})
        weights.append(u.num_examples)
    mean = {k: sum(w * d[k] for w, d in zip(weights, deltas)) / sum(weights) for k in before}
    for part in server.parts:
        assert all(k in momentum for k in part)  # rounds 1 and 2 started both fragments' momentum
        grad = {k: -v for k, v in engine.take(mean, part, 2).items()}
        change, _ = engine.outer_step(grad, {k: momentum[k] for k in part}, lr=0.7, mu=0.9, nesterov=True)
        start, got = engine.take(before, part, 2), server.take(part)
        assert max(float((got[k] - start[k] - change[k]).abs().max()) for k in part) < 1e-6
        assert min(float(change[k].abs().max()) for k in part) > 1e-4  # each fragment moved
    assert server.synced == [1, 0, engine.ALL] and server.fragment() == 0  # round 4 (a grown run) goes on


def test_a_node_that_missed_the_last_round_catches_up_with_every_fragment(tiny_model_dir, tmp_path):
    """A run of 2 rounds grown to 3 (a resume with more server.num-rounds), 4-bit outer steps down:
    node 3 missed round 1 and round 2 (which synced both fragments), node 1 only round 2's
    result; in round 3 both apply the encoded steps, fragment by fragment, to the server's exact
    global, and the downlink lists round 2 as ALL."""
    cfg = _cfg(tiny_model_dir, tmp_path, **{"server.num-rounds": 2, "compression.down": "quantize(4)"})
    strategy = build(cfg)
    contexts = _contexts(3)
    _round(strategy, cfg, contexts, 1, nodes=[1, 2])
    _round(strategy, cfg, contexts, 2, nodes=[1, 2])
    after_2 = {k: t.clone() for k, t in strategy.method.state.items()}
    result, msgs = _round(strategy, cfg, contexts, 3)
    info = {m.metadata.dst_node_id: m.content.config_records["diloco"] for m in msgs}
    assert info[3]["kind"] == "steps" and list(info[3]["synced"]) == [1, engine.ALL]
    assert list(info[1]["rounds"]) == [2] and list(info[1]["synced"]) == [engine.ALL]
    assert {u.node_id: u.metrics["diloco-merged"] for u in result.updates} == {1: 2, 2: 2, 3: 2}
    for node in (1, 2, 3):
        snap = contexts[node].state.array_records[SNAPSHOT].to_torch_state_dict()
        assert all(torch.equal(snap[k], after_2[k]) for k in after_2), node


# --- nodes that miss rounds or lose their state -----------------------------------------------------------
def test_a_node_that_misses_rounds_catches_up_and_one_that_lost_its_state_resyncs(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    strategy = build(cfg)
    contexts = _contexts(3)
    _round(strategy, cfg, contexts, 1)
    _round(strategy, cfg, contexts, 2, nodes=[1, 2])  # node 3 is not sampled
    result, msgs = _round(strategy, cfg, contexts, 3, nodes=[1, 2, 3])
    assert result.applied and result.metrics["clients-ok"] == 3
    info = {m.metadata.dst_node_id: m.content.config_records["diloco"] for m in msgs}
    assert info[3]["kind"] == "values" and list(info[3]["rounds"]) == [1, 2]  # the changes it missed
    assert list(info[1]["rounds"]) == [2]
    by_node = {u.node_id: u.metrics for u in result.updates}
    assert by_node[3]["diloco-merged"] == 2 and by_node[1]["diloco-merged"] == 1
    # node 2 loses its state (a new SuperNode): refused once, then sent the whole state
    contexts[2] = _contexts(3)[2]
    result, _ = _round(strategy, cfg, contexts, 4)
    assert [n for n, _ in result.dropped] == [2] and "holds no state" in result.dropped[0][1]
    result, msgs = _round(strategy, cfg, contexts, 5)
    assert not result.dropped
    sent = {m.metadata.dst_node_id: m.content.config_records["diloco"]["kind"] for m in msgs}
    assert sent == {1: "values", 2: "full", 3: "values"}
    assert {u.node_id: u.metrics["diloco-resynced"] for u in result.updates} == {1: 0, 2: 1, 3: 0}


# --- checkpoints ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_across_the_last_round_is_bit_identical_outer_momentum_included(tiny_model_dir, tmp_path):
    """A server killed as it sends round 4 (the last: it syncs every fragment) resumes from its
    round-3 checkpoint, its nodes keeping their state, and ends where an uninterrupted run ends,
    bit for bit; a finished run of 2 rounds grown to 4 on nodes that lost their state (a new
    simulation) resyncs them from the checkpoint's global model and syncs every fragment again in
    its new last round (the round numbers go on: round 4, not the resumed run's second)."""
    from fedllm.server.loop import run

    over = {"server.checkpoint": True, "server.num-rounds": 4, "diloco.tau": 1, "diloco.alpha": 0.5,
            "compression.down": "quantize(4)"}
    whole = run(LocalGrid(2), _cfg(tiny_model_dir, tmp_path, **{**over, "server.run-name": "whole"}))

    class Crash(LocalGrid):
        """The server process dies as it sends round 4's messages."""

        def push_messages(self, messages):
            messages = list(messages)
            if messages and messages[0].content.config_records[CONFIG]["server-round"] == 4:
                raise KeyboardInterrupt("server killed")
            return super().push_messages(messages)

    grid = Crash(2)
    cfg = _cfg(tiny_model_dir, tmp_path, **{**over, "server.run-name": "cut"})
    with pytest.raises(KeyboardInterrupt):
        run(grid, cfg)
    resumed = LocalGrid(2)
    resumed.contexts = grid.contexts  # the nodes keep their state
    cut = run(resumed, cfg.replace(server__resume=str(tmp_path / "cut")))
    a = checkpoint.read(whole / checkpoint.FILE)["strategy"]["method"]
    b = checkpoint.read(cut / checkpoint.FILE)["strategy"]["method"]
    assert a["momentum"] and set(a["momentum"]) == set(b["momentum"])
    assert a["synced"] == b["synced"] == [1, 0, 1, engine.ALL]
    for key in ("global", "momentum", "feedback"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4] and rows[4]["diloco-fragment"] == engine.ALL
    assert [c["diloco-resynced"] for c in rows[4]["clients"].values()] == [0, 0]
    fresh = run(LocalGrid(2), _cfg(tiny_model_dir, tmp_path, **{**over, "server.run-name": "fresh",
                                                                "server.num-rounds": 2}))
    run(LocalGrid(2), _cfg(tiny_model_dir, tmp_path, **{**over, "server.resume": str(fresh)}))
    rows = [json.loads(line) for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert [r["diloco-fragment"] for r in rows[1:]] == [1, engine.ALL, 1, engine.ALL]
    assert [c["diloco-resynced"] for c in rows[3]["clients"].values()] == [1, 1]
    assert (fresh / "model" / "config.json").is_file()


# --- malformed replies ----------------------------------------------------------------------------------
def _reply(node, fragment_names, state, p, *, record="arrays", payload=None, **metrics_over):
    metrics = {"num-examples": 10, "server-round": 1, "partition-id": node, "diloco-fragment": 1, **metrics_over}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if record == "arrays":
        content["arrays"] = ArrayRecord(payload if payload is not None else
                                        {k: torch.full_like(v, 0.01) for k, v in engine.take(state, fragment_names, p).items()})
    elif record == "update":
        content["update"] = ConfigRecord({"payload": payload})
    return reply_to(node, content)


def _cases(names, state, codec):
    good = {k: torch.full_like(v, 0.01) for k, v in engine.take(state, names, 2).items()}
    first = names[0]
    return {
        "no update record": dict(record=None),
        "another fragment": {"diloco-fragment": 0},
        "a tensor missing": dict(payload={k: v for k, v in good.items() if k != first}),
        "an extra tensor": dict(payload={**good, "extra": torch.zeros(2)}),
        "a wrong shape": dict(payload={**good, first: torch.zeros(3)}),
        "a NaN": dict(payload={**good, first: torch.full_like(good[first], float("nan"))}),
        "garbage payload": dict(record="update", payload=b"FZ\x01garbage"),
        "another codec's payload": dict(record="update", payload=encode(parse("zstd"), good, 0)),
        "oversized": dict(payload={**good, first: torch.zeros(good[first].numel() * 40)}),
    }


@pytest.mark.parametrize("case", ["no update record", "another fragment", "a tensor missing", "an extra tensor",
                                  "a wrong shape", "a NaN", "garbage payload", "another codec's payload",
                                  "oversized"])
def test_malformed_diloco_reply_is_dropped_and_the_round_goes_on(case, tiny_model_dir, tmp_path):
    codec = "quantize(4)" if case in ("garbage payload", "another codec's payload") else ""
    cfg = _cfg(tiny_model_dir, tmp_path, **{"compression.up": codec})
    strategy = build(cfg)
    state = strategy.method.state
    names = strategy.method.parts[1]
    before = {k: t.clone() for k, t in state.items()}
    kwargs = _cases(names, state, codec)[case]
    metrics = {k: v for k, v in kwargs.items() if k not in ("record", "payload")}
    extra = {k: v for k, v in kwargs.items() if k in ("record", "payload")}
    bad = _reply(7, names, state, 2, **extra, **metrics)
    good = _reply(8, names, state, 2, **({"record": "update", "payload": encode(parse(codec), {
        k: torch.full_like(v, 0.01) for k, v in engine.take(state, names, 2).items()}, 0)} if codec else {}))
    result = strategy.round(1, [bad])
    assert not result.applied and result.dropped[0][0] == 7 and result.dropped[0][1]
    assert all(torch.equal(state[k], before[k]) for k in state)
    result = strategy.round(1, [bad, good])
    assert result.applied and [n for n, _ in result.dropped] == [7] and result.metrics["clients-ok"] == 1


def test_a_node_whose_state_does_not_read_back_is_sent_the_whole_model(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    strategy = build(cfg)
    contexts = _contexts(2)
    _round(strategy, cfg, contexts, 1)
    _round(strategy, cfg, contexts, 2)
    contexts[2].state[LOCAL] = ArrayRecord({"not-a-weight": torch.zeros(2)})  # a damaged node state
    result, _ = _round(strategy, cfg, contexts, 3)
    assert [n for n, _ in result.dropped] == [2] and "holds no state" in result.dropped[0][1]
    result, msgs = _round(strategy, cfg, contexts, 4)
    assert not result.dropped and {u.node_id: u.metrics["diloco-resynced"] for u in result.updates} == {1: 0, 2: 1}


def test_a_malformed_request_is_refused_by_the_client(tiny_model_dir, tmp_path):
    from fedllm.errors import PayloadError

    cfg = _cfg(tiny_model_dir, tmp_path)
    base = {CONFIG: ConfigRecord({**cfg.to_flat(), "server-round": 2})}
    info = {"round": 2, "fragment": 0, "version": 1, "base": 0, "rounds": [1], "synced": [1], "kind": "values"}
    bad = {"synced unlike rounds": RecordDict({**base, "diloco": ConfigRecord({**info, "synced": [1, 0]})}),
           "no such fragment": RecordDict({**base, "diloco": ConfigRecord({**info, "synced": [2]})}),
           "no arrays": RecordDict({**base, "diloco": ConfigRecord(info)}),
           "wrong names": RecordDict({**base, "diloco": ConfigRecord(info), ARRAYS: ArrayRecord({"x": torch.zeros(2)})}),
           "steps without payloads": RecordDict({**base, "diloco": ConfigRecord({**info, "kind": "steps", "steps": []})})}
    for name, request in bad.items():
        with pytest.raises(PayloadError):
            handle(request, _contexts(1)[1])


# --- runs -------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("over", [
    {},
    {"diloco.tau": 1, "diloco.alpha": 0.5, "compression.up": "quantize(4)", "compression.down": "quantize(4)"},
    {"diloco.params": "lora", "diloco.fragments": 1, "diloco.inner-steps": 2, "train.lr": 1e-2},
], ids=["full", "overlapped-4bit", "lora"])
def test_a_tiny_run_lowers_the_eval_loss_and_moves_one_fragment_a_round(over, tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    cfg = _cfg(tiny_model_dir, tmp_path, **{"server.evaluate": True, "server.num-rounds": 6, "train.lr": 2e-3,
                                            "server.eval-every": 0, **over})
    run_dir = run(LocalGrid(2), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"] - 0.05
    strategy = build(cfg)
    whole = sum(t.numel() * 4 for t in strategy.method.state.values())
    for r in rows[1:]:  # the last round syncs every fragment: the whole model up
        code = engine.synced_by(r["round"], cfg.diloco.fragments, cfg.server.num_rounds)
        assert r["diloco-fragment"] == code
        up, names = max(r["bytes-up"].values()), engine.keys_of(strategy.method.parts, code)
        share = sum(t.numel() * 4 for t in strategy.method.take(names).values())
        if not cfg.compression.up:
            assert share <= up <= share + 256 * len(names)  # the fragments in float32, npy headers
        else:
            assert up < share / 5  # 4-bit codes and a scale per 64 values
        assert up < whole / cfg.diloco.fragments * 1.2 or code == engine.ALL or cfg.diloco.fragments == 1
    saved = run_dir / ("adapter" if cfg.diloco.params == "lora" else "model")
    assert (saved / ("adapter_config.json" if cfg.diloco.params == "lora" else "config.json")).is_file()
