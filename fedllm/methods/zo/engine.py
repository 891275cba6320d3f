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

What must match on every party for z to be identical: the generator (fedllm.methods.counter_rng, a
counter-based stream computed with integer ops, the same bits on CPUs and GPUs), the parameter
order, shapes and dtype. `fingerprint()` hashes these; the server checks every client's. The
device does not matter: a GPU client, a CPU client and a CPU server agree on every z.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fedllm import devices
from fedllm.config import Config, TrainConfig
from fedllm.methods.zo.config import ZOConfig
from fedllm.data.templates import batches
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods import counter_rng as rng
from fedllm.methods.counter_rng import perturb_  # noqa: F401  (callers reach it through the engine too)
# the scalar codec: callers reach it through the engine (zo.encode_upload, zo.decode, ...)
from fedllm.methods.zo.wire import MAGIC, PAIRS, SUMS, decode, encode, encode_upload, max_upload_bytes  # noqa: F401

# --- perturbations -----------------------------------------------------------------------

def seed_pool(k: int, pool_seed: int) -> list[int]:
    """K distinct 31-bit seeds, the same on every party."""
    return random.Random(pool_seed).sample(range(1, 2**31 - 1), k)


def trainable(model: Any, which: str) -> list[tuple[str, torch.Tensor]]:
    """The perturbed parameters, sorted by name so that every party agrees on the order."""
    named = [(n, p) for n, p in model.named_parameters() if which == "all" or "lora_" in n]
    seen: set[int] = set()
    out = []
    for n, p in sorted(named):
        if id(p) not in seen:  # tied weights (embeddings / lm_head) are one tensor
            seen.add(id(p))
            out.append((n, p))
    return out


def fingerprint(named: list[tuple[str, torch.Tensor]], cfg: ZOConfig) -> int:
    """A 48-bit hash of the generator, parameter names, shapes and dtypes, and the first z values.
    Not the device: z is the same on every one (fedllm.methods.counter_rng)."""
    h = hashlib.sha256(f"{rng.NAME};".encode())
    for n, p in named:
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    first = named[0][1]
    z = rng.draw(seed_pool(1, cfg.pool_seed)[0], 0, 64, cfg.dist, first.dtype, first.device)
    h.update(z.cpu().double().numpy().tobytes())
    return int.from_bytes(h.digest()[:6], "big")


# --- the canonical global state ----------------------------------------------------------

@dataclass
class Accumulators:
    """acc: per-seed sum of the applied scalars; mag: sum of their magnitudes (for -Pro)."""

    k: int
    acc: torch.Tensor = field(default=None)  # type: ignore[assignment]
    mag: torch.Tensor = field(default=None)  # type: ignore[assignment]
    version: int = 0

    def __post_init__(self) -> None:
        self.acc = torch.zeros(self.k) if self.acc is None else self.acc
        self.mag = torch.zeros(self.k) if self.mag is None else self.mag

    def apply(self, payload: bytes) -> torch.Tensor:
        """Add one round's decoded update (float32, the same order everywhere)."""
        update = decode(payload, self.k)
        self.acc = self.acc + update
        self.mag = self.mag + update.abs()
        self.version += 1
        return update

    def probabilities(self) -> torch.Tensor:
        """FedKSeed-Pro: seeds with larger scalar history are drawn more often; the mean
        magnitude is added to every seed so that none is starved."""
        weight = self.mag.double()
        weight = weight + (weight.mean() if weight.sum() > 0 else 1.0)
        return weight / weight.sum()

    def to_bytes(self) -> bytes:
        return struct.pack("<II", self.k, self.version) + self.acc.numpy().tobytes() + self.mag.numpy().tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes, k: int) -> "Accumulators":
        if len(raw) != 8 + 8 * k:
            raise PayloadError(f"zo state: {len(raw)} bytes, expected {8 + 8 * k}")
        k_in, version = struct.unpack_from("<II", raw)
        if k_in != k:
            raise PayloadError(f"zo state: made for K={k_in}, expected K={k}")
        acc = torch.frombuffer(bytearray(raw[8:8 + 4 * k]), dtype=torch.float32).clone()
        mag = torch.frombuffer(bytearray(raw[8 + 4 * k:]), dtype=torch.float32).clone()
        if not (torch.isfinite(acc).all() and torch.isfinite(mag).all()):
            raise PayloadError("zo state: non-finite accumulator")
        return cls(k, acc, mag, version)


# Down messages: either the full state, or the round payloads since a version.
FULL, HISTORY = b"F", b"H"


def encode_down(state: Accumulators, history: list[bytes], since: int | None) -> bytes:
    """The smaller of the full state and the history of rounds since version `since`."""
    full = FULL + state.to_bytes()
    if since is None or since > state.version:
        return full
    parts = history[since:]
    hist = HISTORY + struct.pack("<II", since, len(parts)) + b"".join(
        struct.pack("<I", len(p)) + p for p in parts)
    return min(full, hist, key=len)


def decode_down(raw: bytes, local: Accumulators) -> Accumulators:
    """The global state a down message describes, given this party's own state.

    Raises:
        PayloadError: when malformed, or when `local` is older than the history starts.
    """
    if raw[:1] == FULL:
        return Accumulators.from_bytes(raw[1:], local.k)
    if raw[:1] != HISTORY or len(raw) < 9:
        raise PayloadError("zo down message: bad header")
    since, n = struct.unpack_from("<II", raw, 1)
    if local.version < since:
        raise PayloadError(f"zo sync: local state is at version {local.version}, history starts at {since}; "
                           "the server sends the full state next round")
    if local.version > since + n:
        raise PayloadError(f"zo sync: local state version {local.version} is newer than the server's")
    out = Accumulators(local.k, local.acc.clone(), local.mag.clone(), local.version)
    pos = 9
    for i in range(n):
        if pos + 4 > len(raw):
            raise PayloadError("zo down message: truncated")
        (size,) = struct.unpack_from("<I", raw, pos)
        part = raw[pos + 4:pos + 4 + size]
        if len(part) != size:
            raise PayloadError("zo down message: truncated")
        pos += 4 + size
        if since + i >= local.version:  # rounds this party has already applied are skipped
            out.apply(part)
    if pos != len(raw):
        raise PayloadError("zo down message: trailing bytes")
    return out


# --- the engine --------------------------------------------------------------------------

class ZOEngine:
    """In-place ZO training of a model whose weights are base - lr * sum_k coef_k z_k."""

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
        self.pool = seed_pool(cfg.num_seeds, cfg.pool_seed)
        self.coef = torch.zeros(cfg.num_seeds, dtype=torch.float64)
        self.state = Accumulators(cfg.num_seeds)
        self.fingerprint = fingerprint(named, cfg)
        self.reload_base = reload_base
        self.syncs = 0

    @torch.no_grad()
    def move(self, diff: torch.Tensor) -> int:
        """weights -= lr * diff_k * z_k for every non-zero diff_k; returns seeds regenerated."""
        nonzero = diff.nonzero().flatten().tolist()
        for k in nonzero:
            perturb_(self.params, self.pool[k], -self.cfg.lr * float(diff[k]), self.cfg.dist)
            self.coef[k] += float(diff[k])
        return len(nonzero)

    def sync(self, state: Accumulators) -> int:
        """Bring the weights to `state` (and adopt it); returns seeds regenerated."""
        self.syncs += 1
        if self.reload_base is not None and self.cfg.rebuild_every > 0 and self.syncs % self.cfg.rebuild_every == 0:
            self.rebuild()
        moved = self.move(state.acc.double() - self.coef)
        self.state = state
        return moved

    @torch.no_grad()
    def rebuild(self) -> None:
        """Reset to the base weights and re-apply coef: clears in-place floating-point drift."""
        for p, b in zip(self.params, self.reload_base()):
            p.copy_(b)
        coef, self.coef = self.coef, torch.zeros_like(self.coef)
        self.move(coef)

    @torch.no_grad()
    def loss(self, batch: dict[str, torch.Tensor]) -> float:
        return float(self.model(**{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}).loss)

    @torch.no_grad()
    def step(self, batch: dict[str, torch.Tensor], k: int) -> tuple[float, float] | None:
        """One two-point step on seed index k; returns (g, mean of the two losses), or None
        (weights restored) if a loss was not finite."""
        seed, eps = self.pool[k], self.cfg.eps
        perturb_(self.params, seed, eps, self.cfg.dist)
        plus = self.loss(batch)
        perturb_(self.params, seed, -2 * eps, self.cfg.dist)
        minus = self.loss(batch)
        g = (plus - minus) / (2 * eps)
        if not math.isfinite(g):
            perturb_(self.params, seed, eps, self.cfg.dist)
            return None
        perturb_(self.params, seed, eps - self.cfg.lr * g, self.cfg.dist)  # restore + step
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


def engine_for(cfg: Config) -> tuple[ZOEngine, Any]:
    """(engine, tokenizer) for this run's model, built once per process.

    zo.params=all perturbs every base weight, and a rebuild reloads them from the model cache
    on disk; zo.params=lora perturbs only the LoRA tensors of a PEFT model (initialised from
    train.seed), and a rebuild restores their initial values.
    """
    from fedllm.model import MODEL_CACHE, load_base_model, placement
    from fedllm.methods.adapters import engine as lora

    z = cfg.zo
    key = ("zo", cfg.model.name, cfg.model.dtype, z.params, z.num_seeds, z.pool_seed, z.dist, z.lr, z.eps,
           cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.train.seed, *placement(cfg.model))

    def build() -> tuple[ZOEngine, Any]:
        if z.params == "all":
            model, tokenizer = load_base_model(cfg.model, cached=False)

            def reload() -> list[torch.Tensor]:  # read on the host: no second model on the device
                fresh, _ = load_base_model(dataclasses.replace(cfg.model, device="cpu", device_map=""), cached=False)
                return [p for _, p in trainable(fresh, "all")]
        else:
            model, tokenizer = lora.build_lora_model(cfg.model, cfg.lora, cfg.train.seed)
            initial = [p.detach().clone() for _, p in trainable(model, "lora")]

            def reload() -> list[torch.Tensor]:
                return initial
        return ZOEngine(model, z, reload), tokenizer

    return MODEL_CACHE.get(key, build)
