"""The Method contract, one row per registered method (a new method joins by registering):
messages from its server half reach fedllm's client, the replies decode, aggregate and apply,
the global state moves, a checkpoint's state_dict rebuilds it exactly, and an attack hook
rewrites the update before it is encoded."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from conftest import tiny_run_config
from fedllm.client.round import handle
from fedllm.methods import METHODS
from fedllm.methods.downlink import Downlink
from fedllm.protocol import CONFIG, METRICS
from strategies import build

pytestmark = pytest.mark.usefixtures("task_identity")

SMALL = {"zo": {"zo.num-seeds": 64, "train.lr": 1e-4}, "exact-lora": {"lora.client-ranks": "2,4"},
         "diloco": {"diloco.fragments": 2, "diloco.inner-steps": 4}}


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _contexts(n):
    return {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": node - 1, "num-partitions": n}) for node in range(1, n + 1)}


def _round(strategy, cfg, contexts, rnd):
    msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(cfg.to_flat()), Grid(list(contexts))))
    replies = [Message(handle(m.content, contexts[m.metadata.dst_node_id]), reply_to=m) for m in msgs]
    return strategy.round(rnd, replies), replies


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_keeps_the_contract(name, tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"train.method": name, "server.evaluate": False,
                                                       **SMALL.get(name, {})})
    strategy = build(cfg)
    server = strategy.method
    contexts = _contexts(2)
    digests = [server.digest()]
    for rnd in (1, 2):
        result, replies = _round(strategy, cfg, contexts, rnd)
        assert result.applied and result.metrics["clients-ok"] == 2 and not result.dropped, result.dropped
        assert all(set(r.content.keys()) <= server.reply_records for r in replies)
        assert all(r.content.metric_records[METRICS]["server-round"] == rnd for r in replies)
        digests.append(server.digest())
    assert len(set(digests)) == 3  # every round moved the global state
    # a checkpoint rebuilds the method's state exactly, in a fresh server half
    again = METHODS.get(name).impl.server(cfg)
    again.load_state_dict(server.state_dict())
    assert again.digest() == server.digest()
    (tmp_path / "out").mkdir()
    server.save(tmp_path / "out")
    assert any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("name", METHODS.names())
def test_an_attack_hook_rewrites_the_update_before_encoding(name, tiny_model_dir, tmp_path):
    """sign-flip through fedllm's client: the attacker's decoded update is minus the honest one."""
    base = tiny_run_config(tiny_model_dir, tmp_path, **{"train.method": name, "server.evaluate": False,
                                                        "server.aggregation": "list", **SMALL.get(name, {})})
    deltas = {}
    for kind in ("", "0=sign-flip"):
        cfg = base.replace(attack__clients=kind)
        strategy = build(cfg)
        result, _ = _round(strategy, cfg, _contexts(1), 1)
        deltas[kind] = result.updates[0].delta
    honest, flipped = deltas[""], deltas["0=sign-flip"]
    assert honest and honest.keys() == flipped.keys()  # a list round keeps each update's tensors
    if name == "exact-lora":  # the upload is the adapter itself: compare the changes from its fresh start
        from fedllm.client.round import round_seed
        from fedllm.methods.adapters import engine as lora

        rank2 = base.replace(lora__rank=2)  # partition 0's rank
        net, _ = lora.lora_model(rank2.model, rank2.lora, rank2.train.seed)
        lora.reset_adapter(net, round_seed(rank2, 1, 0))
        start = lora.adapter_state(net)
        honest = {k: t - start[k] for k, t in honest.items()}
        flipped = {k: t - start[k] for k, t in flipped.items()}
        assert max(float(t.abs().max()) for t in honest.values()) > 0
    if name == "zo":  # 8-bit scalars: equal up to the quantization step
        assert torch.allclose(flipped["sums"], -honest["sums"], atol=float(honest["sums"].abs().max()) / 60)
    else:
        assert all(torch.allclose(flipped[k], -honest[k], atol=1e-6) for k in honest)


def test_downlink_one_rule_for_unknown_versions():
    for start_known in (True, False):
        dl = Downlink(start_known)
        assert dl.version_of(1) == (0 if start_known else None)
        dl.sent(1)
        dl.sent(2)
        assert dl.version_of(1) is None  # unknown until its reply is accepted
        dl.accepted(1)
        dl.append(b"r1")
        assert dl.version_of(1) == 0 and dl.missing(1) == [b"r1"]
        assert dl.version_of(2) is None and dl.missing(2) is None  # never replied: the full state
        dl.load_state_dict(dl.state_dict())
        assert dl.version == 1 and dl.version_of(1) == (0 if start_known else None)  # a restart forgets nodes


def test_a_bad_request_is_refused_by_the_client_half(tiny_model_dir, tmp_path):
    from fedllm.errors import PayloadError

    for name, record in (("lora", "arrays"), ("exact-lora", "frozen"), ("zo", "zo"), ("diloco", "diloco"),
                         ("ferret", "ferret")):
        cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"train.method": name, **SMALL.get(name, {})})
        request = RecordDict({CONFIG: ConfigRecord({**cfg.to_flat(), "server-round": 1})})
        with pytest.raises(PayloadError):
            handle(request, _contexts(1)[1])


@pytest.mark.parametrize("name", METHODS.names())
def test_a_streamed_round_equals_the_list_round(name, tiny_model_dir, tmp_path):
    """The same replies, folded as they arrive (server.aggregation=stream) or aggregated as a
    list, move the global state to the same bits (the replies come in partition order); a
    method whose default rule needs every update keeps the list under auto."""
    base = tiny_run_config(tiny_model_dir, tmp_path, **{"train.method": name, "server.evaluate": False,
                                                        **SMALL.get(name, {})})
    listed = build(base.replace(server__aggregation="list"))
    if build(base).chain.fold is None:  # exact-lora's stack
        assert not build(base).streams(10**6)
        return
    streamed = build(base.replace(server__aggregation="stream"))
    assert streamed.streams(3) and not listed.streams(3)
    contexts = _contexts(3)
    for rnd in (1, 2):
        result, replies = _round(listed, base, contexts, rnd)
        list(streamed.configure_train(rnd, ArrayRecord(), ConfigRecord(base.to_flat()), Grid(list(contexts))))
        folded = streamed.round(rnd, iter(replies))
        assert folded.applied and folded.metrics["clients-ok"] == 3
        assert all(u.delta == {} for u in folded.updates) and all(u.delta for u in result.updates)
        assert [u.node_id for u in folded.updates] == [u.node_id for u in result.updates]
        assert streamed.method.digest() == listed.method.digest()
