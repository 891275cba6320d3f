"""Dishonest clients for simulations (attack.clients = "partition=kind,..."), to test that the
ledger's flags and the robust strategies catch them.

- zero: a free rider; skips training and sends the global state back (a zero update).
- noise: trains, then sends a random direction scaled to `noise_scale` x its honest update's norm.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def attacked(kind: str, local: State, global_state: State, noise_scale: float, seed: int) -> State:
    """The local state an attacker of `kind` sends instead of `local`."""
    if kind == "zero":
        return {k: t.clone() for k, t in global_state.items()}
    if kind == "noise":
        gen = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(t.shape, generator=gen, dtype=torch.float32) for k, t in local.items()}
        honest = torch.sqrt(sum(((local[k] - global_state[k]).float() ** 2).sum() for k in local))
        size = torch.sqrt(sum((n ** 2).sum() for n in noise.values()))
        scale = noise_scale * honest / size
        return {k: (global_state[k] + scale * noise[k]).to(local[k].dtype) for k in local}
    raise ValueError(f"unknown attack {kind!r}")
