"""The payload of a compressed tensor dict: header, frame, error feedback (fedllm.compression)."""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

import numpy as np
import torch

from fedllm.compression.codecs import Codec, dense_size, split_shapes
from fedllm.compression.wire import Frame, pack, unpack, varint_decode, varint_encode
from fedllm.errors import PayloadError

State = dict[str, torch.Tensor]
MAGIC = b"FZ\x01"
HEADER = len(MAGIC) + 8


class Feedback(NamedTuple):
    """Error-feedback state: what compression has not yet delivered, per tensor."""

    residual: State


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def encode(codec: Codec, tensors: State, seed: int) -> bytes:
    """Bytes for `tensors` (any float dtype; decoded as float32), keyed by sorted name."""
    names = sorted(tensors)
    shapes = np.array([x for k in names for x in (tensors[k].dim(), *tensors[k].shape)], dtype=np.uint64)
    flat = [tensors[k].detach().to("cpu", torch.float32).reshape(-1).numpy() for k in names]
    frame: Frame = {"shape": varint_encode(shapes),
                    "v": np.concatenate(flat) if flat else np.zeros(0, np.float32)}
    frame = codec.encode(frame, np.random.default_rng(seed))
    return MAGIC + struct.pack("<II", _crc(codec.name), _crc("\n".join(names))) + pack(frame)


def decode(codec: Codec, payload: bytes, names: list[str]) -> State:
    """The tensors in `payload`, as float32.

    Raises:
        PayloadError: for a wrong header, codec or tensor names, and any malformed content.
    """
    if len(payload) < HEADER or payload[: len(MAGIC)] != MAGIC:
        raise PayloadError("not a fedllm compressed payload (bad magic or too short)")
    codec_crc, names_crc = struct.unpack("<II", payload[len(MAGIC):HEADER])
    if codec_crc != _crc(codec.name):
        raise PayloadError(f"payload was encoded with another codec than {codec.name!r}")
    if names_crc != _crc("\n".join(names)):
        raise PayloadError("payload was encoded for other tensor names")
    try:
        frame = codec.decode(unpack(payload[HEADER:]))
        if "shape" not in frame or "v" not in frame or frame["v"].dtype != np.float32:
            raise PayloadError("decoded frame lacks float32 values or shapes")
        shapes, v = split_shapes(varint_decode(frame["shape"])), frame["v"]
        if len(shapes) != len(names) or len(v) != dense_size(frame):
            raise PayloadError(f"{len(shapes)} shapes and {len(v)} values for {len(names)} tensors")
        if not np.all(np.isfinite(v)):
            raise PayloadError("non-finite values")
    except PayloadError:
        raise
    except Exception as err:  # numpy and zstd refuse malformed input in many ways
        raise PayloadError(f"malformed payload: {type(err).__name__}: {err}") from err
    out, offset = {}, 0
    for name, shape in zip(names, shapes):
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(v[offset: offset + n].reshape(shape).copy())
        offset += n
    return out


def compress(codec: Codec, tensors: State, feedback: Feedback | None, seed: int) -> tuple[bytes, Feedback | None]:
    """Encode `tensors` plus the residual in `feedback`; returns the payload and the new state.

    With feedback None (error feedback off) only the payload is computed. Residuals of tensors
    not in `tensors` are kept as they are.
    """
    if feedback is None:
        return encode(codec, tensors, seed), None
    target = {k: t.float() + feedback.residual.get(k, torch.zeros_like(t, dtype=torch.float32)).reshape(t.shape)
              for k, t in tensors.items()}
    payload = encode(codec, target, seed)
    sent = decode(codec, payload, sorted(target))
    # residuals of tensors not sent this time (another fragment's) wait for their next turn
    return payload, Feedback({**feedback.residual, **{k: target[k] - sent[k] for k in target}})

