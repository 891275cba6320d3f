"""Byzantine-robust aggregation: coordinate median, trimmed mean, Krum, Multi-Krum and
norm-bounded averaging. The maths works on an (n, D) matrix of flattened client deltas.

- Coordinate median, trimmed mean: Yin et al., ICML 2018, https://arxiv.org/abs/1803.01498.
- Krum, Multi-Krum: Blanchard et al., NeurIPS 2017, https://arxiv.org/abs/1703.02757. A
  client's score is the sum of squared distances to its n - f - 2 nearest neighbours.
- Norm bounding: Sun et al., 2019, https://arxiv.org/abs/1911.07963.

The robust strategies name the clients they left out or cut down in `self.outliers`.
"""

from __future__ import annotations

import torch

from strategies.base import FedLLMStrategy, State, Update
from strategies.registry import register


def stack(states: list[State]) -> torch.Tensor:
    """(n, D) float32 matrix of the states flattened in sorted key order."""
    return torch.stack([torch.cat([s[k].float().reshape(-1) for k in sorted(s)]) for s in states])


def unstack(vector: torch.Tensor, like: State) -> State:
    out, offset = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vector[offset: offset + n].reshape(like[k].shape)
        offset += n
    return out


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median of (n, D); the mean of the two middle values when n is even."""
    s = x.sort(dim=0).values
    n = x.shape[0]
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def trimmed_mean(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Per coordinate, drop the floor(fraction n) largest and smallest values, average the rest."""
    n = x.shape[0]
    cut = int(fraction * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trimmed mean: cutting {cut} from each end of {n} leaves nothing")
    return x.sort(dim=0).values[cut: n - cut].mean(dim=0)


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of squared distances from each row to its n - f - 2 nearest other rows (at least 1)."""
    n = x.shape[0]
    if n == 1:
        return torch.zeros(1)
    d = torch.cdist(x.double(), x.double()) ** 2  # (n, n)
    d.fill_diagonal_(float("inf"))
    m = min(max(n - f - 2, 1), n - 1)
    return d.sort(dim=1).values[:, :m].sum(dim=1)


def multi_krum(x: torch.Tensor, weights: torch.Tensor, f: int, keep: int) -> tuple[torch.Tensor, list[int]]:
    """Weighted mean of the `keep` rows with the lowest Krum scores (keep=1: Krum). Returns the
    aggregate and the indices kept."""
    chosen = krum_scores(x, f).argsort()[:keep].tolist()
    w = weights[chosen].double()
    return (x[chosen].double() * w[:, None]).sum(0).float() / w.sum().float(), sorted(chosen)


def norm_bounded_mean(x: torch.Tensor, weights: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, list[int]]:
    """Weighted mean after scaling each row down to L2 norm <= max_norm. Returns the mean and
    the indices of the rows that were scaled."""
    norms = x.norm(dim=1)
    scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
    w = weights.float()
    return (x * (scale * w)[:, None]).sum(0) / w.sum(), torch.nonzero(scale < 1).flatten().tolist()


class _Robust(FedLLMStrategy):
    outliers: list[int] = []

    def aggregate(self, server_round: int, updates: list[Update]) -> State:
        x = stack([u.delta for u in updates])
        w = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
        vector, flagged = self.combine(x, w)
        self.outliers = [updates[i].node_id for i in flagged]
        return unstack(vector, updates[0].delta)

    def combine(self, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        raise NotImplementedError


@register("median")
class Median(_Robust):
    """Coordinate-wise median (unweighted)."""

    def combine(self, x, w):
        return coordinate_median(x), []


@register("trimmed-mean")
class TrimmedMean(_Robust):
    """Coordinate-wise mean after cutting strategy.trim-fraction of clients from each end."""

    def combine(self, x, w):
        return trimmed_mean(x, self.cfg.strategy.trim_fraction), []


@register("krum")
class Krum(_Robust):
    """The single update closest to its n - f - 2 neighbours (f = strategy.byzantine)."""

    def combine(self, x, w):
        mean, kept = multi_krum(x, w, self.cfg.strategy.byzantine, 1)
        return mean, [i for i in range(len(x)) if i not in kept]


@register("multikrum")
class MultiKrum(_Robust):
    """Example-weighted mean of the strategy.multikrum-keep best Krum scores (0: n - f)."""

    def combine(self, x, w):
        f = self.cfg.strategy.byzantine
        keep = self.cfg.strategy.multikrum_keep or max(len(x) - f, 1)
        mean, kept = multi_krum(x, w, f, min(keep, len(x)))
        return mean, [i for i in range(len(x)) if i not in kept]


@register("norm-bounded")
class NormBounded(_Robust):
    """Example-weighted mean of updates scaled down to L2 norm <= strategy.max-norm."""

    def combine(self, x, w):
        return norm_bounded_mean(x, w, self.cfg.strategy.max_norm)
