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
import unicodedata
from typing import Any, Callable

from fedllm.registry import Registry

Metric = Callable[[str, str], float]
METRICS: Registry[Metric] = Registry("metric", "server.evaluate")


def normalize(text: str) -> str:
    """Case-folded, NFC-composed (an accent typed apart is the same letter), one space between
    words, no final full stop."""
    return " ".join(unicodedata.normalize("NFC", text.casefold()).strip().rstrip(".").split())


# Scripts written without spaces between words: one token per character (as CJK Rouge usually
# counts), since a run of them is a phrase, not a word.
UNSPACED = ((0x0E00, 0x0EFF),  # Thai, Lao
            (0x1000, 0x109F),  # Myanmar
            (0x1780, 0x17FF),  # Khmer
            (0x3040, 0x30FF), (0x31F0, 0x31FF),  # Hiragana, Katakana
            (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))  # CJK ideographs


def unspaced(ch: str) -> bool:
    code = ord(ch)
    return any(lo <= code <= hi for lo, hi in UNSPACED)


def words(text: str) -> list[str]:
    """Rouge-L's tokens in any script: runs of letters, digits and combining marks (Latin,
    Cyrillic, Greek, Arabic, Hebrew, Devanagari...), one token per character of an unspaced
    script (CJK, kana, Thai...) and per symbol (an emoji, a currency or maths sign); punctuation
    and spaces separate. Case-folded and NFKC-normalized (full-width digits are digits)."""
    out: list[str] = []
    word: list[str] = []
    for ch in unicodedata.normalize("NFKC", text).casefold():
        kind = unicodedata.category(ch)[0]
        if kind in "LNM" and not unspaced(ch):
            word.append(ch)
            continue
        if word:
            out.append("".join(word))
            word = []
        if kind in "LS" or (kind in "NM" and unspaced(ch)):  # an unspaced script's character, a symbol
            out.append(ch)
    if word:
        out.append("".join(word))
    return out


class Words:
    """rouge-score's tokenizer interface over `words`."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


@functools.cache
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words())


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure: the longest common subsequence of `words` (any script; rouge-score's own
    tokenizer keeps only a-z and 0-9, scoring a right Cyrillic or CJK answer 0). Two answers with
    no words at all (punctuation only, or empty) score as exact match does."""
    if not words(prediction) and not words(reference):
        return exact_match(prediction, reference)
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
