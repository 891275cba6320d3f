"""Every command that reads a run directory reads through fedllm.files: a damaged or foreign file
is one line naming the file (and line and field), exit 2 from the CLI, and nothing written over.
Hand-made cases first, then property-based fuzzing of each reader (FUZZ inputs each, derandomized
as in test_fuzz.py; no model and no real plotting, so they stay fast)."""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedllm.cli import main
from fedllm.errors import ConfigError, FedLLMError
from fedllm.files import MAX_DEPTH, FileFormatError, Maybe, check, parse_json, read_json, read_jsonl
from fedllm.reporting import report
from fedllm.reporting.runlog import (format_summary, ledger_view, read_config, read_metrics, summary,
                                     write_atomically)

ROOT = Path(__file__).resolve().parents[1]
ROW = {"round": 1, "train-loss": 1.2, "eval-loss": 1.1, "exact-match": 0.5, "rouge-l": 0.25,
       "bytes-up": {"1": 100, "2": 120}, "bytes-down": {"1": 200}, "round-seconds": 1.5, "dropped": [],
       "clients": {"1": {"partition-id": 0, "train-loss": 1.3}},
       "families": {"parity": {"eval-loss": 1.0, "exact-match": None, "tokens": 4}},
       "lm-eval": {"fedllm_builtin": {"exact_match": 0.5}},
       "ledger": {"scores": {"1": 0.9}, "rewards": {"1": 10 ** 18}, "slashed": {}}}
CHAIN = {"contract": "0x" + "ab" * 20, "chain": "tester", "slashed-to": "pool", "deploy-gas": 1}
ROUND = {"round": 1, "gas-record": 90000, "root": "00", "clients": [
    {"account": "0x" + "cd" * 20, "score": 0.5, "flags": ["noise"], "cumulative": 10 ** 18, "partition": 0,
     "slashed": 10 ** 17, "evidence": "ee"}]}
ACCOUNTS = {"pool": 10 ** 19, "allocated": 0, "burned": 0, "accounts": {"0x" + "cd" * 20: {
    "partition": 0, "stake": 10 ** 18, "slashed": 0, "earned": 1, "claimed": 1, "pending": 0}}}


def _run(tmp_path: Path, rows=(ROW,), config=None, name="run") -> Path:
    run = tmp_path / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"round": 0, "eval-loss": 2.0}, *rows]))
    (run / "config.json").write_text(json.dumps(config or {"lora.rank": 8}))
    return run


def _ledger(run: Path, chain=CHAIN, rounds=(ROUND,), accounts=ACCOUNTS) -> Path:
    (run / "ledger").mkdir()
    (run / "ledger" / "chain.json").write_text(chain if isinstance(chain, str) else json.dumps(chain))
    for r in rounds:
        (run / "ledger" / f"round-{r['round']:04d}.json").write_text(json.dumps(r))
    if accounts is not None:
        (run / "ledger" / "accounts.json").write_text(json.dumps(accounts))
    return run


class _Fake:
    """Stands in for matplotlib's pyplot, figures and axes: every call is accepted and ignored."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs):
        return self

    def __getitem__(self, i):
        return self

    def subplots(self, *args, **kwargs):
        return _Fake(), _Fake()


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr(report, "_pyplot", lambda: _Fake())


# --- the checked path, by hand ---------------------------------------------------------------
def test_check_names_the_field_and_what_it_should_be():
    spec = {"round": int, "bytes-up": Maybe({"*": float}), "clients": Maybe([{"score": (float, None)}])}
    check({"round": 3, "bytes-up": {"1": 2.5, "2": 7}, "clients": [{"score": None}]}, spec, "f")
    cases = [({}, "f: field 'round' is missing"),
             ({"round": "3"}, "f: field 'round' is str \"3\", not an integer"),
             ({"round": True}, "f: field 'round' is true, not an integer"),
             ({"round": 1, "bytes-up": {"1": []}}, "f: field 'bytes-up.1' is a list, not a number"),
             ({"round": 1, "clients": [{"score": 1}, {"score": "x"}]},
              "f: field 'clients[1].score' is str \"x\", not a number or null"),
             ({"round": 2 ** 300}, "f: field 'round' is an integer out of range, not an integer"),
             ([1], "f: the value is a list, not an object")]
    for value, message in cases:
        with pytest.raises(FileFormatError) as err:
            check(value, spec, "f")
        assert str(err.value) == message


def test_json_errors_are_one_line_with_the_place(tmp_path):
    path = tmp_path / "x.json"
    for text, message in [('{"a": 1,\n "b": }', "not valid JSON (Expecting value at line 2 column 7)"),
                          ("[" * 100_000 + "]" * 100_000, f"nested more than {MAX_DEPTH} deep"),
                          ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} deep"),
                          ("1" * 5000, "not valid JSON (ValueError")]:
        path.write_text(text)
        with pytest.raises(FileFormatError) as err:
            read_json(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(FileFormatError, match=r"x.json: not UTF-8 text \(byte 7\)"):
        read_json(path)
    with pytest.raises(FileFormatError, match="more than the 4 a fedllm file holds"):
        read_json(path, limit=4)
    with pytest.raises(FileFormatError, match="missing.json: cannot read it: No such file"):
        read_json(tmp_path / "missing.json")
    assert math.isnan(parse_json('{"a": NaN}', "w")["a"])  # json.dumps writes NaN for a diverged loss


def test_jsonl_names_the_line_and_skips_only_a_cut_off_last_line(tmp_path, caplog):
    path = tmp_path / "m.jsonl"
    path.write_text('{"round": 0}\n\n{"round": 1}\n{"round": 2, "eval-lo')
    assert [n for n, _ in read_jsonl(path, {"round": int}, cut_last=True)] == [1, 3]
    assert "m.jsonl:4: skipped a cut-off last line" in caplog.text
    path.write_text('{"round": 0}\n{"round": 2, "eval-lo\n')  # ends in a newline: written whole, so damaged
    with pytest.raises(FileFormatError, match=r"m.jsonl:2: not valid JSON"):
        read_jsonl(path, cut_last=True)
    path.write_text('{"round": 0}\n{"round": "1"}\n{"round": 2}\n')
    with pytest.raises(FileFormatError, match=r"m.jsonl:2: field 'round' is str \"1\", not an integer"):
        read_jsonl(path, {"round": int})


# --- the commands, by hand -------------------------------------------------------------------
def _cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("metrics, config, message", [
    (None, "{not json", r"config.json: not valid JSON \(Expecting property name"),
    (None, "[1, 2]", r"config.json: the value is a list, not an object"),
    ('{"eval-loss": 1.0}\n', None, r"metrics.jsonl:1: field 'round' is missing"),
    ('{"round": 0}\n{"round": 1, "bytes-up": [3]}\n', None, r"metrics.jsonl:2: field 'bytes-up' is a list, not an object"),
    ('{"round": 0}\n"row"\n{"round": 1}\n', None, r"metrics.jsonl:2: the value is str \"row\", not an object"),
    ('{"round": 0, "eval-loss": "low"}\n', None, r"metrics.jsonl:1: field 'eval-loss' is str \"low\", not a number or null"),
    ('{"round": 0, "families": {"a": {"exact-match": [1]}}}\n', None,
     r"metrics.jsonl:1: field 'families.a.exact-match' is a list"),
    ('{"round": 0, "clients": {"3": {"partition-id": NaN}}}\n', None,
     r"metrics.jsonl:1: field 'clients.3.partition-id' is float NaN, not a finite number"),
])
def test_report_of_a_damaged_run_is_one_line_exit_2_and_overwrites_nothing(tmp_path, capsys, metrics, config, message):
    run = _run(tmp_path)
    if metrics is not None:
        (run / "metrics.jsonl").write_text(metrics)
    if config is not None:
        (run / "config.json").write_text(config)
    (run / "report.html").write_text("an earlier report")
    code, err = _cli(["report", str(run)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("fedllm: error: "), err
    assert re.search(message, err), err
    assert (run / "report.html").read_text() == "an earlier report"
    code, err = _cli(["compare", str(run), str(_run(tmp_path, name="other")), "--out", str(tmp_path / "c.html")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and not (tmp_path / "c.html").exists()


def test_a_run_with_nan_and_infinite_figures_still_reports(tmp_path):
    rows = [{**ROW, "eval-loss": float("nan"), "bytes-up": {"1": float("inf")}, "round-seconds": 2 ** 70}]
    run = _run(tmp_path, rows)
    assert report.render_report(run).read_text().count('<img class="plot"') >= 5
    assert "nan" in format_summary(summary(read_metrics(run)))


def test_compare_labels_runs_that_share_a_folder_name_apart(tmp_path, no_plots):
    a = _run(tmp_path / "sweep-a", config={"lora.rank": 8})
    b = _run(tmp_path / "sweep-b", config={"lora.rank": 16})
    html = report.render_compare([a, b], tmp_path / "cmp.html").read_text()
    assert ">sweep-a/run<" in html and ">sweep-b/run<" in html and "lora.rank" in html
    assert report.render_compare([b, a], tmp_path / "cmp.html").exists()  # its own page it may replace
    assert report.run_labels([a, b, a]) == ["sweep-a/run #1", "sweep-b/run", "sweep-a/run #2"]
    assert report.run_labels([tmp_path / "x" / "run", tmp_path / "y"]) == ["run", "y"]
    deep = [Path("/r/a/b/run"), Path("/r/c/b/run"), Path("/r/a/d/run")]
    assert report.run_labels(deep) == ["a/b/run", "c/b/run", "d/run"]
    assert report.run_labels([Path("/x/run"), Path("/y/x/run")]) == ["/x/run", "y/x/run"]


def test_compare_never_writes_over_a_runs_file_or_a_foreign_page(tmp_path, capsys):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    before = (a / "metrics.jsonl").read_text()
    code, err = _cli(["compare", str(a), str(b), "--out", str(a / "metrics.jsonl")], capsys)
    assert code == 2 and "--out: " in err and "is inside the run directory" in err
    assert (a / "metrics.jsonl").read_text() == before
    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    code, err = _cli(["compare", str(a), str(b), "--out", str(notes)], capsys)
    assert code == 2 and "is not a page fedllm compare wrote" in err and notes.read_text() == "<html>my notes</html>"


def test_ledger_of_a_damaged_chain_file_is_one_line(tmp_path, capsys):
    run = _ledger(_run(tmp_path))
    assert "penalties: 1" in ledger_view(run) and "0x" + "cd" * 20 in ledger_view(run)
    for name, text, message in [
        ("chain.json", "{", "chain.json: not valid JSON"),
        ("chain.json", json.dumps({**CHAIN, "contract": 7}), "chain.json: field 'contract' is int 7, not a string"),
        ("round-0001.json", json.dumps({**ROUND, "clients": [{**ROUND["clients"][0], "score": "high"}]}),
         "round-0001.json: field 'clients[0].score' is str \"high\", not a number"),
        ("accounts.json", json.dumps({"accounts": {"0x1": {"stake": 1.5}}}),
         "accounts.json: field 'accounts.0x1.stake' is float 1.5, not an integer or null"),
    ]:
        saved = (run / "ledger" / name).read_text()
        (run / "ledger" / name).write_text(text)
        code, err = _cli(["ledger", str(run)], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
        (run / "ledger" / name).write_text(saved)


def test_resume_and_trackers_name_a_damaged_file_and_leave_it(tmp_path):
    from fedllm.preflight import resumed_config
    from fedllm.reporting.tracking import read_ids

    run = _run(tmp_path)
    (run / "config.json").write_text('{"a": 1} trailing')
    with pytest.raises(FedLLMError, match=r"--resume: .*config.json: not valid JSON \(Extra data"):
        resumed_config(run)
    ids = run / "trackers.json"
    for text in ("[1]", '{"mlflow": 3}', "\x00"):
        ids.write_text(text)
        with pytest.raises(FileFormatError, match=r"trackers.json: .*\(remove it to start new tracker runs\)"):
            read_ids(ids)
        assert ids.read_text() == text
    ids.write_text('{"mlflow": "abc"}')
    assert read_ids(ids) == {"mlflow": "abc"}


def test_a_foreign_checkpoint_names_its_field(tmp_path):
    from fedllm.server import checkpoint

    checkpoint.save(tmp_path, {"round": "two", "config": {}, "strategy": {}, "rng": None, "ledger": None, "metrics": []})
    with pytest.raises(ConfigError, match=r"server.resume: .*checkpoint.safetensors: field 'round' is str"):
        checkpoint.read(tmp_path / checkpoint.FILE)
    checkpoint.save(tmp_path, {"round": 1, "config": {}, "strategy": {}, "rng": None, "ledger": None,
                               "metrics": [{"round": 0}, {"round": 1, "eval-loss": "x"}]})
    with pytest.raises(ConfigError, match=r"field 'metrics\[1\].eval-loss' is str"):
        checkpoint.read(tmp_path / checkpoint.FILE)
    checkpoint.save(tmp_path, {"round": 1, "config": {"train.method": "lora"}, "strategy": {"method": {}}, "rng": None,
                               "ledger": None, "metrics": []})
    with pytest.raises(ConfigError, match=r"field 'strategy.chain' is missing"):
        checkpoint.read(tmp_path / checkpoint.FILE)

    class Strategy:
        def load_state_dict(self, state):
            return state["method"]["global"]  # what a method indexes in its state

    with pytest.raises(ConfigError, match=r"server.resume: ckpt: its state does not fit train.method=lora \(KeyError"):
        checkpoint.restore(Strategy(), {"strategy": {"method": {}}, "config": {"train.method": "lora"}}, "ckpt")


def test_atomic_writes_replace_a_planted_link_and_leave_its_target(tmp_path):
    target = tmp_path / "bashrc"
    target.write_text("keep me")
    run = _run(tmp_path)
    (run / "report.html").symlink_to(target)
    (run / "report.html.tmp").symlink_to(target)
    write_atomically(run / "report.html", "<html>")
    assert target.read_text() == "keep me" and (run / "report.html").read_text() == "<html>"
    assert not (run / "report.html").is_symlink()


@functools.cache
def _deploy():
    """A private copy of examples/deployment/deploy.py as a module (its `flwr` is replaced here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy", ROOT / "examples" / "deployment" / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    return deploy


def test_deploy_reads_flwr_answers_through_the_checked_path(monkeypatch):
    deploy = _deploy()
    answer = {"out": ""}
    monkeypatch.setattr(deploy, "flwr", lambda *a, **k: subprocess.CompletedProcess([], 0, answer["out"], ""))
    for out, nodes in [('{"nodes": [{"status": "online"}, {"status": "offline"}]}', 1), ("Error: no", 0),
                       ('{"nodes": [1]}', 0), ('{"nodes": {}}', 0), ("[" * 5000, 0)]:
        answer["out"] = out
        assert deploy.online_nodes(Path(".")) == nodes
    answer["out"] = '{"run-id": [1]}'
    with pytest.raises(RuntimeError, match="flwr run failed"):
        deploy.submit(Path("."), "")
    answer["out"] = '{"run-id": 7}'
    assert deploy.submit(Path("."), "") == 7


def test_a_key_file_that_is_not_text_is_one_line():
    pytest.importorskip("eth_account")
    from fedllm.ledger.chain import LedgerError, read_key

    with pytest.raises(LedgerError, match=r"ledger.owner-key: cannot read a key: .*: cannot read it"):
        read_key("file:/nonexistent/key", "ledger.owner-key")


# --- fuzzing ----------------------------------------------------------------------------------
# One stream of inputs goes to every reader: each sees all FUZZ inputs (its own files mutated,
# other fedllm files, generated JSON, deep nesting, bytes), and drawing them once keeps this fast.
# The readers' parse-and-check path is pure (the file I/O around it is tested above); plotting is
# replaced by _Fake, so what runs is every line of the report that indexes a row.
FUZZ = 2000  # inputs per reader
SETTINGS = settings(max_examples=FUZZ, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
CONFIG = {"lora.rank": 8, "server.num-rounds": 3, "train.method": "lora", "server.plugins": ""}
IDS = {"mlflow": "a1", "wandb": "b2"}
CKPT = {"$d": {"format": 3, "round": 1, "config": {"$d": {"lora.rank": 8}},
        "strategy": {"$d": {"method": {"$d": {}}, "chain": {"$d": {"optimizers": {"$d": {}}}}}},
        "rng": {"$d": {"python": 1, "numpy": 2, "torch": {"$t": "t0"}}}, "ledger": None, "metrics": [{"$d": {"round": 0, "eval-loss": 2.0}}, {"$d": {"round": 1, "bytes-up": {
            "$d": {"1": 5}}}}]}}
FLWR = [{"nodes": [{"status": "online"}]}, {"run-id": 3}]
VALID = [ROW, {"round": 0, "eval-loss": 2.0}, CONFIG, CHAIN, ROUND, ACCOUNTS, IDS, CKPT, *FLWR]
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 64, 2 ** 64) | st.sampled_from([2 ** 257, -1, 0]),
                 st.floats(), st.text(CHARS, max_size=6))


def _paths(value, prefix=()) -> list[tuple]:
    """Every place inside a JSON value: dict keys and list indices, outermost first."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    out = []
    for key, item in items:
        out += [(*prefix, key), *_paths(item, (*prefix, key))]
    return out


def _edit(doc, path: tuple, value, drop: bool):
    """A copy of `doc` with the value at `path` replaced by `value` (or dropped)."""
    doc = json.loads(json.dumps(doc))
    inner = doc
    for key in path[:-1]:
        inner = inner[key]
    if drop:
        del inner[path[-1]]
    else:
        inner[path[-1]] = value
    return doc


def documents() -> st.SearchStrategy[bytes]:
    """A file's bytes: a valid fedllm file with a value anywhere in it replaced or dropped, cut
    short, generated JSON, deep nesting, or random bytes."""
    keys = sorted({str(p[-1]) for v in VALID for p in _paths(v)})
    key = st.sampled_from(keys) | st.text(CHARS, max_size=3)
    values = LEAF | st.lists(LEAF, max_size=3) | st.dictionaries(key, LEAF | st.lists(LEAF, max_size=2), max_size=3)
    spots = [(doc, path) for doc in VALID for path in _paths(doc)]
    edited = st.tuples(st.sampled_from(spots), values, st.booleans()).map(
        lambda t: json.dumps(_edit(t[0][0], t[0][1], t[1], t[2])))
    texts = [json.dumps(v) for v in VALID]
    cut = st.tuples(st.sampled_from(texts), st.integers(0, 400)).map(lambda t: t[0][:t[1]])
    deep = st.integers(1, 3000).map(lambda n: '{"round":' * n + "1" + "}" * n)
    return st.one_of(edited, edited, cut, deep, values.map(json.dumps), st.sampled_from(texts)).map(str.encode) \
        | st.binary(max_size=40)


def _rows_readers(text: str, newline: bool) -> None:
    """metrics.jsonl: a row 0, then the input as a second line (cut off or whole), then
    everything that reads rows: the report and compare pages, the summary, the trackers."""
    from fedllm.files import parse_jsonl
    from fedllm.reporting.runlog import row_spec
    from fedllm.reporting.tracking import scalars

    lines = '{"round": 0, "eval-loss": 2.0}\n' + text + ("\n" if newline else "")
    try:
        rows = [row for _, row in parse_jsonl(lines, "metrics.jsonl", row_spec(), cut_last=True)]
    except FileFormatError as err:
        assert "\n" not in str(err) and re.match(r"metrics.jsonl:[2-9]\d*: ", str(err)), str(err)
        return
    if len(rows) == 1:  # the input was a cut-off line, skipped: nothing new to render
        return
    assert report.report_page("run", rows, {}).startswith("<!doctype html>")
    report.compare_page({"a": rows, "b": rows[:1]}, {"a": {}, "b": {}})
    format_summary(summary(rows))
    totals: dict[str, float] = {}
    for row in rows:
        scalars(row, totals)


def _config_readers(text: str) -> None:
    """config.json: the report's and compare's config table, and what --resume builds from it."""
    from fedllm.config import Config
    from fedllm.reporting.runlog import parse_config

    try:
        flat = parse_config(text, "config.json")
    except FileFormatError as err:
        assert "\n" not in str(err) and str(err).startswith("config.json: ")
        return
    report._table(sorted(flat.items()))  # the report's config table
    report.compare_page({}, {"a": flat, "b": {}})  # compare's keys that differ
    try:
        Config.from_flat(flat)
    except ConfigError as err:
        assert "\n" not in str(err), str(err)


def _ledger_readers(text: str) -> None:
    """Each of the ledger's files in turn, the others valid, into `fedllm ledger`'s text."""
    from fedllm.reporting.runlog import LEDGER_SPECS, ledger_text

    for name in LEDGER_SPECS:
        files = {"chain.json": CHAIN, "accounts.json": ACCOUNTS, "round-*.json": ROUND}
        try:
            files[name] = parse_json(text, name)
            check(files[name], LEDGER_SPECS[name], name)
        except FileFormatError as err:
            assert "\n" not in str(err) and str(err).startswith(name)
            continue
        assert ledger_text(files["chain.json"], files["accounts.json"], [files["round-*.json"]]).startswith("FedLedger")


def _other_readers(text: str) -> None:
    """trackers.json, a checkpoint's header, and the deployment example's reading of flwr."""
    import torch

    from fedllm.config import Config
    from fedllm.reporting.tracking import IDS_SPEC
    from fedllm.server import checkpoint

    try:
        check(parse_json(text, "trackers.json"), IDS_SPEC, "trackers.json")
    except FileFormatError as err:
        assert "\n" not in str(err)
    try:
        ckpt = checkpoint.decode(text, {"t0": torch.zeros(2)}, "ckpt")
        Config.from_flat(checkpoint.saved_config(ckpt))
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("server.resume: ") or "ckpt" not in str(err), str(err)
    deploy = _deploy()
    deploy.flwr = lambda *a, **k: subprocess.CompletedProcess([], 0, text, "")
    assert deploy.online_nodes(Path(".")) >= 0
    try:
        assert isinstance(deploy.submit(Path("."), ""), int)
    except RuntimeError as err:
        assert str(err).startswith("flwr run failed")


@SETTINGS
@given(documents(), st.booleans())
def test_fuzz_every_reader(no_plots, raw, newline):
    try:
        text = raw.decode("utf-8")  # read_text's own refusal of other bytes is tested above
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    _rows_readers(text, newline)
    _config_readers(text)
    _ledger_readers(text)
    _other_readers(text)


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(st.lists(st.lists(st.sampled_from(["a", "b", "run", "x y", ".."]), min_size=1, max_size=4), min_size=1,
                max_size=5))
def test_fuzz_compare_labels_are_unique(parts):
    labels = report.run_labels([Path("/r", *p) for p in parts])
    assert len(set(labels)) == len(parts)


def test_report_imports_a_runs_plugins_only_when_asked(tmp_path, no_plots, monkeypatch):
    """A run folder from elsewhere runs no code: the modules its config names in server.plugins are
    imported by `fedllm report --plugins` only."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = _run(tmp_path, config={"lora.rank": 8, "server.plugins": "evil_plugin"}, name="foreign")
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists() and not marker.exists()
    assert main(["report", "--plugins", str(run)]) == 0
    assert marker.read_text() == "ran"


def test_deep_nesting_is_refused_before_the_parser_even_with_a_raised_recursion_limit():
    """py_ecc and py-evm (the ledger's) raise the recursion limit to 100000 on import; json.loads
    then overflows the C stack on deep enough text (a segmentation fault, seen in the suite) before
    any RecursionError. Every reader of outside JSON scans the nesting first: one line, no crash."""
    code = f"""
import sys
sys.setrecursionlimit(100000)
from pathlib import Path
from fedllm.errors import FedLLMError
from fedllm.files import parse_json
from fedllm.data.files import parse_json as parse_data_json
for call in (lambda: parse_json("[" * 2_000_000, "x"), lambda: parse_json('{{"a":' * 2_000_000, "x"),
             lambda: parse_data_json("[" * 2_000_000, Path("d.jsonl"), 7)):
    try:
        call()
    except FedLLMError as err:
        print(err)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and "nested more than" in lines[0] and "nested more than" in lines[1], lines
    assert lines[2].startswith("d.jsonl:7: JSON nested too deeply"), lines
