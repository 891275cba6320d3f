"""Compressed uploads and downloads through the strategies and the client's receive path,
and Flower's DP clipping mod on fedllm's client."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedllm.client.app import dp_clipping
from fedllm.compression import decode, encode, parse
from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.adapters.server import LoraServer
from fedllm.methods.adapters.client import receive_global, send_compressed
from strategies import build

pytestmark = pytest.mark.usefixtures("task_identity")
from conftest import reply_to  # noqa: E402


def _global(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x.lora_A.weight": torch.randn(4, 64, generator=g), "x.lora_B.weight": torch.zeros(32, 4)}


def _context(node=1):
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _fedavg(cfg, state):
    """The adapter with LoRA's server half started at `state`."""
    return build(cfg, LoraServer(cfg, state))


def _compressed_reply(node, payload, n=10.0):
    return reply_to(node, RecordDict({"update": ConfigRecord({"payload": payload}),
                                      "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "server-round": 1})}))


def test_compressed_upload_is_decoded_counted_and_checked():
    cfg = Config.from_flat({"compression.up": "topk(0.5) > quantize(8) > zstd", "server.min-clients": 1})
    start = _global()
    s = _fedavg(cfg, start)
    up = parse(cfg.compression.up)
    delta = {k: torch.randn(v.shape) * 0.01 for k, v in start.items()}
    payload = encode(up, delta, seed=0)
    garbage = payload[:20] + bytes(30)
    other_codec = encode(parse("int8"), delta, 0)
    wrong_shape = encode(up, {**delta, "x.lora_B.weight": torch.zeros(31, 4)}, 0)
    result = s.round(1, [_compressed_reply(1, payload), _compressed_reply(2, garbage),
                         _compressed_reply(3, other_codec), _compressed_reply(4, wrong_shape),
                         _compressed_reply(5, "not bytes")])
    assert result.metrics["clients-ok"] == 1 and result.metrics["clients-dropped"] == 4
    assert result.updates[0].bytes_up == len(payload)
    out = s.method.state
    want = decode(up, payload, sorted(delta))
    assert all(torch.allclose(out[k], start[k] + want[k], atol=1e-7) for k in out)


def test_compressed_download_rebuilds_the_servers_global_bit_for_bit():
    cfg = Config.from_flat({"compression.down": "topk(0.3) > quantize(4) > zstd", "server.min-clients": 1})
    state = _global()
    s = _fedavg(cfg, state)
    contexts = {1: _context(1), 2: _context(2)}
    g = torch.Generator().manual_seed(5)
    for rnd in range(1, 5):
        msgs = list(s.configure_train(rnd, ArrayRecord(state), ConfigRecord(cfg.to_flat()), Grid([1, 2])))
        kinds = {m.metadata.dst_node_id: "arrays" in m.content.array_records for m in msgs}
        # node 2 "fails" in round 2, so in round 3 it gets the full state again
        assert kinds == ({1: True, 2: True} if rnd == 1 else {1: False, 2: rnd == 3})
        replies = []
        for m in msgs:
            node = m.metadata.dst_node_id
            held = receive_global(m.content, contexts[node], cfg)
            assert all(torch.equal(held[k], state[k]) for k in state)
            if node == 2 and rnd == 2:
                continue
            local = {k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in held.items()}
            replies.append(reply_to(node, RecordDict({"arrays": ArrayRecord(local), "metrics": MetricRecord(
                {"num-examples": 1.0, "server-round": rnd})})))
        assert s.round(rnd, replies).applied
        state = s.method.state
    # a delta message for a node that lost its copy is refused, so the server resends the state
    msg = list(s.configure_train(5, ArrayRecord(state), ConfigRecord(cfg.to_flat()), Grid([1])))[0]
    with pytest.raises(PayloadError, match="does not hold global version"):
        receive_global(msg.content, _context(1), cfg)


def test_down_bytes_are_much_smaller_than_the_state():
    cfg = Config.from_flat({"compression.down": "topk-int4", "server.min-clients": 1})
    state = _global()
    s = _fedavg(cfg, state)
    s.configure_train(1, ArrayRecord(), ConfigRecord({}), Grid([1]))
    local = {k: v + 0.01 for k, v in state.items()}
    s.round(1, [reply_to(1, RecordDict({"arrays": ArrayRecord(local),
                                        "metrics": MetricRecord({"num-examples": 1.0, "server-round": 1})}))])
    msg = list(s.configure_train(2, ArrayRecord(), ConfigRecord({}), Grid([1])))[0]
    sent = sum(len(b) for b in msg.content.config_records["down"]["deltas"])
    assert "arrays" not in msg.content.array_records and sent * 20 < ArrayRecord(state).count_bytes()


def test_client_error_feedback_lives_in_node_state():
    cfg = Config.from_flat({"compression.up": "topk(0.1) > quantize(4)"})
    ctx = _context()
    delta = {"w": torch.randn(200)}
    p1 = send_compressed(delta, ctx, cfg, seed=0)
    residual = ctx.state.array_records["ef-residual"].to_torch_state_dict()["w"]
    assert torch.allclose(decode(parse(cfg.compression.up), p1, ["w"])["w"] + residual, delta["w"], atol=1e-6)
    send_compressed(delta, ctx, cfg, seed=1)  # the second upload carries the residual
    off = Config.from_flat({"compression.up": "topk(0.1) > quantize(4)", "compression.error-feedback": False})
    ctx2 = _context()
    send_compressed(delta, ctx2, off, seed=0)
    assert "ef-residual" not in ctx2.state.array_records


@pytest.mark.parametrize("clip", [0.5, 3.0])
def test_dp_clipping_bounds_each_update_norm(clip):
    """Flower's fixedclipping_mod, as fedllm's client runs it, bounds ||local - global||."""
    cfg = Config.from_flat({"dp.clipping-norm": clip, "dp.noise-multiplier": 0.0, "server.min-clients": 1})
    state = _global()
    wrapped = _fedavg(cfg, state)
    msg = list(wrapped.configure_train(1, ArrayRecord(state), ConfigRecord(cfg.to_flat()), Grid([1])))[0]
    far = {k: v + 1.0 for k, v in state.items()}  # update norm sqrt(256 + 128) ~ 19.6

    def client(m, ctx):
        return Message(RecordDict({"arrays": ArrayRecord(far), "metrics": MetricRecord({"num-examples": 1.0, "server-round": 1})}),
                       reply_to=m)

    reply = dp_clipping(msg, _context(), client)
    local = reply.content.array_records["arrays"].to_torch_state_dict()
    norm = torch.sqrt(sum(((local[k] - state[k]) ** 2).sum() for k in state))
    assert norm == pytest.approx(clip, rel=1e-4)
    assert wrapped.round(1, [reply]).applied
    out = wrapped.method.state
    assert torch.sqrt(sum(((out[k] - state[k]) ** 2).sum() for k in state)) == pytest.approx(clip, rel=1e-4)
    # without the clipping key the mod stays out of the way
    plain = Message(RecordDict({"config": ConfigRecord({}), "arrays": ArrayRecord(state)}), dst_node_id=1,
                    message_type=MessageType.TRAIN)
    untouched = dp_clipping(plain, _context(), client).content.array_records["arrays"].to_torch_state_dict()
    assert all(torch.equal(untouched[k], far[k]) for k in far)


def test_dp_noise_is_added_to_the_aggregate():
    cfg = Config.from_flat({"server.min-clients": 1, "dp.clipping-norm": 1.0, "dp.noise-multiplier": 1.0,
                            "dp.sampled-clients": 1})
    state = _global()
    wrapped = _fedavg(cfg, state)
    assert wrapped.chain.noise_std == 1.0
    wrapped.configure_train(1, ArrayRecord(), ConfigRecord({}), Grid([1]))
    reply = reply_to(1, RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": 1.0, "server-round": 1})}))
    assert wrapped.round(1, [reply]).applied
    out = wrapped.method.state
    noise = torch.cat([(out[k] - state[k]).reshape(-1) for k in state])
    assert 0.8 < noise.std().item() < 1.2  # std = multiplier x clip / sampled = 1


def test_dp_refuses_compression():
    from fedllm.errors import ConfigError

    with pytest.raises(ConfigError, match="dp.clipping-norm"):
        build(Config.from_flat({"dp.clipping-norm": 1.0, "compression.up": "int8"}), LoraServer(Config(), _global()))
    with pytest.raises(ConfigError, match="dp.clipping-norm.*train.method=zo"):
        build(Config.from_flat({"dp.clipping-norm": 1.0, "train.method": "zo"}), LoraServer(Config(), _global()))
    assert np.isfinite(Config.from_flat({"dp.clipping-norm": 1.0}).dp.clipping_norm)
