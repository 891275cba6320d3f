"""Resource-aware clients: quantized bases (QLoRA through bitsandbytes), gradient checkpointing,
per-client rank and quantization from node resources, module choice by importance scores, and the
PEFT family (DoRA, IA3, prefix, prompt, P-tuning) through the LoRA method."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run_config
from fedllm.config import Config, ModelConfig, TrainConfig
from fedllm.methods.adapters.config import LoraConfig
from fedllm.data import encode, load_splits
from fedllm.errors import ConfigError
from fedllm.methods.adapters import engine as lora
from fedllm.methods.adapters import modules, resources

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Quantized copies of the tests' models go to a temporary cache, not ~/.cache/fedllm."""
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))


def _rows(tok, n=32):
    from fedllm.config import DataConfig

    train, _ = load_splits(DataConfig(families="parity,arithmetic", train_per_family=n // 2))
    return [encode(tok, e, 64, "") for e in train]


def _eval(model, rows):
    from fedllm.data.templates import batches

    model.eval()
    batch = next(batches(rows, len(rows), 0, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        return float(model(**batch).loss)


def test_a_quantized_copy_is_made_once_and_loaded_after(tiny_cfg, tmp_path):
    from fedllm.model import MODEL_CACHE, load_base_model

    cfg = ModelConfig(name=tiny_cfg.name, quantize="nf4")
    first, _ = load_base_model(cfg)
    copies = list((tmp_path / "cache").glob("tiny-llama*-nf4-*"))
    assert len(copies) == 1 and (copies[0] / "config.json").is_file()
    stamp = copies[0].stat().st_mtime_ns
    MODEL_CACHE.clear()
    again, _ = load_base_model(cfg)
    assert copies[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "cache").iterdir())) == 1
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(first(input_ids=ids).logits, again(input_ids=ids).logits)
    assert type(again.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


@pytest.mark.gguf
def test_smollm2_in_4_bit_trains_and_its_loss_falls(smollm2_dir):
    """The real model: NF4 linear layers (about a third of the fp32 weights' bytes), LoRA trains."""
    model_cfg = ModelConfig(name=str(smollm2_dir), quantize="nf4")
    model, tok = lora.lora_model(model_cfg, LoraConfig(rank=8, dropout=0.0))
    assert model.get_memory_footprint() < 0.4 * 4 * sum(resources.parameter_counts(model_cfg))
    rows = _rows(tok, 16)
    before = _eval(model, rows)
    lora.train(model, rows, TrainConfig(local_steps=6, lr=0.003, batch_size=4), tok.pad_token_id, seed=0)
    assert _eval(model, rows) < before - 0.05


@pytest.mark.parametrize("quantize", ["int8", "nf4", "fp4"])
def test_a_quantized_base_trains_its_adapter_and_the_loss_falls(tiny_cfg, quantize):
    model, tok = lora.lora_model(ModelConfig(name=tiny_cfg.name, quantize=quantize), LoraConfig(rank=8, dropout=0.0))
    kinds = {type(m.get_base_layer()).__name__ for _, m in lora.lora_layers(model)}
    assert kinds == {"Linear8bitLt" if quantize == "int8" else "Linear4bit"}
    rows = _rows(tok)
    before = _eval(model, rows)
    stats = lora.train(model, rows, TrainConfig(local_steps=12, lr=0.02, batch_size=8), tok.pad_token_id, seed=0)
    after = _eval(model, rows)
    assert stats["steps"] == 12 and after < before - 0.1
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_gradient_checkpointing_gives_the_same_step(tiny_cfg):
    """Recomputing activations changes memory, not the result: the same adapter after the same steps,
    while the first layer's attention really runs twice a step (forward, then again in the backward)."""
    states, calls = [], []
    for checkpointing in (False, True):
        model, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=4, dropout=0.0))
        lora.reset_adapter(model, 0)
        count = [0]
        attention = model.base_model.model.model.layers[0].self_attn
        hook = attention.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        lora.train(model, _rows(tok), TrainConfig(local_steps=3, lr=0.01, gradient_checkpointing=checkpointing),
                   tok.pad_token_id, seed=1)
        hook.remove()
        calls.append(count[0])
        states.append(lora.adapter_state(model))
        assert not model.base_model.model.is_activation_checkpointing  # switched off after training
    assert calls == [3, 6]
    assert states[0].keys() == states[1].keys()
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])


def test_truncated_clients_train_the_leading_rows_and_send_the_rest_back():
    full = {"m.lora_A.weight": torch.arange(12.0).reshape(4, 3), "m.lora_B.weight": torch.arange(8.0).reshape(2, 4),
            "other": torch.ones(2)}
    mine = resources.truncate(full, 2)
    assert mine["m.lora_A.weight"].shape == (2, 3) and mine["m.lora_B.weight"].shape == (2, 2)
    trained = {k: v + 100 for k, v in mine.items()}
    back = resources.pad(trained, full)
    delta = lora.subtract(back, full)
    assert (delta["m.lora_A.weight"][:2] == 100).all() and (delta["m.lora_A.weight"][2:] == 0).all()
    assert (delta["m.lora_B.weight"][:, :2] == 100).all() and (delta["m.lora_B.weight"][:, 2:] == 0).all()


def test_a_lower_rank_client_computes_the_truncated_global_adapter(tiny_cfg):
    """alpha scaled by r / R keeps alpha / r: the rank-2 model equals the rank-4 global adapter with
    its rows 2..3 zeroed, output for output."""
    big, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=4, dropout=0.0))
    state = {k: torch.randn_like(v) * 0.3 for k, v in lora.adapter_state(big).items()}
    small, _ = lora.lora_model(tiny_cfg, LoraConfig(rank=2, alpha=16.0 * 2 / 4, dropout=0.0))
    lora.set_adapter_state(small, resources.truncate(state, 2))
    zeroed = resources.pad(resources.truncate(state, 2), {k: torch.zeros_like(v) for k, v in state.items()})
    lora.set_adapter_state(big, zeroed)
    ids = torch.tensor([tok.encode("12 + 7 = 19")])
    with torch.no_grad():
        assert torch.allclose(small(input_ids=ids).logits, big(input_ids=ids).logits, atol=1e-5)


def test_the_resource_policy_by_hand(tiny_model_dir):
    """estimate(q) = 2 x weights_mb(q) + 600; none, int8, nf4 in that order; rank from compute."""
    cfg = Config.from_flat({"model.name": str(tiny_model_dir), "lora.rank": 16, "lora.policy": "resources"})
    linear, other = resources.parameter_counts(cfg.model)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    layers = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n)
    assert (linear, linear + other) == (layers, sum(p.numel() for p in model.parameters()))
    need = {q: 2 * (linear * b + other * 4) / 1e6 + 600 for q, b in (("none", 4), ("int8", 1), ("nf4", 0.5))}
    assert resources.plan(cfg, need["none"]) == (16, "none")
    assert resources.plan(cfg, need["none"] - 1e-4) == (16, "int8")
    assert resources.plan(cfg, need["int8"] - 1e-4) == (16, "nf4")
    assert resources.plan(cfg, 1e6, compute=0.5) == (8, "none")
    assert resources.plan(cfg, 1e6, compute=0.3) == (4, "none")  # 16 x 0.3 = 4.8 -> 4
    assert resources.plan(cfg, 1e6, compute=0.01) == (1, "none")
    with pytest.raises(ConfigError, match="node config memory-mb: .* below the 4-bit estimate"):
        resources.plan(cfg, need["nf4"] - 1)
    got = resources.client_config(cfg, {"memory-mb": need["int8"], "compute": 0.5}, 0)
    assert (got.lora.rank, got.model.quantize) == (8, "int8")
    got = resources.client_config(cfg, {"memory-mb": 1e6, "quantize": "fp4", "lora-rank": 2}, 0)
    assert (got.lora.rank, got.model.quantize) == (2, "fp4")  # the node's own keys win


@pytest.mark.parametrize("node, message", [
    ({}, "lora.policy=resources: this node's node config lacks memory-mb"),
    ({"memory-mb": "lots"}, "node config memory-mb: expected a number"),
    ({"memory-mb": -5}, "node config memory-mb: must be a positive number"),
    ({"memory-mb": 1e6, "compute": 0}, "node config compute: must be a positive"),
    ({"memory-mb": 1e6, "quantize": "int3"}, "node config quantize: must be one of none, int8, nf4, fp4"),
    ({"memory-mb": 1e6, "lora-rank": 0}, "node config lora-rank: must be >= 1"),
])
def test_bad_node_resources_name_the_key(tiny_model_dir, node, message):
    cfg = Config.from_flat({"model.name": str(tiny_model_dir), "lora.policy": "resources"})
    with pytest.raises(ConfigError, match=message):
        resources.client_config(cfg, node, 0)


def test_module_scores_pick_the_modules_that_reach_the_output(tiny_cfg, tmp_path):
    """A constructed case: every o_proj and down_proj weight is zero, so attention and MLP add
    nothing to the residual stream and q, k, v, gate and up get no gradient at all; the scores
    say exactly that, and the choice takes o_proj / down_proj modules only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_cfg.name)
    for name, module in base.named_modules():
        if name.endswith(("o_proj", "down_proj")):
            torch.nn.init.zeros_(module.weight)
    base.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_cfg.name).save_pretrained(tmp_path / "m")
    model_cfg = ModelConfig(name=str(tmp_path / "m"))
    leaves = modules.candidate_leaves(model_cfg)
    assert leaves == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    net, tok = lora.lora_model(model_cfg, LoraConfig(rank=4, dropout=0.0, target_modules=",".join(leaves)))
    scores = modules.module_scores(net, _rows(tok), TrainConfig(), tok.pad_token_id, 2, seed=0)
    shapes = modules.candidate_shapes(model_cfg)
    assert set(scores) == set(shapes) and len(shapes) == 14
    dead = {n for n in shapes if not n.endswith(("o_proj", "down_proj"))}
    assert all(scores[n] == 0.0 for n in dead) and all(scores[n] > 0 for n in set(shapes) - dead)
    chosen = modules.select_modules(scores, shapes, budget=0.5)
    assert chosen and not set(chosen) & dead
    params = {n: sum(s) for n, s in shapes.items()}
    assert sum(params[n] for n in chosen) <= 0.5 * sum(params.values())
    best = max(set(shapes) - dead, key=lambda n: scores[n] / params[n])
    assert best in chosen


def test_module_choice_before_round_one_fixes_the_adapter_for_the_run(tiny_model_dir, tmp_path):
    """lora.target-modules=auto: the server asks the clients (Flower query messages), keeps the best
    modules within the budget, every round trains that adapter, the saved adapter names them, and a
    resume keeps the choice."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"lora.target-modules": "auto", "lora.module-budget": 0.3,
                                                       "lora.calibration-batches": 2})
    run_dir = run(LocalGrid(2), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    chose = rows[0]["prepare"]
    assert chose["clients"] == 2 and 0 < chose["parameter-share"] <= 0.3 and chose["of"] == 14
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert len(saved["target_modules"]) == chose["modules"]
    assert all(r["clients-ok"] == 2 for r in rows[1:])
    assert (run_dir / "report.html").is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), run_dir / "adapter")
    resumed = run(LocalGrid(2), cfg.replace(server__resume=str(run_dir), server__num_rounds=3))
    again = json.loads((resumed / "adapter" / "adapter_config.json").read_text())
    assert sorted(again["target_modules"]) == sorted(saved["target_modules"])


@pytest.mark.parametrize("peft", ["dora", "ia3", "prefix", "prompt", "p-tuning"])
def test_each_peft_adapter_round_trips_and_runs_two_rounds(peft, tiny_model_dir, tmp_path):
    """Two federated rounds of 2 clients (fedavg of the adapter's tensors); the saved adapter loads
    with PeftModel.from_pretrained and gives the server's outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run
    from strategies import build

    modules = "k_proj,v_proj,down_proj" if peft == "ia3" else "q_proj,v_proj"
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"lora.peft": peft, "lora.target-modules": modules,
                                                       "lora.virtual-tokens": 4, "train.lr": 0.01})
    run_dir = run(LocalGrid(2), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients-ok"] for r in rows[1:]] == [2, 2]
    assert rows[-1]["eval-loss"] != rows[0]["eval-loss"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), run_dir / "adapter")
    assert loaded.peft_config["default"].peft_type.value == {"dora": "LORA", "p-tuning": "P_TUNING"}.get(
        peft, peft.upper().replace("PREFIX", "PREFIX_TUNING").replace("PROMPT", "PROMPT_TUNING"))
    strategy = build(cfg)
    from fedllm.server import checkpoint

    strategy.load_state_dict(checkpoint.read(run_dir / checkpoint.FILE)["strategy"])
    ids = torch.tensor([[1, 5, 9, 12]])
    with strategy.method.model() as net, torch.no_grad():
        ours = net(input_ids=ids).logits
    with torch.no_grad():
        theirs = loaded.eval()(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_mixed_federation_aggregates_into_one_adapter(tiny_model_dir, tmp_path):
    """An 8-bit, a 4-bit and a bfloat16 client (node config quantize / dtype) and a rank-2 client in
    one fedavg federation: every reply is accepted, and the result loads with PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    grid = LocalGrid(4)
    for node, extra in {1: {"quantize": "int8"}, 2: {"quantize": "nf4"}, 3: {"dtype": "bfloat16"},
                        4: {"lora-rank": 2}}.items():
        grid.context(node).node_config.update(extra)
    run_dir = run(grid, tiny_run_config(tiny_model_dir, tmp_path, **{"lora.rank": 4, "server.min-replies": 4}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients-ok"] for r in rows[1:]] == [4, 4]
    bits = {c["partition-id"]: (c["base-bits"], c["lora-rank"]) for c in rows[1]["clients"].values()}
    assert bits == {0: (8, 4), 1: (4, 4), 2: (16, 4), 3: (32, 2)}
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), run_dir / "adapter")


@pytest.mark.parametrize("over, message", [
    ({"model.quantize": "int4"}, "model.quantize: must be one of"),
    ({"model.client-quantize": "nf4,q2"}, "model.client-quantize: must be one of"),
    ({"model.quantize": "nf4", "train.method": "zo"}, "model.quantize: train.method=zo"),
    ({"model.quantize": "nf4", "train.method": "exact-lora"}, "model.quantize: train.method=exact-lora"),
    ({"model.client-quantize": "nf4", "train.method": "diloco"}, "model.quantize: train.method=diloco"),
    ({"lora.policy": "resources", "train.method": "exact-lora"}, "lora.policy: train.method=exact-lora"),
    ({"lora.peft": "ia3", "train.method": "exact-lora"}, "lora.peft: train.method=exact-lora takes lora"),
    ({"lora.peft": "adalora"}, "lora.peft: must be one of"),
    ({"lora.peft": "prefix", "lora.target-modules": "auto"}, "lora.target-modules: auto scores LoRA modules"),
    ({"lora.target-modules": "auto", "train.method": "zo"}, "lora.target-modules: auto needs a method"),
    ({"lora.module-budget": 0}, "lora.module-budget: must be in"),
    ({"lora.client-ranks": "4,16"}, "lora.client-ranks: 16 is above lora.rank=8"),
    ({"lora.policy": "fair"}, "lora.policy: must be one of"),
    ({"lora.peft": "prompt", "server.merge": True}, "server.merge: lora.peft=prompt adds virtual tokens"),
])
def test_bad_combinations_are_one_line_errors(tiny_model_dir, tmp_path, over, message):
    from strategies import build

    with pytest.raises(ConfigError, match=message) as err:
        build(tiny_run_config(tiny_model_dir, tmp_path, **{"server.evaluate": False, **over}))
    assert "\n" not in str(err.value)


def test_a_client_above_the_global_rank_is_dropped_with_the_reason(tiny_model_dir, tmp_path):
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    grid = LocalGrid(2)
    grid.context(2).node_config["lora-rank"] = 64
    run_dir = run(grid, tiny_run_config(tiny_model_dir, tmp_path, **{"server.num-rounds": 1}))
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert row["clients-ok"] == 1 and "above lora.rank=8" in row["dropped"][0]["reason"]


def test_a_bad_module_score_reply_is_dropped_and_the_rest_decide(tiny_model_dir):
    from flwr.app import MetricRecord, RecordDict

    from conftest import reply_to
    from fedllm.errors import PayloadError
    from fedllm.methods.adapters.server import LoraServer
    from fedllm.protocol import METRICS, SCORES

    cfg = Config.from_flat({"model.name": str(tiny_model_dir), "lora.target-modules": "auto", "server.evaluate": False})
    server = LoraServer(cfg)
    shapes = modules.candidate_shapes(cfg.model)
    good = {n: (1.0 if n.endswith("layers.1.mlp.down_proj") else 0.0) for n in shapes}
    replies = [
        reply_to(1, RecordDict({SCORES: MetricRecord(good), METRICS: MetricRecord({"num-examples": 4})})),
        reply_to(2, RecordDict({SCORES: MetricRecord({"lm_head": 9.0}), METRICS: MetricRecord({"num-examples": 4})})),
        reply_to(3, RecordDict({SCORES: MetricRecord({next(iter(shapes)): -1.0}),
                                METRICS: MetricRecord({"num-examples": 4})})),
        reply_to(4, RecordDict({METRICS: MetricRecord({"num-examples": 4})})),
    ]
    out = server.prepare(lambda records: iter(replies))
    reasons = [r for _, r in out["dropped"]]
    assert out["clients"] == 1 and len(reasons) == 3
    assert "unknown module 'lm_head'" in reasons[0] and "not a finite number >= 0" in reasons[1]
    assert "lacks the 'scores' record" in reasons[2]
    assert server.modules == "model.layers.1.mlp.down_proj"
    fresh = LoraServer(cfg)
    with pytest.raises(PayloadError, match="no client sent valid module scores"):
        fresh.prepare(lambda records: iter(replies[1:]))


def test_quantized_and_lower_rank_clients_compose_with_codecs_the_ledger_and_resume(tiny_model_dir, tmp_path):
    """DoRA with a 4-bit client and a rank-2 client, int8 codecs both ways: with the ledger on (the
    in-process chain) every round is on the ledger; without it, a resume for a third round goes on
    from the checkpoint; every reply is accepted and the adapters load."""
    pytest.importorskip("web3")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    def grid():
        g = LocalGrid(3)
        g.context(1).node_config["quantize"] = "nf4"
        g.context(2).node_config["lora-rank"] = 2
        return g

    over = {"lora.peft": "dora", "lora.rank": 4, "compression.up": "int8", "compression.down": "int8",
            "server.min-replies": 3}
    booked = run(grid(), tiny_run_config(tiny_model_dir, tmp_path, **over, **{"ledger.enabled": True,
                                                                               "server.run-name": "ledger"}))
    assert all((booked / "ledger" / f"round-{r:04d}.json").is_file() for r in (1, 2))
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **over)
    run_dir = run(grid(), cfg)
    resumed = run(grid(), cfg.replace(server__resume=str(run_dir), server__num_rounds=3))
    for folder, rounds in ((booked, 2), (resumed, 3)):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["clients-ok"] for r in rows[1:]] == [3] * rounds
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), folder / "adapter")
