"""The byte layout under the codecs: varints, bit packing, and frames.

A frame is a small dict of named numpy arrays (uint8 or float32), e.g. {"shape": ..., "v": ...}.
`pack` lays it out as: u8 field count, then per field u8 name length, name, u8 dtype code,
varint byte length, data. `unpack` checks every length and raises PayloadError, so malformed
bytes never reach numpy in a state that could crash it.
"""

from __future__ import annotations

import numpy as np

from fedllm.errors import PayloadError

Frame = dict[str, np.ndarray]
DTYPES = {0: np.dtype(np.uint8), 1: np.dtype(np.float32), 2: np.dtype(np.float16)}
CODES = {v: k for k, v in DTYPES.items()}


def varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128: 7 bits a byte, high bit set on every byte but a value's last."""
    x = np.asarray(values, dtype=np.uint64)
    nbytes = np.ones(len(x), dtype=np.int64)
    for shift in range(7, 64, 7):
        nbytes += (x >> np.uint64(shift)) > 0
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    starts = np.cumsum(nbytes) - nbytes
    for j in range(int(nbytes.max(initial=0))):
        sel = nbytes > j
        low = (x[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (low | more).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    """The inverse of varint_encode.

    Raises:
        PayloadError: for a truncated value or one longer than 64 bits.
    """
    b = np.asarray(data, dtype=np.uint8)
    if len(b) and b[-1] & 0x80:
        raise PayloadError("truncated varint")
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    lengths = ends - starts + 1
    if len(lengths) and lengths.max() > 9:
        raise PayloadError("varint longer than 63 bits")
    out = np.zeros(len(ends), dtype=np.uint64)
    for j in range(int(lengths.max(initial=0))):
        sel = lengths > j
        out[sel] |= (b[starts[sel] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return out


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes < 2**bits (bits in 1, 2, 4, 8) into bytes, low bits first."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    per = 8 // bits
    padded = np.zeros(-(-len(codes) // per) * per, dtype=np.uint8)
    padded[: len(codes)] = codes
    shifts = np.arange(per, dtype=np.uint8) * bits
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first `count` codes of pack_bits' output.

    Raises:
        PayloadError: when the data holds a different number of codes.
    """
    per = 8 // bits
    if len(data) != -(-count // per):
        raise PayloadError(f"{len(data)} bytes cannot hold exactly {count} codes of {bits} bits")
    if bits == 8:
        return np.asarray(data, dtype=np.uint8)
    shifts = np.arange(per, dtype=np.uint8) * bits
    codes = (np.asarray(data, dtype=np.uint8)[:, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].astype(np.uint8)


def pack(frame: Frame) -> bytes:
    parts = [bytes([len(frame)])]
    for name, arr in frame.items():
        arr = np.ascontiguousarray(arr)
        key = name.encode()
        if arr.dtype not in CODES:  # a codec stage's bug, caught before bytes leave the sender
            raise ValueError(f"frame field {name!r}: dtype {arr.dtype} cannot be packed "
                             f"({', '.join(str(d) for d in DTYPES.values())})")
        parts += [bytes([len(key)]), key, bytes([CODES[arr.dtype]]),
                  varint_encode(np.array([arr.nbytes])).tobytes(), arr.tobytes()]
    return b"".join(parts)


def unpack(data: bytes) -> Frame:
    """The frame `pack` wrote.

    Raises:
        PayloadError: for truncated data, an unknown dtype, a length not a multiple of the
            item size, a repeated field, or bytes left over.
    """
    view, pos, frame = memoryview(data), 1, {}
    if not data:
        raise PayloadError("empty frame")
    for _ in range(data[0]):
        if pos >= len(data):
            raise PayloadError("truncated frame header")
        name_len = data[pos]
        name = bytes(view[pos + 1: pos + 1 + name_len]).decode("ascii", errors="replace")
        pos += 1 + name_len
        if pos >= len(data) or data[pos] not in DTYPES:
            raise PayloadError(f"field {name!r}: missing or unknown dtype code")
        dtype = DTYPES[data[pos]]
        end = pos + 1
        while end < len(data) and data[end] & 0x80 and end - pos < 10:
            end += 1
        nbytes = int(varint_decode(np.frombuffer(data[pos + 1: end + 1], dtype=np.uint8))[0]) \
            if end < len(data) else -1
        pos = end + 1
        if nbytes < 0 or pos + nbytes > len(data):
            raise PayloadError(f"field {name!r}: truncated")
        if nbytes % dtype.itemsize or name in frame:
            raise PayloadError(f"field {name!r}: bad length or repeated")
        frame[name] = np.frombuffer(data[pos: pos + nbytes], dtype=dtype).copy()
        pos += nbytes
    if pos != len(data):
        raise PayloadError(f"{len(data) - pos} unexpected bytes after the frame")
    return frame
