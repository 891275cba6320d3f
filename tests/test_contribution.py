"""Contribution scores, dishonesty flags and reward shares, on values worked out by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fedllm.ledger.scoring import (SCORERS, FlagRules, History, ShapleyOptions, cosine_scores, flag_updates,
                                 gtg_shapley, leave_one_out, register_scorer, reward_shares)


def test_cosine_scores_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [-3.0, 0.0]], dtype=torch.float64)
    agg = torch.tensor([1.0, 1.0], dtype=torch.float64)
    s = cosine_scores(v, [1.0] * 4, agg)
    assert s == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)])


def additive(values):
    return lambda s: sum(values[i] for i in s)


def test_leave_one_out_of_an_additive_game_is_each_value():
    values = [0.5, -0.2, 1.5]
    assert leave_one_out(torch.zeros(3, 1), [1.0] * 3, torch.zeros(1), additive(values)) == pytest.approx(values)


def exact_shapley(n, u):
    out = [0.0] * n
    perms = list(itertools.permutations(range(n)))
    for p in perms:
        prefix = frozenset()
        for i in p:
            out[i] += (u(prefix | {i}) - u(prefix)) / len(perms)
            prefix = prefix | {i}
    return out


@pytest.mark.parametrize("game", ["additive", "majority", "synergy"])
def test_gtg_shapley_matches_exact_shapley(game):
    n = 4
    u = {
        "additive": additive([0.4, 0.1, 0.3, 0.2]),
        "majority": lambda s: 1.0 if len(s) >= 3 else 0.0,  # symmetric: 1/4 each
        "synergy": lambda s: (len(s & {0, 1}) == 2) * 1.0 + 0.1 * len(s),  # 0 and 1 only count together
    }[game]
    est = gtg_shapley(torch.zeros(n, 1), [1.0] * n, torch.zeros(1), u,
                      ShapleyOptions(max_permutations=400, tolerance=1e-9, seed=1))
    exact = exact_shapley(n, u)
    assert sum(est) == pytest.approx(u(frozenset(range(n))) - u(frozenset()), abs=1e-9)  # efficiency
    assert est == pytest.approx(exact, abs=0.06)
    if game == "synergy":
        assert est[0] > est[2] + 0.3 and est[1] > est[3] + 0.3


def test_gtg_shapley_truncates():
    calls = []

    def u(s):
        calls.append(s)
        return 1.0 if s else 0.0  # the first client brings everything: the rest is truncated

    est = gtg_shapley(torch.zeros(5, 1), [1.0] * 5, torch.zeros(1), u, ShapleyOptions(max_permutations=5))
    assert est == pytest.approx([0.2] * 5)  # each client leads one of the 5 guided permutations
    assert len(set(calls)) == 2 + 5  # u(N), u(empty) and the five singletons, nothing more
    flat = gtg_shapley(torch.zeros(3, 1), [1.0] * 3, torch.zeros(1), lambda s: 0.7)
    assert flat == [0.0, 0.0, 0.0]  # between-round truncation: nothing changed


def test_scorers_registry():
    assert set(SCORERS) >= {"cosine", "loo", "shapley"}
    with pytest.raises(ValueError, match="registered already"):
        register_scorer("cosine")(lambda *args: [])
    with pytest.raises(ValueError, match="lower-case"):
        register_scorer("Cosine")
    with pytest.raises(ValueError, match="needs a validation utility"):
        SCORERS.get("loo").impl(torch.zeros(2, 1), [1.0, 1.0], torch.zeros(1), None)


def honest_round(n=5, dim=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=g, dtype=torch.float64)
    return torch.stack([common + 2.0 * torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(n)])


def test_flags_catch_free_rider_and_noise_but_not_honest_clients():
    v = honest_round()
    v[3] = 0.0  # free rider
    v[4] = torch.randn(4000, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * v[0].norm() / 63
    hashes = [bytes([i]) * 32 for i in range(5)]
    flags = flag_updates(v, hashes, History())
    assert flags == [[], [], [], ["free-rider"], ["noise"]]
    v[3] = v[0] * 0.01  # near zero: below 5% of the median norm
    assert flag_updates(v, hashes, History())[3] == ["free-rider"]
    assert flag_updates(v, hashes, History(), FlagRules(free_rider_ratio=0.001))[3] == []


def test_flags_catch_duplicates_replays_and_stale_updates():
    v = honest_round()
    hashes = [b"a" * 32, b"b" * 32, b"a" * 32, b"c" * 32, b"d" * 32]
    history = History()
    history.add([b"d" * 32], v[:2].mean(0))
    v[3] = 3.0 * v[:2].mean(0)  # the previous global step sent back, rescaled
    flags = flag_updates(v, hashes, history)
    assert flags == [["duplicate"], [], ["duplicate"], ["stale"], ["replay"]]
    history = History(keep=2)
    for i in range(3):
        history.add([], torch.full((3,), float(i)))
    assert [float(g[0]) for g in history.global_deltas] == [1.0, 2.0]


def test_reward_shares_multiply_before_divide_and_keep_dust():
    assert reward_shares(10, [1, 1, 1]) == [3, 3, 3]  # 1 wei of dust stays
    assert reward_shares(100, [2, 0, -5, 1]) == [66, 0, 0, 33]
    assert reward_shares(0, [1, 2]) == [0, 0] and reward_shares(5, [0, 0]) == [0, 0]
    budget = 10**18
    scores = [333_333, 666_667, 1]  # dividing first would give 0 to the last and lose precision
    shares = reward_shares(budget, scores)
    assert sum(shares) <= budget and budget - sum(shares) < len(scores)
    assert shares[2] == budget // 1_000_001
    for s in shares:
        assert s * sum(scores) <= budget * max(scores)


@pytest.mark.parametrize("n", [2, 3, 5, 6, 9])
def test_cosine_with_the_others_median_matches_a_brute_force(n):
    from fedllm.ledger.scoring import cosine_with_others_median

    gen = torch.Generator().manual_seed(n)
    units = torch.randn(n + 1, 40, generator=gen, dtype=torch.float64)
    units = units / units.norm(dim=1, keepdim=True)
    active = torch.ones(n + 1, dtype=torch.bool)
    active[1] = False
    units[1] = 0.0
    got = cosine_with_others_median(units, active)
    rows = [r for r in range(n + 1) if r != 1]
    for i in rows:
        s = units[[r for r in rows if r != i]].sort(dim=0).values
        ref = (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2
        assert math.isclose(float(got[i]), float(units[i] @ ref / ref.norm()), abs_tol=1e-12)
    assert got[1] == 0.0


def test_opposed_and_oversized_flags():
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(4000, generator=gen, dtype=torch.float64)
    honest = [common + 0.8 * torch.randn(4000, generator=gen, dtype=torch.float64) for _ in range(6)]
    v = torch.stack(honest + [-honest[0], 10 * honest[1]])
    flags = flag_updates(v, [bytes([i]) for i in range(8)], History())
    assert flags == [[]] * 6 + [["opposed"], ["oversized"]]


def test_helpful_compares_each_gain_with_the_median_by_hand():
    from fedllm.ledger.scoring import helpful

    gains = [0.4, 0.2, 0.3, 0.04, -0.2, 9.0]
    active = [True, True, True, True, True, False]  # the last is idle: neither counted nor judged
    # active gains sorted: -0.2, 0.04, 0.2, 0.3, 0.4 -> median 0.2; ratio 0.5: bars +-0.1
    assert helpful(gains, active, 0.5) == [True, True, True, None, False, None]
    assert helpful(gains, active, 0.0) == [None] * 6  # the test off
    assert helpful([-0.2, 0.0, 0.1], [True] * 3, 0.5) == [None] * 3  # median 0: nothing is confirmed


def minority_round():
    """Six updates on a majority task, two honest ones on a minority task that pulls partly
    against the majority's direction, and one sign-flipped majority update (D = 4000)."""
    gen = torch.Generator().manual_seed(3)
    majority = torch.randn(4000, generator=gen, dtype=torch.float64)
    minority = -0.6 * majority + torch.randn(4000, generator=gen, dtype=torch.float64)
    rows = [majority + 0.8 * torch.randn(4000, generator=gen, dtype=torch.float64) for _ in range(6)]
    rows += [minority + 0.3 * torch.randn(4000, generator=gen, dtype=torch.float64) for _ in range(2)]
    return torch.stack(rows + [-rows[0]])


def test_an_honest_minority_whose_validation_gain_vouches_for_it_is_not_opposed():
    v = minority_round()
    hashes = [bytes([i]) * 32 for i in range(9)]
    # by geometry alone the minority's honest updates look like flipped signs ...
    assert flag_updates(v, hashes, History()) == [[]] * 6 + [["opposed"]] * 3
    # ... the validation data tells them from the flipped one: they lower the loss, it raises it
    gains = [0.30, 0.28, 0.31, 0.25, 0.29, 0.27, 0.16, 0.18, -0.30]  # median 0.27: bars +-0.135
    assert flag_updates(v, hashes, History(), gains=gains) == [[]] * 8 + [["opposed", "harmful"]]
    # a minority whose gain is small or even slightly negative (within the slice's resolution)
    # is not opposed either: only a confirmed harm is
    gains[6], gains[7] = 0.01, -0.06
    assert flag_updates(v, hashes, History(), gains=gains) == [[]] * 8 + [["opposed", "harmful"]]
    # with the test off (harmful_ratio 0) the gains are not used
    assert flag_updates(v, hashes, History(), FlagRules(harmful_ratio=0.0), gains=gains) == [[]] * 6 + [["opposed"]] * 3


def test_harmful_flags_an_update_that_raises_the_validation_loss_where_the_others_lower_it():
    """An update may keep an honest norm and direction (poisoned data) and still raise the
    validation loss; its gain gives it away."""
    v = honest_round()
    hashes = [bytes([i]) * 32 for i in range(5)]
    gains = [0.20, 0.22, 0.18, 0.21, -0.15]  # median 0.20: harmful below -0.10
    assert flag_updates(v, hashes, History(), gains=gains) == [[], [], [], [], ["harmful"]]
    gains[4] = -0.05  # within the slice's resolution: no verdict
    assert flag_updates(v, hashes, History(), gains=gains) == [[]] * 5
    v[2] = 0.0  # a free rider is flagged as one; its gain is neither judged nor in the median
    gains[2], gains[4] = -5.0, -0.15
    assert flag_updates(v, hashes, History(), gains=gains) == [[], [], ["free-rider"], [], ["harmful"]]


def test_noise_is_waived_for_a_helpful_update_and_kept_for_an_unhelpful_one():
    v = honest_round()
    v[4] = torch.randn(4000, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * v[0].norm() / 63
    hashes = [bytes([i]) * 32 for i in range(5)]
    assert flag_updates(v, hashes, History(), gains=[0.2, 0.2, 0.2, 0.2, 0.15])[4] == []  # it helps
    assert flag_updates(v, hashes, History(), gains=[0.2, 0.2, 0.2, 0.2, 0.01])[4] == ["noise"]  # no verdict
    assert flag_updates(v, hashes, History(), gains=[0.2, 0.2, 0.2, 0.2, -0.2])[4] == ["noise", "harmful"]


def test_validation_gains_evaluate_each_update_alone_against_none():
    from fedllm.ledger.scoring import validation_gains

    calls = []

    def utility(s):
        calls.append(s)
        return -2.0 + sum((0.5, -0.25, 0.0)[i] for i in s)

    assert validation_gains(utility, 3) == pytest.approx([0.5, -0.25, 0.0])
    assert calls == [frozenset(), frozenset({0}), frozenset({1}), frozenset({2})]  # n + 1 evaluations
