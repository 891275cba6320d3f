"""Datasets: the built-in offline suite, local files, hub datasets; templates; partitioning.

    train, held_out = load_splits(cfg.data)
    mine = partition(train, cfg.data, num_partitions=4, partition_id=0)
"""

from __future__ import annotations

import random

from fedllm.config import DataConfig
from fedllm.data.builtin import FAMILIES, builtin_splits, parse_families
from fedllm.data.files import load_source
from fedllm.data.partition import partition
from fedllm.data.templates import IGNORE, collate, encode, prompt_text

Example = dict[str, str]


def load_splits(cfg: DataConfig) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples for the configured source."""
    if cfg.source == "builtin":
        return builtin_splits(
            parse_families(cfg.families), cfg.train_per_family, cfg.eval_per_family, cfg.seed
        )
    train = load_source(cfg.source, cfg)
    if cfg.eval_source:
        return train, load_source(cfg.eval_source, cfg)
    shuffled = list(train)
    random.Random(cfg.seed).shuffle(shuffled)
    n_eval = max(1, int(len(shuffled) * cfg.eval_fraction))
    return shuffled[n_eval:], shuffled[:n_eval]


__all__ = [
    "FAMILIES",
    "IGNORE",
    "collate",
    "encode",
    "load_splits",
    "partition",
    "prompt_text",
]
