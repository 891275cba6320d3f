import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedllm.config import DataConfig, TrainConfig
from fedllm.methods.adapters.config import LoraConfig
from fedllm.data import builtin, encode
from fedllm.evaluation.held_out import eval_loss
from fedllm.model import MODEL_CACHE
from fedllm.methods.adapters import engine as lora


def _rows(tok, n=16):
    train, _ = builtin.builtin_splits(["parity"], n, 1, seed=0)
    return train, [encode(tok, e, 64) for e in train]


def test_model_is_cached_per_shape(tiny_cfg):
    a, _ = lora.lora_model(tiny_cfg, LoraConfig())
    b, _ = lora.lora_model(tiny_cfg, LoraConfig())
    c, _ = lora.lora_model(tiny_cfg, LoraConfig(rank=4))
    assert a is b and a is not c
    assert MODEL_CACHE.loads == 2


def test_only_adapter_tensors_travel(tiny_cfg):
    model, _ = lora.lora_model(tiny_cfg, LoraConfig(rank=4, target_modules="q_proj,v_proj"))
    state = lora.adapter_state(model)
    assert len(state) == 2 * 2 * 2  # layers x modules x (A, B)
    assert all("lora_A" in k or "lora_B" in k for k in state)
    shapes = {k.split(".")[-2]: tuple(v.shape) for k, v in state.items() if "q_proj" in k}
    assert shapes == {"lora_A": (4, 64), "lora_B": (64, 4)}


def test_adapter_round_trip(tiny_cfg, tmp_path):
    model, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=4))
    state = {k: torch.randn_like(v) * 0.1 for k, v in lora.adapter_state(model).items()}
    lora.set_adapter_state(model, state)
    assert all(torch.equal(v, state[k]) for k, v in lora.adapter_state(model).items())
    ids = tok("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_cfg.name)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, want, atol=1e-6)
        merged = loaded.merge_and_unload()
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)


def test_set_adapter_state_rejects_other_keys(tiny_cfg):
    model, _ = lora.lora_model(tiny_cfg, LoraConfig(rank=4))
    state = lora.adapter_state(model)
    state.pop(next(iter(state)))
    try:
        lora.set_adapter_state(model, state)
    except Exception as err:
        assert "missing" in str(err)
    else:
        raise AssertionError("a missing tensor was accepted")


def test_train_lowers_loss_and_is_repeatable(tiny_cfg):
    model, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=8, dropout=0.0))
    train, rows = _rows(tok)
    start = lora.adapter_state(model)
    before = eval_loss(model, tok, train, DataConfig(max_length=64, system_prompt=""))
    cfg = TrainConfig(local_steps=15, batch_size=4, lr=0.02)
    stats = lora.train(model, rows, cfg, tok.pad_token_id, seed=1)
    after = eval_loss(model, tok, train, DataConfig(max_length=64, system_prompt=""))
    assert after < before - 0.5, (before, after)
    assert stats["steps"] == 15 and stats["examples-seen"] == 60
    first = lora.adapter_state(model)
    lora.set_adapter_state(model, start)
    lora.train(model, rows, cfg, tok.pad_token_id, seed=1)
    assert all(torch.allclose(first[k], v) for k, v in lora.adapter_state(model).items())
    assert not model.training


def test_grad_accum_matches_a_bigger_batch(tiny_cfg):
    model, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=4, dropout=0.0))
    _, rows = _rows(tok, 8)
    rows = [rows[0]] * 8  # identical rows: accumulation of 2x2 equals one batch of 4
    start = lora.adapter_state(model)
    lora.train(model, rows, TrainConfig(local_steps=1, batch_size=4, lr=0.01, max_grad_norm=0), tok.pad_token_id, 0)
    big = lora.adapter_state(model)
    lora.set_adapter_state(model, start)
    lora.train(model, rows, TrainConfig(local_steps=1, batch_size=2, grad_accum=2, lr=0.01, max_grad_norm=0),
               tok.pad_token_id, 0)
    assert all(torch.allclose(big[k], v, atol=1e-6) for k, v in lora.adapter_state(model).items())


def test_adapter_without_base_weights_matches_shapes_and_saves(tiny_cfg, tmp_path):
    model, _ = lora.lora_model(tiny_cfg, LoraConfig(rank=4))
    full = lora.adapter_state(model)
    light = lora.init_adapter_state(tiny_cfg, LoraConfig(rank=4))
    assert {k: v.shape for k, v in light.items()} == {k: v.shape for k, v in full.items()}
    assert all(v.device.type == "cpu" for v in light.values())
    assert all((v == 0).all() == ("lora_B" in k) for k, v in light.items())  # B starts at zero, A does not
    lora.save_adapter(light, tiny_cfg, LoraConfig(rank=4), tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_cfg.name), tmp_path / "adapter")
    assert all(torch.equal(v, light[k]) for k, v in lora.adapter_state(loaded).items())


def test_proximal_term_keeps_the_adapter_near_the_start(tiny_cfg):
    cfg = TrainConfig(local_steps=8, lr=0.05, batch_size=4)
    dist = {}
    for mu in (0.0, 50.0):
        model, tok = lora.lora_model(tiny_cfg, LoraConfig(dropout=0.0))
        lora.reset_adapter(model, 0)
        start = lora.adapter_state(model)
        _, rows = _rows(tok)
        lora.train(model, rows, cfg, tok.pad_token_id, seed=0, proximal_mu=mu)
        end = lora.adapter_state(model)
        dist[mu] = torch.sqrt(sum(((end[k] - start[k]) ** 2).sum() for k in start)).item()
    assert dist[50.0] < 0.7 * dist[0.0]


def test_frozen_delta_is_applied_and_restored_exactly(tiny_cfg):
    model, tok = lora.lora_model(tiny_cfg, LoraConfig(rank=4, dropout=0.0))
    lora.reset_adapter(model, 0)  # B = 0: the adapter adds nothing
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    name, layer = lora.lora_layers(model)[0]
    base = layer.get_base_layer().weight
    before = base.detach().clone()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, base.shape[1], generator=g), torch.randn(base.shape[0], 3, generator=g)
    with torch.no_grad():
        plain = model(ids).logits
        with lora.frozen_delta(model, {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}):
            assert torch.allclose(base, before + b @ a, atol=1e-5)
            shifted = model(ids).logits
        assert torch.equal(base, before)  # restored from a copy, bit for bit
        assert torch.equal(model(ids).logits, plain)
    assert not torch.allclose(shifted, plain, atol=1e-3)
