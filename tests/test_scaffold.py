"""SCAFFOLD (server.strategy=scaffold): the variate maths by hand, the corrected gradient, a tiny
in-process run, checkpoint/resume of c and c_i, bad variate replies dropped, and the refusals."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedllm.config import Config, TrainConfig
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods.adapters import engine as lora
from fedllm.methods.adapters import scaffold
from fedllm.methods.adapters.config import LoraConfig
from fedllm.server.grid import LocalGrid
from tests.conftest import reply_to, tiny_run_config

SCAFFOLD = {"server.strategy": "scaffold", "data.partition": "task"}


# --- the maths, by hand -------------------------------------------------------------------------
def test_client_delta_is_option_two():
    c, x, y = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 0.5])}, {"w": torch.tensor([0.3, 0.9])}
    # (x - y) / (K eta) - c with K eta = 0.1: (0.2, -0.4) / 0.1 - (1, -2) = (2, -4) - (1, -2) = (1, -2)
    assert torch.allclose(scaffold.client_delta(c, x, y, 0.1)["w"], torch.tensor([1.0, -2.0]))


def test_server_step_scales_the_mean_by_the_share_of_clients():
    c = {"w": torch.tensor([1.0, 1.0])}
    deltas = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([4.0, -6.0])}]
    # |S| = 2 of N = 4: c + (2 / 4) * mean = (1, 1) + 0.5 * (3, -3) = (2.5, -0.5)
    assert torch.allclose(scaffold.server_step(c, deltas, 4)["w"], torch.tensor([2.5, -0.5]))
    assert scaffold.server_step(c, [], 4) is c


def test_lr_sum_is_k_eta_at_a_constant_rate_and_follows_warmup():
    assert scaffold.lr_sum(TrainConfig(lr=0.01, local_steps=4), (0, 8)) == pytest.approx(0.04)
    # warm-up over 4 steps: 0.25, 0.5, 0.75, 1.0 of lr in the first round
    assert scaffold.lr_sum(TrainConfig(lr=0.01, local_steps=4, warmup_steps=4), (0, 8)) == pytest.approx(0.025)


def test_the_correction_adds_c_minus_c_i_to_the_gradient(tiny_cfg):
    net, _ = lora.lora_model(tiny_cfg, LoraConfig(rank=2, dropout=0.0))
    state = lora.adapter_state(net)
    c = {k: torch.full(t.shape, 0.5) for k, t in state.items()}
    c_i = {k: torch.full(t.shape, 0.25) for k, t in state.items()}
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    correct = scaffold.correction(net, scaffold.Held(c, c_i))
    correct("step", 0.1)  # not where this correction goes
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)
    correct("gradient", 0.1)
    assert all(torch.allclose(p.grad, torch.full_like(p, 1.25)) for p in params)  # g + c - c_i
    before = [p.detach().clone() for p in params]
    scaffold.correction(net, scaffold.Held(c, c_i, "step"))("step", 0.1)  # y -= lr (c - c_i)
    assert all(torch.allclose(p, b - 0.025) for p, b in zip(params, before))
    assert len(params) == len(state)
    assert scaffold.correction(net, None) is None
    assert torch.equal(scaffold.corrected(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.5])),
                       torch.tensor([2.5]))


def test_a_corrected_local_step_moves_by_the_correction(tiny_cfg):
    """One step from the same start, with and without c - c_i = 100 on one tensor: AdamW's first step
    there is -lr (the corrected gradient is positive), and every other tensor takes the same step."""
    from fedllm.data import builtin, encode

    net, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=2, dropout=0.0))
    start = lora.adapter_state(net)
    rows = [encode(tok, e, 32) for e in builtin.builtin_splits(["parity"], 4, 1, seed=0)[0]]
    cfg = TrainConfig(lr=1e-3, local_steps=1, batch_size=2)
    lora.train(net, rows, cfg, tok.pad_token_id, seed=0)
    plain = lora.adapter_state(net)
    lora.set_adapter_state(net, start)
    c = {k: torch.zeros(t.shape) for k, t in start.items()}
    name = sorted(c)[0]
    c[name] += 100.0
    lora.train(net, rows, cfg, tok.pad_token_id, seed=0,
               correct=scaffold.correction(net, scaffold.Held(c, {k: torch.zeros_like(t) for k, t in c.items()})))
    fixed = lora.adapter_state(net)
    assert torch.allclose(fixed[name], start[name] - 1e-3, atol=2e-5)
    assert all(torch.equal(fixed[k], plain[k]) for k in c if k != name)


# --- in-process runs ----------------------------------------------------------------------------
def _c_of(run_dir) -> dict[str, torch.Tensor]:
    """c as the run's checkpoint holds it."""
    from fedllm.server import checkpoint

    return checkpoint.read(run_dir / checkpoint.FILE)["strategy"]["method"]["scaffold"]["c"]


def _held(grid: LocalGrid) -> list[dict[str, torch.Tensor]]:
    return [grid.contexts[n].state.array_records[scaffold.HELD].to_torch_state_dict() for n in sorted(grid.contexts)]


@pytest.mark.usefixtures("task_identity")
def test_a_tiny_run_keeps_c_the_mean_of_the_clients_c_i(tiny_model_dir, tmp_path):
    from fedllm.reporting.runlog import read_metrics
    from fedllm.server.loop import run

    grid = LocalGrid(2)
    run_dir = run(grid, tiny_run_config(tiny_model_dir, tmp_path, **SCAFFOLD))
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    assert last["clients-ok"] == 2 and last["scaffold-clients-known"] == 2 and last["scaffold-c-norm"] > 0
    assert last["eval-loss"] < rows[0]["eval-loss"]
    held, c = _held(grid), _c_of(run_dir)
    for k in c:  # every client in every round, both from 0: c = mean c_i
        assert torch.allclose(c[k], (held[0][k] + held[1][k]) / 2, atol=1e-6)
        assert not torch.equal(held[0][k], held[1][k]) or not held[0][k].any()


@pytest.mark.usefixtures("task_identity")
def test_codecs_carry_the_variates_both_ways_and_a_step_correction_runs(tiny_model_dir, tmp_path):
    from fedllm.reporting.runlog import read_metrics
    from fedllm.server.loop import run

    grid = LocalGrid(2)
    over = {**SCAFFOLD, "server.strategy": "scaffold(correct=step)", "compression.up": "int8",
            "compression.down": "int8"}
    run_dir = run(grid, tiny_run_config(tiny_model_dir, tmp_path, **over))
    last = read_metrics(run_dir)[-1]
    assert last["clients-ok"] == 2 and last["clients-dropped"] == 0
    held, c = _held(grid), _c_of(run_dir)
    for k in c:  # each client keeps the delta the server decoded: c = mean c_i still
        assert torch.allclose(c[k], (held[0][k] + held[1][k]) / 2, atol=1e-6)


@pytest.mark.usefixtures("task_identity")
def test_resume_keeps_c_in_the_checkpoint_and_c_i_in_the_node_state(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from fedllm.server.loop import run

    over = {**SCAFFOLD, "server.num-rounds": 3}
    whole = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.run-name": "whole"}))
    grid = LocalGrid(2)
    part = run(grid, tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.run-name": "part",
                                                                  "server.num-rounds": 1}))
    after_one = _c_of(part)
    assert any(t.any() for t in after_one.values())
    run(grid, tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.resume": str(part)}))
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c_whole, c_part = _c_of(whole), _c_of(part)
    assert all(torch.equal(c_whole[k], c_part[k]) for k in c_whole)


# --- bad replies --------------------------------------------------------------------------------
def _server_and_reply(tiny_model_dir, tmp_path, **over):
    from fedllm.methods.adapters.server import LoraServer

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **SCAFFOLD, **over)
    server = LoraServer(cfg)
    server.encode_down(1)
    local = {k: t + 0.01 for k, t in server.state.items()}
    return cfg, server, local


@pytest.mark.parametrize("variate, reason", [
    (None, "control variate: lacks the 'scaffold' record"),
    ("shape", "control variate: .*got torch.float32"),
    ("nan", "control variate: .*non-finite values"),
    ("names", "control variate: tensor names differ"),
])
@pytest.mark.usefixtures("task_identity")
def test_a_bad_variate_reply_is_dropped_with_its_reason(tiny_model_dir, tmp_path, variate, reason):
    from strategies import build

    cfg, server, local = _server_and_reply(tiny_model_dir, tmp_path)
    strategy = build(cfg, server)
    good = {k: torch.zeros(t.shape) for k, t in server.state.items()}
    bad = {None: None, "shape": {k: torch.zeros(2, 2) for k in good}, "names": {"x": torch.zeros(1)},
           "nan": {k: torch.full(t.shape, float("nan")) for k, t in good.items()}}[variate]
    metrics = MetricRecord({"num-examples": 4, "server-round": 1})
    replies = []
    for node, v in ((1, good), (2, bad)):
        content = RecordDict({"arrays": ArrayRecord(local), "metrics": metrics})
        if v is not None:
            content[scaffold.VARIATE] = ArrayRecord(v)
        replies.append(reply_to(node, content))
    result = strategy.round(1, replies)
    assert result.applied and [u.node_id for u in result.updates] == [1]
    assert len(result.dropped) == 1 and result.dropped[0][0] == 2
    import re

    assert re.search(reason, result.dropped[0][1]), result.dropped[0][1]
    assert result.metrics["scaffold-clients-known"] == 1  # the dropped node's variate did not count


# --- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("over, match", [
    ({"train.method": "dpo"}, "server.strategy: scaffold's control variates .* train.method=dpo"),
    ({"train.method": "exact-lora"}, "train.method=exact-lora"),
    ({"secagg.enabled": True}, "secagg.enabled: scaffold"),
    ({"dp.clipping-norm": 1.0}, "dp.clipping-norm: scaffold"),
    ({"lora.peft": "prompt"}, "lora.peft: scaffold"),
    ({"lora.client-ranks": "4,8"}, "lora.client-ranks: scaffold"),
])
def test_what_scaffold_cannot_go_with_is_refused_in_one_line(over, match):
    from strategies import resolve

    cfg = Config.from_flat({"server.strategy": "scaffold", **over})
    with pytest.raises(ConfigError, match=match) as err:
        resolve(cfg)
    assert "\n" not in str(err.value)


def test_scaffold_composes_with_a_server_optimizer_and_is_off_otherwise():
    from strategies import resolve

    _, chain = resolve(Config.from_flat({"server.strategy": "scaffold > fedavgm(lr=1.5, momentum=0.0)"}))
    assert chain.rule.name == "scaffold" and chain.rule.meta["variates"] and chain.fold is not None
    assert chain.round_config() == {"scaffold-correct": "gradient"}
    _, chain = resolve(Config.from_flat({"server.strategy": "scaffold(correct=step)"}))
    assert chain.round_config() == {"scaffold-correct": "step"}
    with pytest.raises(ConfigError, match="correct must be one of gradient, step"):
        resolve(Config.from_flat({"server.strategy": "scaffold(correct=weights)"}))
    assert scaffold.on(Config.from_flat({"server.strategy": "scaffold > fedadam"}))
    assert not scaffold.on(Config.from_flat({"server.strategy": "fedavg"})) and not scaffold.on(Config())


def test_a_node_without_c_i_starts_at_c():
    like = {"w": torch.zeros(2)}
    cfg = Config.from_flat({"server.strategy": "scaffold"})
    request = RecordDict({"config": ConfigRecord({}), scaffold.VARIATE: ArrayRecord({"w": torch.tensor([1.0, 2.0])})})
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={}, node_config={})
    held = scaffold.receive(request, context, cfg, like)
    assert torch.equal(held.c_i["w"], held.c["w"])
    context.state[scaffold.HELD] = ArrayRecord({"w": torch.tensor([0.5, 0.5])})
    assert torch.equal(scaffold.receive(request, context, cfg, like).c_i["w"], torch.tensor([0.5, 0.5]))
    assert scaffold.receive(request, context, Config(), like) is None
    request["config"] = ConfigRecord({scaffold.CORRECT: "step"})
    assert scaffold.receive(request, context, cfg, like).where == "step"
    request["config"] = ConfigRecord({scaffold.CORRECT: "sideways"})
    with pytest.raises(PayloadError, match="scaffold-correct: 'sideways'"):
        scaffold.receive(request, context, cfg, like)
