import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedllm import ConfigError
from strategies import STRATEGIES, FedAvg, FedLLMStrategy, get_strategy, register, weighted_mean


pytestmark = pytest.mark.usefixtures("task_identity")


GLOBAL = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}


def _reply(node: int, arrays, n=10.0, metrics=None, error=None) -> Message:
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    if error:
        from flwr.app import Error

        return Message(Error(code=0, reason=error), reply_to=out)
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": 1.0, **(metrics or {})})
    return Message(content, reply_to=out)


def _strategy() -> FedAvg:
    s = FedAvg()
    s.global_state = {k: v.clone() for k, v in GLOBAL.items()}
    return s


def test_weighted_mean_by_hand():
    out = weighted_mean([{"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([4.0, 3.0])}], [1.0, 2.0])
    assert torch.allclose(out["x"], torch.tensor([3.0, 2.0]))  # (1*1 + 2*4)/3, (0 + 2*3)/3


def test_fedavg_weights_by_examples():
    s = _strategy()
    local1 = {"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([[1.0]])}  # delta (1, 0), 1
    local2 = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([[4.0]])}  # delta (0, 3), 4
    arrays, metrics = s.aggregate_train(1, [_reply(1, local1, n=30), _reply(2, local2, n=10)])
    out = arrays.to_torch_state_dict()
    # global + (30 * d1 + 10 * d2) / 40
    assert torch.allclose(out["a"], torch.tensor([1.75, 2.75]))
    assert torch.allclose(out["b"], torch.tensor([[1.75]]))
    assert metrics["clients-ok"] == 2 and metrics["clients-dropped"] == 0


BAD = {
    "client error": dict(arrays=None, error="boom"),
    "no arrays": dict(arrays=None),
    "wrong name": dict(arrays={"a": torch.zeros(2), "c": torch.zeros(1, 1)}),
    "missing tensor": dict(arrays={"a": torch.zeros(2)}),
    "wrong shape": dict(arrays={"a": torch.zeros(3), "b": torch.zeros(1, 1)}),
    "wrong dtype": dict(arrays={"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1, 1)}),
    "nan": dict(arrays={"a": torch.tensor([float("nan"), 0.0]), "b": torch.zeros(1, 1)}),
    "inf": dict(arrays={"a": torch.tensor([float("inf"), 0.0]), "b": torch.zeros(1, 1)}),
    "zero examples": dict(arrays=dict(GLOBAL), n=0.0),
    "negative examples": dict(arrays=dict(GLOBAL), n=-5.0),
    "garbage bytes": dict(arrays=ArrayRecord({"a": Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                                                         data=b"\x00garbage"),
                                              "b": Array(np.zeros((1, 1), dtype=np.float32))})),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_reply_is_dropped_and_global_unchanged(case):
    s = _strategy()
    arrays, metrics = s.aggregate_train(1, [_reply(7, **BAD[case])])
    assert arrays is None
    assert metrics["clients-dropped"] == 1
    assert s.dropped[0][0] == 7 and s.dropped[0][1]
    good = {"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([[0.0]])}
    arrays, _ = s.aggregate_train(1, [_reply(7, **BAD[case]), _reply(8, good)])
    assert torch.allclose(arrays.to_torch_state_dict()["a"], torch.tensor([3.0, 2.0]))  # only node 8 counts


def test_configure_train_does_not_mutate_caller_config():
    class OneNodeGrid:
        def get_node_ids(self):
            return [11, 12]

    s = FedAvg()
    config = ConfigRecord({"lora.rank": 8})
    msgs = list(s.configure_train(3, ArrayRecord(GLOBAL), config, OneNodeGrid()))
    assert "server-round" not in config
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
    assert msgs[0].content.config_records["config"]["server-round"] == 3


def test_registry_by_name_and_path():
    assert get_strategy("fedavg") is FedAvg
    assert get_strategy("strategies.fedavg:FedAvg") is FedAvg
    with pytest.raises(ConfigError, match="server.strategy.*unknown strategy 'fedavgg'"):
        get_strategy("fedavgg")
    with pytest.raises(ConfigError, match="server.strategy: cannot import"):
        get_strategy("no_such_module:Thing")


def test_register_checks_names():
    with pytest.raises(ValueError, match="lower-case"):
        register("FedFoo")
    with pytest.raises(ValueError, match="registered already"):
        register("fedavg")(type("Other", (FedLLMStrategy,), {}))
    assert "fedavg" in STRATEGIES
