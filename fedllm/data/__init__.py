"""Datasets: the built-in offline suite, local files, hub datasets; templates; partitioning.

    train, held_out = load_splits(cfg.data)
    mine = partition(train, cfg.data, num_partitions=4, partition_id=0)
    pairs, held_out_pairs = load_splits(cfg.data, preference=True)   # each with a "rejected" answer
"""

from __future__ import annotations

import functools
import random

from fedllm.config import DataConfig
from fedllm.errors import DataError
from fedllm.data.checks import check_sizes, screen, warn_once
from fedllm.data.builtin import FAMILIES, builtin_splits, parse_families, with_rejected
from fedllm.data.files import load_source
from fedllm.data.partition import partition
from fedllm.data.templates import IGNORE, collate, encode, pair_text, prompt_text

Example = dict[str, str]


def load_splits(cfg: DataConfig, preference: bool = False) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples for the configured source; with `preference`, pairs (a
    "rejected" answer besides the chosen "response": the built-in preference suite, or a file's
    data.prompt-field, data.chosen-field and data.rejected-field)."""
    if cfg.source == "builtin":
        train, held_out = _builtin(tuple(parse_families(cfg.families)), cfg.train_per_family, cfg.eval_per_family,
                                   cfg.seed)
        if preference:
            return with_rejected(train, cfg.seed), with_rejected(held_out, cfg.seed)
        return list(train), list(held_out)
    train = load_source(cfg.source, cfg, preference)
    if cfg.eval_source:
        held_out = load_source(cfg.eval_source, cfg, preference)
        seen = {example_key(e) for e in held_out}
        kept = [e for e in train if example_key(e) not in seen]
        if len(kept) < len(train):
            warn_once(f"data: {len(train) - len(kept)} training examples also in {cfg.eval_source} left out of "
                      "training")
        if not kept:
            raise DataError(f"data.source: every example of {cfg.source} is also in data.eval-source")
        return kept, held_out
    unique = list({example_key(e): e for e in train}.values())  # exact duplicates would land on both sides
    if len(unique) < len(train):
        warn_once(f"data: {len(train) - len(unique)} exact duplicate examples of {cfg.source} removed")
    shuffled = list(unique)
    random.Random(cfg.seed).shuffle(shuffled)
    n_eval = max(1, int(len(shuffled) * cfg.eval_fraction))
    if len(shuffled) - n_eval < 1:
        raise DataError(f"data.source: {len(shuffled)} distinct examples leave none to train on after holding out "
                        f"data.eval-fraction={cfg.eval_fraction}")
    return shuffled[n_eval:], shuffled[:n_eval]


@functools.lru_cache(maxsize=4)
def _builtin(families: tuple[str, ...], train_per_family: int, eval_per_family: int,
             seed: int) -> tuple[list[Example], list[Example]]:
    """The built-in splits, generated once per process (each of 1000 simulated clients asks)."""
    return builtin_splits(list(families), train_per_family, eval_per_family, seed)


def example_key(example: Example) -> tuple[str, ...]:
    """What makes an example (or a pair) itself: instruction, input, response and rejected answer."""
    return example["instruction"], example.get("input", ""), example["response"], example.get("rejected", "")


__all__ = [
    "FAMILIES",
    "IGNORE",
    "check_sizes",
    "collate",
    "encode",
    "example_key",
    "load_splits",
    "pair_text",
    "partition",
    "prompt_text",
    "screen",
]
