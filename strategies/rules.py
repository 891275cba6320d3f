"""Aggregation rules: pure functions from a round's accepted updates to the aggregate delta.

    def rule(updates: list[Update], cfg: Config, **args) -> State | Aggregate

A rule's parameters are keyword arguments after (updates, cfg), given as the stage's arguments
in server.strategy (`trimmed-mean(fraction=0.2)`, `krum(f=2)`, `my_pkg.rules:clipped(c=1)`);
the built-ins default each to its strategy.* key (deprecated: one release). A rule that leaves
clients out or cuts them down names them in `Aggregate.outliers` (the
ledger flags them). Register with `RULES.register(name, fn, accepts={...}, streams=...)`:
`accepts` names the update kinds it works on (a method's `delta_kind`: "dense" LoRA deltas,
"sums" zo per-seed sums, "factors" exact-lora adapters); `streams` says the rule is a sum
that the server folds update by update as replies arrive, with `fold` (a strategies.fold.Fold)
saying how, rather than one that needs every update at once (streams=False: the server keeps
the round's list).

- FedAvg: McMahan et al., 2017, https://arxiv.org/abs/1602.05629. On LoRA it averages the A
  and B factors separately, which is not the average of the products B @ A (see exact-lora).
- FedProx: FedAvg here, plus (mu / 2) ||w - w_global||^2 on the client (fedprox(mu=...),
  sent as "proximal-mu"); Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127.
- Coordinate median, trimmed mean: Yin et al., ICML 2018, https://arxiv.org/abs/1803.01498.
- Krum, Multi-Krum: Blanchard et al., NeurIPS 2017, https://arxiv.org/abs/1703.02757. A
  client's score is the sum of squared distances to its n - f - 2 nearest neighbours. Here f is
  1 and Multi-Krum averages the n - f best by default; Flower's Krum and MultiKrum take f = 0
  and MultiKrum keeps 1 (it is Krum) unless told: `krum(flavor=flower)`, `multikrum(flavor=flower)`.
- Norm bounding: Sun et al., 2019, https://arxiv.org/abs/1911.07963.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import torch

from fedllm.config import Config
from fedllm.protocol import State, Update
from fedllm.registry import Registry
from strategies.flavors import FLAVOR_CHECK, flavor_of, setting
from strategies.fold import MEAN, fold_all


class Aggregate(NamedTuple):
    """A rule's result: the aggregate delta and the node ids it left out or cut down."""

    delta: State
    outliers: tuple[int, ...] = ()


Rule = Callable[[list[Update], Config], "State | Aggregate"]
RULES: Registry[Rule] = Registry("rule", "server.strategy")
DENSE = frozenset({"dense", "sums"})  # the update kinds whose tensors have the same shapes for every client


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


def fedavg(updates: list[Update], cfg: Config) -> State:
    """Example-weighted mean of the deltas (float32): the MEAN fold run over the list, so a
    streamed round that folds the same updates in the same order gives the same bits."""
    return fold_all(MEAN, [u.delta for u in updates], [u.num_examples for u in updates])


def fedprox(updates: list[Update], cfg: Config, mu: float | None = None) -> State:
    """FedAvg on the server; `mu` (default strategy.proximal-mu) goes to the clients each round."""
    return fedavg(updates, cfg)


def _robust(combine: Callable[..., tuple[torch.Tensor, list[int]]]) -> Rule:
    """A rule from a function of the (n, D) matrix, the (n,) example weights, the config and the
    rule's keyword parameters (which the rule's signature shows, for the chain's checks)."""

    def rule(updates: list[Update], cfg: Config, **params: Any) -> Aggregate:
        x = stack([u.delta for u in updates])
        w = torch.tensor([u.num_examples for u in updates], dtype=torch.float32)
        vector, flagged = combine(x, w, cfg, **params)
        return Aggregate(unstack(vector, updates[0].delta), tuple(updates[i].node_id for i in flagged))

    head = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("updates", "cfg")]
    rule.__signature__ = inspect.Signature(head + list(inspect.signature(combine).parameters.values())[3:])
    rule.__doc__ = combine.__doc__
    return rule


def _left_out(n: int, kept: list[int]) -> list[int]:
    return [i for i in range(n) if i not in kept]


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _median(x, w, cfg):
    """Coordinate-wise median (unweighted)."""
    return coordinate_median(x), []


def _trimmed(x, w, cfg, fraction: float | None = None):
    """Coordinate-wise mean after cutting `fraction` (default strategy.trim-fraction) of clients from each end."""
    fraction = _or(fraction, cfg.strategy.trim_fraction)
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trimmed-mean: fraction must be in [0, 0.5), got {fraction}")
    return trimmed_mean(x, fraction), []


def _krum(x, w, cfg, f: int | None = None, *, flavor: str | None = None):
    """The single update closest to its n - f - 2 neighbours (f default strategy.byzantine, 1;
    flavor=flower: 0, Flower's Krum)."""
    flavor = flavor_of(flavor)
    mean, kept = multi_krum(x, w, setting(cfg, flavor, "krum", "f", f, "byzantine"), 1)
    return mean, _left_out(len(x), kept)


def _multikrum(x, w, cfg, f: int | None = None, keep: int | None = None, *, flavor: str | None = None):
    """Example-weighted mean of the `keep` best Krum scores (default strategy.multikrum-keep; 0: n - f;
    f default strategy.byzantine, 1; flavor=flower: f 0 and keep 1, Flower's MultiKrum, which is Krum)."""
    flavor = flavor_of(flavor)
    f = setting(cfg, flavor, "multikrum", "f", f, "byzantine")
    keep = setting(cfg, flavor, "multikrum", "keep", keep, "multikrum_keep") or max(len(x) - f, 1)
    mean, kept = multi_krum(x, w, f, min(keep, len(x)))
    return mean, _left_out(len(x), kept)


def _norm_bounded(x, w, cfg, max_norm: float | None = None):
    """Example-weighted mean of updates scaled down to L2 norm <= `max_norm` (default strategy.max-norm)."""
    return norm_bounded_mean(x, w, _or(max_norm, cfg.strategy.max_norm))


def proximal_mu(cfg: Config, mu: float | None = None) -> dict[str, float]:
    """FedProx's per-round value for the clients: its stage's `mu`, else strategy.proximal-mu."""
    return {"proximal-mu": _or(mu, cfg.strategy.proximal_mu)}


RULES.register("fedavg", fedavg, accepts=DENSE, streams=True, fold=MEAN)
RULES.register("fedkseed", fedavg, accepts=frozenset({"sums"}), streams=True, fold=MEAN)  # FedKSeed's name for it
RULES.register("fedprox", fedprox, accepts=frozenset({"dense"}), streams=True, fold=MEAN, round_config=proximal_mu,
               checks={"mu": ">= 0"})
for _name, _combine, _checks in (("median", _median, {}), ("trimmed-mean", _trimmed, {"fraction": "[0, 0.5)"}),
                                 ("krum", _krum, {"f": "int >= 0", **FLAVOR_CHECK}),
                                 ("multikrum", _multikrum, {"f": "int >= 0", "keep": "int >= 0", **FLAVOR_CHECK}),
                                 ("norm-bounded", _norm_bounded, {"max_norm": "> 0"})):
    # not for zo's sums: clients draw their own seeds, so a coordinate-wise statistic of sparse sums is ~0
    RULES.register(_name, _robust(_combine), accepts=frozenset({"dense"}), streams=False, checks=_checks)
