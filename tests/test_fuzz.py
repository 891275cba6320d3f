"""Property-based fuzzing of every decoder and parser that reads bytes or strings from outside:
thousands of generated and mutated inputs each, and nothing but the documented error type.

Deterministic (derandomize) so that CI sees the same inputs every run; the example counts are
the `max_examples` of each property (FUZZ below)."""

from __future__ import annotations

import json
import struct
from multiprocessing import Pipe

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedllm.client import worker
from fedllm.server import checkpoint
from fedllm.compression import PRESETS, decode, encode, parse
from fedllm.config import Config
from fedllm.errors import ConfigError, DataError, FedLLMError, PayloadError
from fedllm.methods.zo import engine as zo

FUZZ = 1500  # examples per property
SETTINGS = settings(max_examples=FUZZ, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
NAMES = ["a.lora_A.weight", "a.lora_B.weight"]
DELTA = {"a.lora_A.weight": torch.linspace(-1, 1, 32).reshape(4, 8), "a.lora_B.weight": torch.ones(6, 4) * 0.1}
CODECS = ["topk(0.3)", "randk(0.5, unbiased=False)", "quantize(4)", "cluster(4)", "zstd"] + \
    [p for p in PRESETS if p != "none"]
K = 64


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """A valid payload with bytes flipped, cut, inserted or appended, or random bytes."""
    n = len(valid)
    flip = st.tuples(st.integers(0, max(n - 1, 0)), st.integers(1, 255)).map(
        lambda t: valid[:t[0]] + bytes([valid[t[0]] ^ t[1]]) + valid[t[0] + 1:] if n else valid)
    cut = st.integers(0, n).map(lambda i: valid[:i])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(
        lambda t: valid[:t[0]] + t[1] + valid[t[0]:])
    many = st.lists(st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: bytes(_apply(valid, edits)))
    return st.one_of(flip, cut, insert, many, st.binary(max_size=4 * n + 64))


def _apply(valid: bytes, edits) -> bytearray:
    out = bytearray(valid)
    for i, b in edits:
        if i < len(out):
            out[i] = b
    return out


@pytest.mark.parametrize("spec", CODECS)
def test_codec_payloads(spec):
    codec = parse(spec)
    valid = encode(codec, DELTA, seed=1)

    @SETTINGS
    @given(mutations(valid))
    def check(payload):
        try:
            out = decode(codec, payload, NAMES)
        except PayloadError:
            return
        assert set(out) == set(NAMES) and all(torch.isfinite(t).all() for t in out.values())

    check()


ZO_VALID = [zo.encode(K, torch.tensor([1, 5, 9, 63]), torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64),
                      bits, 0, mode) for bits in (0, 2, 4, 8) for mode in (zo.PAIRS, zo.SUMS)]


@SETTINGS
@given(st.sampled_from(ZO_VALID).flatmap(mutations))
def test_zo_payloads(payload):
    try:
        out = zo.decode(payload, K)
    except PayloadError:
        return
    assert out.shape == (K,) and torch.isfinite(out).all()


def _down_messages():
    state, history = zo.Accumulators(K), []
    for r in range(3):
        payload = zo.encode(K, torch.tensor([r, r + 7]), torch.tensor([1.0, -2.0], dtype=torch.float64), 8, r, zo.SUMS)
        state.apply(payload)
        history.append(payload)
    return [zo.encode_down(state, history, since) for since in (None, 0, 1, 2)]


@SETTINGS
@given(st.sampled_from(_down_messages()).flatmap(mutations), st.integers(0, 3))
def test_zo_downlink_messages(raw, held):
    local = zo.Accumulators(K)
    local.version = held
    try:
        out = zo.decode_down(raw, local)
    except PayloadError:
        return
    assert torch.isfinite(out.acc).all() and out.version >= 0


CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
WORDS = st.sampled_from(["topk", "randk", "quantize", "cluster", "zstd", "int8", "fedzip", "(", ")", ",", ">", "->",
                         "0.5", "4", "-1", "1e9", "nan", "bits=", "block=", "'x'", "[1]", " ", "lambda: 0", "__import__"])


@SETTINGS
@given(st.one_of(st.text(CHARS, max_size=40), st.lists(WORDS, max_size=12).map("".join)))
def test_codec_chain_strings(spec):
    try:
        parse(spec)
    except ConfigError:
        pass


KEYS = ["lora.client-ranks", "ledger.penalties", "attack.clients", "compression.up", "data.families",
        "server.strategy", "train.method", "ledger.scorer"]
SPEC_WORDS = st.sampled_from(["1", "0", "-3", "4,8", "noise=0.5", "free-rider=2", "3=zero", "a=b", "=", ",", ">",
                              "median", "fedadam", "krum > fedavgm", "exact-lora", "os:system", "nan", " "])


@SETTINGS
@given(st.sampled_from(KEYS), st.one_of(st.text(CHARS, max_size=30), st.lists(SPEC_WORDS, max_size=6).map("".join)))
def test_config_strings(key, value):
    from strategies import resolve

    try:
        resolve(Config.from_flat({key: value}))
    except ConfigError:
        pass


@SETTINGS
@given(st.dictionaries(st.sampled_from(["lora.rank", "train.lr", "zo.bits", "server.fraction-train", "dp.clipping-norm",
                                        "strategy.trim-fraction", "ledger.stake", "data.max-length"]),
                       st.one_of(st.text(CHARS, max_size=12), st.floats(allow_nan=True), st.integers(-10**12, 10**12),
                                 st.booleans()), max_size=4))
def test_config_values(flat):
    try:
        Config.from_flat(flat)
    except ConfigError:
        pass


def _rows_file(tmp_path_factory):
    return tmp_path_factory.mktemp("rows")


@settings(max_examples=FUZZ // 3, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.sampled_from([".jsonl", ".json", ".csv"]),
       st.one_of(st.binary(max_size=300),
                 st.lists(st.dictionaries(st.sampled_from(["instruction", "response", "input", "family", "x"]),
                                          st.one_of(st.text(CHARS, max_size=20), st.integers(), st.none(),
                                                    st.lists(st.integers(), max_size=2),
                                                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))),
                          max_size=5).map(lambda rows: "\n".join(json.dumps(r) for r in rows).encode())))
def test_data_files(tmp_path_factory, suffix, content):
    from fedllm.config import DataConfig
    from fedllm.data import load_source

    path = _rows_file(tmp_path_factory) / f"data{suffix}"
    path.write_bytes(content)
    try:
        rows = load_source(str(path), DataConfig())
    except DataError:
        return
    assert all(isinstance(r["instruction"], str) and isinstance(r["response"], str) for r in rows)


@settings(max_examples=FUZZ // 3, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=200).flatmap(lambda b: st.sampled_from([
    b, struct.pack("<Q", len(b)) + b, struct.pack("<Q", 20) + b'{"__metadata__":{}}' + b])))
def test_checkpoint_files(tmp_path_factory, raw):
    path = _rows_file(tmp_path_factory) / checkpoint.FILE
    path.write_bytes(raw)
    with pytest.raises(ConfigError):
        checkpoint.read(path)


@SETTINGS
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_worker_socket_frames(frames):
    a, b = Pipe()
    with a, b:
        for frame in frames:
            a.send_bytes(frame)
        a.close()
        try:
            head, *parts = worker.recv_parts(b)
        except PayloadError:
            return
        assert isinstance(head, dict) and len(parts) == head["parts"]


def test_the_fuzzing_counts_are_what_the_note_says():
    assert FUZZ >= 1000 and issubclass(PayloadError, FedLLMError) and issubclass(DataError, FedLLMError)
