"""Built-in offline instruction suite: task families with short, verifiable answers.

Every example is generated deterministically from (seed, family, split), so every party of a
federation builds the same data without a download. The held-out split never repeats a
training prompt.

    train, held_out = builtin_splits(["arithmetic", "sorting"], 64, 8, seed=0)
    train[0]  # {"instruction": ..., "input": ..., "response": ..., "family": "arithmetic"}

The preference suite (train.method=dpo) is the same examples with a "rejected" answer each: a
plausible wrong one made the way the family's own mistakes look (an off-by-one sum, a wrong unit
factor, two numbers out of order, the day before or after, the other parity), so the chosen answer
("response") is right and the rejected one wrong by construction, checkable offline.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Callable

from fedllm.errors import ConfigError

Example = dict[str, str]

WORDS = (
    "apple river stone cloud garden window silver market planet candle forest yellow "
    "bridge rocket pencil summer winter orange castle dragon mirror basket jungle anchor "
    "butter camera dinner engine finger guitar hammer island ladder magnet napkin pepper "
    "puzzle rabbit saddle ticket violin wallet zipper banana carpet donkey falcon goblet "
    "harbor kitten lemon meadow needle oyster parrot quartz ribbon shadow tunnel velvet"
).split()

UNITS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return "Compute the expression.", f"{a} {op} {b}", str(value)


def _word(rng: random.Random) -> str:
    """A listed word, or a pronounceable made-up one so that families never run dry."""
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "Reverse the letters of the word.", word, word[::-1]


def _units(rng: random.Random) -> tuple[str, str, str]:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(1, 20)
    return f"Convert {src} to {dst}.", f"{n} {src}", str(n * factor)


def _sorting(rng: random.Random) -> tuple[str, str, str]:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    return (
        "Sort the numbers in ascending order.",
        ", ".join(map(str, nums)),
        ", ".join(map(str, sorted(nums))),
    )


def _dates(rng: random.Random) -> tuple[str, str, str]:
    start = dt.date(2020, 1, 1) + dt.timedelta(days=rng.randint(0, 1500))
    days = rng.randint(1, 30)
    end = start + dt.timedelta(days=days)
    return f"What is the date {days} days after this date?", start.isoformat(), end.isoformat()


def _word_length(rng: random.Random) -> tuple[str, str, str]:
    word = _word(rng)
    return "How many letters are in the word?", word, str(len(word))


def _parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    return "Is the number even or odd?", str(n), "even" if n % 2 == 0 else "odd"


FAMILIES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "units": _units,
    "sorting": _sorting,
    "dates": _dates,
    "word_length": _word_length,
    "parity": _parity,
}


def _off_by_one(response: str, inp: str, rng: random.Random) -> str:
    return str(int(response) + rng.choice((-1, 1)))


def _wrong_reverse(response: str, inp: str, rng: random.Random) -> str:
    """The reversal with one pair of neighbouring, different letters swapped (or a letter doubled)."""
    spots = [i for i in range(len(response) - 1) if response[i] != response[i + 1]]
    if not spots:
        return response + response[-1]
    i = rng.choice(spots)
    return response[:i] + response[i + 1] + response[i] + response[i + 2:]


def _wrong_factor(response: str, inp: str, rng: random.Random) -> str:
    """The amount times a neighbouring power of ten of the right factor (1000 for 100, 60 for 24...)."""
    n = int(inp.split()[0])
    factor = int(response) // n
    wrong = rng.choice([f for _, _, f in UNITS if f != factor] + [factor * 10])
    return str(n * wrong)


def _misordered(response: str, inp: str, rng: random.Random) -> str:
    nums = response.split(", ")
    i = rng.randrange(len(nums) - 1)
    nums[i], nums[i + 1] = nums[i + 1], nums[i]
    return ", ".join(nums)


def _wrong_date(response: str, inp: str, rng: random.Random) -> str:
    return (dt.date.fromisoformat(response) + dt.timedelta(days=rng.choice((-1, 1)))).isoformat()


def _other_parity(response: str, inp: str, rng: random.Random) -> str:
    return "odd" if response == "even" else "even"


WRONG: dict[str, Callable[[str, str, random.Random], str]] = {
    "arithmetic": _off_by_one,
    "reverse": _wrong_reverse,
    "units": _wrong_factor,
    "sorting": _misordered,
    "dates": _wrong_date,
    "word_length": _off_by_one,
    "parity": _other_parity,
}


def with_rejected(examples: list[Example], seed: int) -> list[Example]:
    """Preference pairs: each example with a plausible wrong "rejected" answer (its "response" is the
    chosen one), drawn from (seed, family, prompt) so every party builds the same pairs."""
    out = []
    for e in examples:
        rng = random.Random(f"{seed}/{e['family']}/{e['instruction']}/{e['input']}/rejected")
        out.append({**e, "rejected": WRONG[e["family"]](e["response"], e["input"], rng)})
    return out


def parse_families(spec: str) -> list[str]:
    """'all' or a comma list of family names, checked."""
    if spec.strip() == "all":
        return list(FAMILIES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown or not names:
        raise ConfigError(
            f"data.families: unknown family {unknown or spec!r}; choose from {', '.join(FAMILIES)}"
        )
    return names


def generate(family: str, n: int, seed: int, split: str, exclude: set | None = None) -> list[Example]:
    """`n` distinct examples of one family, skipping prompts in `exclude`."""
    rng = random.Random(f"{seed}/{family}/{split}")
    seen = set(exclude or ())
    out: list[Example] = []
    for _ in range(200 * n):
        if len(out) == n:
            break
        instruction, inp, response = FAMILIES[family](rng)
        if (instruction, inp) in seen:
            continue
        seen.add((instruction, inp))
        out.append({"instruction": instruction, "input": inp, "response": response, "family": family})
    return out


def builtin_splits(
    families: list[str], train_per_family: int, eval_per_family: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples; held-out prompts never appear in train."""
    train: list[Example] = []
    held_out: list[Example] = []
    for family in families:
        ev = generate(family, eval_per_family, seed, "eval")
        held_out += ev
        train += generate(family, train_per_family, seed, "train", {(e["instruction"], e["input"]) for e in ev})
    return train, held_out
