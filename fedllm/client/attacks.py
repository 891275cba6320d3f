"""Dishonest and faulty clients for simulations (attack.clients = "partition=kind,..."), to test
that validation, the ledger's flags and the robust strategies catch them.

Model poisoning (the client trains honestly, then sends something else):
- zero: a free rider; skips training and sends the global state back (a zero update).
- noise: a Gaussian direction scaled to attack.noise-scale x its honest update's norm.
- sign-flip: minus its honest update.
- scale: its honest update times attack.scale.
Lazy or copying clients:
- replay: skips training and sends its previous round's reply again, byte for byte (trains
  honestly in its first round, having nothing to replay).
- duplicate: sends the update of partition attack.victim (it trains as that client: same data,
  same seed, so the bytes are the victim's).
Data poisoning:
- label-flip: trains on its own prompts with the responses shuffled among them.
A fault:
- crash: raises mid-round, after loading the model (a dropout, for tests).

Each kind is one `Attack` of hooks in the ATTACKS registry; a new kind is one registration
(`ATTACKS.register("my-kind", Attack(update=...))`), in a module server.plugins names.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from fedllm.registry import Registry

if TYPE_CHECKING:  # torch is imported where an attack runs, so that config checks stay light
    import torch

class Attack(NamedTuple):
    """What a dishonest client of one kind does differently from an honest one; each hook is
    optional, and client_train.handle calls them in this order. `cfg` is the run's Config.

    start(pid, server_round): before anything (crash raises here).
    partition(cfg, pid) -> the partition it trains as (duplicate: attack.victim).
    data(examples, seed) -> the examples it trains on (label-flip).
    train: False skips local training (zero: a free rider).
    replay: sends its previous round's reply again (after training honestly in its first).
    update(delta, seed, cfg) -> what it sends instead of its honest update (model poisoning).
    """

    start: Callable[[int, int], None] | None = None
    partition: Callable[[Any, int], int] | None = None
    data: Callable[[list[dict[str, Any]], int], list[dict[str, Any]]] | None = None
    train: bool = True
    replay: bool = False
    update: Callable[["dict[str, torch.Tensor]", int, Any], "dict[str, torch.Tensor]"] | None = None


ATTACKS: Registry[Attack] = Registry("attack", "attack.clients")
"""attack.clients kinds; a user's own joins with `ATTACKS.register("my-kind", Attack(...))` in a
module named by server.plugins."""


class Crash(RuntimeError):
    """Raised by an attack.clients crash client."""


def crash(pid: int, server_round: int) -> None:
    raise Crash(f"attack.clients: partition {pid} crashes in round {server_round} (a test fault)")


def poisoned(kind: str, delta: dict[str, torch.Tensor], seed: int, noise_scale: float = 1.0,
             scale: float = 10.0) -> dict[str, torch.Tensor]:
    """The update a model-poisoning attacker of `kind` sends instead of its honest `delta`;
    any other kind returns `delta` itself."""
    import torch

    if kind == "zero":
        return {k: torch.zeros_like(t) for k, t in delta.items()}
    if kind == "sign-flip":
        return {k: -t for k, t in delta.items()}
    if kind == "scale":
        return {k: scale * t for k, t in delta.items()}
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(t.shape, generator=gen, dtype=torch.float32) for k, t in delta.items()}
        honest = torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values()))
        size = torch.sqrt(sum((n.double() ** 2).sum() for n in noise.values()))
        factor = float(noise_scale * honest / size) if size > 0 else 0.0
        return {k: (factor * noise[k]).to(delta[k].dtype) for k in delta}
    return delta


def flip_labels(examples: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The examples with their responses shuffled among them (a derangement when n > 1); preference
    pairs with chosen and rejected swapped (every label flipped)."""
    if examples and "rejected" in examples[0]:
        return [{**e, "response": e["rejected"], "rejected": e["response"]} for e in examples]
    if len(examples) < 2:
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    shift = order[1:] + order[:1]  # each takes the response of the next in a random cycle
    out = [dict(e) for e in examples]
    for i, j in zip(order, shift):
        out[i]["response"] = examples[j]["response"]
    return out


def _poisoning(kind: str) -> Callable[[dict[str, torch.Tensor], int, Any], dict[str, torch.Tensor]]:
    return lambda delta, seed, cfg: poisoned(kind, delta, seed, cfg.attack.noise_scale, cfg.attack.scale)


ATTACKS.register("zero", Attack(train=False, update=_poisoning("zero")))
ATTACKS.register("noise", Attack(update=_poisoning("noise")))
ATTACKS.register("sign-flip", Attack(update=_poisoning("sign-flip")))
ATTACKS.register("scale", Attack(update=_poisoning("scale")))
ATTACKS.register("replay", Attack(replay=True))
ATTACKS.register("duplicate", Attack(partition=lambda cfg, pid: cfg.attack.victim))
ATTACKS.register("label-flip", Attack(data=flip_labels))
ATTACKS.register("crash", Attack(start=crash))
POISONING = tuple(e.name for e in ATTACKS.entries() if e.impl.update is not None)  # rewrite an honest update
