"""The one plug-in grammar (fedllm.plugins): stages and their literal arguments, refused specs
naming the key and the stage, and the strategy.* keys that stage arguments replace."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
import torch

from conftest import reply_to
from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.plugins import Stage, parse_stages
from strategies import build

pytestmark = pytest.mark.usefixtures("task_identity")

GLOBAL = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}


def test_stages_and_their_arguments():
    assert parse_stages("trimmed-mean(fraction=0.2) > fedadam(lr=0.01, beta1=0.9)", "server.strategy") == [
        Stage("trimmed-mean", (), {"fraction": 0.2}, "trimmed-mean(fraction=0.2)"),
        Stage("fedadam", (), {"lr": 0.01, "beta1": 0.9}, "fedadam(lr=0.01, beta1=0.9)")]
    user, zstd = parse_stages("my_pkg.codecs:sign(scale=2) > zstd")
    assert (user.name, user.kwargs, zstd.name, zstd.kwargs) == ("my_pkg.codecs:sign", {"scale": 2}, "zstd", {})
    (s,) = parse_stages("topk(0.01, scope=tensor, on=true, off=False, n=-3, tag='a > b, c', x=1e-3)")
    assert s.args == (0.01,) and s.kwargs == {"scope": "tensor", "on": True, "off": False, "n": -3,
                                              "tag": "a > b, c", "x": 1e-3}
    assert isinstance(s.kwargs["n"], int) and isinstance(s.args[0], float)
    assert [t.name for t in parse_stages("topk(0.01) -> quantize(4) -> zstd")] == ["topk", "quantize", "zstd"]
    assert parse_stages("  ") == [] and parse_stages("median()") == [Stage("median", (), {}, "median()")]


@pytest.mark.parametrize("spec, message", [
    ("fedprox(mu=)", "server.strategy: stage 'fedprox(mu=)': an argument has no value"),
    ("fedprox(mu=__import__('os'))", "server.strategy: stage \"fedprox(mu=__import__('os'))\": "
                                     "\"__import__('os')\" is not a literal"),
    ("krum(f=1, 2)", "server.strategy: stage 'krum(f=1, 2)': a positional argument after a keyword one"),
    ("krum(f=1, f=2)", "server.strategy: stage 'krum(f=1, f=2)': argument 'f' given twice"),
    ("krum(f=[1])", "server.strategy: stage 'krum(f=[1])': '[1]' is not a literal"),
    ("median > krum(f=1", "server.strategy: stage 'median > krum(f=1': unclosed '('"),
    ("median >", "server.strategy: 'median >' has an empty stage"),
    ("me dian", "server.strategy: stage 'me dian': expected name or name(arguments)"),
])
def test_bad_specs_name_the_key_and_the_stage(spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_stages(spec, "server.strategy")


@pytest.mark.parametrize("spec, message", [
    ("krum(g=2)", "server.strategy: stage 'krum(g=2)': unknown argument 'g'; krum takes f"),
    ("median(fraction=0.1)", "server.strategy: stage 'median(fraction=0.1)': unknown argument 'fraction'; median "
                             "takes no arguments"),
    ("fedavg > fedadam(momentum=0.5)", "unknown argument 'momentum'; fedadam takes lr, beta1, beta2, tau"),
    ("fedavg > fedadam(0.1, 0.9, 0.99, 1e-3, 7)", "fedadam takes lr, beta1, beta2, tau"),
])
def test_an_argument_a_stage_does_not_take_is_refused(spec, message):
    from strategies import resolve

    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(Config.from_flat({"server.strategy": spec}))


def test_codec_specs_speak_the_same_grammar():
    from fedllm.compression import parse

    assert parse("topk(fraction=0.01) > quantize(bits=4) > zstd").name == parse("topk-int4").name
    with pytest.raises(ConfigError, match=re.escape("compression.up: codec stage 'topk(0.01, frac=2)': unknown "
                                                    "argument 'frac'; topk takes fraction, scope")):
        Config.from_flat({"compression.up": "topk(0.01, frac=2) > zstd"})
    with pytest.raises(ConfigError, match=re.escape("compression.down: codec stage 'no_such_mod:codec': cannot import")):
        Config.from_flat({"compression.down": "no_such_mod:codec"})
    assert parse("fedllm.compression.codecs:quantize(8) > zstd").name == parse("int8").name  # module:factory


def _reply(node, local, n=10.0, rnd=1):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from fedllm.protocol import ARRAYS, METRICS

    return reply_to(node, RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord(
        {"num-examples": n, "train-loss": 1.0, "server-round": rnd})}))


def _two_rounds(flat):
    """The global state after two rounds of five clients, and the round config sent."""
    from fedllm.methods.adapters.server import LoraServer

    cfg = Config.from_flat(flat)
    s = build(cfg, LoraServer(cfg, GLOBAL))
    for rnd in (1, 2):
        s.round(rnd, [_reply(10 + i, {"a": torch.tensor([1.0 + i * i * rnd, 2.0 - i]), "b": torch.tensor([[0.1 * i]])},
                             n=1.0 + i, rnd=rnd) for i in range(5)])
    return s.method.state, s.round_config(1)


@pytest.mark.parametrize("old, new, spelling", [
    ({"server.strategy": "trimmed-mean", "strategy.trim-fraction": 0.4}, "trimmed-mean(fraction=0.4)",
     "strategy.trim-fraction: deprecated"),
    ({"server.strategy": "multikrum", "strategy.byzantine": 2, "strategy.multikrum-keep": 2},
     "multikrum(f=2, keep=2)", 'server.strategy="multikrum(f=2, keep=2)"'),
    ({"server.strategy": "norm-bounded > fedadam", "strategy.max-norm": 0.5, "strategy.server-lr": 0.1,
      "strategy.beta1": 0.5, "strategy.tau": 0.01},
     "norm-bounded(max_norm=0.5) > fedadam(lr=0.1, beta1=0.5, tau=0.01)",
     'server.strategy="norm-bounded(max_norm=0.5) > fedadam(lr=0.1, beta1=0.5, tau=0.01)"'),
    ({"server.strategy": "fedavgm", "strategy.momentum": 0.5, "strategy.server-lr": 0.7},
     "fedavgm(lr=0.7, momentum=0.5)", 'server.strategy="fedavg > fedavgm(lr=0.7, momentum=0.5)"'),
    ({"server.strategy": "fedprox", "strategy.proximal-mu": 0.3}, "fedprox(mu=0.3)", "fedprox(mu=0.3)"),
    ({"server.strategy": "krum", "strategy.byzantine": 2}, "krum(f=2)", 'server.strategy="krum(f=2)"'),
])
def test_old_keys_warn_once_and_equal_the_new_spelling(old, new, spelling, caplog):
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        state_old, sent_old = _two_rounds(old)
    warned = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(warned) == 1 and spelling in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        state_new, sent_new = _two_rounds({"server.strategy": new})
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]
    assert sent_old == sent_new
    assert all(torch.equal(state_old[k], state_new[k]) for k in state_old)  # the same bits
    changed, _ = _two_rounds({"server.strategy": new.split(">")[0].split("(")[0]})
    assert not all(torch.equal(changed[k], state_new[k]) for k in changed) or new.startswith("fedprox")


def test_stage_arguments_win_over_the_old_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        a, _ = _two_rounds({"server.strategy": "trimmed-mean(fraction=0.4)", "strategy.trim-fraction": 0.0})
    b, _ = _two_rounds({"server.strategy": "trimmed-mean(fraction=0.4)"})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "(trimmed-mean(fraction=0.0) where that stage is in the chain)" in caplog.text


def test_config_and_its_errors_stay_light():
    """Building a config (attack kinds and codecs from their registries) imports no torch."""
    code = ("import sys, fedllm.config as c\n"
            "c.Config.from_flat({'attack.clients': '1=zero,2=label-flip', 'compression.up': 'topk-int4'})\n"
            "try:\n    c.Config.from_flat({'attack.clients': '1=evil'})\nexcept c.ConfigError as e:\n    print(e)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("attack.clients: '1=evil' is not partition=kind with a kind among crash, duplicate")


@pytest.mark.parametrize("spec, says", [
    ("trimmed-mean(fraction=0.7)", "fraction must be in [0, 0.5), got 0.7"),
    ("krum(f=1.5)", "f must be a whole number >= 0, got 1.5"),
    ("fedavg > fedadam(lr=-1)", "lr must be > 0, got -1"),
    ("fedavgm(momentum=1)", "momentum must be in [0, 1), got 1"),
    ("norm-bounded(max_norm='big')", "max_norm must be > 0, got 'big'"),
])
def test_a_stage_argument_out_of_range_fails_with_the_config(spec, says):
    """Not in a round: the preflight's resolve refuses it in one line naming the stage."""
    from strategies import resolve

    with pytest.raises(ConfigError, match=r"^server\.strategy: stage .*" + re.escape(says) + "$"):
        resolve(Config.from_flat({"server.strategy": spec}))
