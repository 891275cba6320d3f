"""lm-evaluation-harness as the engine for standard tasks, and fedllm's own tasks for it.

    folder = write_tasks(run_dir / "lm-eval" / "tasks", held_out, cfg.data)
    figures = run_tasks(model, tokenizer, ["fedllm_builtin", "mmlu"], cfg.data, include_path=folder)
    figures["fedllm_builtin"]["exact_match"]

fedllm ships two task definitions built from a run's held-out split, written as lm-eval
`--include_path` YAML with local `data_files` (so they run offline) and the datasets cache of their
examples inside the same folder (held-out examples are not copied into ~/.cache/huggingface):
- `fedllm_builtin`: generative; greedy answer to the same chat prompt fedllm's own evaluation
  uses (the tokenizer's chat template, data.system-prompt as the system message), scored by
  fedllm's metrics (fedllm.evaluation.metrics: exact match with the same normalization, Rouge-L, a plug-in's own);
- `fedllm_builtin_mc`: multiple choice; the reference answer among up to three wrong answers
  of the same family (other held-out examples' answers), scored by log-likelihood (acc, acc_norm).
Every other lm-eval task (mmlu, gsm8k, ...) works when its data is reachable or in the
Hugging Face datasets cache (HF_DATASETS_OFFLINE=1 uses only the cache). `fedllm tasks DIR`
writes the two tasks for the `lm_eval` command itself.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from fedllm.rng import rng_state, set_rng_state
from fedllm.config import DataConfig
from fedllm.errors import ConfigError, FedLLMError
from fedllm.evaluation.metrics import METRICS, lm_eval_name

log = logging.getLogger(__name__)

LOCAL_TASKS = ("fedllm_builtin", "fedllm_builtin_mc")
DATASETS_CACHE = "datasets-cache"  # in the tasks' folder: the Hugging Face datasets cache of their examples
# What the summary and the report show of each task: the first of these metrics it has.
HEADLINE = ("exact_match", "acc", "acc_norm", "f1", "rouge_l")

_GENERATIVE = """\
# fedllm's built-in suite as an lm-eval task (written by fedllm.evaluation.harness.write_tasks)
task: fedllm_builtin
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: response
generation_kwargs:
  until: []
  do_sample: false
  max_gen_toks: {max_new_tokens}
process_results: !function utils.process_results
metric_list:
{metric_list}metadata:
  version: 1.0
"""

_CHOICE = """\
# fedllm's built-in suite as a multiple-choice lm-eval task (written by fedllm.evaluation.harness.write_tasks)
task: fedllm_builtin_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_UTILS = '''\
"""Scoring of the fedllm_builtin task: fedllm's own metrics (fedllm.evaluation.metrics: exact match,
Rouge-L, and those of the modules below, which register their own)."""

import importlib

from fedllm.evaluation.metrics import lm_eval_name, scores

for module in {modules!r}:
    importlib.import_module(module)


def process_results(doc, results):
    return {{lm_eval_name(name): value for name, value in scores(results[0], doc["response"]).items()}}
'''
_METRIC = """\
  - metric: {name}
    aggregation: mean
    higher_is_better: true
"""


def user_text(example: dict[str, str], tokenizer: Any = None, cfg: DataConfig | None = None) -> str:
    """What the task's prompt field holds: the user message, which lm-eval wraps in the chat
    template (and system prompt) itself; for a `tokenizer` without a chat template, the whole
    plain prompt fedllm.data.templates.prompt_text builds."""
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        from fedllm.data.templates import prompt_text

        return prompt_text(tokenizer, example, cfg.system_prompt if cfg else "")
    return f"{example['instruction']}\n{example['input']}" if example.get("input") else example["instruction"]


def choices_of(examples: list[dict[str, str]], seed: int, tokenizer: Any = None,
               cfg: DataConfig | None = None) -> list[dict[str, Any]]:
    """Multiple-choice rows: each example's answer with up to three wrong answers of its family
    (other examples' answers), shuffled; examples whose family has one answer only are left out."""
    answers: dict[str, list[str]] = {}
    for e in examples:
        seen = answers.setdefault(e.get("family", "all"), [])
        if e["response"] not in seen:
            seen.append(e["response"])
    rows = []
    for i, e in enumerate(examples):
        rng = random.Random(seed * 1_000_003 + i)
        wrong = [a for a in answers[e.get("family", "all")] if a != e["response"]]
        if not wrong:
            continue
        options = rng.sample(wrong, min(3, len(wrong))) + [e["response"]]
        rng.shuffle(options)
        rows.append({"prompt": user_text(e, tokenizer, cfg), "choices": options, "label": options.index(e["response"]),
                     "family": e.get("family", "all")})
    return rows


def write_tasks(folder: Path, examples: list[dict[str, str]], cfg: DataConfig, max_new_tokens: int = 16,
                tokenizer: Any = None) -> Path:
    """Write fedllm_builtin and fedllm_builtin_mc over `examples` into `folder` (YAML, JSONL
    data with absolute paths, and the scoring module); returns the folder, for include_path.
    Pass the model's `tokenizer` when it may lack a chat template (see `user_text`)."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    gen_data, mc_data = folder / "fedllm_builtin.jsonl", folder / "fedllm_builtin_mc.jsonl"
    gen_data.write_text("".join(json.dumps({"prompt": user_text(e, tokenizer, cfg), "response": e["response"],
                                            "family": e.get("family", "all")}) + "\n" for e in examples))
    mc_data.write_text("".join(json.dumps(r) + "\n" for r in choices_of(examples, cfg.seed, tokenizer, cfg)))
    metric_list = "".join(_METRIC.format(name=lm_eval_name(e.name)) for e in METRICS.entries())
    # datasets' Arrow copy of the examples goes beside them (else into ~/.cache/huggingface, a new copy
    # for every new folder): it goes away with the folder
    cache = json.dumps(str(folder / DATASETS_CACHE))
    (folder / "fedllm_builtin.yaml").write_text(_GENERATIVE.format(data=json.dumps(str(gen_data)), cache=cache,
                                                                   max_new_tokens=max_new_tokens,
                                                                   metric_list=metric_list))
    (folder / "fedllm_builtin_mc.yaml").write_text(_CHOICE.format(data=json.dumps(str(mc_data)), cache=cache))
    # the lm_eval command imports this file alone: it imports the modules a plug-in metric came from
    modules = sorted({e.impl.__module__ for e in METRICS.entries()} - {"fedllm.evaluation.metrics", "__main__"})
    (folder / "utils.py").write_text(_UTILS.format(modules=modules))
    return folder


def parse_tasks(spec: str) -> list[str]:
    return [t.strip() for t in spec.split(",") if t.strip()]


def task_manager(tasks: list[str], include_path: list[Path], key: str = "--tasks",
                 include_key: str = "--include-path") -> Any:
    """lm-eval's TaskManager that knows every one of `tasks` (only the include paths when they
    suffice: indexing lm-eval's own ~15,000 tasks takes seconds).

    Raises:
        ConfigError: naming the first unknown task.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"{key}: lm-eval is not installed (pip install 'fedllm[eval]')") from None
    for path in include_path:
        if not Path(path).is_dir():
            raise ConfigError(f"{include_key}: {path} is not a folder")
    if include_path and all(t in LOCAL_TASKS for t in tasks):  # no need to index lm-eval's own tasks
        manager = TaskManager(include_path=[str(p) for p in include_path], include_defaults=False)
    else:
        manager = TaskManager(include_path=[str(p) for p in include_path] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        close = [n for n in manager.all_tasks if unknown[0].lower() in n.lower()][:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"{key}: unknown lm-eval task {unknown[0]!r}{hint}; fedllm's own: {', '.join(LOCAL_TASKS)}")
    return manager


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], cfg: DataConfig, include_path: list[Path] = (),
              limit: int = 0, batch_size: int = 16, manager: Any = None,
              samples: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of `model` through lm-eval's HF model class (greedy, the
    tokenizer's chat template with data.system-prompt, zero-shot unless the task says otherwise).
    With `samples`, each task's per-example records (doc, filtered response) are put there.

    Raises:
        ConfigError: for an unknown task.
        FedLLMError: when a task's data cannot be loaded (offline, no cache), naming the task.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(tasks, list(include_path))
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=None)
    chat = bool(getattr(tokenizer, "chat_template", None))
    out: dict[str, dict[str, float]] = {}
    saved = rng_state()  # lm-eval seeds the global generators; the run's sampling and noise must not notice
    try:
        for task in tasks:  # one at a time: an unreachable dataset names its task
            try:
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=[task], task_manager=manager, limit=limit or None, log_samples=samples is not None,
                    apply_chat_template=chat, system_instruction=(cfg.system_prompt or None) if chat else None,
                    bootstrap_iters=0, verbosity="WARNING")
            except (ConfigError, KeyboardInterrupt):
                raise
            except Exception as err:
                raise FedLLMError(f"lm-eval task {task}: {_why(err)}") from err
            for name, figures in (results or {}).get("results", {}).items():
                out[name] = {_metric_name(metric): float(v) for metric, v in figures.items()
                             if isinstance(v, (int, float)) and not metric.startswith("alias")
                             and "_stderr" not in metric and metric != "sample_len"}
            if samples is not None:
                for name, records in (results or {}).get("samples", {}).items():
                    samples[name] = [{"doc": r["doc"], "response": r["filtered_resps"][0]} for r in records]
    finally:
        model.train(was_training)
        set_rng_state(saved)
    return out


def _metric_name(key: str) -> str:
    """lm-eval's 'metric,filter' as 'metric' (filter 'none') or 'metric/filter' (gsm8k's
    exact_match,strict-match and exact_match,flexible-extract stay apart)."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def headline(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: its headline metric's value} (the first of HEADLINE the task has)."""
    out = {}
    for task, metrics in figures.items():
        for name in HEADLINE:
            found = [k for k in metrics if k == name or k.startswith(name + "/")]
            if found:
                out[f"{task}/{found[0]}"] = metrics[found[0]]
                break
    return out


def _why(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if any(s in text for s in ("ConnectionError", "OfflineMode", "offline", "resolve", "Couldn't reach",
                               "LocalEntryNotFound", "couldn't be found", "doesn't exist on the Hub")):
        return (f"its data could not be loaded ({text}); hub tasks need network access or a copy in the "
                "Hugging Face datasets cache")
    return text
