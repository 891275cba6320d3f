"""Property-based fuzzing of the data readers (fedllm.data.files): JSONL, JSON, CSV and Parquet
files, and the rows a hub dataset hands over, each read with `load_source` for instruction data
and for preference pairs; the built-in suite for any data.families text. Whatever the bytes,
the answer is examples that mean something or a FedLLMError, never another exception.

Deterministic (derandomize), as tests/test_fuzz.py; FUZZ examples per reader."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedllm.config import DataConfig
from fedllm.data.builtin import builtin_splits, parse_families, with_rejected
from fedllm.data.files import load_source, to_examples
from fedllm.errors import ConfigError, FedLLMError

logging.getLogger("fedllm.data").setLevel(logging.ERROR)  # the counts of dropped examples, thousands of times

FUZZ = 2000  # examples per reader
SETTINGS = settings(max_examples=FUZZ, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
CFG = DataConfig()
SHM = Path("/dev/shm")  # in memory: rewriting a file on a disk's overlay costs milliseconds, thousands of times
SCRATCH = Path(tempfile.mkdtemp(prefix="fedllm-data-fuzz-",
                                dir=SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None))
atexit.register(shutil.rmtree, SCRATCH, True)
KEYS = ["instruction", "response", "input", "family", "prompt", "chosen", "rejected", "x", ""]
PIECES = ["", " ", "a", "42", "Сколько", "東京", "مرحبا", "🎉", "\u0301", "\x00", "\ud800", "\n", '"', ",", "\\", "[",
          "{"]


def value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON-like value: text from odd pieces (blank, other scripts, NUL, a lone surrogate,
    quotes and brackets), numbers, None, booleans, or a short list or object of them."""
    pick = rng.randrange(10 if depth < 2 else 7)
    if pick < 4:
        return "".join(rng.choice(PIECES) for _ in range(rng.randrange(4)))
    if pick == 4:
        return rng.choice([None, True, False, 0, -1, 2 ** 70, 0.5, float("nan"), float("inf")])
    if pick < 7:
        return rng.choice(["q", "a", "b", "a "])  # the same answer twice, blank-padded, makes degenerate pairs
    if pick < 9:
        return {rng.choice(KEYS): value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return [value(rng, depth + 1) for _ in range(rng.randrange(3))]


def rows_of(seed: int) -> list:
    """A few rows, most of them objects holding most of the fields the readers look for, most of
    those text."""
    rng = random.Random(seed)
    out = []
    for _ in range(rng.randrange(5)):
        if rng.random() < 0.9:
            out.append({k: field(rng) for k in KEYS if rng.random() < 0.85})
        else:
            out.append(value(rng))
    return out


def field(rng: random.Random) -> Any:
    if rng.random() < 0.75:
        head = rng.choice(["q", "a", "b", "Сколько", "東京", "🎉"])
        return head + "".join(rng.choice(PIECES) for _ in range(rng.randrange(2)))
    return value(rng)


ROWS = st.integers(0, 2 ** 32).map(rows_of)
DEEP = st.integers(1, 4000).map(lambda d: '{"instruction": ' + "[" * d + "]" * d + ', "response": "a"}')


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """`valid` with bytes flipped, cut or inserted, or random bytes."""
    n = len(valid)
    flip = st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
        lambda t: valid[:t[0]] + bytes([valid[t[0]] ^ t[1]]) + valid[t[0] + 1:])
    cut = st.integers(0, n).map(lambda i: valid[:i])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(
        lambda t: valid[:t[0]] + t[1] + valid[t[0]:])
    return st.one_of(flip, cut, insert, st.binary(max_size=2 * n))


def jsonl(rows: list) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode("utf-8", "surrogatepass")


def csv_bytes(rows: list) -> bytes:
    keys = sorted({k for r in rows if isinstance(r, dict) for k in r} | {"instruction", "response"})
    lines = [",".join(keys)] + [",".join(json.dumps(r.get(k, "")) if isinstance(r, dict) else json.dumps(r)
                                         for k in keys) for r in rows]
    return "\n".join(lines).encode("utf-8", "surrogatepass")


VALID = [{"instruction": "q", "response": "a", "prompt": "p", "chosen": "c", "rejected": "r", "family": "f"},
         {"instruction": "Сколько?", "input": "2+2", "response": "4", "prompt": "東京?", "chosen": "是", "rejected": "否"}]


def read(name: str, payload: bytes, preference: bool) -> None:
    """`load_source` on `payload` written as `name`: examples with text fields, or a FedLLMError."""
    path = SCRATCH / name
    path.write_bytes(payload)
    try:
        examples = load_source(str(path), CFG, preference)
    except FedLLMError as err:
        assert "\n" not in str(err)
        return
    check(examples, preference)


def check(examples: list[dict[str, str]], preference: bool) -> None:
    assert examples and all(isinstance(v, str) for e in examples for v in e.values())
    for e in examples:
        assert e["response"].strip() and (e["instruction"].strip() or e["input"].strip())
        if preference:
            assert e["rejected"].strip() and e["rejected"].strip() != e["response"].strip()


@SETTINGS
@given(st.one_of(ROWS.map(jsonl), DEEP.map(str.encode), mutated(jsonl(VALID))), st.booleans())
def test_jsonl_files(payload, preference):
    read("data.jsonl", payload, preference)


@SETTINGS
@given(st.one_of(ROWS.map(lambda r: json.dumps(r, indent=1).encode("utf-8", "surrogatepass")),
                 DEEP.map(lambda d: f"[\n{d}\n]".encode()),
                 mutated(json.dumps(VALID, indent=1).encode())), st.booleans())
def test_json_files(payload, preference):
    read("data.json", payload, preference)


@SETTINGS
@given(st.one_of(ROWS.map(csv_bytes), mutated(csv_bytes(VALID)),
                 st.integers(0, 300_000).map(lambda n: b"instruction,response\nq," + b"x" * n)), st.booleans())
def test_csv_files(payload, preference):
    read("data.csv", payload, preference)


def parquet_bytes(rows: list) -> bytes:
    table = pa.Table.from_pylist([r for r in rows if isinstance(r, dict)] or [{"instruction": None}])
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def flat_rows(seed: int) -> list[dict]:
    """Rows pyarrow can type: each column one kind of value (text, an integer, a list), or None."""
    rng = random.Random(seed)
    kinds = {k: str if rng.random() < 0.8 else rng.choice([int, list]) for k in KEYS}
    make = {str: lambda: rng.choice("qab") + "".join(rng.choice(PIECES[:8]) for _ in range(rng.randrange(3))),
            int: lambda: rng.randrange(-9, 9), list: lambda: [rng.randrange(3)] * rng.randrange(3)}
    return [{k: None if rng.random() < 0.1 else make[kinds[k]]() for k in KEYS if rng.random() < 0.9}
            for _ in range(rng.randrange(1, 5))]


@SETTINGS
@given(st.one_of(st.integers(0, 2 ** 32).map(lambda seed: parquet_bytes(flat_rows(seed))),
                 mutated(parquet_bytes(VALID))), st.booleans())
def test_parquet_files(payload, preference):
    read("data.parquet", payload, preference)


@SETTINGS
@given(ROWS, st.booleans())
def test_hub_rows(rows, preference):
    """Rows as a hub dataset hands them over (any JSON-like values), mapped to examples."""
    try:
        examples = to_examples(rows, CFG, "hub-name", preference)
    except FedLLMError:
        return
    check(examples, preference)


FAMILY_WORDS = st.sampled_from(["all", "parity", "arithmetic", "reverse", "units", "sorting", "dates", "word_length",
                                "", ",", " ", "nope", "Parity", "all,parity"])


@SETTINGS
@given(st.lists(FAMILY_WORDS, max_size=4).map(",".join), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2 ** 31))
def test_builtin_families_and_pairs(spec, n_train, n_eval, seed):
    """The built-in suite for any data.families text: a ConfigError naming the key, or splits that
    never share a prompt and whose preference pairs are never degenerate."""
    try:
        families = parse_families(spec)
    except ConfigError as err:
        assert str(err).startswith("data.families")
        return
    train, held_out = builtin_splits(families, n_train, n_eval, seed)
    assert not {(e["instruction"], e["input"]) for e in train} & {(e["instruction"], e["input"]) for e in held_out}
    check(with_rejected(train + held_out, seed), preference=True)
