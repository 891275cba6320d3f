import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedllm import ConfigError
from fedllm.config import Config
from fedllm.methods.adapters.server import LoraServer
from strategies import OPTIMIZERS, RULES, FedLLMStrategy, build, weighted_mean


pytestmark = pytest.mark.usefixtures("task_identity")


GLOBAL = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}


def _reply(node: int, arrays, n=10.0, metrics=None, error=None, rnd=1) -> Message:
    out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    if error:
        from flwr.app import Error

        return Message(Error(code=0, reason=error), reply_to=out)
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": 1.0, "server-round": rnd, **(metrics or {})})
    return Message(content, reply_to=out)


def _strategy(chain: str = "fedavg", cfg: Config | None = None, **flat) -> FedLLMStrategy:
    """The adapter with LoRA's server half started at GLOBAL and server.strategy=`chain`."""
    cfg = cfg or Config.from_flat({"server.strategy": chain, **flat})
    return build(cfg, LoraServer(cfg, {k: v.clone() for k, v in GLOBAL.items()}))


def _aggregate(s: FedLLMStrategy, rnd: int, replies):
    """One round: (the new global state, or None when nothing was applied; the result)."""
    result = s.round(rnd, replies)
    return (dict(s.method.state) if result.applied else None), result


def test_weighted_mean_by_hand():
    out = weighted_mean([{"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([4.0, 3.0])}], [1.0, 2.0])
    assert torch.allclose(out["x"], torch.tensor([3.0, 2.0]))  # (1*1 + 2*4)/3, (0 + 2*3)/3


def test_fedavg_weights_by_examples():
    s = _strategy()
    local1 = {"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([[1.0]])}  # delta (1, 0), 1
    local2 = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([[4.0]])}  # delta (0, 3), 4
    out, result = _aggregate(s, 1, [_reply(1, local1, n=30), _reply(2, local2, n=10)])
    metrics = result.metrics
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
    out, result = _aggregate(s, 1, [_reply(7, **BAD[case])])
    assert out is None and not result.applied
    assert result.metrics["clients-dropped"] == 1
    assert result.dropped[0][0] == 7 and result.dropped[0][1]
    assert torch.equal(s.method.state["a"], GLOBAL["a"])
    good = {"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([[0.0]])}
    out, _ = _aggregate(s, 1, [_reply(7, **BAD[case]), _reply(8, good)])
    assert torch.allclose(out["a"], torch.tensor([3.0, 2.0]))  # only node 8 counts


def test_configure_train_does_not_mutate_caller_config():
    class OneNodeGrid:
        def get_node_ids(self):
            return [11, 12]

    s = _strategy()
    config = ConfigRecord({"lora.rank": 8})
    msgs = list(s.configure_train(3, ArrayRecord(GLOBAL), config, OneNodeGrid()))
    assert "server-round" not in config
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
    assert msgs[0].content.config_records["config"]["server-round"] == 3


def test_registry_by_name_and_path():
    assert RULES.get("fedavg").impl is fedavg
    assert RULES.get("strategies.rules:fedavg").impl is fedavg
    with pytest.raises(ConfigError, match="server.strategy.*unknown rule 'fedavgg'"):
        RULES.get("fedavgg")
    with pytest.raises(ConfigError, match="server.strategy: cannot import"):
        RULES.get("no_such_module:Thing")
    with pytest.raises(ConfigError, match="server.strategy.*unknown rule 'fedavgg'"):
        _strategy("fedavgg")


def test_register_checks_names():
    with pytest.raises(ValueError, match="lower-case"):
        RULES.register("FedFoo", fedavg)
    with pytest.raises(ValueError, match="registered already"):
        RULES.register("fedavg", lambda updates, cfg: {})
    assert "fedavg" in RULES and "fedadam" in OPTIMIZERS


@pytest.mark.parametrize("spec, message", [
    ("fedadam > median", "'median' is a rule"),
    ("median > fedadam > ", "empty stage"),
    ("stack", "unknown rule 'stack'"),
    ("exact-lora", "is a method: set train.method=exact-lora"),
    ("fedadam(flavor=pytorch)", "flavor must be one of fedllm, flower, got 'pytorch'"),
    ("krum(flavor=flwr)", "flavor must be one of fedllm, flower, got 'flwr'"),
    ("fedavg > fedavgm(flavor=1)", "flavor must be one of fedllm, flower, got 1"),
])
def test_chain_errors_name_the_stage(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _strategy(spec)


# --- the strategy family -------------------------------------------------------------------
from fedllm.methods.exact_lora.server import ExactLoraServer, compact, stack_factors  # noqa: E402
from strategies import (adaptive_step, coordinate_median, fedavg, krum_scores, momentum_step,  # noqa: E402
                        multi_krum, norm_bounded_mean, trimmed_mean)

# every registered rule that takes LoRA deltas, alone and chained with every server optimizer:
# a new rule or optimizer joins the table by registering
LORA_CHAINS = ([r.name for r in RULES.entries() if "dense" in r.meta.get("accepts", ())]
               + [f"{r} > {o}" for r in ("fedavg", "median") for o in OPTIMIZERS])


def _with_global(name, cfg=None):
    return _strategy(name, cfg.replace(server__strategy=name) if cfg else None)


@pytest.mark.parametrize("name", LORA_CHAINS)
def test_every_strategy_keeps_the_contract(name):
    """Shared table: shapes kept, inputs untouched, finite output, bad replies dropped."""
    s = _with_global(name)
    locals_ = [{"a": torch.tensor([1.0 + i, 2.0 - i]), "b": torch.tensor([[0.1 * i]])} for i in range(5)]
    copies = [{k: v.clone() for k, v in d.items()} for d in locals_]
    replies = [_reply(10 + i, d) for i, d in enumerate(locals_)] + [_reply(99, **BAD["nan"])]
    if s.chain.rule.meta.get("variates"):  # scaffold: each reply also carries its control-variate delta
        for r in replies:
            r.content["scaffold"] = ArrayRecord({k: torch.zeros_like(v) for k, v in GLOBAL.items()})
    out, result = _aggregate(s, 1, replies)
    metrics = result.metrics
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in GLOBAL.items()}
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(locals_, copies) for k in a)
    assert metrics["clients-ok"] == 5 and metrics["clients-dropped"] == 1 and result.dropped[0][0] == 99
    state = s.state_dict()  # what a checkpoint keeps, by name
    assert set(state) == {"method", "chain"} and torch.equal(state["method"]["global"]["a"], out["a"])


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "median", "trimmed-mean", "krum", "multikrum",
                                  "norm-bounded"])
def test_identical_updates_give_that_update(name):
    s = _with_global(name, Config.from_flat({"strategy.max-norm": 100.0}))
    local = {"a": torch.tensor([1.5, 2.5]), "b": torch.tensor([[-1.0]])}
    out, _ = _aggregate(s, 1, [_reply(i, local) for i in range(4)])
    assert all(torch.allclose(out[k], local[k]) for k in local)


def test_fedavgm_momentum_by_hand():
    d = {"x": torch.tensor([0.75])}
    step, m = momentum_step(d, None, 0.9, 1.0)
    assert torch.allclose(step["x"], torch.tensor([0.75]))
    step, m = momentum_step(d, m, 0.9, 2.0)
    assert torch.allclose(m["x"], torch.tensor([0.9 * 0.75 + 0.75]))  # 1.425
    assert torch.allclose(step["x"], torch.tensor([2.85]))
    s = _with_global("fedavgm")
    r1 = [_reply(1, {"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([[1.0]])}, n=30),
          _reply(2, {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([[4.0]])}, n=10)]
    s.round(1, r1)
    r2 = [_reply(1, {"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([[1.0]])}, n=30, rnd=2),
          _reply(2, {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([[4.0]])}, n=10, rnd=2)]
    s.method.state = {k: v.clone() for k, v in GLOBAL.items()}  # the same deltas against the same global
    out, _ = _aggregate(s, 2, r2)  # m = 0.75 * 1.9
    assert torch.allclose(out["a"], torch.tensor([1.0, 2.0]) + 0.75 * 1.9)


@pytest.mark.parametrize("rule, v1", [
    ("adam", 0.99 * 1e-6 + 0.01 * 0.25),     # beta2 v0 + (1 - beta2) d^2, v0 = tau^2
    ("yogi", 1e-6 + 0.01 * 0.25),            # v0 - (1 - beta2) d^2 sign(v0 - d^2)
    ("adagrad", 1e-6 + 0.25),                # v0 + d^2
])
def test_adaptive_steps_by_hand(rule, v1):
    d = {"x": torch.tensor([0.5], dtype=torch.float64)}
    step, moments = adaptive_step(d, None, rule, lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)
    m1 = 0.1 * 0.5
    assert moments.v["x"].item() == pytest.approx(v1)
    assert step["x"].item() == pytest.approx(0.01 * m1 / (v1 ** 0.5 + 1e-3))


@pytest.mark.parametrize("rule, beta1, v1, correction", [
    ("adam", 0.9, 0.01 * 0.25, (1 - 0.99 ** 2) ** 0.5 / (1 - 0.9 ** 2)),  # v0 = 0; Flower's bias correction, t = 1
    ("yogi", 0.9, 0.01 * 0.25, 1.0),                                      # 0 - 0.01 d^2 sign(0 - d^2)
    ("adagrad", 0.0, 0.25, 1.0),                                          # no first moment: m = d
])
def test_flower_flavor_steps_by_hand(rule, beta1, v1, correction):
    d = {"x": torch.tensor([0.5], dtype=torch.float64)}
    step, moments = adaptive_step(d, None, rule, lr=0.1, beta1=beta1, beta2=0.99, tau=1e-3, flavor="flower")
    m1 = (1 - beta1) * 0.5
    assert moments.v["x"].item() == pytest.approx(v1) and moments.t == 1
    assert step["x"].item() == pytest.approx(0.1 * correction * m1 / (v1 ** 0.5 + 1e-3))
    _, moments = adaptive_step(d, moments, rule, lr=0.1, beta1=beta1, beta2=0.99, tau=1e-3, flavor="flower")
    assert moments.t == 2


def test_a_parameter_is_its_argument_else_its_key_else_the_flavors_default():
    from strategies.flavors import setting

    cfg, plain = Config.from_flat({"strategy.beta1": 0.5}), Config.from_flat({})
    assert setting(cfg, "flower", "fedadagrad", "beta1", 0.3, "beta1") == 0.3      # the stage's argument
    assert setting(cfg, "flower", "fedadagrad", "beta1", None, "beta1") == 0.5     # a key set away from its default
    assert setting(plain, "flower", "fedadagrad", "beta1", None, "beta1") == 0.0   # Flower's FedAdagrad: no m
    assert setting(plain, "fedllm", "fedadagrad", "beta1", None, "beta1") == 0.9   # the key's default
    assert setting(plain, "flower", "fedyogi", "lr", None, "server_lr", 1e-3) == 0.01
    assert setting(plain, "fedllm", "fedyogi", "lr", None, "server_lr", 1e-3) == 1e-3
    assert setting(plain, "flower", "multikrum", "keep", None, "multikrum_keep") == 1


def test_fedadam_strategy_uses_server_lr():
    cfg = Config.from_flat({"strategy.server-lr": 0.1, "strategy.tau": 1e-3})
    s = _with_global("fedadam", cfg)
    out, _ = _aggregate(s, 1, [_reply(1, {"a": torch.tensor([1.5, 2.0]), "b": torch.tensor([[0.0]])})])
    # d = 0.5 on a[0], 0 elsewhere: step = 0.1 * 0.05 / (sqrt(0.99e-6 + 0.0025) + 1e-3)
    expect = 1.0 + 0.1 * 0.05 / ((0.99e-6 + 0.0025) ** 0.5 + 1e-3)
    assert out["a"][0].item() == pytest.approx(expect, rel=1e-5)
    assert out["a"][1].item() == pytest.approx(2.0)


def test_robust_aggregates_by_hand():
    col = lambda *v: torch.tensor(v)[:, None]  # noqa: E731  (n, 1)
    assert coordinate_median(col(1.0, 5.0, 2.0)).item() == 2.0
    assert coordinate_median(col(1.0, 5.0, 2.0, 10.0)).item() == 3.5  # (2 + 5) / 2
    assert trimmed_mean(col(1.0, 2.0, 3.0, 100.0, -50.0), 0.2).item() == 2.0  # drops -50 and 100
    x = col(0.0, 0.1, 0.3, 10.0)
    # f = 0: each point's two nearest squared distances: 0.01+0.09, 0.01+0.04, 0.04+0.09, 94.09+98.01
    assert torch.allclose(krum_scores(x, 0), torch.tensor([0.10, 0.05, 0.13, 192.10], dtype=torch.float64))
    mean, kept = multi_krum(x, torch.ones(4), 0, 1)
    assert kept == [1] and mean.item() == pytest.approx(0.1)
    mean, kept = multi_krum(x, torch.tensor([1.0, 1.0, 2.0, 1.0]), 0, 3)
    assert kept == [0, 1, 2] and mean.item() == pytest.approx((0.0 + 0.1 + 0.6) / 4)
    mean, cut = norm_bounded_mean(torch.tensor([[3.0, 4.0], [0.3, 0.4]]), torch.ones(2), 1.0)
    assert cut == [0] and torch.allclose(mean, torch.tensor([0.45, 0.6]))  # (0.6, 0.8) and (0.3, 0.4)


def test_robust_strategies_resist_one_outlier_and_name_it():
    honest = [{"a": torch.tensor([1.1 + 0.01 * i, 2.0]), "b": torch.tensor([[0.0]])} for i in range(4)]
    evil = {"a": torch.tensor([1000.0, -1000.0]), "b": torch.tensor([[500.0]])}
    for name in ("median", "trimmed-mean", "krum", "multikrum"):
        s = _strategy(name)
        out, result = _aggregate(s, 1, [_reply(i, d) for i, d in enumerate(honest)] + [_reply(9, evil)])
        assert (out["a"] - torch.tensor([1.115, 2.0])).abs().max() < 0.05, name
        if name in ("krum", "multikrum"):
            assert 9 in result.outliers
    _, result = _aggregate(_strategy("norm-bounded"), 1, [_reply(i, d) for i, d in enumerate(honest)] + [_reply(9, evil)])
    assert result.outliers == (9,)


def test_fedprox_sends_mu_and_the_client_term_pulls_to_global():
    class Grid:
        def get_node_ids(self):
            return [1, 2]

    s = _strategy("fedprox", **{"strategy.proximal-mu": 0.5})
    msg = list(s.configure_train(1, ArrayRecord(GLOBAL), ConfigRecord({}), Grid()))[0]
    assert msg.content.config_records["config"]["proximal-mu"] == 0.5
    assert "proximal-mu" not in _strategy("fedavg").round_config(1)


# --- exact LoRA aggregation ----------------------------------------------------------------
def _factors(rank, seed, out=6, inp=5):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(rank, inp, generator=g), "m.lora_B.weight": torch.randn(out, rank, generator=g)}


def test_stacking_is_exact_where_fedavg_is_not():
    c1, c2 = _factors(2, 0), _factors(3, 1)  # different ranks
    w1, w2, s1, s2 = 30.0, 10.0, 16 / 2, 16 / 3
    want = (w1 * s1 * c1["m.lora_B.weight"] @ c1["m.lora_A.weight"]
            + w2 * s2 * c2["m.lora_B.weight"] @ c2["m.lora_A.weight"]) / (w1 + w2)
    out = stack_factors([(c1, w1, s1), (c2, w2, s2)], {})
    assert out["m.lora_A.weight"].shape == (5, 5) and out["m.lora_B.weight"].shape == (6, 5)
    assert torch.allclose(out["m.lora_B.weight"] @ out["m.lora_A.weight"], want, atol=1e-5)
    a, b = compact(out["m.lora_A.weight"], out["m.lora_B.weight"])
    assert a.shape[0] == 5 and torch.allclose(b @ a, want, atol=1e-4)  # rank 5 = min(in, out)
    # averaging the factors (same rank) is not the mean of the products
    d1, d2 = _factors(2, 2), _factors(2, 3)
    avg = ((d1["m.lora_B.weight"] + d2["m.lora_B.weight"]) / 2) @ ((d1["m.lora_A.weight"] + d2["m.lora_A.weight"]) / 2)
    exact = (d1["m.lora_B.weight"] @ d1["m.lora_A.weight"] + d2["m.lora_B.weight"] @ d2["m.lora_A.weight"]) / 2
    assert (avg - exact).abs().max() > 0.1


def test_compact_keeps_the_numerical_rank_and_caps():
    c = _factors(2, 0, out=40, inp=30)
    a = torch.cat([c["m.lora_A.weight"], c["m.lora_A.weight"] * 2])  # rank 2 written as rank 4
    b = torch.cat([c["m.lora_B.weight"], c["m.lora_B.weight"]], dim=1)
    na, nb = compact(a, b)
    assert na.shape == (2, 30) and nb.shape == (40, 2) and torch.allclose(nb @ na, b @ a, atol=1e-4)
    full = _factors(6, 1, out=40, inp=30)
    ca, cb = compact(full["m.lora_A.weight"], full["m.lora_B.weight"], max_rank=3)
    m = full["m.lora_B.weight"] @ full["m.lora_A.weight"]
    s = torch.linalg.svdvals(m)
    assert ca.shape[0] == 3
    assert (m - cb @ ca).norm().item() == pytest.approx(s[3:].norm().item(), rel=1e-4)  # best rank-3 fit


def test_exact_lora_strategy_accepts_ranks_and_refuses_misfits():
    ref = _factors(4, 9)
    cfg = Config.from_flat({"train.method": "exact-lora"})
    s = build(cfg, ExactLoraServer(cfg, ref))
    assert s.chain.name == "stack"  # the method's own rule, by default
    good = [_reply(1, _factors(2, 0), n=30), _reply(2, _factors(3, 1), n=10)]
    bad_rank = {"m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.randn(6, 3)}
    bad_in = {"m.lora_A.weight": torch.randn(2, 7), "m.lora_B.weight": torch.randn(6, 2)}
    result = s.round(1, good + [_reply(3, bad_rank), _reply(4, bad_in)])
    metrics = result.metrics
    assert result.applied and metrics["clients-ok"] == 2 and metrics["clients-dropped"] == 2
    want = stack_factors([(_factors(2, 0), 30.0, 8.0), (_factors(3, 1), 10.0, 16 / 3)], {})
    frozen = s.method.frozen
    got = frozen["m.lora_B.weight"] @ frozen["m.lora_A.weight"]
    assert torch.allclose(got, want["m.lora_B.weight"] @ want["m.lora_A.weight"], atol=1e-4)
    assert metrics["frozen-rank"] == 5
    with pytest.raises(ConfigError, match="train.method=exact-lora does not take codecs"):
        build(cfg.replace(compression__up="int8"), ExactLoraServer(cfg, ref))
    with pytest.raises(ConfigError, match="rule 'median' does not aggregate 'factors' updates"):
        build(cfg.replace(server__strategy="median"), ExactLoraServer(cfg, ref))
