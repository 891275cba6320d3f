"""Small and degenerate data (fedllm.data.checks, partition, files): too few examples for the
clients is one line naming data.partition and the counts, never the partitioner's IndexError;
degenerate examples and pairs are left out with counts; what a reader cannot read names
file:line."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from fedllm.config import Config, DataConfig
from fedllm.data import check_sizes, load_source, load_splits, partition, screen
from fedllm.data import files
from fedllm.data.checks import warn_once
from fedllm.data.templates import batches
from fedllm.errors import DataError, FedLLMError


def examples(n: int, families: str = "ab") -> list[dict[str, str]]:
    return [{"instruction": f"q{i}", "input": "", "response": f"a{i}", "family": families[i % len(families)]}
            for i in range(n)]


@pytest.mark.parametrize("scheme, n, clients, need", [("iid", 2, 4, 4), ("task", 3, 4, 4), ("dirichlet", 4, 4, 5),
                                                      ("iid", 1, 2, 2)])
def test_too_few_examples_for_the_clients_names_the_data_keys(scheme, n, clients, need):
    """flwr-datasets' IidPartitioner indexed past the data here (IndexError in every client)."""
    for pid in range(clients):
        with pytest.raises(DataError, match=rf"^data: {n} training examples cannot give {clients} clients one each "
                                            rf"\(data.partition={scheme} needs at least {need}\); use at most "):
            partition(examples(n), DataConfig(partition=scheme), clients, pid)


def test_a_task_family_shared_by_more_clients_than_it_has_examples():
    data = examples(1, "a") + [{**e, "family": "b"} for e in examples(3)]  # a: 1 example, shared by clients 0 and 2
    sizes = [len(partition(data, DataConfig(partition="task"), 3, pid)) for pid in (0, 1)]
    assert sizes == [1, 3]
    with pytest.raises(DataError, match=r"data.partition=task: partition 2 of 3 gets none of the 4 training examples"):
        partition(data, DataConfig(partition="task"), 3, 2)


def test_check_sizes_counts_and_warns_about_partitions_below_the_batch(caplog):
    cfg = Config.from_flat({"data.partition": "iid", "train.batch-size": 3})
    with caplog.at_level(logging.WARNING, logger="fedllm.data"):
        sizes = check_sizes(examples(10), examples(1), cfg, 4)
    assert sizes == [3, 3, 2, 2] and sum(sizes) == 10
    assert "2 of 4 clients hold fewer than train.batch-size=3 examples (fewest: 2, client 2)" in caplog.text
    with pytest.raises(DataError, match="no held-out examples.*data.eval-fraction"):
        check_sizes(examples(10), [], cfg, 4)
    with pytest.raises(FedLLMError, match="use at most 10 clients"):
        check_sizes(examples(10), examples(1), cfg, 11)


def test_the_preflight_refuses_too_little_data_before_an_engine_starts():
    from fedllm.preflight import check_partitions

    cfg = Config.from_flat({"data.families": "parity,arithmetic", "data.train-per-family": 1, "data.partition": "iid"})
    train, held_out = load_splits(cfg.data)
    with pytest.raises(FedLLMError, match=r"^data: 2 training examples cannot give 4 clients one each"):
        check_partitions(train, cfg, 4, held_out)


def test_batches_of_a_partition_smaller_than_the_batch_are_the_whole_partition():
    rows = [{"input_ids": [i + 1], "labels": [i + 1]} for i in range(3)]
    stream = batches(rows, 8, 0, torch.Generator().manual_seed(0))
    for _ in range(5):
        assert sorted(next(stream)["input_ids"].flatten().tolist()) == [1, 2, 3]
    with pytest.raises(DataError, match="no training examples"):
        next(batches([], 8, 0, torch.Generator()))


def test_degenerate_pairs_are_left_out_with_counts(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    pairs += [{"prompt": "q9", "chosen": "same", "rejected": " same "}, {"prompt": " ", "chosen": "a", "rejected": "b"},
              {"prompt": "q8", "chosen": "a", "rejected": ""}]
    path.write_text("\n".join(json.dumps(p) for p in pairs))
    warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fedllm.data"):
        kept = load_source(str(path), DataConfig(), preference=True)
    assert [e["instruction"] for e in kept] == ["q0", "q1", "q2", "q3"]
    assert ("3 of 7 pairs left out (1 with the same chosen and rejected answer; 1 with a blank prompt "
            "(data.prompt-field); 1 with a blank rejected answer (data.rejected-field))") in caplog.text
    path.write_text(json.dumps({"prompt": "q", "chosen": "x", "rejected": "x"}))
    with pytest.raises(DataError, match=r"pairs.jsonl: all 1 pairs are degenerate \(1 with the same chosen and "
                                        r"rejected answer\)"):
        load_source(str(path), DataConfig(), preference=True)


def test_blank_instruction_examples_are_left_out():
    blank = [{"instruction": " ", "input": "", "response": "a"}, {"instruction": "q", "input": "", "response": "\n"}]
    assert screen(examples(2) + blank + [{**blank[0], "input": "2 + 2"}], "f") == examples(2) + [
        {**blank[0], "input": "2 + 2"}]  # an input alone is a prompt
    with pytest.raises(DataError, match=r"f: all 1 examples are degenerate \(1 with a blank response "
                                        r"\(data.response-field\)\)"):
        screen([{"instruction": "q", "input": "", "response": " "}], "f")


@pytest.mark.parametrize("name, text, message", [
    ("deep.jsonl", '{"instruction": "a", "response": "b"}\n{"x": ' + "[" * 50000 + "]" * 50000 + "}\n",
     r"deep.jsonl:2: JSON nested too deeply"),
    ("deep.json", '[\n{"instruction": "a", "response": "b"},\n{"x": ' + "[" * 50000 + "]" * 50000 + "}]",
     r"deep.json:3: JSON nested too deeply"),
    ("bad.json", '[\n{"instruction": "a",\n "response": }]', r"bad.json:3: not JSON: Expecting value"),
    ("huge.csv", "instruction,response\na,b\nc," + "x" * 200_000 + "\n", r"huge.csv:3: cannot read CSV: field larger"),
    ("surrogate.jsonl", '{"instruction": "a\\ud800", "response": "b"}',
     r"row 0, column 'instruction': not valid Unicode"),
])
def test_unreadable_files_name_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_source(str(path), DataConfig())


def test_bytes_that_are_not_utf8_and_huge_lines_name_their_line(tmp_path, monkeypatch):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r"bytes.jsonl:2: not UTF-8 text \(byte 0xff\)"):
        load_source(str(path), DataConfig())
    monkeypatch.setattr(files, "MAX_LINE", 1 << 20)
    path.write_text('{"instruction": "a", "response": "b"}\n' + json.dumps({"instruction": "q" * (2 << 20)}) + "\n")
    with pytest.raises(DataError, match=r"bytes.jsonl:2: a line longer than 1 MiB"):
        load_source(str(path), DataConfig())
