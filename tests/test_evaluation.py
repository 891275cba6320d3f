"""Evaluation people can compare: Rouge-L, per-family figures, lm-eval tasks (fedllm's own,
offline), `fedllm eval`, experiment trackers read back, communication beside the score."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_run_config
from fedllm.config import DataConfig
from fedllm.server.grid import LocalGrid


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_rouge_l_matches_the_longest_common_subsequence_by_hand():
    from fedllm.evaluation.held_out import rouge_l

    # LCS("the cat on the mat", "the cat sat on the mat") = 5 words: P = 5/5, R = 5/6
    p, r = 1.0, 5 / 6
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("12, 45, 67", "12, 45, 67") == 1.0  # punctuation is not a word
    assert rouge_l("67, 45", "45, 67") == pytest.approx(0.5)  # one word in order out of two each side
    assert rouge_l("", "42") == 0.0 and rouge_l("Paris", "paris") == 1.0


SCRIPTS = ["Москва", "Привет, мир!", "東京は日本の首都です", "서울은 한국의 수도", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
           "สวัสดีครับ", "🎉👍", "Ἀθῆναι", "１２３", "ok", "...", ""]


@pytest.mark.parametrize("answer", SCRIPTS)
def test_identical_answers_score_one_in_any_script(answer):
    """rouge-score's own tokenizer keeps a-z and 0-9 only: a right Cyrillic or CJK answer scored 0."""
    from fedllm.evaluation.metrics import exact_match, rouge_l

    assert rouge_l(answer, answer) == 1.0 and exact_match(answer, answer) == 1.0
    assert rouge_l(answer.upper(), answer) == 1.0 == exact_match(answer.upper(), answer)


def test_rouge_l_counts_words_and_characters_by_script():
    from fedllm.evaluation.metrics import exact_match, rouge_l, words

    assert words("Привет, мир!") == ["привет", "мир"] and words("東京は") == ["東", "京", "は"]
    assert words("१२ नमस्ते 🎉!") == ["१२", "नमस्ते", "🎉"]  # Devanagari digits and marks stay in their word
    assert rouge_l("Привет мир", "Привет друг") == pytest.approx(0.5)  # one word of two each side
    assert rouge_l("東京", "京都") == pytest.approx(0.5)  # one character in order of two each side
    for a, b in [("Москва", "Париж"), ("東京", "大阪"), ("🎉", "👍"), ("مرحبا", "وداعا")]:
        assert rouge_l(a, b) == 0.0 == exact_match(a, b)


def test_per_family_figures_sum_to_the_overall_ones(tiny_model_dir):
    from fedllm.data import load_splits
    from fedllm.evaluation.held_out import em_subset, eval_loss, evaluate, exact_match, generate_answers, rouge_l

    model, tok = _tiny(tiny_model_dir)
    cfg = DataConfig(families="parity,arithmetic,sorting", eval_per_family=3, max_length=64)
    _, held = load_splits(cfg)
    out = evaluate(model, tok, held, cfg, batch_size=4, em_examples=5, max_new_tokens=3)
    fams = out["families"]
    assert sorted(fams) == ["arithmetic", "parity", "sorting"]
    tokens = sum(f["tokens"] for f in fams.values())
    assert sum(f["eval-loss"] * f["tokens"] for f in fams.values()) / tokens == pytest.approx(out["eval-loss"])
    assert out["eval-loss"] == pytest.approx(eval_loss(model, tok, held, cfg, batch_size=3))  # batching-free
    generated = sum(f["generated"] for f in fams.values())
    picked = em_subset(held, 5)
    assert generated == len(picked) == 5
    for key in ("exact-match", "rouge-l"):
        assert sum((f[key] or 0.0) * f["generated"] for f in fams.values()) / generated == pytest.approx(out[key])
    # and the overall figures against an independent computation over the same examples
    answers = generate_answers(model, tok, picked, cfg, max_new_tokens=3, batch_size=4)
    assert out["exact-match"] == pytest.approx(exact_match(model, tok, picked, cfg, max_new_tokens=3, batch_size=4))
    assert out["rouge-l"] == pytest.approx(sum(rouge_l(a, e["response"]) for a, e in zip(answers, picked)) / 5)
    by_family = {}
    for e, a in zip(picked, answers):
        by_family.setdefault(e["family"], []).append(rouge_l(a, e["response"]))
    assert {n: f["rouge-l"] for n, f in fams.items()} == pytest.approx(
        {n: sum(v) / len(v) for n, v in by_family.items()})
    # one family: no breakdown to show
    single = evaluate(model, tok, held[:3], cfg, batch_size=4, em_examples=2, max_new_tokens=2)
    assert "families" not in single and math.isfinite(single["eval-loss"])


def test_local_lm_eval_tasks_generate_what_fedllm_generates(tiny_model_dir, tmp_path):
    """The same prompts reach the model through lm-eval as through fedllm: greedy answers agree
    example by example, and so do exact match and Rouge-L."""
    from fedllm.data import load_splits
    from fedllm.evaluation.held_out import generate_answers, normalize, rouge_l
    from fedllm.evaluation.harness import choices_of, run_tasks, write_tasks

    model, tok = _tiny(tiny_model_dir)
    cfg = DataConfig(families="parity,arithmetic,reverse", eval_per_family=4, max_length=64)
    _, held = load_splits(cfg)
    folder = write_tasks(tmp_path / "tasks", held, cfg, max_new_tokens=4, tokenizer=tok)
    samples: dict = {}
    figures = run_tasks(model, tok, ["fedllm_builtin", "fedllm_builtin_mc"], cfg, include_path=[folder],
                        batch_size=1, samples=samples)
    ours = generate_answers(model, tok, held, cfg, max_new_tokens=4, batch_size=1)
    theirs = {s["doc"]["response"] + "|" + s["doc"]["prompt"]: s["response"] for s in samples["fedllm_builtin"]}
    assert len(theirs) == len(held)
    for e, answer in zip(held, ours):
        key = e["response"] + "|" + (f"{e['instruction']}\n{e['input']}" if e.get("input") else e["instruction"])
        assert theirs[key] == answer  # the same text, token for token
    em = sum(normalize(a) == normalize(e["response"]) for a, e in zip(ours, held)) / len(held)
    assert figures["fedllm_builtin"]["exact_match"] == pytest.approx(em)
    assert figures["fedllm_builtin"]["rouge_l"] == pytest.approx(
        sum(rouge_l(a, e["response"]) for a, e in zip(ours, held)) / len(held))
    mc = choices_of(held, cfg.seed)
    answer_of = {(f"{e['instruction']}\n{e['input']}" if e.get("input") else e["instruction"]): e for e in held}
    for r in mc:  # the label points at this example's own answer; the others are its family's wrong ones
        e = answer_of[r["prompt"]]
        assert r["choices"][r["label"]] == e["response"]
        assert len(set(r["choices"])) == len(r["choices"]) >= 2
        assert {c for i, c in enumerate(r["choices"]) if i != r["label"]} <= {
            x["response"] for x in held if x["family"] == e["family"] and x["response"] != e["response"]}
    assert len(samples["fedllm_builtin_mc"]) == len(mc) and 0.0 <= figures["fedllm_builtin_mc"]["acc"] <= 1.0


@pytest.mark.gguf
def test_lm_eval_on_smollm2_agrees_with_fedllms_exact_match(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.config import ModelConfig
    from fedllm.data import load_splits
    from fedllm.evaluation.held_out import generate_answers, normalize
    from fedllm.evaluation.harness import run_tasks, write_tasks
    from fedllm.model import resolve

    path = resolve(ModelConfig())
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    cfg = DataConfig(eval_per_family=1)  # one example of each of the seven families
    _, held = load_splits(cfg)
    folder = write_tasks(tmp_path, held, cfg, max_new_tokens=8, tokenizer=tok)
    samples: dict = {}
    figures = run_tasks(model, tok, ["fedllm_builtin"], cfg, include_path=[folder], batch_size=1, samples=samples)
    ours = generate_answers(model, tok, held, cfg, max_new_tokens=8, batch_size=1)
    assert sorted(s["response"] for s in samples["fedllm_builtin"]) == sorted(ours)
    assert any(a.strip() for a in ours)  # a real model says something
    em = sum(normalize(a) == normalize(e["response"]) for a, e in zip(ours, held)) / len(held)
    assert figures["fedllm_builtin"]["exact_match"] == pytest.approx(em)


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """A 2-round tiny run with lm-eval tasks and all four trackers on."""
    from fedllm.server.loop import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path_factory.mktemp("tracked"), **{
        "server.eval-tasks": "fedllm_builtin,fedllm_builtin_mc", "server.exact-match-examples": 4,
        "server.trackers": "tensorboard,mlflow,wandb,aim"})
    return run(LocalGrid(2), cfg)


@pytest.mark.slow
def test_trackers_are_written_and_read_back(tracked_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedllm.reporting.runlog import read_metrics
    from fedllm.reporting.tracking import tracking_uri

    rows = read_metrics(tracked_run)
    want = [(r["round"], r["eval-loss"]) for r in rows]
    assert [w[0] for w in want] == [0, 1, 2]
    events = EventAccumulator(str(tracked_run / "tensorboard" / tracked_run.name))
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("eval-loss")]
    assert [s for s, _ in got] == [0, 1, 2] and all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(got, want))
    assert "families/parity/eval-loss" in events.Tags()["scalars"]
    assert "lm-eval/fedllm_builtin_mc/acc" in events.Tags()["scalars"]
    cum = [e.value for e in events.Scalars("bytes-up-cumulative")]
    assert cum[-1] == pytest.approx(sum(sum(r["bytes-up"].values()) for r in rows if r["round"] > 0))

    ids = json.loads((tracked_run / "trackers.json").read_text())
    client = MlflowClient(tracking_uri(tracked_run))
    history = client.get_metric_history(ids["mlflow"], "eval-loss")
    got = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in got] == [0, 1, 2] and [v for _, v in got] == pytest.approx([w for _, w in want])
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.data.params["lora.rank"] == "8" and mlrun.info.status == "FINISHED"
    assert "report.html" in [a.path for a in client.list_artifacts(ids["mlflow"])]

    offline = list((tracked_run / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
    assert offline and (offline[0] / "files" / "report.html").exists()
    assert list(offline[0].glob("*.wandb"))[0].stat().st_size > 0

    from aim import Run

    aim_run = Run(run_hash=ids["aim"], repo=str(tracked_run))  # opened for writing: aim reads unindexed runs so
    try:
        assert aim_run["hparams"]["lora.rank"] == 8
        seq = next(m for m in aim_run.metrics() if m.name == "eval-loss")
        assert sorted(seq.values.sparse_numpy()[1]) == pytest.approx(sorted(w for _, w in want))
    finally:
        aim_run.close()


@pytest.mark.slow
def test_lm_eval_figures_go_into_metrics_summary_and_report(tracked_run):
    from fedllm.reporting.runlog import read_metrics

    rows = read_metrics(tracked_run)
    assert all(set(r["lm-eval"]) == {"fedllm_builtin", "fedllm_builtin_mc"} for r in rows)
    summary = json.loads((tracked_run / "summary.json").read_text())
    assert summary["bytes-total"] == summary["bytes-up-total"] + summary["bytes-down-total"] > 0
    assert summary["lm-eval-after"]["fedllm_builtin/exact_match"] == rows[-1]["lm-eval"]["fedllm_builtin"]["exact_match"]
    assert set(summary["families-after"]) == {"parity", "arithmetic"}
    html = (tracked_run / "report.html").read_text()
    for title in ("eval loss per family", "exact match per family", "Rouge-L per family", "lm-eval tasks per round"):
        assert f'alt="{title}"' in html
    assert "communication total" in html


@pytest.mark.slow
def test_fedllm_eval_rebuilds_the_result_and_names_bad_input(tracked_run, tmp_path, capsys):
    from fedllm.cli import main
    from fedllm.reporting.runlog import read_metrics

    assert main(["eval", str(tracked_run), "--tasks", "fedllm_builtin", "--batch-size", "1"]) == 0
    saved = json.loads((tracked_run / "lm-eval" / "results.json").read_text())
    # the checkpoint's global model is the one the last round evaluated
    last = read_metrics(tracked_run)[-1]["lm-eval"]["fedllm_builtin"]
    assert saved["round"] == 2 and saved["results"]["fedllm_builtin"] == pytest.approx(last)
    capsys.readouterr()

    def error(*argv) -> str:
        assert main(["eval", *map(str, argv)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "no such run directory" in error(tmp_path / "missing", "--tasks", "fedllm_builtin")
    assert "not a fedllm run directory" in error(tmp_path, "--tasks", "fedllm_builtin")
    assert "unknown lm-eval task 'no_such_task'" in error(tracked_run, "--tasks", "no_such_task")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "remote.yaml").write_text("task: remote_qa\ndataset_path: fedllm-nobody/no-such-dataset\n"
                                     "test_split: test\noutput_type: generate_until\ndoc_to_text: q\n"
                                     "doc_to_target: a\nmetric_list:\n  - metric: exact_match\n")
    import os

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        line = error(tracked_run, "--tasks", "remote_qa", "--include-path", hub)
    finally:
        del os.environ["HF_DATASETS_OFFLINE"]
    assert "lm-eval task remote_qa" in line and "could not be loaded" in line


def test_bad_tracker_and_task_settings_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    from fedllm.cli import main
    from fedllm.config import Config
    from fedllm.errors import ConfigError

    from fedllm.reporting.tracking import check_installed

    with pytest.raises(ConfigError, match="server.trackers: unknown tracker 'comet'; registered: aim, mlflow, "
                                          "tensorboard, wandb"):
        check_installed(Config.from_flat({"server.trackers": "tensorboard,comet"}))  # what preflight runs
    argv = ["simulate", "--num-clients", "2", "--set", f"model.name={tiny_model_dir}", "--set",
            f"server.run-dir={tmp_path}", "--set", "server.eval-tasks=fedllm_builtin,nosuch_task"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedllm: error: server.eval-tasks: unknown lm-eval task 'nosuch_task'; fedllm's own: "
                   "fedllm_builtin, fedllm_builtin_mc"]
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_a_resumed_run_continues_its_tracker_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    from fedllm.config import Config
    from fedllm.reporting.tracking import Trackers, tracking_uri

    cfg = Config.from_flat({"server.trackers": "mlflow"})
    rows = [{"round": 0, "eval-loss": 2.0}, {"round": 1, "eval-loss": 1.5, "bytes-up": {"1": 10, "2": 20}}]
    first = Trackers(cfg, tmp_path)
    for row in rows:
        first.log(row)
    first.finish()  # the run stops here; its checkpoint holds rows
    again = Trackers(cfg, tmp_path, rows)
    again.log({"round": 2, "eval-loss": 1.25, "bytes-up": {"1": 5}})
    again.finish()
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri(tmp_path))
    assert len(client.search_runs([client.get_experiment_by_name("fedllm").experiment_id])) == 1
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval-loss")) == [
        (0, 2.0), (1, 1.5), (2, 1.25)]
    assert [m.value for m in client.get_metric_history(run_id, "bytes-up-cumulative")] == [30.0, 35.0]


def test_fedllm_tasks_writes_task_yaml_with_absolute_data_paths(tmp_path, capsys):
    import yaml

    from fedllm.cli import main

    assert main(["tasks", str(tmp_path / "t"), "--set", "data.families=parity,arithmetic",
                 "--set", "data.eval-per-family=3"]) == 0
    folder = tmp_path / "t"
    assert capsys.readouterr().out.strip() == str(folder.resolve())
    text = (folder / "fedllm_builtin.yaml").read_text().replace("!function ", "")
    data = yaml.safe_load(text)["dataset_kwargs"]["data_files"]["test"]
    assert data == str((folder / "fedllm_builtin.jsonl").resolve())
    rows = [json.loads(line) for line in (folder / "fedllm_builtin.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["family"] for r in rows} == {"parity", "arithmetic"}
    mc = [json.loads(line) for line in (folder / "fedllm_builtin_mc.jsonl").read_text().splitlines()]
    assert all(2 <= len(r["choices"]) <= 4 for r in mc)  # parity has two answers: even, odd


def test_lm_eval_leaves_the_global_generators_as_it_found_them(tiny_model_dir, tmp_path):
    """lm-eval seeds random, numpy and torch; a run's client sampling and DP noise must not repeat."""
    import random

    import numpy as np

    from fedllm.data import load_splits
    from fedllm.evaluation.harness import run_tasks, write_tasks

    model, tok = _tiny(tiny_model_dir)
    cfg = DataConfig(families="parity", eval_per_family=2, max_length=64)
    folder = write_tasks(tmp_path, load_splits(cfg)[1], cfg, max_new_tokens=2, tokenizer=tok)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    run_tasks(model, tok, ["fedllm_builtin"], cfg, include_path=[folder], batch_size=2)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


@pytest.mark.slow
def test_nothing_planted_in_a_run_directory_is_read_as_a_task(tracked_run, tmp_path):
    """A task YAML left in RUN_DIR/lm-eval (say, by whoever could write there) under the name of
    fedllm's own task, with a scoring function of its own, is never loaded."""
    from fedllm.server.evaluator import evaluate_run

    planted = tracked_run / "lm-eval" / "tasks" / "a"
    planted.mkdir(parents=True)
    marker = tmp_path / "ran"
    (planted / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                     "def process_results(doc, results):\n    return {'exact_match': 1.0}\n")
    (planted / "x.yaml").write_text("task: fedllm_builtin\ndataset_path: json\ntest_split: test\n"
                                    "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: response\n"
                                    "process_results: !function evil.process_results\n")
    figures = evaluate_run(tracked_run, ["fedllm_builtin"], limit=2, batch_size=2)
    assert not marker.exists() and "fedllm_builtin" in figures


def test_a_checkpoint_from_before_a_key_existed_still_resumes(tmp_path):
    """Config keys added later (server.trackers, ...) compare as their defaults; evaluation and
    tracker keys may change on resume."""
    from fedllm import rng
    from fedllm.server import checkpoint
    from fedllm.config import Config
    from fedllm.errors import ConfigError

    flat = Config().to_flat()
    old = {k: v for k, v in flat.items() if not k.startswith(("server.eval-tasks", "server.trackers"))}
    strategy = {"method": {}, "chain": {"optimizers": {}}}  # the shape every run's state has
    checkpoint.save(tmp_path, {"round": 1, "config": old, "strategy": strategy, "rng": rng.rng_state(),
                               "ledger": None, "metrics": []})
    assert checkpoint.load(tmp_path, flat)["round"] == 1
    assert checkpoint.load(tmp_path, {**flat, "server.trackers": "tensorboard"})["round"] == 1
    with pytest.raises(ConfigError, match="server.resume: lora.rank"):
        checkpoint.load(tmp_path, {**flat, "lora.rank": 4})
