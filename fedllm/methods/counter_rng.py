"""Counter-based perturbations that every party regenerates bit for bit, on any device.

    z = draw(seed, offset=0, n=1000, dist="gaussian", dtype=torch.float32, device="cuda:0")

Element i of seed s's stream depends only on (s, i): it is computed, not read from a stateful
generator, with torch integer ops that give the same bits on a CPU and on a GPU (wrapping int64
multiplies and adds, shifts, xors, a table lookup). Neither torch's CPU and CUDA generators (they
give different numbers for one seed) nor float transcendentals (log and cos differ in the last
bit between devices) are used.

- Bits: SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
  OOPSLA 2014; Vigna's reference mixer), read as a counter-based generator: word c of seed s is
  mix64(key(s) + (c + 1) * 0x9E3779B97F4A7C15), with key(s) = mix64(s + 0x9E3779B97F4A7C15).
- Rademacher: 64 signs a word, byte by byte (little-endian bytes, high bit first: numpy's
  unpackbits order); element i is bit i of the stream.
- Gaussian: 4 elements a word, each a 16-bit index into a table of 65,536 equiprobable N(0, 1)
  quantiles (the inverse CDF at the bin midpoints, rescaled to unit variance, mean 0 by symmetry):
  z is N(0, 1) quantized to 2^16 levels, |z| <= 4.3; its CDF is within 2^-17 of the normal's.
  The table is computed once in float64 on the CPU (Python's statistics.NormalDist) and cast, so
  it is the same on every party.

A tensor at element `offset` of the concatenated parameters takes elements offset..offset+n-1:
the whole model is one stream, so a party may split it into chunks anywhere. On the CPU this is
faster than torch.randn (bench/zo.py), and it needs no copy of the model: chunks of CHUNK elements.
"""

from __future__ import annotations

import functools
from statistics import NormalDist

import numpy as np
import torch

NAME = "splitmix64-q16"  # in the fingerprint and in a zo checkpoint: what generated z
CHUNK = {"gaussian": 1 << 20, "rademacher": 1 << 22}  # elements drawn at a time: a buffer, not a model
LANES = {"gaussian": 4, "rademacher": 64}  # elements per 64-bit word

_MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores it."""
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


def mix64(x: int) -> int:
    """SplitMix64's output function on a Python int (the reference the tensor code follows)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * _C1) & _MASK
    x = ((x ^ (x >> 27)) * _C2) & _MASK
    return x ^ (x >> 31)


def key(seed: int) -> int:
    """A seed's 64-bit stream key: streams of nearby seeds start far apart."""
    return mix64(seed + GAMMA)


def words(seed: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Words start..start+count-1 of seed's stream, (count,) int64 holding the uint64 bits."""
    steps = _steps(count, str(torch.device(device)))  # (c + 1) * GAMMA for c < count
    z = steps.add(_signed(key(seed) + start * GAMMA))  # wraps mod 2^64, as uint64 would
    tmp = torch.empty_like(z)
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)  # arithmetic on int64; the mask makes it logical
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(_signed(mult))
    return z


def _steps(count: int, device: str) -> torch.Tensor:
    """(c + 1) * GAMMA mod 2^64 for c < count; up to a chunk's words, a slice of one cached tensor."""
    if count > _CHUNK_WORDS:  # a draw larger than a chunk (not perturb_'s)
        return torch.arange(1, count + 1, dtype=torch.int64, device=device).mul_(_signed(GAMMA))
    return _chunk_steps(device)[:count]


_CHUNK_WORDS = max(CHUNK[d] // LANES[d] for d in LANES) + 1  # + 1: a chunk may start mid-word


@functools.lru_cache(maxsize=None)
def _chunk_steps(device: str) -> torch.Tensor:
    return torch.arange(1, _CHUNK_WORDS + 1, dtype=torch.int64, device=device).mul_(_signed(GAMMA))


@functools.lru_cache(maxsize=None)
def _gaussian_table() -> torch.Tensor:
    """(65536,) float64: N(0, 1) at the midpoints of 2^16 equiprobable bins, unit variance."""
    inv = NormalDist().inv_cdf
    half = [inv((i + 0.5) / 65536) for i in range(32768, 65536)]  # the upper half; the lower mirrors it
    table = torch.tensor([-v for v in reversed(half)] + half, dtype=torch.float64)
    return table / table.pow(2).mean().sqrt()


@functools.lru_cache(maxsize=None)
def _levels(dtype: torch.dtype, device: str) -> torch.Tensor:
    """The Gaussian table in `dtype` on `device`: cast on the CPU, then moved (the same values everywhere)."""
    return _gaussian_table().to(dtype).to(device)


@functools.lru_cache(maxsize=None)
def _sign_rows(device: str) -> torch.Tensor:
    """(256,) int64, each the 8 bytes of a byte's bits as int8 +-1, high bit first (one 8-byte row a byte:
    a 1-D gather, then one cast)."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.int8) * 2 - 1  # (256, 8)
    return torch.from_numpy(bits).view(torch.int64).view(-1).to(device)


def draw(seed: int, offset: int, n: int, dist: str, dtype: torch.dtype,
         device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements offset..offset+n-1 of seed's z stream, (n,) of `dtype` on `device`."""
    lanes = LANES[dist]
    first, skip = divmod(offset, lanes)
    count = (skip + n + lanes - 1) // lanes
    w = words(seed, first, count, device)
    if dist == "gaussian":
        idx = w.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)  # (4 count,) in 0..65535
        return _levels(dtype, str(torch.device(device))).index_select(0, idx)[skip:skip + n]
    rows = _sign_rows(str(torch.device(device))).index_select(0, w.view(torch.uint8).to(torch.int32))
    return rows.view(torch.int8)[skip:skip + n].to(dtype)  # (8 count,) rows -> (64 count,) signs


def reference(seed: int, offset: int, n: int, dist: str) -> np.ndarray:
    """The same elements computed independently with numpy's uint64 arithmetic, float64: what the
    tests hold `draw` to (before its cast to the parameters' dtype)."""
    lanes = LANES[dist]
    first, skip = divmod(offset, lanes)
    count = (skip + n + lanes - 1) // lanes
    with np.errstate(over="ignore"):
        x = (np.arange(first + 1, first + 1 + count, dtype=np.uint64) * np.uint64(GAMMA)) + np.uint64(key(seed))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_C1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_C2)
        x = x ^ (x >> np.uint64(31))
    raw = x.astype("<u8").tobytes()
    if dist == "gaussian":
        return _gaussian_table().numpy()[np.frombuffer(raw, dtype="<u2")][skip:skip + n]
    return (np.unpackbits(np.frombuffer(raw, dtype=np.uint8)).astype(np.float64) * 2 - 1)[skip:skip + n]


@torch.no_grad()
def perturb_(params: list[torch.Tensor], seed: int, scale: float, dist: str) -> None:
    """params += scale * z(seed), in place. The parameters are one stream (this module),
    drawn CHUNK elements at a time on their own device: no parameter-sized buffer, and the same z
    on every device."""
    offset = 0
    for p in params:
        flat = p.view(-1) if p.is_contiguous() else None
        n = p.numel()
        if flat is None:  # not seen on a model's parameters; kept correct, not fast
            p.add_(draw(seed, offset, n, dist, p.dtype, p.device).view(p.shape), alpha=scale)
        else:
            for start in range(0, n, CHUNK[dist]):
                size = min(CHUNK[dist], n - start)
                flat[start:start + size].add_(draw(seed, offset + start, size, dist, p.dtype, p.device),
                                              alpha=scale)
        offset += n



def draw_rows(seeds: list[int], offset: int, n: int, dist: str, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Elements offset..offset+n-1 of each seed's z stream, (len(seeds), n): row r equals
    draw(seeds[r], offset, n, ...), drawn in one pass (a block's bases at once)."""
    lanes = LANES[dist]
    first, skip = divmod(offset, lanes)
    count = (skip + n + lanes - 1) // lanes
    dev = str(torch.device(device))
    keys = torch.tensor([_signed(key(s) + first * GAMMA) for s in seeds], dtype=torch.int64, device=dev)
    z = _steps(count, dev)[None, :] + keys[:, None]  # (S, count), wrapping as uint64 would
    tmp = torch.empty_like(z)
    for shift, mult in ((30, _C1), (27, _C2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(_signed(mult))
    if dist == "gaussian":
        idx = z.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)  # (S, 4 count)
        return _levels(dtype, dev)[idx][:, skip:skip + n]
    rows = _sign_rows(dev)[z.view(torch.uint8).to(torch.int64)]  # (S, 8 count) rows of 8 signs
    return rows.view(torch.int8).view(len(seeds), -1)[:, skip:skip + n].to(dtype)


def _groups(seeds: list[int], n: int, dist: str) -> list[tuple[int, list[int]]]:
    """(first index, seeds) groups whose draws stay within a chunk of elements."""
    per = max(1, CHUNK[dist] // max(n, 1))
    return [(i, seeds[i:i + per]) for i in range(0, len(seeds), per)]


@torch.no_grad()
def project(x: torch.Tensor, seeds: list[int], offset: int, dist: str) -> torch.Tensor:
    """(len(seeds),) float64: <x, z(s)[offset:offset + x.numel()]> for each seed s, a flat tensor's
    coordinates along bases drawn from the streams (Ferret's projection, fedllm.methods.ferret), drawn
    a chunk of elements at a time on x's device."""
    flat = x.reshape(-1).double()
    n, out = flat.numel(), torch.zeros(len(seeds), dtype=torch.float64, device=flat.device)
    for start in range(0, n, CHUNK[dist]):
        size = min(CHUNK[dist], n - start)
        for first, group in _groups(seeds, size, dist):
            z = draw_rows(group, offset + start, size, dist, torch.float64, flat.device)  # (S, size)
            out[first:first + len(group)] += z @ flat[start:start + size]
    return out.cpu()


@torch.no_grad()
def combine(coefs: list[float], seeds: list[int], offset: int, n: int, dist: str, dtype: torch.dtype,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """sum_j coefs[j] * z(seeds[j])[offset:offset + n], (n,) of `dtype`: Ferret's reconstruction. Summed in
    float32 row after row in the order given (elementwise adds, no reduction whose order a BLAS or a thread
    count could change), so every party that combines the same coefficients gets the same bits."""
    out = torch.zeros(n, dtype=torch.float32, device=device)
    for start in range(0, n, CHUNK[dist]):
        size = min(CHUNK[dist], n - start)
        for first, group in _groups(seeds, size, dist):
            rows = draw_rows(group, offset + start, size, dist, torch.float32, device)  # (S, size)
            for r in range(len(group)):
                c = coefs[first + r]
                if c != 0.0:
                    out[start:start + size].add_(rows[r], alpha=c)
    return out.to(dtype)
