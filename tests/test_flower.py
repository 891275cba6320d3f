"""fedllm's strategy as a Flower user meets it: driven by Flower's own `Strategy.start`, and its
server optimizers and robust rules beside Flower's strategies on the same inputs."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from conftest import tiny_run_config
from fedllm.server.grid import LocalGrid
from strategies import build
from strategies.arrays import leaves, state_arrays


def test_state_arrays_flatten_by_path():
    state = {"global": {"m.lora_A.weight": torch.ones(2, 3, dtype=torch.bfloat16)}, "downlink": {"history": [b"ab"]},
             "next-round": 4, "modules": "q_proj,v_proj", "feedback": None}
    record = state_arrays(state)
    assert list(record) == ["global/m.lora_A.weight", "downlink/history/0", "next-round"]  # str and None left out
    assert record["global/m.lora_A.weight"].dtype == "float32" and record["global/m.lora_A.weight"].shape == (2, 3)
    assert bytes(record["downlink/history/0"].numpy()) == b"ab" and record["next-round"].numpy() == 4
    with pytest.raises(ValueError, match="'a/b' appears twice"):
        state_arrays({"a/b": torch.zeros(1), "a": {"b": torch.zeros(1)}})


@pytest.mark.usefixtures("task_identity")
def test_flower_start_returns_the_trained_global(tiny_model_dir, tmp_path):
    """Flower's `Strategy.start` over fedllm's strategy ends with the method's trained global state
    in `result.arrays` (and hands it to `evaluate_fn`)."""
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.num-rounds": 1})
    strategy = build(cfg)
    initial = {k: t.clone() for k, t in strategy.method.state_dict()["global"].items()}
    seen = []
    result = strategy.start(LocalGrid(2), ArrayRecord(), num_rounds=1, train_config=ConfigRecord(cfg.to_flat()),
                            evaluate_fn=lambda rnd, arrays: seen.append((rnd, arrays)))
    assert result.train_metrics_clientapp[1]["clients-ok"] == 2
    state = strategy.method.state_dict()
    got = result.arrays.to_torch_state_dict()
    assert got and list(got) == [path for path, _ in leaves(state)]
    assert all(torch.equal(got[path], torch.as_tensor(value)) for path, value in leaves(state))
    trained = {k.removeprefix("global/"): t for k, t in got.items() if k.startswith("global/")}
    assert trained.keys() == initial.keys()
    assert max((trained[k] - initial[k]).abs().max().item() for k in initial) > 0  # it trained
    assert seen[-1][0] == 1 and seen[-1][1] is result.arrays
