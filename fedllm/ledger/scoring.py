"""Per-client contribution scores and dishonesty flags, from one round's updates.

Scorers (a registry, `SCORERS`; `ledger.scorer` picks one):
- `cosine`: cosine similarity of each update to the round's aggregate; cheap, needs no data.
- `loo`: leave-one-out, u(N) - u(N minus i), where u(S) is the utility (minus the validation
  loss) of the global model moved by the example-weighted mean of the updates in S.
- `shapley`: GTG-Shapley (Liu et al., 2022, https://arxiv.org/abs/2109.02053): Monte-Carlo
  permutations, each led by a different client in turn; a permutation is cut short once
  u(prefix) is within `tolerance` x |u(N) - u(empty)| of u(N) (the remaining marginals count
  as 0), the whole round scores 0 when |u(N) - u(empty)| <= `min_gain`, and sampling stops
  when the estimates change by less than `tolerance` (relative) or after `max_permutations`.
A scorer is `f(vectors, weights, aggregate, utility) -> list[float]`; register yours with
`@register_scorer("name")` (with `needs_utility=True` if it calls `utility`).

Flags (`flag_updates`) name what an update looks like, for a penalty: `free-rider` (norm below
`free_rider_ratio` x the median norm: a zero or near-zero update), `noise` (no more aligned
with the others' coordinate-wise median than a random direction: |cos| * sqrt(D) < `noise_z`),
`opposed` (cos * sqrt(D) <= -`noise_z`: a flipped sign), `harmful` (its validation gain, the
validation loss of the pre-round state minus that of the state moved by this update alone, is
below -`harmful_ratio` x the round's median gain: it raises the loss where the others lower
it), `oversized` (norm above `oversize_ratio` x the median),
`duplicate` (the same bytes as another client's update this round: all of them, or, with
commitments on chain, all but the first committed), `replay` (the same bytes as an update of
an earlier round), `stale` (cosine >= 0.999 with an earlier global delta), `outlier` (left
out or cut by a robust strategy), `invalid` (a payload the server dropped).

The geometric tests (`noise`, `opposed`) compare an update with the round's majority, which a
client whose task differs from most others' (a non-IID minority) need not follow. With
validation gains the data has the last word: an update whose gain is at least `harmful_ratio` x
the median lowers the validation loss (its own task's examples in it included) and is never
`noise`; an update is `opposed` only when its gain also confirms the harm (below -`harmful_ratio`
x the median: it is then `harmful` too). A gain in between tells nothing either way (the slice's
resolution): `noise` stands on the geometry, `opposed` is not raised.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fedllm.ledger.merkle import Leaf
from fedllm.registry import Registry

Utility = Callable[[frozenset[int]], float]
Scorer = Callable[[torch.Tensor, list[float], torch.Tensor, Utility | None], list[float]]
SCORERS: Registry[Scorer] = Registry("scorer", "ledger.scorer")


def needs_utility(lc: Any) -> bool:
    """Whether a run's ledger (its LedgerConfig) calls the method's validation utility: its
    scorer does, or the harmful flag's validation gains are on (ledger.harmful-ratio above 0)."""
    return bool(SCORERS.get(lc.scorer).meta.get("needs_utility")) or lc.harmful_ratio > 0


def register_scorer(name: str, **meta: Any) -> Callable[[Scorer], Scorer]:
    """Decorator: add a scorer under a unique lower-case name. Metadata: needs_utility (it
    calls the method's validation utility), options (it takes ShapleyOptions)."""
    return SCORERS.register(name, **meta)


def flatten(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """(D,) float64 vector of a state's tensors in sorted key order."""
    return torch.cat([state[k].double().reshape(-1) for k in sorted(state)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity; 0 when either vector is zero."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


@register_scorer("cosine")
def cosine_scores(vectors: torch.Tensor, weights: list[float], aggregate: torch.Tensor,
                  utility: Utility | None = None) -> list[float]:
    """cos(update_i, aggregate) for each row of `vectors` (n, D)."""
    return [cosine(v, aggregate) for v in vectors]


@register_scorer("loo", needs_utility=True)
def leave_one_out(vectors: torch.Tensor, weights: list[float], aggregate: torch.Tensor,
                  utility: Utility | None = None) -> list[float]:
    """u(N) - u(N minus {i}): how much worse the round would be without client i."""
    if utility is None:
        raise ValueError("leave-one-out needs a validation utility")
    everyone = frozenset(range(len(vectors)))
    full = utility(everyone)
    return [full - utility(everyone - {i}) for i in range(len(vectors))]


@dataclass
class ShapleyOptions:
    max_permutations: int = 20
    tolerance: float = 0.01  # relative to the round's gain |u(N) - u(empty)|
    min_gain: float = 1e-6  # absolute: a smaller gain scores everyone 0
    seed: int = 0


SHAPLEY = ShapleyOptions()


@register_scorer("shapley", needs_utility=True, options=True)
def gtg_shapley(vectors: torch.Tensor, weights: list[float], aggregate: torch.Tensor,
                utility: Utility | None = None, options: ShapleyOptions | None = None) -> list[float]:
    """GTG-Shapley estimate of each client's share of u(N) - u(empty)."""
    if utility is None:
        raise ValueError("GTG-Shapley needs a validation utility")
    opt = options or SHAPLEY
    n = len(vectors)
    cache: dict[frozenset[int], float] = {}

    def u(s: frozenset[int]) -> float:
        if s not in cache:
            cache[s] = utility(s)
        return cache[s]

    full, empty = u(frozenset(range(n))), u(frozenset())
    gain = abs(full - empty)
    if gain <= opt.min_gain:
        return [0.0] * n  # between-round truncation: this round changed nothing worth sharing
    rng = random.Random(opt.seed)
    totals, estimate = [0.0] * n, [0.0] * n
    for t in range(1, opt.max_permutations + 1):
        rest = [i for i in range(n) if i != (t - 1) % n]
        rng.shuffle(rest)
        order, prefix, previous = [(t - 1) % n] + rest, frozenset(), empty  # guided: each client leads in turn
        for i in order:
            if abs(full - previous) <= opt.tolerance * gain:
                break  # within-round truncation: the rest add (about) nothing
            prefix = prefix | {i}
            value = u(prefix)
            totals[i] += value - previous
            previous = value
        new = [s / t for s in totals]
        change = sum(abs(a - b) for a, b in zip(new, estimate)) / max(sum(abs(a) for a in new), 1e-12)
        estimate = new
        if t >= n and change < opt.tolerance:
            break
    return estimate


@dataclass
class FlagRules:
    free_rider_ratio: float = 0.05
    noise_z: float = 4.0
    stale_cosine: float = 0.999
    oversize_ratio: float = 5.0
    harmful_ratio: float = 0.5  # of the median validation gain; 0: no harmful test, no waiver


def helpful(gains: list[float], active: list[bool], ratio: float) -> list[bool | None]:
    """The validation data's verdict on each update, against m, the median gain of the active
    updates: True (gain >= ratio x m: it lowers the loss), False (gain < -ratio x m: it raises
    it) or None (in between; an inactive update; `ratio` 0; or m <= 0, a round in which the data
    confirms no direction)."""
    values = [g for g, a in zip(gains, active) if a]
    if ratio <= 0 or not values:
        return [None] * len(gains)
    median = statistics.median(values)
    if not median > 0:
        return [None] * len(gains)
    return [None if not a else True if g >= ratio * median else False if g < -ratio * median else None
            for g, a in zip(gains, active)]


@dataclass
class History:
    """What the flags compare with: update hashes and global deltas of earlier rounds (the server
    records each round's example-weighted mean of the unflagged updates, FedAvg's step)."""

    hashes: set[bytes] = field(default_factory=set)
    global_deltas: list[torch.Tensor] = field(default_factory=list)
    keep: int = 8  # global deltas kept

    def state_dict(self) -> dict[str, Any]:
        return {"hashes": sorted(self.hashes), "global_deltas": list(self.global_deltas), "keep": self.keep}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "History":
        return cls(set(state["hashes"]), list(state["global_deltas"]), int(state["keep"]))

    def add(self, hashes: list[bytes], global_delta: torch.Tensor | None) -> None:
        self.hashes.update(hashes)
        if global_delta is not None:
            self.global_deltas = (self.global_deltas + [global_delta])[-self.keep:]


def cosine_with_others_median(units: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Cosine of each active row with the coordinate-wise median of the other active rows
    (leave-one-out, from one sort: removing row i shifts the order statistics past its rank by
    one). A robust reference: a minority of flipped, scaled or noisy rows barely moves it, where
    a sum of the others' directions is partly cancelled by them. 0 for inactive rows or with
    fewer than two active ones. O(n D log n)."""
    n, _ = units.shape
    out = torch.zeros(n, dtype=torch.float64)
    rows = active.nonzero().flatten()
    if len(rows) < 2:
        return out
    x = units[rows]  # (k, D)
    s, order = x.T.contiguous().sort(dim=1)  # (D, k): sorting rows of contiguous memory is ~3x faster
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(len(rows)).expand_as(order))  # (D, k) rank of each entry
    s, rank = s.T.contiguous(), rank.T.contiguous()  # (k, D)
    m = len(rows) - 1  # the others
    lo, hi = (m - 1) // 2, m // 2
    for j, i in enumerate(rows.tolist()):
        r = rank[j]  # (D,)
        pick_lo = torch.where(r > lo, s[lo], s[lo + 1])
        pick_hi = torch.where(r > hi, s[hi], s[hi + 1])
        ref = (pick_lo + pick_hi) / 2  # (D,) median of the others
        size = ref.norm()
        out[i] = float(x[j] @ ref / size) if size > 0 else 0.0
    return out


def flag_updates(vectors: torch.Tensor, hashes: list[bytes], history: History,
                 rules: FlagRules | None = None, order: list[int] | None = None,
                 gains: list[float] | None = None) -> list[list[str]]:
    """The flags of each accepted update (rows of `vectors`, (n, D)), in row order; O(n D log n).

    `order`: each update's commitment order index on chain (ledger.commit-reveal; 0: none kept).
    Of identical updates the first committed is the original and the others are `duplicate`;
    when none of them committed, who copied whom cannot be told and every copy is flagged.
    `gains`: each update's validation gain (`validation_gains`), or None without validation data:
    then no `harmful` test, and `noise` and `opposed` stand on the geometry alone. With gains, a
    helpful update is never `noise` and only a harmful one is `opposed`."""
    rules = rules or FlagRules()
    n, dim = vectors.shape
    flags: list[list[str]] = [[] for _ in range(n)]
    if n == 0:
        return flags
    norms = vectors.norm(dim=1)  # (n,)
    median = norms.median()
    idle = (norms <= rules.free_rider_ratio * median) | (norms == 0)  # (n,)
    units = vectors / norms.clamp_min(1e-300)[:, None]  # (n, D)
    units[idle] = 0.0  # a zero update has no direction to judge, nor to lend
    cos_others = cosine_with_others_median(units, ~idle)  # (n,)
    helps = helpful(gains, (~idle).tolist(), rules.harmful_ratio) if gains is not None else [None] * n
    judged = any(h is not None for h in helps)  # the gains give verdicts (ratio > 0, a positive median)
    stale = torch.zeros(n, dtype=torch.bool)
    for g in history.global_deltas:
        if g.norm() > 0:
            stale |= units @ g >= rules.stale_cosine * float(g.norm())
    big = norms > rules.oversize_ratio * median if rules.oversize_ratio > 0 else torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        if idle[i]:
            flags[i].append("free-rider")
            continue
        z = float(cos_others[i]) * math.sqrt(dim)  # a random direction gives |z| about 1
        if int((~idle).sum()) > 1 and rules.noise_z > 0 and not helps[i]:  # the data vouches for a helper
            if abs(z) < rules.noise_z:
                flags[i].append("noise")
            elif z <= -rules.noise_z and (not judged or helps[i] is False):  # the data confirms the harm
                flags[i].append("opposed")  # pulls against the others: a flipped sign
        if helps[i] is False:
            flags[i].append("harmful")
        if big[i]:
            flags[i].append("oversized")
        if stale[i]:
            flags[i].append("stale")
    order = order or [0] * n
    for i, h in enumerate(hashes):
        if hashes.count(h) > 1:
            first = min((order[j] for j, g in enumerate(hashes) if g == h and order[j] > 0), default=0)
            if first == 0 or order[i] != first:  # committed later, or not at all: a copy
                flags[i].append("duplicate")
        if h in history.hashes:
            flags[i].append("replay")
    return flags


def validation_gains(utility: Utility, n: int) -> list[float]:
    """u({i}) - u(empty) for each of `n` updates: how much each alone lowers the validation loss
    of the pre-round state (n + 1 evaluations)."""
    empty = utility(frozenset())
    return [utility(frozenset({i})) - empty for i in range(n)]


def reward_shares(budget: int, scores: list[int]) -> list[int]:
    """Integer shares of `budget` proportional to non-negative integer scores, multiplying
    before dividing; the shares never sum to more than the budget (the dust stays)."""
    total = sum(max(s, 0) for s in scores)
    if total == 0 or budget <= 0:
        return [0] * len(scores)
    return [budget * max(s, 0) // total for s in scores]


SCORE_SCALE = 10**6  # scores travel as fixed-point integers
Row = tuple[int, str, bytes, float, list[str]]  # a ledger row: node, account, update hash, score, flags


def settle(server_round: int, rows: list[Row], budget: int, before: dict[str, int]) -> list[Leaf]:
    """Each row's leaf: its fixed-point score and cumulative reward (`before` plus its share of
    `budget`, proportional to the scores)."""
    fixed = [int(max(score, 0.0) * SCORE_SCALE) for *_, score, _ in rows]
    shares = reward_shares(budget, fixed)
    return [Leaf(server_round, account, score, before[account] + share, digest)
            for (_, account, digest, _, _), score, share in zip(rows, fixed, shares)]
