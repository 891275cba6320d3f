"""Ferret (train.method=ferret): projection and reconstruction by hand, the codec, the same weights on
every party, an in-process run, its bytes, the config checks and a resume."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_run_config
from safetensors.torch import load_file

from fedllm.config import Config
from fedllm.data import encode, load_splits
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods import counter_rng as rng
from fedllm.methods.ferret import engine as fe
from fedllm.methods.ferret import wire
from fedllm.model import MODEL_CACHE

OVER = {"train.method": "ferret", "ferret.num-bases": 512, "data.eval-per-family": 4,
        "server.exact-match-examples": 0, "server.eval-every": 0}


def _z(seed, offset, n):
    return torch.from_numpy(rng.reference(seed, offset, n, "gaussian"))


# --- the maths, by hand -----------------------------------------------------------------------------

def test_blocks_cut_tensors_into_equal_pieces_and_bases_follow_their_sizes():
    blocks = fe.blocks_of([10, 3], 4)  # 10 -> 3 + 3 + 4 (no small remainder), 3 -> 3
    assert [(b.param, b.start, b.size, b.offset) for b in blocks] == [(0, 0, 3, 0), (0, 3, 3, 3), (0, 6, 4, 6),
                                                                     (1, 0, 3, 10)]
    assert fe.allocation([3, 3, 4, 3], 13) == [3, 3, 4, 3]
    assert fe.allocation([3, 3, 4, 3], 2) == [1, 1, 1, 1]  # at least one a block
    assert fe.allocation([100, 1], 10) == [10, 1]


def test_basis_seeds_differ_by_version_and_index_and_are_fixed():
    seeds = {fe.basis_seed(42, v, j) for v in range(5) for j in range(5)}
    assert len(seeds) == 25 and all(0 <= s < 2**63 for s in seeds)
    assert fe.basis_seed(42, 0, 0) == rng.mix64(rng.mix64(rng.key(42) + rng.GAMMA)) >> 1
    assert fe.basis_seed(43, 0, 0) != fe.basis_seed(42, 0, 0)


def test_project_and_combine_are_the_dot_and_the_weighted_sum_of_the_reference_z():
    x = torch.tensor([1.0, -2.0, 0.5])
    got = rng.project(x, [7, 9], 5, "gaussian")
    assert got.dtype == torch.float64 and got.shape == (2,)
    assert torch.allclose(got, torch.stack([(x.double() * _z(s, 5, 3)).sum() for s in (7, 9)]), atol=1e-12)
    rows = rng.draw_rows([7, 9], 5, 3, "rademacher", torch.float64)
    assert all(np.array_equal(rows[i].numpy(), rng.reference(s, 5, 3, "rademacher")) for i, s in enumerate((7, 9)))
    got = rng.combine([2.0, -0.5], [7, 9], 5, 3, "gaussian", torch.float32)
    assert torch.allclose(got.double(), 2.0 * _z(7, 5, 3) - 0.5 * _z(9, 5, 3), atol=1e-6)


def test_projection_and_reconstruction_worked_out_by_hand():
    # two tensors (4 and 2 elements), one block each: 2 + 1 bases of 3
    deltas = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([-1.0, 0.5])]
    blocks = fe.blocks_of([4, 2], 4)
    counts = fe.allocation([b.size for b in blocks], 3)
    assert counts == [2, 1]
    coefs = fe.project(deltas, blocks, counts, seed=3, version=1)
    flat = torch.cat([d.reshape(-1) for d in deltas]).double()
    want, expected_step = [], torch.zeros(6, dtype=torch.float64)
    for b, n in zip(blocks, counts):
        for j in range(n):
            z = _z(fe.basis_seed(3, 1, j), b.offset, b.size)  # basis j of version 1, this block's stretch
            g = float((flat[b.offset:b.offset + b.size] * z).sum())  # gamma = <delta_b, z>
            want.append(g)
            expected_step[b.offset:b.offset + b.size] += 0.5 * g / n * z  # (scale / K_b) sum_j gamma z
    assert torch.allclose(coefs, torch.tensor(want, dtype=torch.float64), atol=1e-9)
    params = [torch.zeros(2, 2), torch.zeros(2)]
    fe.reconstruct_(params, coefs, blocks, counts, seed=3, version=1, scale=0.5)
    assert torch.allclose(torch.cat([p.reshape(-1) for p in params]).double(), expected_step, atol=1e-5)


def test_the_reconstruction_is_unbiased_over_the_rounds_bases():
    delta = [torch.tensor([1.0, -2.0, 0.5, 3.0])]
    blocks = fe.blocks_of([4], 4)
    counts = [2]
    total = torch.zeros(4)
    rounds = 800
    for v in range(rounds):
        params = [torch.zeros(4)]
        fe.reconstruct_(params, fe.project(delta, blocks, counts, 0, v), blocks, counts, 0, v, scale=1.0)
        total += params[0]
    assert torch.allclose(total / rounds, delta[0], atol=0.4)  # E[z z^T] = I; sd of the mean ~0.1


# --- the codec --------------------------------------------------------------------------------------

def test_codec_roundtrip_and_its_size():
    coefs = torch.tensor([1.0, -3.0, 0.25, 100.0, -50.0], dtype=torch.float64)
    counts = [3, 2]
    raw = wire.encode(coefs, counts, version=4, bits=0, seed=0)
    assert len(raw) == wire.size(5, 2, 0) == wire.HEAD.size + 20
    assert torch.equal(wire.decode(raw, counts, 4), coefs)
    raw8 = wire.encode(coefs, counts, version=4, bits=8, seed=1)
    assert len(raw8) == wire.size(5, 2, 8) == wire.HEAD.size + 8 + 5
    got = wire.decode(raw8, counts, 4)
    scales = torch.tensor([3.0, 3.0, 3.0, 100.0, 100.0], dtype=torch.float64) / 127  # a scale per block
    assert ((got - coefs).abs() <= scales + 1e-6).all()
    assert float(got[1]) == pytest.approx(-3.0, rel=1e-6) and float(got[3]) == pytest.approx(100.0, rel=1e-6)
    assert wire.encode(coefs, counts, 4, 8, seed=1) == raw8  # the same seed writes the same bytes
    assert torch.equal(wire.decode(wire.encode(-coefs, counts, 4, 8, seed=1), counts, 4), -got)  # and -c gives -c
    assert len(wire.encode(coefs, counts, 4, 4, seed=1)) == wire.HEAD.size + 8 + 3


def test_codec_stochastic_rounding_is_unbiased():
    coefs = torch.tensor([0.3, 1.0], dtype=torch.float64)
    mean = sum(wire.decode(wire.encode(coefs, [2], 0, 4, seed=s), [2], 0) for s in range(2000)) / 2000
    assert abs(float(mean[0]) - 0.3) < 0.01


@pytest.mark.parametrize("mutate,message", [
    (lambda raw: raw[:5], "shorter than its header"),
    (lambda raw: b"XX" + raw[2:], "bad header"),
    (lambda raw: raw[:-1], "body bytes"),
    (lambda raw: raw[:wire.HEAD.size] + np.float32(np.nan).tobytes() + raw[wire.HEAD.size + 4:], "bad block scale"),
])
def test_codec_refuses_malformed_payloads(mutate, message):
    raw = wire.encode(torch.tensor([1.0, 2.0, 3.0]), [2, 1], version=0, bits=8, seed=0)
    with pytest.raises(PayloadError, match=message):
        wire.decode(mutate(raw), [2, 1], 0)
    with pytest.raises(PayloadError, match="bases of version 0, expected 1"):
        wire.decode(raw, [2, 1], 1)
    with pytest.raises(PayloadError, match="3 coefficients in 2 blocks, expected 4 in 2"):
        wire.decode(raw, [2, 2], 0)


# --- every party holds the same weights -------------------------------------------------------------

def _cfg(tiny_model_dir, tmp_path, **over):
    return tiny_run_config(tiny_model_dir, tmp_path, **{**OVER, **over})


def test_server_and_clients_reconstruct_the_same_weights(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, **{"train.local-steps": 1})
    server, tok = fe.engine_for(cfg, cached=False)
    client, _ = fe.engine_for(cfg)
    late, _ = fe.engine_for(cfg, cached=False)  # a node that misses the rounds, then catches up
    assert client is not server and client.model is not server.model
    train, _ = load_splits(cfg.data)
    rows = [encode(tok, e, 64, cfg.data.system_prompt) for e in train]
    history = []
    for version in range(2):
        start = [p.detach().clone() for p in client.params]
        ups = []
        for pid in range(2):
            coefs, stats = client.train(rows[pid::2], cfg.train, tok.pad_token_id, seed=10 * version + pid)
            assert stats["update-norm"] > 0 and coefs.shape == (client.num_coefs,)
            assert all(torch.equal(p, s) for p, s in zip(client.params, start))  # restored to the global weights
            ups.append(client.decode(client.encode(coefs, version, seed=pid), version))
        payload = server.encode(sum(ups) / 2, version, seed=version)
        server.apply(payload)
        history.append(payload)
        assert client.sync(version, server.chains[version], [payload]) == 1
        assert client.chain == server.chain and client.version == server.version == version + 1
        assert all(torch.equal(a, b) for a, b in zip(client.params, server.params))
    assert any(not torch.equal(a, b) for a, b in zip(server.params, late.reload()))  # the weights moved
    assert late.sync(0, server.chains[0], history) == 2 and late.chain == server.chain
    assert all(torch.equal(a, b) for a, b in zip(late.params, server.params))
    assert client.sync(1, server.chains[1], history[1:]) == 0  # already there: nothing applied
    with pytest.raises(PayloadError, match="another history"):
        client.sync(1, b"\0" * 32, history[1:])
    assert client.sync(0, server.chains[0], history[:1]) == 1 and client.version == 1  # since 0: replayed


def test_params_all_trains_every_weight_in_bounded_blocks(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, **{"ferret.params": "all", "ferret.block-size": 4096,
                                            "ferret.num-bases": 64, "train.local-steps": 1})
    engine, tok = fe.engine_for(cfg, cached=False)
    names = [n for n, _ in fe.trainable(engine.model, "all")]
    assert not any("lora_" in n for n in names) and len(names) == len(set(names))
    assert sum(b.size for b in engine.blocks) == sum(p.numel() for p in engine.params)  # tied weights once
    assert max(b.size for b in engine.blocks) <= 4096 and engine.num_coefs >= 64
    start = [p.detach().clone() for p in engine.params]
    train, _ = load_splits(cfg.data)
    coefs, stats = engine.train([encode(tok, e, 64, cfg.data.system_prompt) for e in train], cfg.train,
                                tok.pad_token_id, seed=0)
    assert torch.isfinite(coefs).all() and stats["update-norm"] > 0
    assert all(torch.equal(p, s) for p, s in zip(engine.params, start))


# --- a run ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def whole(tmp_path_factory, tiny_model_dir):
    """A two-round in-process ferret run of two clients (shared by the tests below)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    tmp = tmp_path_factory.mktemp("ferret")
    MODEL_CACHE.clear()
    out = run(LocalGrid(2), _cfg(tiny_model_dir, tmp, **{"server.run-name": "whole"}))
    MODEL_CACHE.clear()
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None
    return tmp, out


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_lowers_the_eval_loss_with_k_coefficients_a_client_and_round(whole, tiny_model_dir):
    tmp, run_dir = whole
    rows = _rows(run_dir)
    assert rows[-1]["eval-loss"] < rows[0]["eval-loss"]
    cfg = _cfg(tiny_model_dir, tmp)
    engine, _ = fe.engine_for(cfg)
    per_client = wire.size(engine.num_coefs, len(engine.counts), cfg.ferret.bits)
    assert engine.num_coefs == pytest.approx(512, abs=len(engine.counts))
    for row in rows[1:]:
        assert row["bytes-up"] == {"1": per_client, "2": per_client}  # K bytes, a scale a block, the header
        assert row["ferret-version"] == row["round"]
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "ferret" / "history.bin").is_file()


@pytest.mark.usefixtures("task_identity")
def test_resume_reaches_the_same_weights(whole, tiny_model_dir):
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    tmp, full = whole
    part = run(LocalGrid(2), _cfg(tiny_model_dir, tmp, **{"server.run-name": "part", "server.num-rounds": 1}))
    MODEL_CACHE.clear()  # a new process: every engine starts at version 0
    run(LocalGrid(2), _cfg(tiny_model_dir, tmp, **{"server.resume": str(part)}))
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(part / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in _rows(part)] == [0, 1, 2]
    assert (full / "ferret" / "history.bin").read_bytes() == (part / "ferret" / "history.bin").read_bytes()


# --- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("over,key", [
    ({"compression.up": "int8"}, "compression.up/down"),
    ({"compression.down": "int8"}, "compression.up/down"),
    ({"server.strategy": "fedavg > fedadam"}, "server.strategy"),
    ({"server.strategy": "fedkseed"}, "server.strategy"),
    ({"dp.clipping-norm": 1.0}, "dp.clipping-norm"),
    ({"lora.peft": "dora"}, "lora.peft"),
    ({"secagg.enabled": True}, "secagg.enabled"),
    ({"ferret.bits": 3}, "ferret.bits"),
    ({"ferret.params": "some"}, "ferret.params"),
    ({"ferret.num-bases": 0}, "ferret.num-bases"),
    ({"ferret.scale": 0.0}, "ferret.scale"),
])
def test_what_ferret_does_not_take_is_one_line_naming_the_key(over, key):
    from strategies.adapter import resolve

    with pytest.raises(ConfigError) as err:
        resolve(Config.from_flat({"train.method": "ferret", **over}))
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value)


def test_params_all_takes_what_the_adapter_checks_refuse():
    from strategies.adapter import resolve

    resolve(Config.from_flat({"train.method": "ferret", "ferret.params": "all", "lora.peft": "dora"}))
    resolve(Config.from_flat({"train.method": "ferret", "server.strategy": "median"}))
