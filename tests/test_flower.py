"""fedllm's strategy as a Flower user meets it: driven by Flower's own `Strategy.start`, and its
server optimizers and robust rules beside Flower's strategies on the same inputs."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from conftest import tiny_run_config
from fedllm.server.grid import LocalGrid
from strategies import build, state_arrays
from strategies.arrays import leaves


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
@pytest.mark.parametrize("method, trained", [("lora", "global/"), ("zo", "accumulators")])
def test_flower_start_returns_the_trained_global(method, trained, tiny_model_dir, tmp_path):
    """Flower's `Strategy.start` over fedllm's strategy ends with the method's trained global state
    in `result.arrays` (and hands it to `evaluate_fn`): lora's adapter, zo's accumulators."""
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.num-rounds": 1, "train.method": method})
    strategy = build(cfg)
    initial = state_arrays(strategy.method.state_dict()).to_torch_state_dict()
    seen = []
    result = strategy.start(LocalGrid(2), ArrayRecord(), num_rounds=1, train_config=ConfigRecord(cfg.to_flat()),
                            evaluate_fn=lambda rnd, arrays: seen.append((rnd, arrays)))
    assert result.train_metrics_clientapp[1]["clients-ok"] == 2
    state = strategy.method.state_dict()
    got = result.arrays.to_torch_state_dict()
    assert got and list(got) == [path for path, _ in leaves(state)]
    assert all(torch.equal(got[path], torch.as_tensor(np.array(value))) for path, value in leaves(state))
    moved = [k for k in got if k.startswith(trained)]
    assert moved and all(k in initial and got[k].shape == initial[k].shape for k in moved)
    assert any(not torch.equal(got[k], initial[k]) for k in moved)  # it trained
    assert seen[-1][0] == 1 and seen[-1][1] is result.arrays


# --- beside Flower's strategies, on the same inputs ----------------------------------------
from flwr.app import MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import (FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedTrimmedAvg,  # noqa: E402
                                     FedYogi, Krum, MultiKrum)

from conftest import reply_to  # noqa: E402
from fedllm.config import Config  # noqa: E402
from fedllm.methods.adapters.server import LoraServer  # noqa: E402

SHAPES = {"m.lora_A.weight": (4, 6), "m.lora_B.weight": (5, 4)}
NODES = [1, 2, 3, 4, 5]  # node 5 sends an outlier

# fedllm's chain, Flower's strategy: the same aggregate with flavor=flower (Flower's defaults) or
# with the same parameters spelled each way
SAME = {
    "fedavg": FedAvg,
    "median": FedMedian,
    "trimmed-mean(fraction=0.2)": lambda: FedTrimmedAvg(beta=0.2),
    "fedavgm(flavor=flower)": FedAvgM,
    "fedavgm(lr=0.5, momentum=0.9)": lambda: FedAvgM(server_learning_rate=0.5, server_momentum=0.9),
    "fedadam(flavor=flower)": FedAdam,
    "fedyogi(flavor=flower)": FedYogi,
    "fedadagrad(flavor=flower)": FedAdagrad,
    "fedadam(flavor=flower, lr=0.01, beta1=0.5, beta2=0.9, tau=0.01)":
        lambda: FedAdam(eta=0.01, beta_1=0.5, beta_2=0.9, tau=0.01),
    "median > fedyogi(flavor=flower, lr=0.05)": None,  # no Flower counterpart: checked for running only
    "krum(flavor=flower)": Krum,
    "multikrum(flavor=flower)": MultiKrum,
    "krum(f=1)": lambda: Krum(num_malicious_nodes=1),
    "multikrum(f=1, keep=3)": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
}
# fedllm's defaults beside Flower's, on updates as small as LoRA's (d^2 near tau^2): the
# optimizers with Flower's lr set to fedllm's 1e-3, so that the formulas alone differ (v_0 = tau^2,
# no bias correction, Adagrad's first moment); Multi-Krum's f and keep (docs/rules.md says how)
DIFFERENT = {"fedadam": lambda: FedAdam(eta=1e-3), "fedyogi": lambda: FedYogi(eta=1e-3),
             "fedadagrad": lambda: FedAdagrad(eta=1e-3), "multikrum": MultiKrum}


class Nodes:
    def get_node_ids(self):
        return NODES


def _locals(rnd: int, scale: float) -> list[dict[str, np.ndarray]]:
    """The clients' local adapters in round `rnd`: 1 + scale (0.5 + N(0, 1)), node 5's 20 times as far."""
    rng = np.random.default_rng(rnd)
    out = [{k: (1.0 + scale * (0.5 + rng.normal(0, 1, s) * (20 if node == NODES[-1] else 1))).astype(np.float32)
            for k, s in SHAPES.items()} for node in NODES]
    return out


def _replies(rnd: int, scale: float) -> list:
    return [reply_to(node, RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in local.items()}),
                                       "metrics": MetricRecord({"num-examples": 10 * node, "train-loss": 1.0,
                                                                "server-round": rnd})}))
            for node, local in zip(NODES, _locals(rnd, scale))]


def _rounds(spec: str, flower, rounds: int = 3, scale: float = 0.1) -> float:
    """fedllm's chain `spec` and Flower's strategy over the same `rounds` rounds of replies (local
    adapters `scale` away from 1), from the same global; the largest absolute difference of their
    global adapters after any round."""
    start = {k: np.full(s, 1.0, np.float32) for k, s in SHAPES.items()}
    cfg = Config.from_flat({"server.strategy": spec})
    ours = build(cfg, LoraServer(cfg, {k: torch.from_numpy(v.copy()) for k, v in start.items()}))
    theirs, arrays, worst = flower() if flower else None, ArrayRecord({k: Array(v) for k, v in start.items()}), 0.0
    for rnd in range(1, rounds + 1):
        assert ours.round(rnd, _replies(rnd, scale)).applied
        if theirs is None:
            continue
        list(theirs.configure_train(rnd, arrays, ConfigRecord(), Nodes()))
        arrays, _ = theirs.aggregate_train(rnd, _replies(rnd, scale))
        got = ours.method.state_dict()["global"]
        worst = max(worst, max(np.abs(got[k].double().numpy() - arrays[k].numpy()).max() for k in SHAPES))
    return worst


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("spec", list(SAME))
def test_flower_flavor_equals_flowers_strategy(spec):
    assert _rounds(spec, SAME[spec]) < 1e-5


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("spec", list(DIFFERENT))
def test_fedllm_defaults_differ_from_flowers(spec):
    assert _rounds(spec, DIFFERENT[spec], scale=1e-3) > 1e-4  # 30 times what float32 makes of the same formula
