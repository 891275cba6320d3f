"""Zeroth-order, seed-based updates: FedKSeed with one-byte scalars.

A pool of K seeds is fixed for the run. A local step draws a seed s, perturbs the weights in
place by +eps z_s, -2 eps z_s (two forward passes on the same batch, dropout off), and keeps
one scalar, the projected gradient g = (l+ - l-) / (2 eps); the last pass moves the weights by
(eps - lr g) z_s, which restores them and takes the step at once. So the weights are always

    theta = base - lr * sum_k coef_k * z_k          (K scalars describe the whole model)

`ZOEngine` keeps `coef` (float64) for its in-memory weights; syncing to any target vector
regenerates only the seeds whose coefficient differs. The canonical global state is
`Accumulators` (acc, mag, version), built identically by the server and every client from
the same 8-bit round payloads.

References: Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models
with Communication Cost under 18 Kilobytes" (FedKSeed, ICML 2024); Malladi et al., "Fine-Tuning
Language Models with Just Forward Passes" (MeZO, 2023); Zelikman et al., "Just One Byte (per
gradient)" (2023).

Sparse ZO (zo.mask): only a fixed subset of the weights is perturbed and trained, z drawn for the
subset alone (one stream over its elements, in parameter and index order): the variance of the
two-point estimate grows with the number of perturbed weights, and a step costs two forward passes
and no full-model perturbation. Guo et al., "Zeroth-Order Fine-Tuning of LLMs with Extreme Sparsity"
(Meerkat/SensZOQ, 2024). The subset is a function of the base weights and the config (`select`), so
every party derives it; its digest is in the fingerprint.

First-order warm-up (zo.warmup-rounds): the first N round payloads are dense float32 deltas of the
perturbed weights (clients' AdamW steps, averaged), kept in `Accumulators.warm`; zo then continues
from base + warm. ZOWarmUp's idea; the zo accumulators are still zero when it ends.

What must match on every party for z to be identical: the generator (fedllm.methods.counter_rng, a
counter-based stream computed with integer ops, the same bits on CPUs and GPUs), the parameter
order, shapes and dtype. `fingerprint()` hashes these; the server checks every client's. The
device does not matter: a GPU client, a CPU client and a CPU server agree on every z.
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any, Callable

import torch

from fedllm import devices
from fedllm.config import Config, TrainConfig
from fedllm.methods.zo.config import ZOConfig
from fedllm.data.templates import batches
from fedllm.errors import ConfigError
from fedllm.methods import counter_rng as rng
from fedllm.methods.trained import start_model, trainable  # noqa: F401  (callers reach trainable here too)
from fedllm.methods.counter_rng import perturb_  # noqa: F401  (callers reach it through the engine too)
# the scalar codec: callers reach it through the engine (zo.encode_upload, zo.decode, ...)
from fedllm.methods.zo.wire import MAGIC, PAIRS, SUMS, decode, encode, encode_upload, max_upload_bytes  # noqa: F401
# the canonical global state: callers reach it through the engine too
from fedllm.methods.zo.state import (FULL, HISTORY, WARM, Accumulators, decode_down, decode_warm, encode_down,  # noqa: F401
                                     encode_warm)

# --- perturbations -----------------------------------------------------------------------

def seed_pool(k: int, pool_seed: int) -> list[int]:
    """K distinct 31-bit seeds, the same on every party."""
    return random.Random(pool_seed).sample(range(1, 2**31 - 1), k)


MASK_SEED = 0  # the stream zo.mask-by=random ranks weights by: never a pool seed (those are >= 1)


@torch.no_grad()
def select(params: list[torch.Tensor], fraction: float, by: str) -> list[torch.Tensor]:
    """The sparse subset: per parameter, the sorted flat indices (int64, on the CPU) of the
    ceil(fraction * total) weights with the largest score over all parameters, ties taken in
    stream order; the score is |w| (by="magnitude") or |z| of the stream MASK_SEED ("random").

    Exact on every party: the scores are the base weights (or the device-independent z), and the
    threshold is an order statistic, not a sort that may break ties differently.
    """
    total = sum(p.numel() for p in params)
    keep = max(1, math.ceil(fraction * total))
    if by == "magnitude":
        score = torch.cat([p.detach().reshape(-1).cpu().float().abs() for p in params])  # (total,)
    else:
        score = rng.draw(MASK_SEED, 0, total, "gaussian", torch.float32).abs_()
    threshold = float(torch.kthvalue(score, total - keep + 1).values)  # the keep-th largest
    chosen = score > threshold
    ties = (score == threshold).nonzero().flatten()[:keep - int(chosen.sum())]
    chosen[ties] = True
    out, start = [], 0
    for p in params:
        out.append(chosen[start:start + p.numel()].nonzero().flatten())
        start += p.numel()
    return out


def fingerprint(named: list[tuple[str, torch.Tensor]], cfg: ZOConfig, mask: list[torch.Tensor] | None = None) -> int:
    """A 48-bit hash of the generator, parameter names, shapes and dtypes, the first z values,
    the sparse subset (its indices) and the warm-up. Not the device: z is the same on every one
    (fedllm.methods.counter_rng)."""
    h = hashlib.sha256(f"{rng.NAME};".encode())
    for n, p in named:
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    if mask is not None:
        h.update(f"mask:{cfg.mask!r}:{cfg.mask_by};".encode())
        for idx in mask:
            h.update(idx.numpy().astype("<i8").tobytes())
    if cfg.warmup_rounds:
        h.update(f"warmup:{cfg.warmup_rounds}:{cfg.warmup_lr!r};".encode())
    first = named[0][1]
    z = rng.draw(seed_pool(1, cfg.pool_seed)[0], 0, 64, cfg.dist, first.dtype, first.device)
    h.update(z.cpu().double().numpy().tobytes())
    return int.from_bytes(h.digest()[:6], "big")


# --- the engine --------------------------------------------------------------------------

class ZOEngine:
    """In-place ZO training of a model whose weights are base + warm - lr * sum_k coef_k z_k
    (z over the sparse subset when zo.mask is set; warm over the perturbed weights, zero without
    a warm-up)."""

    def __init__(self, model: Any, cfg: ZOConfig, reload_base: Callable[[], list[torch.Tensor]] | None = None):
        self.model = model
        self.cfg = cfg
        named = trainable(model, cfg.params)
        if not named:
            raise ConfigError(f"zo.params: the model has no {cfg.params!r} parameters to perturb")
        self.params = [p for _, p in named]
        self.device = devices.of(model)
        for p in self.params:
            p.requires_grad_(False)
        # the sparse subset: per parameter, its flat indices on the parameter's device (None: all)
        cpu_mask = select(self.params, cfg.mask, cfg.mask_by) if cfg.mask > 0 else None
        self.mask = None if cpu_mask is None else [idx.to(p.device) for idx, p in zip(cpu_mask, self.params)]
        self.n = sum(p.numel() for p in self.params) if cpu_mask is None else sum(len(i) for i in cpu_mask)
        self.pool = seed_pool(cfg.num_seeds, cfg.pool_seed)
        self.coef = torch.zeros(cfg.num_seeds, dtype=torch.float64)
        self.state = self.empty_state()
        self.fingerprint = fingerprint(named, cfg, cpu_mask)
        self.reload_base = reload_base
        self.syncs = 0
        # the warm-up: the perturbed weights at base (n,), and the warm offset the weights carry
        self.base_flat = self.flat().cpu().float() if cfg.warmup_rounds else None
        self.warm = torch.zeros(self.n if cfg.warmup_rounds else 0)

    def empty_state(self) -> Accumulators:
        return Accumulators(self.cfg.num_seeds, n=self.n if self.cfg.warmup_rounds else 0)

    def warming(self, state: Accumulators | None = None) -> bool:
        """Whether the round after `state` (default: the adopted one) is a first-order warm-up round."""
        return (state or self.state).warm_rounds < self.cfg.warmup_rounds

    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """weights += scale * z(seed), over the sparse subset when there is one (its own stream:
        element j of the subset, in parameter and index order, takes z element j)."""
        if self.mask is None:
            perturb_(self.params, seed, scale, self.cfg.dist)
            return
        offset = 0
        for p, idx in zip(self.params, self.mask):
            if len(idx):
                z = rng.draw(seed, offset, len(idx), self.cfg.dist, p.dtype, p.device)
                p.view(-1).index_add_(0, idx, z, alpha=scale)
            offset += len(idx)

    @torch.no_grad()
    def flat(self) -> torch.Tensor:
        """The perturbed weights as one (n,) float32 vector (the subset's, in stream order)."""
        if self.mask is None:
            return torch.cat([p.reshape(-1).float() for p in self.params])
        return torch.cat([p.view(-1).index_select(0, idx).float() for p, idx in zip(self.params, self.mask)])

    @torch.no_grad()
    def set_flat(self, values: torch.Tensor) -> None:
        """Write an (n,) vector back into the perturbed weights (the inverse of `flat`)."""
        start = 0
        for i, p in enumerate(self.params):
            size = p.numel() if self.mask is None else len(self.mask[i])
            part = values[start:start + size].to(p.device, p.dtype)
            if self.mask is None:
                p.view(-1).copy_(part)
            else:
                p.view(-1).index_copy_(0, self.mask[i], part)
            start += size

    @torch.no_grad()
    def move(self, diff: torch.Tensor) -> int:
        """weights -= lr * diff_k * z_k for every non-zero diff_k; returns seeds regenerated."""
        nonzero = diff.nonzero().flatten().tolist()
        for k in nonzero:
            self.perturb(self.pool[k], -self.cfg.lr * float(diff[k]))
            self.coef[k] += float(diff[k])
        return len(nonzero)

    def set_warm(self, warm: torch.Tensor) -> None:
        """Set the perturbed weights to base + warm exactly (the same bits on every party, however
        many rounds brought warm there); the zo moves are re-applied by the caller."""
        self.set_flat(self.base_flat + warm)
        self.warm = warm.clone()
        self.coef.zero_()

    def sync(self, state: Accumulators) -> int:
        """Bring the weights to `state` (and adopt it); returns seeds regenerated."""
        self.syncs += 1
        if self.reload_base is not None and self.cfg.rebuild_every > 0 and self.syncs % self.cfg.rebuild_every == 0:
            self.rebuild()
        if state.n and not torch.equal(state.warm, self.warm):
            self.set_warm(state.warm)
        moved = self.move(state.acc.double() - self.coef)
        self.state = state
        return moved

    @torch.no_grad()
    def rebuild(self) -> None:
        """Reset to the base weights and re-apply warm and coef: clears in-place floating-point drift."""
        for p, b in zip(self.params, self.reload_base()):
            p.copy_(b)
        coef = self.coef.clone()
        if self.base_flat is not None:
            self.set_warm(self.warm)
        self.coef.zero_()
        self.move(coef)

    @torch.no_grad()
    def loss(self, batch: dict[str, torch.Tensor]) -> float:
        return float(self.model(**{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}).loss)

    @torch.no_grad()
    def step(self, batch: dict[str, torch.Tensor], k: int) -> tuple[float, float] | None:
        """One two-point step on seed index k; returns (g, mean of the two losses), or None
        (weights restored) if a loss was not finite."""
        seed, eps = self.pool[k], self.cfg.eps
        self.perturb(seed, eps)
        plus = self.loss(batch)
        self.perturb(seed, -2 * eps)
        minus = self.loss(batch)
        g = (plus - minus) / (2 * eps)
        if not math.isfinite(g):
            self.perturb(seed, eps)
            return None
        self.perturb(seed, eps - self.cfg.lr * g)  # restore + step
        self.coef[k] += g
        return g, (plus + minus) / 2

    def train(self, rows: list[dict[str, list[int]]], cfg: TrainConfig, pad_id: int,
              seed: int) -> tuple[list[tuple[int, float]], dict[str, float]]:
        """`cfg.local_steps` ZO steps; returns the (seed index, g) pairs and stats."""
        gen = torch.Generator().manual_seed(seed)
        probs = self.state.probabilities() if self.cfg.pro else None
        was_training = self.model.training
        self.model.eval()  # dropout off: both passes must see the same function
        pairs: list[tuple[int, float]] = []
        losses: list[float] = []
        skipped = 0
        stream = batches(rows, cfg.batch_size, pad_id, gen)
        try:
            for _ in range(cfg.local_steps):
                batch = next(stream)
                if probs is None:
                    k = int(torch.randint(len(self.pool), (1,), generator=gen))
                else:
                    k = int(torch.multinomial(probs, 1, generator=gen))
                out = self.step(batch, k)
                if out is None:
                    skipped += 1
                    continue
                pairs.append((k, out[0]))
                losses.append(out[1])
        finally:
            self.model.train(was_training)
        return pairs, {"train-loss": sum(losses) / max(len(losses), 1), "steps": float(len(pairs)),
                       "skipped-steps": float(skipped)}

    def train_first_order(self, rows: list[dict[str, list[int]]], cfg: TrainConfig, pad_id: int,
                          seed: int) -> tuple[torch.Tensor, dict[str, float]]:
        """A warm-up round: `cfg.local_steps` AdamW steps (zo.warmup-lr, gradient norm clipped to 1)
        on the perturbed weights only, through the same loss; returns their delta (n,) float32 and
        stats. The weights are restored afterwards: the round's aggregate moves every party alike."""
        gen = torch.Generator().manual_seed(seed)
        start = self.flat()  # (n,)
        w = start.clone().requires_grad_(True)
        opt = torch.optim.AdamW([w], lr=self.cfg.warmup_lr, weight_decay=0.0)
        was_training = self.model.training
        self.model.eval()
        losses: list[float] = []
        stream = batches(rows, cfg.batch_size, pad_id, gen)
        for p in self.params:
            p.requires_grad_(True)
        try:
            for _ in range(cfg.local_steps):
                batch = next(stream)
                loss = self.model(**{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}).loss
                if not torch.isfinite(loss):
                    self.model.zero_grad(set_to_none=True)
                    continue
                loss.backward()
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self.params]
                if self.mask is None:
                    w.grad = torch.cat([g.reshape(-1).float() for g in grads]).to(w.device)
                else:
                    w.grad = torch.cat([g.view(-1).index_select(0, idx).float()
                                        for g, idx in zip(grads, self.mask)]).to(w.device)
                self.model.zero_grad(set_to_none=True)
                torch.nn.utils.clip_grad_norm_([w], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.set_flat(w.detach())
                losses.append(float(loss.detach()))
        finally:
            for p in self.params:
                p.requires_grad_(False)
                p.grad = None
            self.model.train(was_training)
            delta = self.flat() - start
            self.set_flat(start)  # back to exactly what the global state says
        return delta.cpu(), {"train-loss": sum(losses) / max(len(losses), 1), "steps": float(len(losses)),
                             "skipped-steps": float(cfg.local_steps - len(losses))}


def engine_for(cfg: Config) -> tuple[ZOEngine, Any]:
    """(engine, tokenizer) for this run's model, built once per process.

    zo.params=all perturbs every base weight, and a rebuild reloads them from the model cache
    on disk; zo.params=lora perturbs only the LoRA tensors of a PEFT model (initialised from
    train.seed), and a rebuild restores their initial values.
    """
    from fedllm.model import MODEL_CACHE, placement

    z = cfg.zo
    key = ("zo", cfg.model.name, cfg.model.dtype, z.params, z.num_seeds, z.pool_seed, z.dist, z.lr, z.eps, z.mask,
           z.mask_by, z.warmup_rounds, z.warmup_lr,
           cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.train.seed, *placement(cfg.model))

    def build() -> tuple[ZOEngine, Any]:
        model, tokenizer, reload = start_model(cfg, z.params)
        return ZOEngine(model, z, reload), tokenizer

    return MODEL_CACHE.get(key, build)
