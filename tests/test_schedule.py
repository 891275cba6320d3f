"""Round-aware learning rates (fedllm.methods.schedule) and AdamW moments kept between a node's
rounds (train.keep-optimizer)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_run_config
from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.methods import check_spec
from fedllm.methods.schedule import clock, lr_factor


def _train(**over):
    return Config.from_flat({"train.lr": 0.01, **over}).train


def test_cosine_after_warmup_by_hand():
    t = _train(**{"train.lr-schedule": "cosine", "train.warmup-steps": 2, "train.min-lr": 0.001})
    # warm-up: (s + 1) / 2; then floor + (1 - floor) (1 + cos(pi (s - 2) / 9)) / 2, floor 0.1, over steps 2..11
    assert [lr_factor(t, s, 12) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(t, 2, 12) == pytest.approx(1.0)
    assert lr_factor(t, 11, 12) == pytest.approx(0.1)
    assert lr_factor(t, 5, 12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))


def test_linear_and_constant_by_hand():
    linear = _train(**{"train.lr-schedule": "linear"})
    assert [lr_factor(linear, s, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert lr_factor(linear, 40, 5) == 0.0  # past the end: the floor, never negative
    warm = _train(**{"train.warmup-steps": 4})
    assert [lr_factor(warm, s, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert all(lr_factor(_train(), s, 10) == 1.0 for s in range(10))


def test_the_clock_counts_rounds_not_a_nodes_history():
    cfg = Config.from_flat({"server.num-rounds": 5, "train.local-steps": 3})
    assert [clock(cfg, r) for r in (0, 1, 2, 5)] == [(0, 15), (0, 15), (3, 15), (12, 15)]


@pytest.mark.parametrize("over, key", [
    ({"train.warmup-steps": 20, "server.num-rounds": 2, "train.local-steps": 10}, "train.warmup-steps"),
    ({"train.min-lr": 0.5, "train.lr": 0.1}, "train.min-lr"),
    ({"train.lr-schedule": "step"}, "train.lr-schedule"),
    ({"train.keep-optimizer": True, "train.method": "exact-lora"}, "train.keep-optimizer"),
    ({"train.keep-optimizer": True, "train.optimizer": "paged-adamw-8bit"}, "train.keep-optimizer"),
    ({"train.warmup-steps": -1}, "train.warmup-steps"),
])
def test_bad_schedule_settings_name_the_key(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ":"):
        check_spec(Config.from_flat(over))


def test_train_steps_at_the_scheduled_rates(tiny_cfg):
    from fedllm.methods.adapters import engine as lora
    from fedllm.methods.adapters.config import LoraConfig
    from fedllm.data.templates import encode

    net, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=2, dropout=0.0), 0)
    rows = [encode(tok, {"instruction": f"say {i}", "input": "", "response": str(i)}, 32) for i in range(4)]
    cfg = _train(**{"train.lr-schedule": "linear", "train.local-steps": 2, "train.max-grad-norm": 0.0})
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["lr"]))
    lora.train(net, rows, cfg, tok.pad_token_id, seed=0, optimizer=opt, clock=(2, 5))  # steps 2 and 3 of 5
    assert seen == pytest.approx([0.01 * 0.5, 0.01 * 0.25])


def test_moments_round_trip_and_refuse_other_tensors():
    from fedllm.methods.adapters.optimizer import adamw_state, make_adamw

    net = torch.nn.Linear(2, 3)
    opt = make_adamw(net, _train(), None)
    for _ in range(3):
        net(torch.ones(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
    held = adamw_state(opt)
    again = make_adamw(net, _train(), held)
    moments = again.state[net.weight]
    assert int(moments["step"]) == 3 and torch.equal(moments["exp_avg_sq"], opt.state[net.weight]["exp_avg_sq"])
    other = make_adamw(torch.nn.Linear(3, 2), _train(), held)  # other shapes: a fresh AdamW
    assert not other.state


@pytest.mark.parametrize("keep", [True, False])
def test_a_run_keeps_each_nodes_moments_between_its_rounds(tiny_model_dir, tmp_path, keep):
    from fedllm.methods.adapters.client import MOMENTS
    from fedllm.reporting.runlog import read_metrics
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"train.keep-optimizer": keep, "train.lr-schedule": "cosine",
                                                       "train.warmup-steps": 1, "server.num-rounds": 3})
    grid = LocalGrid(2)
    rows = read_metrics(run(grid, cfg))
    assert all(math.isfinite(r["eval-loss"]) for r in rows)
    for node in grid.contexts.values():
        if keep:  # 3 rounds of 2 steps, each round continuing the last one's moments
            held = node.state.array_records[MOMENTS].to_torch_state_dict()
            assert {float(v) for k, v in held.items() if k.endswith(".step")} == {6.0}
        else:
            assert MOMENTS not in node.state.array_records


def test_the_cli_refuses_a_warmup_longer_than_the_run_before_any_engine(tmp_path, capsys):
    from fedllm.cli import main

    assert main(["simulate", "--set", "train.warmup-steps=1000", "--set", f"server.run-dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.warmup-steps: 1000 is not below the run's" in err[0]
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_which_methods_take_the_schedule():
    from fedllm.methods import METHODS
    from fedllm.methods.schedule import steps_per_round

    over = {"train.lr-schedule": "cosine"}
    for name in ("lora", "exact-lora", "dpo", "diloco", "ferret"):
        check_spec(Config.from_flat({**over, "train.method": name}))  # accepted
    with pytest.raises(ConfigError, match=r"train\.lr-schedule:.*zo"):
        check_spec(Config.from_flat({**over, "train.method": "zo"}))  # zo steps at zo.lr
    cfg = Config.from_flat({"train.method": "diloco", "diloco.inner-steps": 12, "diloco.fragments": 4})
    assert steps_per_round(cfg) == 3 and clock(cfg, 3) == (6, cfg.server.num_rounds * 3)
    assert {m.name for m in METHODS.entries()} == {"lora", "exact-lora", "zo", "diloco", "dpo", "ferret"}
