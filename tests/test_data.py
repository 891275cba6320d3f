import csv
import datetime as dt
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedllm import ConfigError, DataError
from fedllm.config import DataConfig
from fedllm.data import FAMILIES, IGNORE, encode, load_splits, partition, prompt_text
from fedllm.data.builtin import builtin_splits, parse_families


def test_builtin_suite_has_six_or_more_tagged_families():
    train, held_out = builtin_splits(list(FAMILIES), 20, 5, seed=0)
    assert len(FAMILIES) >= 6
    assert Counter(e["family"] for e in train) == {f: 20 for f in FAMILIES}
    assert Counter(e["family"] for e in held_out) == {f: 5 for f in FAMILIES}


def test_builtin_is_deterministic_and_seeded():
    a, _ = builtin_splits(list(FAMILIES), 10, 2, seed=1)
    b, _ = builtin_splits(list(FAMILIES), 10, 2, seed=1)
    c, _ = builtin_splits(list(FAMILIES), 10, 2, seed=2)
    assert a == b
    assert a != c


def test_held_out_prompts_never_in_train():
    train, held_out = builtin_splits(list(FAMILIES), 60, 10, seed=0)
    seen = {(e["instruction"], e["input"]) for e in train}
    assert not seen & {(e["instruction"], e["input"]) for e in held_out}
    assert len(seen) == len(train)  # no duplicates either


def test_answers_are_verifiable():
    train, _ = builtin_splits(list(FAMILIES), 40, 1, seed=3)
    for e in train:
        family, inp, resp = e["family"], e["input"], e["response"]
        if family == "arithmetic":
            a, op, b = inp.split()
            assert int(resp) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        elif family == "reverse":
            assert resp == inp[::-1]
        elif family == "sorting":
            assert resp == ", ".join(map(str, sorted(int(x) for x in inp.split(", "))))
        elif family == "dates":
            days = int(e["instruction"].split()[4])
            assert dt.date.fromisoformat(inp) + dt.timedelta(days=days) == dt.date.fromisoformat(resp)
        elif family == "word_length":
            assert int(resp) == len(inp)
        elif family == "parity":
            assert resp == ("even" if int(inp) % 2 == 0 else "odd")
        elif family == "units":
            n, unit = inp.split()
            assert int(resp) % int(n) == 0 and unit in e["instruction"]


def test_unknown_family_is_named():
    with pytest.raises(ConfigError, match="data.families"):
        parse_families("arithmetic,astrology")


ROWS = [{"q": f"question {i}", "ctx": f"c{i}", "a": f"answer {i}", "topic": "ab"[i % 2]} for i in range(20)]


def _write(path, rows):
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_with_custom_fields(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    _write(path, ROWS)
    cfg = DataConfig(source=str(path), instruction_field="q", input_field="ctx", response_field="a",
                     label_field="topic", eval_fraction=0.2)
    train, held_out = load_splits(cfg)
    assert len(train) == 16 and len(held_out) == 4
    everything = sorted(train + held_out, key=lambda e: int(e["instruction"].split()[1]))
    assert everything[3] == {"instruction": "question 3", "input": "c3", "response": "answer 3", "family": "b"}


def test_missing_field_names_file_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    _write(path, [{"q": "x", "a": "y"}, {"q": "x2"}])
    cfg = DataConfig(source=str(path), instruction_field="q", response_field="a")
    with pytest.raises(DataError, match=r"data\.jsonl.*row 1.*'a'"):
        load_splits(cfg)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_splits(DataConfig(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "data.txt").write_text("hi")
    with pytest.raises(DataError, match="suffix"):
        load_splits(DataConfig(source=str(tmp_path / "data.txt")))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.json"):
        load_splits(DataConfig(source=str(tmp_path / "broken.json")))


def _parts(scheme, n=4, **kw):
    train, _ = builtin_splits(list(FAMILIES), 30, 1, seed=0)
    cfg = DataConfig(partition=scheme, **kw)
    return train, [partition(train, cfg, n, i) for i in range(n)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "task"])
def test_partitions_cover_data_without_overlap(scheme):
    train, parts = _parts(scheme)
    key = lambda e: (e["instruction"], e["input"])  # noqa: E731
    flat = [key(e) for p in parts for e in p]
    assert len(flat) == len(set(flat)), "an example landed on two clients"
    assert set(flat) <= {key(e) for e in train}
    assert all(parts), "an empty partition"
    if scheme != "task":
        assert len(flat) == len(train)


def test_iid_partitions_are_balanced():
    _, parts = _parts("iid")
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_task_partition_is_non_iid_by_family():
    _, parts = _parts("task")
    families = [{e["family"] for e in p} for p in parts]
    assert sorted(len(f) for f in families) == [1, 2, 2, 2]  # 7 families dealt to 4 clients
    assert set().union(*families) == set(FAMILIES)
    assert sum(len(f) for f in families) == len(FAMILIES)  # no family on two clients


def test_task_partition_with_more_clients_than_families():
    train, parts = _parts("task", n=10)
    assert all(len({e["family"] for e in p}) == 1 for p in parts)
    assert sum(len(p) for p in parts) == len(train)


def test_dirichlet_small_alpha_is_skewed():
    _, parts = _parts("dirichlet", alpha=0.1)
    top_share = [Counter(e["family"] for e in p).most_common(1)[0][1] / len(p) for p in parts]
    assert max(top_share) > 0.5


def test_partition_id_out_of_range():
    with pytest.raises(ConfigError, match="partition-id"):
        partition([], DataConfig(), 2, 5)


def test_file_problems_are_named_by_line_and_column(tmp_path):
    from fedllm.data import load_source

    cfg = DataConfig()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response":\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: not a JSON line"):
        load_source(str(bad), cfg)
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufeffinstruction,response\nq,a\n".encode("utf-8"))
    assert load_source(str(bom), cfg) == [{"instruction": "q", "response": "a", "input": "", "family": "all"}]
    nested = tmp_path / "nested.jsonl"
    nested.write_text('{"instruction": {"text": "q"}, "response": "a"}\n')
    with pytest.raises(DataError, match=r"row 0, column 'instruction': a dict, not text"):
        load_source(str(nested), cfg)


def test_exact_duplicates_never_land_on_both_sides(tmp_path):
    rows = [{"instruction": f"q{i % 5}", "response": f"a{i % 5}"} for i in range(40)]  # 5 distinct, 8 times each
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, held = load_splits(DataConfig(source=str(path), eval_fraction=0.2))
    assert len(train) + len(held) == 5
    assert not {e["instruction"] for e in train} & {e["instruction"] for e in held}


def test_truncation_keeps_the_end_of_the_prompt_and_the_response(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_answer = {"instruction": "Say the numbers.", "input": "", "response": " ".join(str(i) for i in range(400))}
    row = encode(tok, long_answer, max_length=64, system_prompt="Be brief.")
    prompt_ids = tok(prompt_text(tok, long_answer, "Be brief."), add_special_tokens=False)["input_ids"]
    n_prompt = sum(1 for x in row["labels"] if x == IGNORE)
    assert len(row["input_ids"]) == 64 and n_prompt == 16  # a quarter stays for the question's end
    assert row["input_ids"][:16] == prompt_ids[-16:] and row["labels"][16:] == row["input_ids"][16:]
    both_long = {**long_answer, "instruction": " ".join(["word"] * 300)}
    row = encode(tok, both_long, max_length=64)
    n_prompt = sum(1 for x in row["labels"] if x == IGNORE)
    prompt_ids = tok(prompt_text(tok, both_long), add_special_tokens=False)["input_ids"]
    assert n_prompt == 16 and row["input_ids"][:16] == prompt_ids[-16:]
    short = {"instruction": " ".join(["word"] * 300), "input": "", "response": "42"}
    row = encode(tok, short, max_length=64)
    resp = tok("42", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(row["input_ids"]) == 64 and row["input_ids"][-len(resp):] == resp  # a long prompt loses its start
