"""Reliability: malformed replies never crash a round nor move the global state; dropouts and
missing clients are counted; too few replies retry, then stop; checkpoints resume a killed run
to the same weights; attack clients behave as documented."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from safetensors.torch import load_file

from conftest import reply_to, tiny_run_config
from fedllm import rng
from fedllm.server import checkpoint
from fedllm.client.attacks import flip_labels, poisoned
from fedllm.compression import PRESETS, encode, parse
from fedllm.config import Config
from fedllm.errors import ConfigError
from fedllm.server.grid import LocalGrid
from fedllm.methods.zo import engine as zo
from fedllm.methods.adapters.server import LoraServer
from fedllm.methods.adapters.client import shifted
from fedllm.methods.zo.server import ZOServer
from strategies import build

# --- the malformed-reply matrix -------------------------------------------------------------

GLOBAL = {"a": torch.zeros(64), "b": torch.zeros(8, 8)}
GOOD_LOCAL = {"a": torch.linspace(-1, 1, 64) * 0.01, "b": torch.ones(8, 8) * 0.02}
K = 64
CODECS = ["topk(0.5)", "randk(0.5, unbiased=False)", "quantize(8)", "cluster(16)", "zstd"] + [p for p in PRESETS if p != "none"]


def _metrics(**over):
    return MetricRecord({"num-examples": 10, "train-loss": 1.0, "server-round": 1, "partition-id": 0, **over})


def _arrays_reply(node, arrays=None, metrics=None, extra=None, error=None):
    if error:
        from flwr.app import Error

        out = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type="train")
        return Message(Error(code=0, reason=error), reply_to=out)
    content = RecordDict({"metrics": metrics if metrics not in (None, False) else _metrics()})
    if arrays is not False:
        arrays = GOOD_LOCAL if arrays is None else arrays
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    for name, record in (extra or {}).items():
        content[name] = record
    if metrics is False:
        del content["metrics"]
    return reply_to(node, content)


def _delta():
    return {k: GOOD_LOCAL[k] - GLOBAL[k] for k in GLOBAL}


def _codec_reply(node, payload, metrics=None):
    return reply_to(node, RecordDict({"update": ConfigRecord({"payload": payload}),
                                      "metrics": metrics if metrics is not None else _metrics()}))


def _garbage_array():
    import numpy as np

    return ArrayRecord({"a": Array(dtype="float32", shape=(64,), stype="numpy.ndarray", data=b"\x00garbage"),
                        "b": Array(np.zeros((8, 8), dtype=np.float32))})


LORA_CASES = {
    "client error": lambda: _arrays_reply(7, error="CUDA out of memory"),
    "no metrics record": lambda: _arrays_reply(7, metrics=False),
    "no num-examples": lambda: _arrays_reply(7, metrics=MetricRecord({"server-round": 1})),
    "zero examples": lambda: _arrays_reply(7, metrics=_metrics(**{"num-examples": 0})),
    "negative examples": lambda: _arrays_reply(7, metrics=_metrics(**{"num-examples": -3})),
    "nan examples": lambda: _arrays_reply(7, metrics=_metrics(**{"num-examples": math.nan})),
    "huge examples": lambda: _arrays_reply(7, metrics=_metrics(**{"num-examples": 1e12})),
    "infinite train-loss": lambda: _arrays_reply(7, metrics=_metrics(**{"train-loss": math.inf})),
    "old round number": lambda: _arrays_reply(7, metrics=_metrics(**{"server-round": 0})),
    "unexpected record": lambda: _arrays_reply(7, extra={"extra": ConfigRecord({"x": 1})}),
    "no arrays": lambda: _arrays_reply(7, arrays=False),
    "extra tensor": lambda: _arrays_reply(7, arrays={**GOOD_LOCAL, "c": torch.zeros(1)}),
    "missing tensor": lambda: _arrays_reply(7, arrays={"a": GOOD_LOCAL["a"]}),
    "wrong shape": lambda: _arrays_reply(7, arrays={"a": torch.zeros(65), "b": GOOD_LOCAL["b"]}),
    "wrong dtype": lambda: _arrays_reply(7, arrays={"a": GOOD_LOCAL["a"].double(), "b": GOOD_LOCAL["b"]}),
    "nan value": lambda: _arrays_reply(7, arrays={"a": torch.full((64,), math.nan), "b": GOOD_LOCAL["b"]}),
    "inf value": lambda: _arrays_reply(7, arrays={"a": GOOD_LOCAL["a"], "b": torch.full((8, 8), -math.inf)}),
    "undecodable bytes": lambda: _arrays_reply(7, arrays=_garbage_array()),
    "oversized payload": lambda: _arrays_reply(7, extra={"ledger": ConfigRecord({"blob": b"\0" * 200_000})}),
    "norm above the bound": lambda: _arrays_reply(7, arrays={"a": torch.full((64,), 50.0), "b": GOOD_LOCAL["b"]}),
}

CODEC_CASES = {
    "empty payload": lambda c: b"",
    "truncated": lambda c: encode(parse(c), _delta(), 0)[:20],
    "bad magic": lambda c: b"XX" + encode(parse(c), _delta(), 0)[2:],
    "another codec": lambda c: encode(parse("quantize(4)" if c != "quantize(4)" else "zstd"), _delta(), 0),
    "other tensor names": lambda c: encode(parse(c), {"x": torch.zeros(64), "b": torch.zeros(8, 8)}, 0),
    "not bytes": lambda c: "a string",
}


def _lora_strategy(codec=None):
    flat = {"server.min-clients": 1, "server.max-update-norm": 100.0}
    if codec:
        flat["compression.up"] = codec
    cfg = Config.from_flat(flat)
    return build(cfg, LoraServer(cfg, GLOBAL))


def _check_dropped_and_unchanged(make_strategy, bad, good):
    """Alone, `bad` leaves nothing to aggregate; beside `good` the result is good's alone."""
    s = make_strategy()
    result = s.round(1, [bad])
    assert not result.applied and result.metrics["clients-dropped"] == 1 and result.metrics["clients-ok"] == 0
    assert result.dropped[0][0] == 7 and result.dropped[0][1]
    assert all(torch.equal(s.method.state[k], GLOBAL[k]) for k in GLOBAL)
    alone, both = make_strategy(), make_strategy()
    assert alone.round(1, [good]).applied and both.round(1, [bad, good]).applied
    assert all(torch.equal(both.method.state[k], alone.method.state[k]) for k in GLOBAL)
    return result.dropped[0][1]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("case", list(LORA_CASES))
def test_malformed_lora_reply(case):
    reason = _check_dropped_and_unchanged(_lora_strategy, LORA_CASES[case](), _arrays_reply(8))
    if case == "oversized payload":
        assert "exceeds the limit" in reason
    if case == "norm above the bound":
        assert "server.max-update-norm" in reason


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("case", list(CODEC_CASES))
def test_malformed_compressed_reply(codec, case):
    good = _codec_reply(8, encode(parse(codec), _delta(), 0))
    _check_dropped_and_unchanged(lambda: _lora_strategy(codec), _codec_reply(7, CODEC_CASES[case](codec)), good)


def _zo_up(idx, values, bits=8, k=K, mode=zo.PAIRS):
    return zo.encode(k, torch.tensor(idx), torch.tensor(values, dtype=torch.float64), bits, 0, mode)


GOOD_UP = _zo_up([1, 5, 9], [0.5, -1.0, 2.0])


def _patched_scale(payload, scale):
    head = list(struct.unpack_from("<2sBBIIf", payload))
    head[-1] = scale
    return struct.pack("<2sBBIIf", *head) + payload[struct.calcsize("<2sBBIIf"):]


def _zo_reply(node, up=GOOD_UP, record="zo", **over):
    metrics = {"num-examples": 10, "server-round": 1, "zo-version": 0, "zo-fingerprint": 1, "partition-id": 0,
               **over}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if record:
        content[record] = ConfigRecord({"up": up})
    return reply_to(node, content)


ZO_CASES = {
    "no zo record": lambda: _zo_reply(7, record=None),
    "wrong record": lambda: _zo_reply(7, record="update"),
    "up not bytes": lambda: _zo_reply(7, up="0102"),
    "empty up": lambda: _zo_reply(7, up=b""),
    "truncated": lambda: _zo_reply(7, up=GOOD_UP[:-2]),
    "trailing bytes": lambda: _zo_reply(7, up=GOOD_UP + b"\0"),
    "bad magic": lambda: _zo_reply(7, up=b"QQ" + GOOD_UP[2:]),
    "another K": lambda: _zo_reply(7, up=_zo_up([1], [0.5], k=K // 2)),
    "seed index outside the pool": lambda: _zo_reply(7, up=_zo_up([K + 3], [0.5])),
    "non-finite scalar": lambda: _zo_reply(7, up=_zo_up([1], [math.nan], bits=0)),
    "zero scale": lambda: _zo_reply(7, up=_patched_scale(GOOD_UP, 0.0)),
    "infinite scale": lambda: _zo_reply(7, up=_patched_scale(GOOD_UP, math.inf)),
    "scalars above the norm bound": lambda: _zo_reply(7, up=_zo_up([1, 2], [900.0, -900.0])),
    "oversized": lambda: _zo_reply(7, up=GOOD_UP + b"\0" * (zo.max_upload_bytes(K) + 1)),
    "stale version": lambda: _zo_reply(7, **{"zo-version": 3}),
    "other fingerprint": lambda: _zo_reply(7, **{"zo-fingerprint": 2}),
    "old round number": lambda: _zo_reply(7, **{"server-round": 0}),
    "zero examples": lambda: _zo_reply(7, **{"num-examples": 0}),
}


def _zo_strategy():
    cfg = Config.from_flat({"train.method": "zo", "zo.num-seeds": K, "server.min-clients": 1,
                            "server.max-update-norm": 100.0})
    return build(cfg, ZOServer(cfg, fingerprint=1))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("case", list(ZO_CASES))
def test_malformed_zo_reply(case):
    s = _zo_strategy()
    result = s.round(1, [ZO_CASES[case]()])
    state = s.method.state
    assert result.metrics["clients-dropped"] == 1 and state.version == 0
    assert torch.equal(state.acc, torch.zeros(K)) and result.dropped[0][1]
    alone, both = _zo_strategy(), _zo_strategy()
    alone.round(1, [_zo_reply(8)])
    both.round(1, [ZO_CASES[case](), _zo_reply(8)])
    a, b = alone.method.state, both.method.state
    assert b.version == a.version == 1
    assert torch.equal(b.acc, a.acc) and torch.equal(b.mag, a.mag)


@pytest.mark.usefixtures("task_identity")
def test_the_round_comes_from_the_message_a_reply_answers():
    """A standard Flower client (arrays + num-examples, no server-round metric) takes part; a
    reply to a message this round did not send is dropped, whatever it claims."""
    s = _lora_strategy()
    sent = list(s.configure_train(1, ArrayRecord(), ConfigRecord({}), type("G", (), {"get_node_ids": lambda self: [7, 8]})()))
    for i, m in enumerate(sent):
        m.metadata.__dict__["_message_id"] = f"id-{i}"  # as a grid stamps what it pushes
    to7 = next(m for m in sent if m.metadata.dst_node_id == 7)
    plain = Message(RecordDict({"arrays": ArrayRecord(GOOD_LOCAL), "metrics": MetricRecord({"num-examples": 10})}),
                    reply_to=to7)
    stray_to = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=8, message_type="train")
    stray_to.metadata.__dict__["_message_id"] = "an-old-message"
    stray = Message(RecordDict({"arrays": ArrayRecord(GOOD_LOCAL), "metrics": _metrics()}), reply_to=stray_to)
    result = s.round(1, [plain, stray], sent)
    assert result.applied and [u.node_id for u in result.updates] == [7]
    assert result.dropped == ((8, "reply to a message this round did not send"),)


def test_a_clients_traceback_becomes_one_short_line():
    from fedllm.protocol import short_reason

    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    boom()\n"
             "\x1b[31mRuntimeError: CUDA out of memory\x1b[0m\n\n")
    assert short_reason(trace) == "RuntimeError: CUDA out of memory"
    assert len(short_reason("x" * 5000)) == 300 and short_reason("") == "no reason given"


def test_the_matrix_is_large_enough():
    cases = len(LORA_CASES) + len(CODECS) * len(CODEC_CASES) + len(ZO_CASES)
    assert cases >= 20 and len(CODECS) == len(PRESETS) - 1 + 5  # every stage alone and every preset


# --- rounds with missing and failing clients, in process -----------------------------------

@pytest.mark.usefixtures("task_identity")
def test_missing_and_failing_clients_are_counted_and_the_round_completes(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.round-timeout": 1.0, "attack.clients": "2=crash"})
    run_dir = run(LocalGrid(3, silent={2}), cfg)  # node 2 never answers, node 3 (partition 2) raises
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in rows[1:]:
        assert r["clients-ok"] == 1 and r["clients-missing"] == 1 and r["clients-dropped"] == 1
        reasons = {d["node"]: d["reason"] for d in r["dropped"]}
        assert "round-timeout" in reasons["2"] and "Crash: attack.clients: partition 2 crashes" in reasons["3"]
    assert (run_dir / "adapter").is_dir()


@pytest.mark.usefixtures("task_identity")
def test_too_few_replies_retry_then_stop_with_the_checkpoint(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run
    from fedllm.server.round import RoundFailed

    grid = LocalGrid(2)
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.num-rounds": 1})
    run(grid, cfg)
    sent = grid.sent
    grid = LocalGrid(2)
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.run-name": "fails", "server.min-replies": 2,
                                                 "server.round-retries": 2, "attack.clients": "1=crash"})
    with pytest.raises(RoundFailed, match=r"round 1: too few valid replies \(1 valid of 2 sent; .*server.min-replies=2.*"
                                          r"most common drop reason \(3 of 3\): client error: Crash: attack.clients: partition 1"):
        run(grid, cfg)
    assert grid.sent == 3 * sent  # tried three times
    assert "too few valid replies" in (tmp_path / "fails" / "error.txt").read_text()


@pytest.mark.usefixtures("task_identity")
def test_resume_in_process_reaches_the_same_state_and_refuses_another_config(tiny_model_dir, tmp_path):
    from fedllm.server.loop import run

    over = {"server.strategy": "fedadam", "strategy.server-lr": 0.01, "compression.down": "int8",
            "server.num-rounds": 3}
    whole = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.run-name": "whole"}))
    part = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.run-name": "part",
                                                                    "server.num-rounds": 1}))
    with pytest.raises(ConfigError, match="server.resume: lora.rank is 16"):
        run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.resume": str(part),
                                                                 "lora.rank": 16}))
    run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.resume": str(part)}))
    a, b = load_file(whole / "adapter" / "adapter_model.safetensors"), load_file(part / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]


def test_checkpoint_errors_name_the_problem(tmp_path):
    flat = Config().to_flat()
    with pytest.raises(ConfigError, match="checkpoint.safetensors does not exist"):
        checkpoint.load(tmp_path, flat)
    (tmp_path / checkpoint.FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        checkpoint.load(tmp_path, flat)
    checkpoint.save(tmp_path, {"round": 4, "config": flat, "metrics": [], "ledger": None, "rng": rng.rng_state(),
                               "strategy": {"method": {}, "chain": {"optimizers": {}}}})
    assert not (tmp_path / (checkpoint.FILE + ".tmp")).exists()
    with pytest.raises(ConfigError, match="server.num-rounds: 3 is below the 4 rounds"):
        checkpoint.load(tmp_path, flat)
    assert checkpoint.load(tmp_path, {**flat, "server.num-rounds": 6})["round"] == 4


def test_checkpoint_is_data_only_and_round_trips_every_value(tmp_path):
    import random

    import numpy as np

    flat = Config().to_flat()
    state = {"global": {"w": torch.randn(3, 2), "b": torch.zeros(0)}, "history": [b"", b"\x00\xffpayload"],
             "moments": {"m": {"w": torch.ones(2, dtype=torch.float64)}}, "none": None, "nan": math.nan,
             "tuple": (1, "a", (2.5, None)), "big": 10**30, "$d": "a key that looks like a tag"}
    random.seed(3)
    saved = rng.rng_state()
    checkpoint.save(tmp_path, {"round": 1, "config": flat, "strategy": {"method": state, "chain": {"optimizers": {}}},
                               "rng": saved, "metrics": [{"round": 0}], "ledger": None})
    back = checkpoint.load(tmp_path, flat)
    got = back["strategy"]["method"]
    assert torch.equal(got["global"]["w"], state["global"]["w"]) and got["global"]["b"].shape == (0,)
    assert got["history"] == state["history"] and got["moments"]["m"]["w"].dtype == torch.float64
    assert got["none"] is None and math.isnan(got["nan"]) and got["tuple"] == (1, "a", (2.5, None))
    assert got["big"] == 10**30 and got["$d"] == state["$d"]
    rng.set_rng_state(back["rng"])
    assert random.random() == (random.seed(3), random.random())[1]
    assert np.array_equal(back["rng"]["numpy"][1], saved["numpy"][1])
    with pytest.raises(TypeError, match="cannot store object at .strategy.bad"):
        checkpoint.save(tmp_path, {"round": 1, "config": flat, "strategy": {"bad": object()}})


def test_a_pickle_planted_as_the_checkpoint_runs_nothing(tmp_path):
    """A run folder from someone else: its checkpoint is read as data, never unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / checkpoint.FILE).write_bytes(pickle.dumps({"format": checkpoint.FORMAT, "x": Boom()}))
    with pytest.raises(ConfigError, match="cannot read"):
        checkpoint.load(tmp_path, Config().to_flat())
    torch.save({"format": checkpoint.FORMAT, "x": Boom()}, tmp_path / checkpoint.FILE)  # torch's zip pickle too
    with pytest.raises(ConfigError, match="cannot read"):
        checkpoint.load(tmp_path, Config().to_flat())
    assert not (tmp_path / "pwned").exists()


# --- attack clients -----------------------------------------------------------------------

def test_poisoned_updates_by_hand():
    delta = {"w": torch.tensor([3.0, -4.0])}
    assert torch.equal(poisoned("sign-flip", delta, 0)["w"], torch.tensor([-3.0, 4.0]))
    assert torch.equal(poisoned("scale", delta, 0, scale=10.0)["w"], torch.tensor([30.0, -40.0]))
    assert torch.equal(poisoned("zero", delta, 0)["w"], torch.zeros(2))
    noise = poisoned("noise", delta, 0, noise_scale=2.0)["w"]
    assert math.isclose(float(noise.norm()), 10.0, rel_tol=1e-5) and not torch.allclose(noise / 2, delta["w"] / 5)
    local, glob = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([0.5, 2.0])}
    assert torch.equal(shifted(local, glob, lambda d: poisoned("sign-flip", d, 0))["w"], torch.tensor([0.0, 3.0]))
    assert torch.equal(shifted(local, glob, lambda d: poisoned("zero", d, 0))["w"], glob["w"])


def test_label_flip_gives_every_prompt_another_response():
    examples = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(7)]
    flipped = flip_labels(examples, seed=3)
    assert [e["instruction"] for e in flipped] == [e["instruction"] for e in examples]
    assert all(f["response"] != e["response"] for f, e in zip(flipped, examples))
    assert sorted(f["response"] for f in flipped) == sorted(e["response"] for e in examples)
    assert examples[0]["response"] == "a0"  # the caller's list is left alone


@pytest.mark.usefixtures("task_identity")
def test_attack_clients_send_what_they_claim(tiny_model_dir, tmp_path):
    """Through fedllm's client: replay resends its previous bytes, duplicate sends its victim's,
    sign-flip sends minus the honest update, crash raises."""
    from fedllm.client.attacks import Crash
    from fedllm.client.round import handle

    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"attack.clients": "1=replay,2=duplicate,3=sign-flip,4=crash",
                                                  "attack.victim": 0})
    contexts = {pid: Context(run_id=1, node_id=pid + 1, state=RecordDict(), run_config={},
                             node_config={"partition-id": pid, "num-partitions": 5}) for pid in range(5)}
    honest_cfg = cfg.replace(attack__clients="")

    def request(c, rnd, state):
        return RecordDict({"config": ConfigRecord({**c.to_flat(), "server-round": rnd}), "arrays": ArrayRecord(state)})

    from fedllm.methods.adapters import engine as lora

    glob = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)
    r1 = {pid: handle(request(cfg, 1, glob), contexts[pid]) for pid in range(4)}
    with pytest.raises(Crash, match="partition 4 crashes in round 1"):
        handle(request(cfg, 1, glob), contexts[4])
    arrays = {pid: r.array_records["arrays"].to_torch_state_dict() for pid, r in r1.items()}
    assert all(torch.equal(arrays[2][k], arrays[0][k]) for k in glob)  # the duplicate's bytes are the victim's
    honest3 = handle(request(honest_cfg, 1, glob), Context(run_id=1, node_id=9, state=RecordDict(), run_config={},
                                                          node_config={"partition-id": 3, "num-partitions": 5}))
    h3 = honest3.array_records["arrays"].to_torch_state_dict()
    assert all(torch.allclose(arrays[3][k] - glob[k], -(h3[k] - glob[k]), atol=1e-6) for k in glob)
    glob2 = {k: v + 0.01 for k, v in glob.items()}
    r2 = handle(request(cfg, 2, glob2), contexts[1])
    assert r2.metric_records["metrics"]["server-round"] == 2 and r2.metric_records["metrics"]["steps"] == 0
    replayed = r2.array_records["arrays"].to_torch_state_dict()
    assert all(torch.equal(replayed[k], arrays[1][k]) for k in glob)  # round 1's bytes again


# --- a real simulation: a crashing client, and SIGKILL then --resume -----------------------

def _fedllm_cmd(*args):
    return [sys.executable, "-m", "fedllm", *args]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _sets(tiny_model_dir, tmp_path, name, **over):
    sets = {"model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": name,
            "server.num-rounds": 3, "data.families": "parity,arithmetic", "data.train-per-family": 12,
            "data.eval-per-family": 4, "train.local-steps": 4, "train.lr": 0.02,
            "server.exact-match-examples": 2, "server.max-new-tokens": 2, **over}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.slow
def test_a_client_that_raises_mid_round_is_dropped_and_the_round_completes(tiny_model_dir, tmp_path):
    args = _sets(tiny_model_dir, tmp_path, "crash", **{"server.num-rounds": 2, "attack.clients": "2=crash"})
    proc = subprocess.run(_fedllm_cmd("simulate", "--num-clients", "3", *args), capture_output=True, text=True,
                          env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients-ok"] == 2 and r["clients-dropped"] == 1
        assert "partition 2 crashes" in r["dropped"][0]["reason"]
    assert rows[2]["eval-loss"] < rows[0]["eval-loss"]


def _ray_processes():
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.slow
@pytest.mark.parametrize("over", [
    {"server.strategy": "fedadam", "strategy.server-lr": 0.01, "compression.down": "int8", "lora.dropout": 0.1},
    # dpo's resume in process: test_dpo_composes_with_codecs_the_ledger_and_resume; killed, in the heavy tier
    pytest.param({"train.method": "dpo", "compression.down": "int8", "train.lr": 0.005}, marks=pytest.mark.heavy),
], ids=["lora-fedadam", "dpo"])
def test_sigkill_after_a_round_then_resume_gives_the_weights_of_an_uninterrupted_run(over, tiny_model_dir, tmp_path):
    whole = subprocess.run(_fedllm_cmd("simulate", "--num-clients", "2", *_sets(tiny_model_dir, tmp_path, "whole", **over)),
                           capture_output=True, text=True, env=_env(), timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    before = _ray_processes()
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(_fedllm_cmd("simulate", "--num-clients", "2", *_sets(tiny_model_dir, tmp_path, "killed", **over)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    deadline = time.time() + 600
    while not (run_dir / checkpoint.FILE).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the server and the simulation's Ray processes with it
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    time.sleep(2)
    for pid in _ray_processes() - before:  # Ray daemons that outlive their driver would slow the rest
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    done = checkpoint.read(run_dir / checkpoint.FILE)["round"]
    assert 1 <= done < 3 and not (run_dir / "summary.json").exists()
    resumed = subprocess.run(_fedllm_cmd("simulate", "--num-clients", "2", "--resume", str(run_dir)),
                             capture_output=True, text=True, env=_env(), timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run_dir} after round {done}" in resumed.stderr
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    ref = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("eval-loss") for r in rows] == [r.get("eval-loss") for r in ref]


def test_resume_cli_errors(tmp_path):
    from fedllm.cli import main

    assert main(["simulate", "--resume", str(tmp_path / "nope")]) == 2
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(Config().to_flat()))
    assert main(["simulate", "--resume", str(tmp_path / "run")]) == 2



@pytest.mark.usefixtures("task_identity")
def test_zo_resume_in_process_reaches_the_accumulators_up_to_the_perturbation_drift(tiny_model_dir, tmp_path):
    """A resumed zo client rebuilds its weights from the accumulators in one move, an
    uninterrupted one round by round: the float32 paths differ (DESIGN: in-place perturbation
    is not exact), so the scalars agree to about 1e-5, not bit for bit as LoRA's weights do."""
    from fedllm.server.loop import run

    over = {"train.method": "zo", "zo.num-seeds": 64, "train.local-steps": 3, "train.lr": 1e-4,
            "server.num-rounds": 3}
    whole = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.run-name": "whole"}))
    part = run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.run-name": "part",
                                                                    "server.num-rounds": 2}))
    run(LocalGrid(2), tiny_run_config(tiny_model_dir, tmp_path, **{**over, "server.resume": str(part)}))
    a = zo.Accumulators.from_bytes((whole / "zo" / "accumulators.bin").read_bytes(), 64)
    b = zo.Accumulators.from_bytes((part / "zo" / "accumulators.bin").read_bytes(), 64)
    assert a.version == b.version == 3 and torch.equal(a.acc != 0, b.acc != 0)
    assert float((a.acc - b.acc).norm() / a.acc.norm()) < 1e-4


def _living(pgid: str) -> list[str]:
    """Processes of a process group that are not zombies (dead, waiting to be reaped)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout
    return [pid for pid, group, stat in (line.split() for line in out.splitlines()) if group == pgid
            and not stat.startswith("Z")]


def _group_alive(pattern: str) -> set[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.slow
# one handler takes both signals (simulation.supervise): SIGINT in the heavy tier
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.heavy), signal.SIGTERM])
def test_a_signal_stops_a_simulation_within_seconds_and_leaves_nothing_behind(sig, tiny_model_dir, tmp_path):
    """SIGINT and SIGTERM end `fedllm simulate` within seconds: one line, exit 128 + signal, the
    last finished round's checkpoint kept (it loads), and no engine or Ray process left."""
    args = _sets(tiny_model_dir, tmp_path, "stopped", **{"server.num-rounds": 40, "train.local-steps": 40})
    proc = subprocess.Popen(_fedllm_cmd("simulate", "--num-clients", "2", *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env())
    run_dir = tmp_path / "stopped"
    deadline = time.time() + 600
    while not (run_dir / checkpoint.FILE).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    (engine,) = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    group = subprocess.run(["pgrep", "-g", engine], capture_output=True, text=True).stdout.split()
    assert len(group) >= 3  # the engine and Ray's processes share its process group
    t0 = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 15
    assert proc.returncode == 128 + sig
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fedllm: stopped by {signal.Signals(sig).name}; round ") and "--resume" in last
    assert "Traceback" not in err
    done = checkpoint.load(run_dir, Config.from_flat(json.loads((run_dir / "config.json").read_text())).to_flat())
    assert done["round"] >= 1
    deadline = time.time() + 10
    while _living(engine) and time.time() < deadline:  # SIGKILLed at once; exiting takes a moment
        time.sleep(0.2)
    assert _living(engine) == []


@pytest.mark.slow
def test_a_server_that_fails_ends_the_cli_within_seconds_with_its_reason(tiny_model_dir, tmp_path):
    """Flower's engine would wait on after its ServerApp raised; the CLI ends with the reason."""
    (tmp_path / "bad_rule.py").write_text("def rule(updates, cfg):\n    raise RuntimeError('my rule broke')\n")
    before = _ray_processes() | _group_alive("fedllm _engine")
    args = _sets(tiny_model_dir, tmp_path, "broken", **{"server.strategy": "bad_rule:rule", "server.num-rounds": 2})
    t0 = time.time()
    proc = subprocess.run(_fedllm_cmd("simulate", "--num-clients", "2", *args), capture_output=True, text=True,
                          env={**_env(), "PYTHONPATH": str(tmp_path)}, timeout=600)
    assert proc.returncode == 2
    assert "fedllm: error: the server stopped: RuntimeError: my rule broke" in proc.stderr
    assert "RuntimeError: my rule broke" in (tmp_path / "broken" / "error.txt").read_text()
    assert time.time() - t0 < 120
    deadline = time.time() + 10
    while (_ray_processes() | _group_alive("fedllm _engine")) - before and time.time() < deadline:
        time.sleep(0.2)  # killed at once; exiting and being reaped takes a moment
    assert (_ray_processes() | _group_alive("fedllm _engine")) - before == set()
