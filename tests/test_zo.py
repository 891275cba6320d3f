import math

import numpy as np
import pytest
import torch
from conftest import reply_to
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedllm import PayloadError
from fedllm.config import Config
from fedllm.data import encode, load_splits
from fedllm.model import MODEL_CACHE
from fedllm.methods.zo import engine as zo
from fedllm.methods import counter_rng as rng
from fedllm.methods.zo import wire as zo_wire
from strategies import build

K = 64


def _cfg(tiny_model_dir, **kw):
    flat = {"model.name": str(tiny_model_dir), "train.method": "zo", "zo.num-seeds": K, "zo.lr": 1e-4,
            "data.families": "parity", "data.train-per-family": 16, "data.eval-per-family": 8,
            "train.local-steps": 10, "train.batch-size": 4, "server.min-clients": 1}
    flat.update(kw)
    return Config.from_flat(flat)


def _fresh_engine(cfg):
    MODEL_CACHE.clear()  # a new process, as far as the engine cache is concerned
    return zo.engine_for(cfg)


def _zo_strategy(cfg):
    """The adapter with zo's server half, whose engine is its own (built in a fresh cache)."""
    MODEL_CACHE.clear()
    strategy = build(cfg)
    MODEL_CACHE.clear()
    return strategy


def _rows(cfg, tok):
    train, _ = load_splits(cfg.data)
    return [encode(tok, e, 64, cfg.data.system_prompt) for e in train]


# --- perturbations --------------------------------------------------------------------------

def test_splitmix64_mixer_matches_its_published_outputs():
    # SplitMix64 from state 0: the outputs in Vigna's reference (splitmix64.c) and Java's SplittableRandom
    assert [rng.mix64(c * rng.GAMMA) for c in (1, 2, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                               0x06C45D188009454F]
    w = rng.words(0, 0, 3)  # the tensor code: the same words, read as uint64
    assert [int(x) & (2**64 - 1) for x in w] == [rng.mix64(rng.key(0) + c * rng.GAMMA) for c in (1, 2, 3)]


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("seed,offset,n", [(7, 0, 1), (7, 0, 100_003), (1_234_567, 13, 4097), (2**31 - 2, 65, 63),
                                           (42, 1_000_000_007, 999)])
def test_z_equals_the_numpy_reference(dist, seed, offset, n):
    got = rng.draw(seed, offset, n, dist, torch.float64)
    assert got.shape == (n,)
    assert np.array_equal(got.numpy(), rng.reference(seed, offset, n, dist))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_z_in_each_dtype_is_the_reference_cast(dist, dtype):
    got = rng.draw(99, 5, 3000, dist, dtype)
    assert got.dtype == dtype
    assert torch.equal(got, torch.from_numpy(rng.reference(99, 5, 3000, dist)).to(dtype))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_z_is_reproducible_and_distributed(dist):
    a = rng.draw(7, 0, 200_003, dist, torch.float64)
    assert torch.equal(a, rng.draw(7, 0, 200_003, dist, torch.float64))
    assert not torch.equal(a, rng.draw(8, 0, 200_003, dist, torch.float64))
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1) < 0.01
    if dist == "rademacher":
        assert set(a.unique().tolist()) == {-1.0, 1.0}
    else:  # N(0, 1): kurtosis 3, a quarter of the mass beyond 1.15, 1% beyond 2.576, nothing beyond 4.4
        assert abs(float((a ** 4).mean()) - 3) < 0.05
        assert abs(float((a.abs() > 1.1503).double().mean()) - 0.25) < 0.005
        assert abs(float((a.abs() > 2.5758).double().mean()) - 0.01) < 0.002
        assert float(a.abs().max()) < 4.4
        table = rng._gaussian_table()
        assert torch.equal(table, -table.flip(0)) and abs(float(table.pow(2).mean()) - 1) < 1e-12  # mean 0, var 1
    # one stream: any split into pieces gives the same elements
    assert torch.equal(torch.cat([rng.draw(7, 0, 77, dist, torch.float64), rng.draw(7, 77, 200_003 - 77, dist,
                                                                                   torch.float64)]), a)
    lag = float((a[1:] * a[:-1]).mean())  # neighbours are uncorrelated
    assert abs(lag) < 0.01


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_perturb_is_the_stream_over_all_parameters(dist):
    params = [torch.zeros(3, 5), torch.zeros(rng.CHUNK[dist] + 11), torch.zeros(7).as_strided((7,), (1,))]
    zo.perturb_(params, 11, 0.5, dist)
    flat = torch.cat([p.reshape(-1) for p in params]).double()
    expected = 0.5 * torch.from_numpy(rng.reference(11, 0, flat.numel(), dist)).float().double()
    assert torch.equal(flat, expected)
    t = torch.zeros(4, 6).t()  # a non-contiguous parameter takes its elements in its own (row-major) order
    zo.perturb_([t], 11, 1.0, dist)
    assert torch.equal(t.reshape(-1).double(), torch.from_numpy(rng.reference(11, 0, 24, dist)).float().double())


def test_seed_pool_is_fixed_and_distinct():
    assert zo.seed_pool(100, 42) == zo.seed_pool(100, 42)
    assert len(set(zo.seed_pool(4096, 1))) == 4096
    assert zo.seed_pool(10, 1) != zo.seed_pool(10, 2)


# --- the codec ------------------------------------------------------------------------------

PAIRS = [(3, 0.5), (10, -1.25), (3, 0.25), (63, 2.0)]


def test_float_pairs_round_trip_exactly_by_hand():
    payload = zo.encode_upload(K, PAIRS, 0, seed=0)
    dense = zo.decode(payload, K)
    assert dense[3] == 0.75 and dense[10] == -1.25 and dense[63] == 2.0
    assert float(dense.abs().sum()) == 4.0
    # K=64: SUMS needs an 8-byte mask + 3 floats; PAIRS 4 one-byte indices + 4 floats
    assert len(payload) == zo_wire.HEAD.size + min(8 + 3 * 4, 4 + 4 * 4)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("mode", [zo.PAIRS, zo.SUMS])
def test_quantized_error_bound_and_size(bits, mode):
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(K, (200,), generator=gen)
    values = torch.randn(200, generator=gen, dtype=torch.float64)
    payload = zo.encode(K, idx, values, bits, seed=1, mode=mode)
    exact = torch.zeros(K, dtype=torch.float64).index_add_(0, idx, values)
    got = zo.decode(payload, K).double()
    if mode == zo.SUMS:
        count = int((exact != 0).sum())
        scale = float(exact.abs().max()) / (2 ** (bits - 1) - 1)
        assert (got - exact).abs().max() <= scale + 1e-6  # one quantum per seed at most
        assert len(payload) == zo_wire.HEAD.size + K // 8 + math.ceil(count * bits / 8)
    else:
        scale = float(values.abs().max()) / (2 ** (bits - 1) - 1)
        per_seed = torch.bincount(idx, minlength=K).double()
        assert ((got - exact).abs() <= per_seed * scale + 1e-6).all()
        assert len(payload) == zo_wire.HEAD.size + 200 + math.ceil(200 * bits / 8)


def test_stochastic_rounding_is_unbiased():
    idx, value = torch.tensor([0, 1]), torch.tensor([1.0, 0.3], dtype=torch.float64)
    means = torch.stack([zo.decode(zo.encode(4, idx, value, 2, seed=s, mode=zo.SUMS), 4)[1] for s in range(2000)])
    assert abs(float(means.mean()) - 0.3) < 0.02  # 0.3 sits between the codes 0 and 1 (scale 1)


def test_upload_at_fedkseed_scale_is_under_700_bytes():
    gen = torch.Generator().manual_seed(0)
    pairs = [(int(torch.randint(4096, (1,), generator=gen)), float(torch.randn(1, generator=gen))) for _ in range(200)]
    assert len(zo.encode_upload(4096, pairs, 8, seed=0)) <= 700


GOOD = zo.encode_upload(K, PAIRS, 8, seed=0)
MALFORMED = {
    "empty": b"",
    "truncated header": GOOD[:5],
    "truncated body": GOOD[:-1],
    "trailing byte": GOOD + b"\x00",
    "bad magic": b"XX" + GOOD[2:],
    "bad mode": GOOD[:2] + b"\x07" + GOOD[3:],
    "wrong K": zo.encode_upload(K * 2, PAIRS, 8, seed=0),
    "index out of range": zo.encode(K, torch.tensor([1]), torch.tensor([1.0]), 0, 0, zo.PAIRS)[:-5] + b"\xff"
    + zo.encode(K, torch.tensor([1]), torch.tensor([1.0]), 0, 0, zo.PAIRS)[-4:],
    "nan scalar": zo.encode(K, torch.tensor([1]), torch.tensor([float("nan")]), 0, 0, zo.PAIRS),
    "zero scale": zo_wire.HEAD.pack(b"ZK", 0, 8, K, 1, 0.0) + b"\x01\x05",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_payload_is_rejected(case):
    with pytest.raises(PayloadError):
        zo.decode(MALFORMED[case], K)


def test_down_message_picks_history_or_full_state():
    state, history = zo.Accumulators(K), []
    for r in range(3):
        p = zo.encode(K, torch.tensor([r, 5]), torch.tensor([1.0, -2.0]), 8, r, zo.SUMS)
        state.apply(p)
        history.append(p)
    fresh = zo.decode_down(zo.encode_down(state, history, 0), zo.Accumulators(K))
    assert torch.equal(fresh.acc, state.acc) and fresh.version == 3
    full = zo.encode_down(state, history, None)
    assert full[:1] == zo.FULL and len(full) == 1 + 8 + 8 * K
    assert torch.equal(zo.decode_down(full, zo.Accumulators(K)).acc, state.acc)
    behind = zo.Accumulators(K)
    behind.apply(history[0])
    with pytest.raises(PayloadError, match="history starts at 2"):
        zo.decode_down(zo.encode_down(state, history, 2), behind)


def test_pro_probabilities_follow_magnitudes():
    state = zo.Accumulators(4)
    assert torch.allclose(state.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    state.apply(zo.encode(4, torch.tensor([0, 1]), torch.tensor([3.0, -1.0]), 0, 0, zo.SUMS))
    p = state.probabilities()  # (|g| + mean) / sum = (3+1, 1+1, 0+1, 0+1) / 8
    assert torch.allclose(p, torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64))


# --- the engine -----------------------------------------------------------------------------

def test_step_restores_and_skips_non_finite(tiny_model_dir, monkeypatch):
    cfg = _cfg(tiny_model_dir)
    engine, tok = _fresh_engine(cfg)
    before = [p.clone() for p in engine.params]
    monkeypatch.setattr(engine, "loss", lambda batch: float("nan"))
    pairs, stats = engine.train(_rows(cfg, tok), cfg.train, tok.pad_token_id, 0)
    assert pairs == [] and stats["skipped-steps"] == 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(before, engine.params))
    assert float(engine.coef.abs().sum()) == 0


def test_in_place_drift_is_bounded(tiny_model_dir):
    """300 in-place steps (900 in-place adds of eps-sized z) stay within 2e-5 of the exact
    base - lr * sum coef z: rounding errors of ~1e-7 (float32 near |w| ~ 1) add up like a random
    walk, sqrt(900) * 1e-7 ~ 3e-6 typical. A rebuild clears them."""
    cfg = _cfg(tiny_model_dir, **{"train.local-steps": 300})
    engine, tok = _fresh_engine(cfg)
    engine.train(_rows(cfg, tok), cfg.train, tok.pad_token_id, 0)
    rebuilt, _ = _fresh_engine(cfg)
    rebuilt.move(engine.coef.clone())
    drift = max(float((a - b).abs().max()) for a, b in zip(engine.params, rebuilt.params))
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(rebuilt.params, engine.reload_base()))
    assert moved > 1e-3  # the model did change
    assert drift < 2e-5, drift
    engine.rebuild()
    assert max(float((a - b).abs().max()) for a, b in zip(engine.params, rebuilt.params)) < 1e-7


def test_fingerprint_tracks_what_must_match(tiny_model_dir):
    a, _ = _fresh_engine(_cfg(tiny_model_dir))
    b, _ = _fresh_engine(_cfg(tiny_model_dir))
    c, _ = _fresh_engine(_cfg(tiny_model_dir, **{"zo.dist": "rademacher"}))
    d, _ = _fresh_engine(_cfg(tiny_model_dir, **{"zo.params": "lora"}))
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def _server_round(strategy, engines, cfg, server_round, rows, pad_id):
    """One FedKSeed round driven by hand: down messages, local steps, replies, aggregation."""

    class Grid:
        def get_node_ids(self):
            return list(engines)

    msgs = list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), Grid()))
    replies = []
    for m in msgs:
        node = m.metadata.dst_node_id
        engine = engines[node]
        down = m.content.config_records["zo"]
        engine.sync(zo.decode_down(bytes(down["down"]), engine.state))
        if engine.warming():  # a warm-up round: the dense delta, as ZOClient.upload sends it
            delta, stats = engine.train_first_order(rows, cfg.train, pad_id, seed=server_round * 10 + node)
            record = {"zo-sums": ArrayRecord({"warm": delta})}
        else:
            pairs, stats = engine.train(rows, cfg.train, pad_id, seed=server_round * 10 + node)
            record = {"zo": ConfigRecord({"up": zo.encode_upload(K, pairs, cfg.zo.bits, seed=node)})}
        replies.append(reply_to(node, RecordDict({**record, "metrics": MetricRecord(
            {"num-examples": 10, "train-loss": stats["train-loss"], "zo-version": engine.state.version,
             "zo-fingerprint": engine.fingerprint, "server-round": server_round})})))
    return strategy.round(server_round, replies)


@pytest.mark.usefixtures("task_identity")
def test_local_model_equals_model_rebuilt_from_aggregated_scalars(tiny_model_dir):
    """Single client, float32 scalars: the client's trained weights equal base - lr * sum acc z
    rebuilt by a fresh party from the server's accumulators, within 1e-5 (float32 scalars and
    in-place rounding, see test_in_place_drift_is_bounded)."""
    cfg = _cfg(tiny_model_dir, **{"zo.bits": 0, "train.local-steps": 25})
    strategy = _zo_strategy(cfg)
    client, tok = _fresh_engine(cfg)
    metrics = _server_round(strategy, {1: client}, cfg, 1, _rows(cfg, tok), tok.pad_token_id).metrics
    assert metrics["clients-ok"] == 1 and strategy.method.state.version == 1
    rebuilt, _ = _fresh_engine(cfg)
    rebuilt.sync(strategy.method.state)
    diff = max(float((a - b).abs().max()) for a, b in zip(client.params, rebuilt.params))
    assert diff < 1e-5, diff


@pytest.mark.usefixtures("task_identity")
def test_client_that_skipped_rounds_syncs_to_the_same_model(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, **{"train.local-steps": 6})
    strategy = _zo_strategy(cfg)
    a, tok = _fresh_engine(cfg)
    b, _ = _fresh_engine(cfg)
    rows = _rows(cfg, tok)
    _server_round(strategy, {1: a, 2: b}, cfg, 1, rows, tok.pad_token_id)
    for r in (2, 3, 4):  # node 2 misses three rounds
        _server_round(strategy, {1: a}, cfg, r, rows, tok.pad_token_id)
    down_a = strategy.method.encode_down(1)["zo"]["down"]
    down_b = strategy.method.encode_down(2)["zo"]["down"]
    assert len(down_b) > len(down_a)  # the stale client gets the rounds it missed
    a.sync(zo.decode_down(down_a, a.state))
    b.sync(zo.decode_down(down_b, b.state))
    assert torch.equal(a.state.acc, b.state.acc) and a.state.version == b.state.version == 4
    assert max(float((x - y).abs().max()) for x, y in zip(a.params, b.params)) < 1e-5


@pytest.mark.usefixtures("task_identity")
def test_stale_or_malformed_replies_are_dropped(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    strategy = _zo_strategy(cfg)
    server = strategy.method
    good = zo.encode_upload(K, PAIRS, 8, 0)

    def reply(node, up, version=0, n=10, fingerprint=server.fingerprint):
        return reply_to(node, RecordDict({"zo": ConfigRecord({"up": up}), "metrics": MetricRecord(
            {"num-examples": n, "zo-version": version, "zo-fingerprint": fingerprint, "server-round": 1})}))

    result = strategy.round(1, [reply(1, good, version=5), reply(2, good[:-3]), reply(3, good, n=0),
                                reply(5, good, fingerprint=2)])
    assert result.metrics["clients-dropped"] == 4 and server.state.version == 0 and not result.applied
    assert "fingerprint differs" in result.dropped[3][1]
    assert float(server.state.acc.abs().sum()) == 0
    result = strategy.round(1, [reply(4, good)])
    assert result.metrics["clients-ok"] == 1 and server.state.version == 1


def test_pro_sampling_prefers_seeds_with_large_history(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, **{"zo.pro": "true", "train.local-steps": 40})
    engine, tok = _fresh_engine(cfg)
    engine.state = zo.Accumulators(K)
    engine.state.apply(zo.encode(K, torch.tensor([5]), torch.tensor([1000.0]), 0, 0, zo.SUMS))
    pairs, _ = engine.train(_rows(cfg, tok), cfg.train, tok.pad_token_id, 0)
    share = sum(1 for k, _ in pairs if k == 5) / len(pairs)
    assert share > 0.3  # p(5) = (1000 + 15.6) / (1000 + 64 * 15.6) ~ 0.51; uniform would be 1/64


def test_lora_only_engine_leaves_base_weights_alone(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, **{"zo.params": "lora", "zo.lr": 1e-2})
    engine, tok = _fresh_engine(cfg)
    base = {n: p.clone() for n, p in engine.model.named_parameters() if "lora_" not in n}
    engine.train(_rows(cfg, tok), cfg.train, tok.pad_token_id, 0)
    assert all(torch.equal(p, base[n]) for n, p in engine.model.named_parameters() if "lora_" not in n)
    assert float(engine.coef.abs().sum()) > 0


@pytest.mark.usefixtures("task_identity")
def test_client_refuses_a_different_perturbation_fingerprint(tiny_model_dir):
    from flwr.app import Message, MessageType

    from fedllm.client.round import handle

    cfg = _cfg(tiny_model_dir)
    engine, _ = _fresh_engine(cfg)
    down = zo.encode_down(zo.Accumulators(K), [], 0)
    msg = Message(RecordDict({"config": ConfigRecord(cfg.to_flat()), "zo": ConfigRecord(
        {"down": down, "fingerprint": engine.fingerprint + 1, "version": 0})}),
        dst_node_id=1, message_type=MessageType.TRAIN)
    with pytest.raises(PayloadError, match="perturbations differ"):
        handle(msg.content, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_an_empty_upload_decodes_to_zeros(bits):
    """A client with no valid step (or a free rider) sends no scalars; its upload must decode
    (the packer used to refuse zero codes) as zeros."""
    up = zo.encode_upload(K, [], bits, 0)
    assert torch.equal(zo.decode(up, K), torch.zeros(K))


def test_a_checkpoint_of_the_earlier_generator_is_refused_in_one_line():
    from fedllm.errors import ConfigError
    from fedllm.methods.zo.server import ZOServer

    cfg = Config.from_flat({"train.method": "zo", "zo.num-seeds": K})
    server = ZOServer(cfg, fingerprint=0)
    state = server.state_dict()
    assert state["generator"] == rng.NAME
    ZOServer(cfg, fingerprint=0).load_state_dict(state)  # this generator's checkpoint resumes
    old = {k: v for k, v in state.items() if k != "generator"}  # what fedllm wrote before rng
    with pytest.raises(ConfigError, match=r"^server.resume: this zo checkpoint's perturbations came from the "
                                          r"generator of an earlier fedllm .*start a new run$"):
        ZOServer(cfg, fingerprint=0).load_state_dict(old)


# --- sparse zo (zo.mask) and the first-order warm-up (zo.warmup-rounds) ---------------------

def test_select_takes_the_largest_magnitudes_with_ties_in_stream_order():
    a = torch.tensor([[0.5, -3.0], [2.0, 0.1]])
    b = torch.tensor([2.0, -2.0, 0.0, 4.0])
    # 8 weights, fraction 0.5 -> 4 kept: 4.0, -3.0, then three tied at |2|: the first two in stream order
    idx = zo.select([a, b], 0.5, "magnitude")
    assert [i.tolist() for i in idx] == [[1, 2], [0, 3]]
    assert [i.tolist() for i in zo.select([a, b], 0.01, "magnitude")] == [[], [3]]  # at least one
    rand = zo.select([a, b], 0.5, "random")  # ranked by |z| of a fixed stream: the same every time
    assert sum(len(i) for i in rand) == 4 and [i.tolist() for i in rand] == [i.tolist() for i in
                                                                              zo.select([a, b], 0.5, "random")]


def test_sparse_perturbation_is_the_stream_over_the_subset(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, **{"zo.mask": 0.01, "zo.dist": "gaussian"})
    engine, _ = _fresh_engine(cfg)
    assert engine.n == math.ceil(0.01 * sum(p.numel() for p in engine.params))
    before = [p.clone() for p in engine.params]
    engine.perturb(7, 0.5)
    moved = torch.cat([(p - b).reshape(-1) for p, b in zip(engine.params, before)])
    assert int((moved != 0).sum()) <= engine.n  # nothing outside the subset moves
    flat = engine.flat() - torch.cat([b.view(-1)[i] for b, i in zip(before, engine.mask)])
    expected = 0.5 * torch.from_numpy(rng.reference(7, 0, engine.n, "gaussian")).float()
    assert torch.allclose(flat, expected, atol=1e-6)


def test_fingerprint_covers_the_mask_and_the_warmup(tiny_model_dir):
    plain, _ = _fresh_engine(_cfg(tiny_model_dir))
    prints = {plain.fingerprint}
    for over in ({"zo.mask": 0.01}, {"zo.mask": 0.02}, {"zo.mask": 0.01, "zo.mask-by": "random"},
                 {"zo.mask": 0.01, "zo.warmup-rounds": 1}, {"zo.mask": 0.01, "zo.warmup-rounds": 2}):
        engine, _ = _fresh_engine(_cfg(tiny_model_dir, **over))
        prints.add(engine.fingerprint)
        again, _ = _fresh_engine(_cfg(tiny_model_dir, **over))  # another party derives the same subset
        assert again.fingerprint == engine.fingerprint
        assert all(torch.equal(x, y) for x, y in zip(engine.mask, again.mask))
    assert len(prints) == 6


def _weights(engine):
    return [p.detach().clone() for p in engine.params]


@pytest.mark.usefixtures("task_identity")
def test_sparse_rounds_keep_server_and_clients_identical(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, **{"zo.mask": 0.02, "zo.lr": 1e-2, "train.local-steps": 4})
    strategy = _zo_strategy(cfg)
    a, tok = _fresh_engine(cfg)
    b, _ = _fresh_engine(cfg)
    rows = _rows(cfg, tok)
    base = _weights(a)
    for r in (1, 2):
        _server_round(strategy, {1: a, 2: b}, cfg, r, rows, tok.pad_token_id)
    server = strategy.method
    for e in (a, b):
        e.sync(zo.decode_down(server.encode_down(1)["zo"]["down"], e.state))
    with server.model():
        pass
    assert a.fingerprint == b.fingerprint == server.fingerprint  # the subset's digest is in it
    assert all(torch.equal(x, y) for x, y in zip(a.mask, server.engine.mask))
    for e in (a, b):
        assert max(float((x - y).abs().max()) for x, y in zip(e.params, server.engine.params)) < 1e-5
    moved = [float((x - y).abs().max()) for x, y in zip(_weights(a), base)]
    assert max(moved) > 1e-4


@pytest.mark.usefixtures("task_identity")
def test_warmup_then_zo_keeps_every_party_identical_and_resumes(tiny_model_dir):
    """Round 1 is first-order (dense deltas over the subset), rounds 2-3 zeroth-order from the warmed-up
    weights; a node that missed the warm-up gets the dense state once; a server resumed from its
    checkpoint after the switch holds the same state and rebuilds the same model."""
    from fedllm.methods.zo.server import ZOServer

    cfg = _cfg(tiny_model_dir, **{"zo.mask": 0.02, "zo.lr": 1e-2, "zo.warmup-rounds": 1, "zo.warmup-lr": 1e-2,
                                  "train.local-steps": 3})
    strategy = _zo_strategy(cfg)
    server = strategy.method
    a, tok = _fresh_engine(cfg)
    rows = _rows(cfg, tok)
    base_flat = a.flat()
    assert a.warming()
    _server_round(strategy, {1: a}, cfg, 1, rows, tok.pad_token_id)
    assert server.state.warm_rounds == 1 and server.state.version == 1 and float(server.state.warm.abs().sum()) > 0
    assert float(server.state.acc.abs().sum()) == 0  # the zo accumulators start from zero at the switch
    assert torch.equal(a.flat(), base_flat)  # the client restored its weights: the aggregate moves it
    _server_round(strategy, {1: a}, cfg, 2, rows, tok.pad_token_id)  # zo, from base + warm
    assert not a.warming() and server.state.version == 2 and float(server.state.acc.abs().sum()) > 0
    resumed = ZOServer(cfg)  # a restarted server (fresh engine in a fresh cache)
    MODEL_CACHE.clear()
    resumed.load_state_dict(server.state_dict())
    assert resumed.state.to_bytes() == server.state.to_bytes()
    _server_round(strategy, {1: a}, cfg, 3, rows, tok.pad_token_id)
    late, _ = _fresh_engine(cfg)  # missed everything: one down message holds the dense warm state once
    down = server.encode_down(2)["zo"]["down"]
    assert 4 * late.n < len(down) < 4 * late.n + 8 * K + 200
    late.sync(zo.decode_down(down, late.state))
    a.sync(zo.decode_down(server.encode_down(1)["zo"]["down"], a.state))
    with server.model():
        pass
    assert torch.equal(late.warm, server.state.warm) and torch.equal(a.warm, late.warm)
    for x, y in zip(late.params, server.engine.params):
        assert float((x - y).abs().max()) < 1e-6
    for x, y in zip(a.params, server.engine.params):
        assert float((x - y).abs().max()) < 1e-5  # a's own in-place zo steps: see test_in_place_drift_is_bounded
    flat = late.flat()
    assert float((flat - base_flat).abs().max()) > 1e-3  # warmed up and trained


@pytest.mark.parametrize("over,key", [({"zo.mask": 1.5}, "zo.mask"), ({"zo.mask": -0.1}, "zo.mask"),
                                      ({"zo.mask-by": "gradient"}, "zo.mask-by"),
                                      ({"zo.warmup-rounds": 2}, "zo.warmup-rounds"),
                                      ({"zo.warmup-rounds": -1, "zo.mask": 0.01}, "zo.warmup-rounds"),
                                      ({"zo.warmup-lr": 0.0, "zo.mask": 0.01}, "zo.warmup-lr"),
                                      ({"zo.warmup-rounds": 1, "zo.mask": 0.01, "secagg.enabled": True},
                                       "zo.warmup-rounds")])
def test_bad_sparse_and_warmup_keys_name_the_key(over, key):
    from fedllm.errors import ConfigError
    from fedllm.methods.base import spec_of
    from fedllm.methods.zo.config import check_zo

    with pytest.raises(ConfigError, match=rf"^{key}:"):
        cfg = Config.from_flat({"train.method": "zo", **over})
        check_zo(cfg, spec_of(cfg))
