"""Ferret's engine: first-order local steps, projected onto shared random bases, reconstructed alike
by every party.

    engine, tokenizer = engine_for(cfg)         # cached per process
    engine.apply(payload)                       # global version v -> v + 1, the same bits everywhere
    coefs, stats = engine.train(rows, cfg.train, pad_id, seed)   # AdamW steps, project, restore

Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language Models" (ICML 2025,
https://arxiv.org/abs/2409.06277). A client takes `train.local-steps` first-order steps from the global
weights w_v and projects its update delta = w_local - w_v, block by block, onto bases drawn from shared
seeds; it sends only the coordinates, and every party rebuilds the update from seeds and coordinates:

    gamma_{b,j} = <delta_b, z_{b,j}>                                (uploaded: K numbers in all)
    w_{v+1,b} = w_{v,b} + (scale / K_b) * sum_j mean_gamma_{b,j} z_{b,j}

z_{b,j} ~ N(0, I) (fedllm.methods.counter_rng: the same bits on every device), so
E[z z^T] = I and with ferret.scale = 1 the reconstruction is unbiased; its variance is about
(d_b / K_b) |delta_b|^2, which the fresh bases of every round average out over rounds. The
reconstruction is linear in gamma, so the mean of the clients' coordinates (the rule chain's
aggregate, all clients of a round projecting on the same bases) rebuilds the mean update.

Blocks: each trained tensor (sorted by name, tied tensors once), cut into pieces of at most
ferret.block-size elements; block b takes K_b = max(1, round(K d_b / d)) bases (Ferret's block-wise
reconstruction: a basis costs d_b to draw, not d). Block b is the stretch offset_b..offset_b + d_b of
the trained parameters as one stream, and basis j of version v is that stretch of the stream of seed
basis_seed(ferret.seed, v, j): bases differ across blocks, bases and rounds, and every party derives
them from (seed, version) alone.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fedllm import devices
from fedllm.config import Config, TrainConfig
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods import counter_rng as rng
from fedllm.methods.ferret import wire
from fedllm.methods.ferret.config import FerretConfig
from fedllm.methods.trained import start_model, trainable  # noqa: F401  (callers reach trainable here too)

DIST = "gaussian"  # the bases' distribution (counter_rng's quantized N(0, 1))


@dataclass(frozen=True)
class Block:
    """A stretch of one trained tensor: elements start..start + size - 1 of parameter `param`
    (flattened), elements offset..offset + size - 1 of the trained parameters as one stream."""

    param: int
    start: int
    size: int
    offset: int


def blocks_of(sizes: list[int], block_size: int) -> list[Block]:
    """Each tensor of `sizes` elements cut into blocks of at most `block_size`, in order."""
    out, offset = [], 0
    for i, n in enumerate(sizes):
        pieces = -(-n // block_size)  # equal pieces, so no small remainder block
        for k in range(pieces):
            lo, hi = n * k // pieces, n * (k + 1) // pieces
            out.append(Block(i, lo, hi - lo, offset + lo))
        offset += n
    return out


def allocation(sizes: list[int], k: int) -> list[int]:
    """K_b: K bases in proportion to block sizes, at least one a block."""
    total = sum(sizes)
    return [max(1, round(k * n / total)) for n in sizes]


def basis_seed(seed: int, version: int, j: int) -> int:
    """The stream seed of basis j of version v (SplitMix64's mixer over (seed, v, j)), 63 bits."""
    return rng.mix64(rng.mix64(rng.key(seed) + (version + 1) * rng.GAMMA) + j) >> 1


def project(deltas: list[torch.Tensor], blocks: list[Block], counts: list[int], seed: int,
            version: int) -> torch.Tensor:
    """(K,) float64: gamma_{b,j} = <delta_b, z_{b,j}>, block by block, bases of `version`."""
    out = []
    for block, n in zip(blocks, counts):
        piece = deltas[block.param].reshape(-1)[block.start:block.start + block.size]
        out.append(rng.project(piece, [basis_seed(seed, version, j) for j in range(n)], block.offset, DIST))
    return torch.cat(out)


@torch.no_grad()
def reconstruct_(params: list[torch.Tensor], coefs: torch.Tensor, blocks: list[Block], counts: list[int],
                 seed: int, version: int, scale: float) -> None:
    """params += (scale / K_b) sum_j coefs_{b,j} z_{b,j}, block by block, in place."""
    first = 0
    for block, n in zip(blocks, counts):
        p = params[block.param]
        weights = [scale * float(c) / n for c in coefs[first:first + n]]
        step = rng.combine(weights, [basis_seed(seed, version, j) for j in range(n)], block.offset, block.size,
                           DIST, p.dtype, p.device)
        p.view(-1)[block.start:block.start + block.size].add_(step)
        first += n


def fingerprint(named: list[tuple[str, torch.Tensor]], cfg: FerretConfig) -> int:
    """A 48-bit hash of the generator, the trained tensors' names, shapes and dtypes, and the blocking."""
    h = hashlib.sha256(f"{rng.NAME};{cfg.num_bases};{cfg.block_size};{cfg.seed};{cfg.scale};".encode())
    for n, p in named:
        h.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
    return int.from_bytes(h.digest()[:6], "big")


def chain_start(fp: int) -> bytes:
    """The hash chain's value at version 0 (for this fingerprint)."""
    return hashlib.sha256(b"ferret:" + fp.to_bytes(6, "big")).digest()


def chain_next(chain: bytes, payload: bytes) -> bytes:
    """The chain after one more round payload: equal chains mean equal histories, so equal weights."""
    return hashlib.sha256(chain + payload).digest()


class FerretEngine:
    """A model at a global version of the run: its initial trained weights plus the rounds applied."""

    def __init__(self, model: Any, cfg: FerretConfig, reload: Callable[[], list[torch.Tensor]]) -> None:
        self.model, self.cfg, self.reload = model, cfg, reload
        named = trainable(model, cfg.params)
        if not named:
            raise ConfigError(f"ferret.params: the model has no {cfg.params!r} parameters to train")
        self.params = [p for _, p in named]
        for p in self.params:
            p.requires_grad_(True)
        self.blocks = blocks_of([p.numel() for p in self.params], cfg.block_size)
        self.counts = allocation([b.size for b in self.blocks], cfg.num_bases)
        self.device = devices.of(model)
        self.fingerprint = fingerprint(named, cfg)
        self.chains = [chain_start(self.fingerprint)]  # the hash chain at each version applied

    @property
    def num_coefs(self) -> int:
        return sum(self.counts)

    def encode(self, coefs: torch.Tensor, version: int, seed: int) -> bytes:
        return wire.encode(coefs, self.counts, version, self.cfg.bits, seed)

    def decode(self, payload: bytes, version: int) -> torch.Tensor:
        return wire.decode(payload, self.counts, version)

    @property
    def chain(self) -> bytes:
        return self.chains[-1]

    @property
    def version(self) -> int:
        return len(self.chains) - 1

    @torch.no_grad()
    def reset(self) -> None:
        """Back to version 0: the initial trained weights."""
        for p, initial in zip(self.params, self.reload()):
            p.copy_(initial.to(p.device))
        self.chains = [chain_start(self.fingerprint)]

    def apply(self, payload: bytes) -> None:
        """Apply one round's payload (the aggregate coefficients of the bases of this version)."""
        coefs = self.decode(payload, self.version)
        reconstruct_(self.params, coefs, self.blocks, self.counts, self.cfg.seed, self.version, self.cfg.scale)
        self.chains.append(chain_next(self.chain, payload))

    def sync(self, since: int, base: bytes, rounds: list[bytes]) -> int:
        """Reach version since + len(rounds), given the payloads after version `since` and the history's
        chain `base` at `since`. Rounds this engine has already applied (clients of one process share
        it) are skipped once their chain is checked; `since` = 0 replays the whole run from the initial
        weights when this engine holds another history. Returns the rounds applied.

        Raises:
            PayloadError: this engine's history differs from the message's (the server sends the whole
                history next round).
        """
        here = self.version - since  # rounds of the message this engine already holds
        if 0 <= here <= len(rounds) and self.chains[since] == base:
            chain = base
            for payload in rounds[:here]:
                chain = chain_next(chain, payload)
            if chain != self.chain:
                here = -1
        else:
            here = -1
        if here < 0:
            if since != 0:
                raise PayloadError(f"ferret sync: this node holds version {self.version} of another history than "
                                   f"the message's, which builds on version {since}; the server sends the whole "
                                   "history next round")
            if base != chain_start(self.fingerprint):
                raise PayloadError("ferret sync: the run's history starts from other weights (ferret.*, lora.* "
                                   "and model.* must match the server's)")
            self.reset()
            here = 0
        for payload in rounds[here:]:
            self.apply(payload)
        return len(rounds) - here

    def train(self, rows: list[dict[str, list[int]]], cfg: TrainConfig, pad_id: int, seed: int,
              proximal_mu: float = 0.0, clock: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, dict[str, float]]:
        """Local AdamW steps from the global weights (`clock`: train.lr-schedule's, as lora's), the
        update's coordinates on this version's bases, and the weights restored (the cached model stays
        at the global version). Returns (coefs, stats)."""
        from fedllm.methods.adapters import engine as lora

        start = [p.detach().clone() for p in self.params]
        try:
            stats = lora.train(self.model, rows, cfg, pad_id, seed=seed, proximal_mu=proximal_mu, clock=clock)
            t0 = time.perf_counter()
            with torch.no_grad():
                deltas = [p.detach() - s for p, s in zip(self.params, start)]
            coefs = project(deltas, self.blocks, self.counts, self.cfg.seed, self.version)
            delta_norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas)))
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, start):
                    p.copy_(s)
        if not torch.isfinite(coefs).all():
            raise PayloadError("ferret: the local update is not finite (lower train.lr)")
        return coefs, {**stats, "update-norm": delta_norm, "project-seconds": time.perf_counter() - t0}


def engine_for(cfg: Config, cached: bool = True) -> tuple[FerretEngine, Any]:
    """(engine, tokenizer) for this run's model: the clients of one process share one, built once
    (each restores it after training); `cached=False` builds a new one (a server half owns its own).

    ferret.params=lora trains the [lora] adapter of a PEFT model (initialised from train.seed) on a
    frozen base, and a reset restores the initial adapter; ferret.params=all trains every weight, and a
    reset reloads them from the model cache on disk (on the host: no second model on the device).
    """
    from fedllm.model import MODEL_CACHE, placement

    f = cfg.ferret
    key = ("ferret", cfg.model.name, cfg.model.dtype, f.params, f.num_bases, f.block_size, f.seed, f.scale,
           cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.train.seed,
           *placement(cfg.model))

    def build() -> tuple[FerretEngine, Any]:
        model, tokenizer, reload = start_model(cfg, f.params)
        return FerretEngine(model, f, reload), tokenizer

    return MODEL_CACHE.get(key, build) if cached else build()
