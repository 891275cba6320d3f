"""Ferret's coefficient codec: one round's K coefficients (a client's upload, or the round's aggregate
every party applies) in a few bytes.

    payload = encode(coefs, counts, version=3, bits=8, seed=round_seed)   # HEAD + scales + packed codes
    coefs = decode(payload, counts, version=3)                            # (K,) float64

HEAD is (magic, bits, version, count, blocks). bits=0: count float32 values. bits=8 or 4: one float32
scale per block (its largest |coefficient| over 2^(bits-1) - 1; blocks differ by orders of magnitude),
then the codes q + 2^(bits-1), packed by compression's packer; q = sign(c) floor(|c| / scale + u) with u
uniform from a generator seeded by the caller (stochastic rounding: unbiased; every party that encodes
the same values with the same seed writes the same bytes, and -c the negated codes).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from fedllm.compression.wire import pack_bits, unpack_bits
from fedllm.errors import PayloadError

MAGIC = b"FR"
HEAD = struct.Struct("<2sBIII")  # magic, bits, version, count, blocks


def _levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1  # the largest |q|: codes stay in 1..2^bits - 1, symmetric around zero


def encode(coefs: torch.Tensor, counts: list[int], version: int, bits: int, seed: int) -> bytes:
    """(K,) coefficients of blocks with `counts` bases each (sum(counts) = K), for bases of `version`."""
    values = coefs.detach().double().cpu()
    if values.numel() != sum(counts):
        raise ValueError(f"{values.numel()} coefficients for {sum(counts)} bases")
    head = HEAD.pack(MAGIC, bits, version, values.numel(), len(counts))
    if bits == 0:
        return head + values.float().numpy().tobytes()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(values.shape, generator=gen, dtype=torch.float64)
    scales, codes, start = [], [], 0
    for n in counts:
        block = values[start:start + n]
        scale = float(block.abs().max()) / _levels(bits) if n else 0.0
        scale = scale or 1.0
        # sign(c) floor(|c| / scale + u): unbiased, and -c encodes to exactly minus c's codes
        q = torch.sign(block) * torch.floor(block.abs() / scale + noise[start:start + n]).clamp_(max=_levels(bits))
        scales.append(scale)
        codes.append(q.to(torch.int64) + 2 ** (bits - 1))
        start += n
    packed = pack_bits(torch.cat(codes).numpy().astype(np.uint8), bits).tobytes()
    return head + np.asarray(scales, dtype="<f4").tobytes() + packed


def decode(payload: bytes, counts: list[int], version: int) -> torch.Tensor:
    """(K,) float64 coefficients of an encoded payload.

    Raises:
        PayloadError: on a wrong header, version, length or block count, or a non-finite value.
    """
    if len(payload) < HEAD.size:
        raise PayloadError(f"ferret payload: {len(payload)} bytes is shorter than its header")
    magic, bits, got_version, count, blocks = HEAD.unpack_from(payload)
    if magic != MAGIC or bits not in (0, 4, 8):
        raise PayloadError("ferret payload: bad header")
    if got_version != version:
        raise PayloadError(f"ferret payload: coefficients of the bases of version {got_version}, expected {version}")
    if count != sum(counts) or blocks != len(counts):
        raise PayloadError(f"ferret payload: {count} coefficients in {blocks} blocks, expected {sum(counts)} in "
                           f"{len(counts)} (ferret.num-bases, ferret.block-size and the model must match)")
    body = payload[HEAD.size:]
    if bits == 0:
        if len(body) != 4 * count:
            raise PayloadError(f"ferret payload: {len(body)} body bytes, expected {4 * count}")
        values = torch.from_numpy(np.frombuffer(body, dtype="<f4").astype(np.float64))
    else:
        expected = 4 * blocks + math.ceil(count * bits / 8)
        if len(body) != expected:
            raise PayloadError(f"ferret payload: {len(body)} body bytes, expected {expected}")
        scales = np.frombuffer(body[:4 * blocks], dtype="<f4").astype(np.float64)
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise PayloadError("ferret payload: bad block scale")
        codes = unpack_bits(np.frombuffer(body[4 * blocks:], dtype=np.uint8), bits, count).astype(np.int64)
        q = codes - 2 ** (bits - 1)
        if np.abs(q).max(initial=0) > _levels(bits):
            raise PayloadError("ferret payload: code outside the symmetric range")
        values = torch.from_numpy(q * np.repeat(scales, counts))
    if not torch.isfinite(values).all():
        raise PayloadError("ferret payload: non-finite coefficient")
    return values


def size(count: int, blocks: int, bits: int) -> int:
    """Bytes of an encoded payload of `count` coefficients in `blocks` blocks."""
    return HEAD.size + (4 * count if bits == 0 else 4 * blocks + math.ceil(count * bits / 8))
