"""Evaluation metrics: per-example scores of a greedy answer against the reference, averaged by
fedllm.evaluation.held_out over the generated examples (overall and per family), shown by the report and
scored the same way in the lm-eval task fedllm_builtin (fedllm.evaluation.harness).

    METRICS.register("exact-match", exact_match, label="exact match")
    score = METRICS.get("rouge-l").impl("the answer", "the reference")     # a float

A metric is `score(prediction: str, reference: str) -> float`; every registered metric is
computed at each evaluation, under its name in the metrics row (JSONL) and in lm-eval with
dashes as underscores. A user's own is one registration in a module server.plugins names.
Light on purpose (no torch): the report and config-time checks import it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from fedllm.registry import Registry

Metric = Callable[[str, str], float]
METRICS: Registry[Metric] = Registry("metric", "server.evaluate")


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure (longest common subsequence of words; rouge-score's tokenizer:
    lower case, letters and digits only)."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalized answer equals the normalized reference, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def label(name: str) -> str:
    """How the report names a metric (its `label` metadata, else its name)."""
    entry = METRICS.get(name) if name in METRICS else None
    return entry.meta.get("label", name) if entry else name


def lm_eval_name(name: str) -> str:
    """A metric's name in lm-eval's metric_list (dashes as underscores)."""
    return name.replace("-", "_")


def scores(prediction: str, reference: str) -> dict[str, float]:
    """Every registered metric of one answer, by name."""
    return {e.name: float(e.impl(prediction, reference)) for e in METRICS.entries()}


METRICS.register("exact-match", exact_match, label="exact match")
METRICS.register("rouge-l", rouge_l, label="Rouge-L", axis="Rouge-L F")
