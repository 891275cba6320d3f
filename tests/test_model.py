import os
import time

import pytest
import torch

from fedllm import MODEL_CACHE, ModelError, load_base_model
from fedllm.config import ModelConfig
from fedllm.model import convert_gguf, packaged_gguf, resolve


@pytest.mark.gguf  # the real SmolLM2 GGUF, converted once per session
def test_gguf_converts_once_to_a_loadable_cache(smollm2_dir, model_cache):
    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    t0 = time.perf_counter()
    assert convert_gguf(packaged_gguf(), model_cache) == smollm2_dir  # cache hit
    assert time.perf_counter() - t0 < 1.0
    model, tok = load_base_model(ModelConfig(cache_dir=str(model_cache)))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
    # A real model, not random weights: its top next-token guess is sensible.
    assert "Paris" in tok.decode(logits[0, -1].argmax())


def test_bfloat16(tiny_model_dir):
    model, _ = load_base_model(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_process_cache_loads_once(tiny_cfg):
    a = load_base_model(tiny_cfg)
    b = load_base_model(tiny_cfg)
    assert a[0] is b[0]
    assert MODEL_CACHE.loads == 1
    MODEL_CACHE.clear()
    assert load_base_model(tiny_cfg)[0] is not a[0]


def test_local_dir_loads_with_transformers(tiny_model_dir):
    model, tok = load_base_model(ModelConfig(name=str(tiny_model_dir)), cached=False)
    assert model.config.num_hidden_layers == 2
    assert tok.pad_token is not None


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="model.name.*not found"):
        resolve(ModelConfig(name=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelError, match="model.name"):
        resolve(ModelConfig(name=str(tmp_path / "missing-dir") + "/"))


def test_dir_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve(ModelConfig(name=str(tmp_path)))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + os.urandom(64))
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve(ModelConfig(name=str(bad), cache_dir=str(tmp_path / "c")))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(packaged_gguf().read_bytes()[:4096])
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        resolve(ModelConfig(name=str(truncated), cache_dir=str(tmp_path / "c")))
    assert not list((tmp_path / "c").glob("truncated*"))  # no half-written cache


def test_hub_id_without_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(ModelError, match="model.name: cannot load 'no-such-org/no-such-model'"):
        load_base_model(ModelConfig(name="no-such-org/no-such-model"), cached=False)
