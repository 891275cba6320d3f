"""lora.personal (fedllm.methods.adapters.personal): tiny in-process runs with a private adapter
(dual) or private top layers (head): the private tensors never reach a reply, the server's state or a
checkpoint; each client's personalised held-out loss is measured and beats the global adapter's on a
by-task partition; a node's private adapter never reaches another node's round through the process's
cached model; a resume keeps what the nodes hold; the combinations that do not fit are refused."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from safetensors.torch import load_file

from conftest import tiny_run_config
from fedllm.client.round import handle
from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.methods import check_spec
from fedllm.methods.adapters import personal
from fedllm.protocol import METRICS
from fedllm.reporting.runlog import read_metrics, summary
from fedllm.server import checkpoint
from fedllm.server.grid import LocalGrid
from fedllm.server.loop import run
from strategies import build

# two clients, one task each (parity, arithmetic), enough steps for the private part to specialise
RUN = {"data.partition": "task", "data.eval-per-family": 4, "server.num-rounds": 4, "train.local-steps": 6,
       "train.lr": 1e-2, "server.evaluate": True}


class Recording(LocalGrid):
    """A LocalGrid that keeps every reply's content with a copy of the node's private tensors right
    after it."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.replies: list[tuple[int, RecordDict, dict[str, torch.Tensor]]] = []

    def reply(self, message):
        content = super().reply(message)
        node = message.metadata.dst_node_id
        held = self.context(node).state.array_records.get(personal.PRIVATE)
        self.replies.append((node, content, held.to_torch_state_dict() if held is not None else {}))
        return content


def _run(tiny_model_dir, tmp_path, kind, **over):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**RUN, "lora.personal": kind, **over})
    grid = Recording(2)
    return grid, run(grid, cfg)


def _tensors(content: RecordDict) -> dict[str, torch.Tensor]:
    return {k: t for record in content.array_records.values() for k, t in record.to_torch_state_dict().items()}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.float(), b.float())


@pytest.mark.parametrize("kind", ["dual", "head"])
def test_private_tensors_stay_on_the_node_and_personalise(kind, tiny_model_dir, tmp_path):
    grid, run_dir = _run(tiny_model_dir, tmp_path, kind)
    held = {node: grid.context(node).state[personal.PRIVATE].to_torch_state_dict() for node in (1, 2)}
    assert all(any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in h.items()) for h in held.values())
    saved = load_file(str(run_dir / checkpoint.FILE))  # every tensor the checkpoint holds, whatever its name
    for node, content, private in grid.replies:
        sent = _tensors(content)
        assert sent and private
        if kind == "head":  # the private layers' names never travel
            assert not set(sent) & set(private)
        # no private tensor's values in any reply (dual: the same names, the shared adapter's values)
        assert not any(_same(t, p) for t in sent.values() for p in private.values() if p.abs().max() > 0)
    for h in held.values():  # nor in the checkpoint
        if kind == "head":
            assert not any(name.endswith(k) for name in saved for k in h)
        assert not any(_same(t, p) for t in saved.values() for p in h.values() if p.abs().max() > 0)
    rows = read_metrics(run_dir)
    first, last = rows[1]["clients"].values(), rows[-1]["clients"].values()
    if kind == "head":  # round 1: the private layers are fresh (B = 0): both figures are the global adapter's
        assert all(m["personal-eval-loss"] == pytest.approx(m["global-eval-loss"], rel=1e-5) for m in first)
    else:  # dual's figure comes after its private steps, on top of the global state the client received
        assert all("private-train-loss" in m for m in first)
    # after a few rounds on one task each, every client's personalised model beats the global adapter
    assert all(m["personal-eval-loss"] < m["global-eval-loss"] for m in last)
    s = summary(rows)
    assert s["personal-eval-loss-after"] < s["global-eval-loss-clients-after"] and s["personal-ratio-after"] < 1
    adapter = (run_dir / "adapter" / "adapter_model.safetensors")
    assert adapter.exists()
    if kind == "head":  # the saved global adapter holds the private layers at their start: B = 0
        state = load_file(str(adapter))
        assert set(held[1]) <= set(state)
        assert all(float(state[k].abs().max()) == 0 for k in held[1] if k.endswith("lora_B.weight"))


def _contexts(n):
    return {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": node - 1, "num-partitions": n}) for node in range(1, n + 1)}


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind", ["dual", "head"])
def test_no_private_adapter_leaks_into_another_nodes_round(kind, tiny_model_dir, tmp_path):
    """Node 1 trains its private part; node 2's first sync on the same cached model loads the fresh
    one, and node 1's next sync its own."""
    from fedllm.methods.adapters import engine as lora
    from fedllm.methods.adapters.client import LoraClient

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**RUN, "lora.personal": kind, "server.evaluate": False})
    strategy = build(cfg)
    contexts = _contexts(2)

    def message(rnd, node):
        msgs = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(cfg.to_flat()), _Grid([node]))
        return next(iter(msgs)).content

    def loaded(half):
        if kind == "dual":
            return personal.private_state(half.net), half.net.fedllm_private_initial
        state = lora.adapter_state(half.net)
        return {k: state[k] for k in half.personal.private}, {k: half.net.fedllm_initial[k] for k in half.personal.private}

    handle(message(1, 1), contexts[1])
    mine = contexts[1].state[personal.PRIVATE].to_torch_state_dict()
    other = LoraClient(cfg, contexts[2], 1)
    other.sync(message(1, 2), seed=0)
    now, fresh = loaded(other)
    assert set(now) == set(mine) and all(torch.equal(now[k], fresh[k]) for k in fresh)
    assert any(not torch.equal(now[k], mine[k]) for k in mine)
    again = LoraClient(cfg, contexts[1], 0)
    again.sync(message(2, 1), seed=0)
    now, _ = loaded(again)
    assert all(torch.equal(now[k], mine[k]) for k in mine)


@pytest.mark.usefixtures("task_identity")
def test_without_personal_adapters_nothing_is_evaluated_on_the_clients(tiny_model_dir, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**RUN, "server.evaluate": False})
    strategy = build(cfg)
    context = _contexts(1)[1]
    msg = next(iter(strategy.configure_train(1, ArrayRecord(), ConfigRecord(cfg.to_flat()), _Grid([1]))))
    reply = handle(msg.content, context)
    assert "personal-eval-loss" not in reply.metric_records[METRICS]
    assert personal.PRIVATE not in context.state.array_records


def test_a_resume_keeps_what_the_nodes_hold(tiny_model_dir, tmp_path):
    grid, run_dir = _run(tiny_model_dir, tmp_path, "dual", **{"server.num-rounds": 2})
    kept = {node: grid.context(node).state[personal.PRIVATE].to_torch_state_dict() for node in (1, 2)}
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{**RUN, "lora.personal": "dual", "server.num-rounds": 3,
                                                       "server.resume": str(run_dir)})
    grid.replies.clear()
    run(grid, cfg)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # round 3 started from each node's own private adapter: it personalises from the first step
    assert all(m["personal-eval-loss"] < m["global-eval-loss"] for m in rows[-1]["clients"].values())
    assert all(not _same(grid.context(n).state[personal.PRIVATE].to_torch_state_dict()[k], t)
               for n in (1, 2) for k, t in kept[n].items() if k.endswith("lora_B.weight"))


@pytest.mark.parametrize("flat, words", [
    ({"lora.personal": "yes"}, "lora.personal: must be one of none, head, dual"),
    ({"lora.personal": "dual", "train.method": "exact-lora"}, "lora.personal: train.method=exact-lora"),
    ({"lora.personal": "dual", "train.method": "zo"}, "lora.personal: train.method=zo"),
    ({"lora.personal": "head", "train.method": "dpo"}, "lora.personal: train.method=dpo"),
    ({"lora.personal": "dual", "lora.peft": "ia3"}, "lora.personal: lora.peft=ia3"),
    ({"lora.personal": "dual", "secagg.enabled": True}, "set secagg.enabled=false"),
    ({"lora.personal": "dual", "server.strategy": "scaffold"}, "SCAFFOLD"),
    ({"lora.personal": "head", "server.init-from": "/tmp/adapter"}, "lora.personal=head"),
    ({"lora.personal": "head", "lora.personal-lr": 1e-3}, "lora.personal-lr: only lora.personal=dual"),
])
def test_combinations_that_do_not_fit_are_refused(flat, words):
    with pytest.raises(ConfigError) as err:
        check_spec(Config.from_flat(flat))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_head_names_are_the_top_quarter_of_the_adapted_layers():
    names = [f"base_model.model.model.layers.{i}.self_attn.{m}.lora_{ab}.weight"
             for i in range(8) for m in ("q_proj", "v_proj") for ab in "AB"]
    private = personal.head_names(names)
    assert {personal.layer_of(n) for n in private} == {6, 7} and len(private) == 8
    with pytest.raises(ConfigError, match="lora.personal=head"):
        personal.head_names([n for n in names if ".layers.3." in n])
    with pytest.raises(ConfigError, match="no decoder layer number"):
        personal.head_names(["prompt_encoder.weight"])
    state = {n: torch.zeros(1) for n in names}
    shared, held = personal.split(state, Config.from_flat({"lora.personal": "head"}))
    assert set(held) == private and set(shared) == set(names) - private
    assert personal.split(state, Config())[1] == {}


@pytest.mark.parametrize("kind", ["dual", "head"])
def test_codecs_and_the_downlink_carry_the_shared_part_only(kind, tiny_model_dir, tmp_path):
    """compression.up and .down (encoded deltas, error feedback, the node's copy of the global
    state): the run goes through, the node's copy holds the server's names, head's private names
    are in no reply, and the clients still personalise."""
    grid, run_dir = _run(tiny_model_dir, tmp_path, kind, **{"compression.up": "int8", "compression.down": "int8",
                                                            "server.num-rounds": 3})
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and not any(r["dropped"] for r in rows[1:])
    node = grid.context(1).state
    private = node[personal.PRIVATE].to_torch_state_dict()
    copy = node["global"].to_torch_state_dict()  # what compression.down's deltas rebuild on the node
    if kind == "head":
        assert not set(copy) & set(private)
        assert not any(set(_tensors(content)) & set(p) for _, content, p in grid.replies)
    assert all(m["personal-eval-loss"] < m["global-eval-loss"] for m in rows[-1]["clients"].values())
