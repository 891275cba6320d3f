"""zo's scalar codec: a round's (seed index, scalar) pairs or per-seed sums in a few bytes (bits
per scalar: zo.bits), and the per-seed sums the server sends down; each payload starts with HEAD
(magic, mode, bits, K, count, scale)."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import torch

from fedllm.compression.codecs import symmetric_quantize
from fedllm.compression.wire import pack_bits, unpack_bits
from fedllm.errors import PayloadError

MAGIC = b"ZK"
PAIRS, SUMS = 0, 1
HEAD = struct.Struct("<2sBBIIf")  # magic, mode, bits, K, count, scale


def _quantize(values: torch.Tensor, bits: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Shared-scale symmetric quantization with stochastic rounding (unbiased): compression's
    quantizer over one block, in float64, with torch's uniform draws (the generator is seeded
    by the round, so every party rounds alike)."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), 1.0
    noise = torch.rand(values.shape, generator=gen, dtype=torch.float64).numpy()[None]  # (1, n)
    q, scales = symmetric_quantize(values.double().numpy()[None], bits, noise)
    return torch.from_numpy(q[0]), float(scales[0]) or 1.0


def _pack(q: torch.Tensor, bits: int) -> bytes:
    """Offset-binary codes q + 2**(bits-1), packed low bits first by compression's packer."""
    return pack_bits((q + 2 ** (bits - 1)).numpy().astype(np.uint8), bits).tobytes()


def _unpack(raw: bytes, count: int, bits: int) -> torch.Tensor:
    codes = unpack_bits(np.frombuffer(raw, dtype=np.uint8), bits, count)
    return torch.from_numpy(codes.astype(np.int64)) - 2 ** (bits - 1)


def encode(k: int, idx: torch.Tensor, values: torch.Tensor, bits: int, seed: int, mode: int) -> bytes:
    """Encode per-seed scalars: `PAIRS` keeps (index, value) per step, `SUMS` a K-bit mask
    plus one value per non-zero seed. bits=0 sends float32 values."""
    gen = torch.Generator().manual_seed(seed)
    if mode == SUMS:
        dense = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values.double())
        mask = dense != 0
        values = dense[mask]
        where = pack_bits(mask.numpy().astype(np.uint8), 1).tobytes()
    else:
        where = idx.numpy().astype(_index_dtype(k)).tobytes()
    if bits == 0:
        body, scale = values.float().numpy().tobytes(), 1.0
    else:
        q, scale = _quantize(values, bits, gen)
        body = _pack(q, bits)
    return HEAD.pack(MAGIC, mode, bits, k, len(values), scale) + where + body


def _index_dtype(k: int) -> Any:
    return np.uint8 if k <= 256 else np.uint16


def decode(payload: bytes, k: int) -> torch.Tensor:
    """Dense float32 per-seed sums (K,) of an encoded payload.

    Raises:
        PayloadError: on a wrong header, K, length, index or a non-finite value.
    """
    if len(payload) < HEAD.size:
        raise PayloadError(f"zo payload: {len(payload)} bytes is shorter than its header")
    magic, mode, bits, k_in, count, scale = HEAD.unpack_from(payload)
    if magic != MAGIC or mode not in (PAIRS, SUMS) or bits not in (0, 2, 4, 8):
        raise PayloadError("zo payload: bad header")
    if k_in != k:
        raise PayloadError(f"zo payload: made for K={k_in}, expected K={k}")
    if not math.isfinite(scale) or scale <= 0:
        raise PayloadError(f"zo payload: bad scale {scale}")
    rest = payload[HEAD.size:]
    where_len = (k + 7) // 8 if mode == SUMS else count * np.dtype(_index_dtype(k)).itemsize
    body_len = count * 4 if bits == 0 else math.ceil(count * bits / 8)
    if len(rest) != where_len + body_len:
        raise PayloadError(f"zo payload: {len(rest)} body bytes, expected {where_len + body_len}")
    if mode == SUMS:
        mask = unpack_bits(np.frombuffer(rest[:where_len], dtype=np.uint8), 1, k)
        idx = torch.from_numpy(mask.astype(np.int64)).nonzero().flatten()
        if len(idx) != count:
            raise PayloadError(f"zo payload: mask has {len(idx)} seeds, header says {count}")
    else:
        idx = torch.from_numpy(np.frombuffer(rest[:where_len], dtype=_index_dtype(k)).astype(np.int64))
        if len(idx) and idx.max() >= k:
            raise PayloadError(f"zo payload: seed index outside 0..{k - 1}")
    raw = rest[where_len:]
    if bits == 0:
        values = torch.frombuffer(bytearray(raw), dtype=torch.float32).double() if count else \
            torch.zeros(0, dtype=torch.float64)
    else:
        values = _unpack(raw, count, bits).double() * scale
    if not torch.isfinite(values).all():
        raise PayloadError("zo payload: non-finite scalar")
    return torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values).float()


def max_upload_bytes(k: int) -> int:
    """The largest upload `encode_upload` makes for K seeds: per-seed float32 sums, whatever the steps."""
    return HEAD.size + (k + 7) // 8 + 4 * k


def encode_upload(k: int, pairs: list[tuple[int, float]], bits: int, seed: int) -> bytes:
    """A round's (seed index, scalar) pairs, or their per-seed sums, whichever is smaller."""
    idx = torch.tensor([i for i, _ in pairs], dtype=torch.int64)
    values = torch.tensor([g for _, g in pairs], dtype=torch.float64)
    return min((encode(k, idx, values, bits, seed, m) for m in (PAIRS, SUMS)), key=len)
