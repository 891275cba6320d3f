"""What the data must hold before it trains: examples that mean something, and enough of them.

    kept = screen(examples, "data.jsonl", preference=False)   # degenerate ones dropped, counted
    sizes = check_sizes(train, held_out, cfg, num_clients=4)  # every client's count, or a DataError

`screen` drops an example with a blank prompt or a blank answer, and a preference pair whose
rejected answer is blank or the same as the chosen one (DPO's loss on such a pair is a constant,
log 2, whatever the model does), logs how many of each and refuses data left with none.
`check_sizes` runs in `fedllm simulate`'s pre-flight with the same partitioning the clients use:
more clients than examples, or an empty held-out split, fail there with the counts. A partition
smaller than train.batch-size is allowed: its batches hold the whole partition, reshuffled each
step (docs/data.md), and the pre-flight says which clients that is.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter

from fedllm.config import Config
from fedllm.data.partition import partition
from fedllm.errors import DataError

Example = dict[str, str]
log = logging.getLogger(__name__)


def flaw(example: Example, preference: bool) -> str:
    """Why an example teaches nothing ('' when it is fine)."""
    if not (example["instruction"].strip() or example.get("input", "").strip()):
        return "a blank prompt (data.prompt-field)" if preference else "a blank instruction (data.instruction-field)"
    if not example["response"].strip():
        return "a blank chosen answer (data.chosen-field)" if preference else "a blank response (data.response-field)"
    if preference:
        if not example["rejected"].strip():
            return "a blank rejected answer (data.rejected-field)"
        if example["response"].strip() == example["rejected"].strip():
            return "the same chosen and rejected answer"
    return ""


def screen(examples: list[Example], where: str, preference: bool = False) -> list[Example]:
    """`examples` without the degenerate ones (`flaw`), their counts logged.

    Raises:
        DataError: naming `where` and the counts, when none is left.
    """
    reasons: Counter[str] = Counter()
    kept = []
    for example in examples:
        why = flaw(example, preference)
        if why:
            reasons[why] += 1
        else:
            kept.append(example)
    if not reasons:
        return kept
    kind = "pairs" if preference else "examples"
    counts = "; ".join(f"{n} with {why}" for why, n in reasons.most_common())
    if not kept:
        raise DataError(f"{where}: all {len(examples)} {kind} are degenerate ({counts}); check the file and the "
                        "data.*-field keys")
    warn_once(f"data: {where}: {len(examples) - len(kept)} of {len(examples)} {kind} left out ({counts})")
    return kept


@functools.lru_cache(maxsize=256)
def warn_once(message: str) -> None:
    """Log `message` once per process: the server, the pre-flight and every client of a simulation
    read the same file (`warn_once.cache_clear()` makes it speak again)."""
    log.warning("%s", message)


def check_sizes(train: list[Example], held_out: list[Example] | None, cfg: Config, num_clients: int) -> list[int]:
    """Every client's example count under data.partition, checked against what a round needs
    (`held_out` None: not checked).

    Raises:
        DataError: naming the data key and the counts: no held-out examples, more clients than
            training examples, or a partition left empty.
    """
    if held_out is not None and not held_out:
        raise DataError("data: no held-out examples to evaluate on; set data.eval-source, or raise data.eval-fraction "
                        "or data.eval-per-family")
    sizes = [len(partition(train, cfg.data, num_clients, pid)) for pid in range(num_clients)]
    small = [pid for pid, n in enumerate(sizes) if n < cfg.train.batch_size]
    if small:
        log.warning("data: %d of %d clients hold fewer than train.batch-size=%d examples (fewest: %d, client %d); "
                    "their batches are their whole partition", len(small), num_clients, cfg.train.batch_size,
                    min(sizes), sizes.index(min(sizes)))
    return sizes
