"""Compression on the wire: codec chains over a dict of tensors, with error feedback.

    codec = parse("topk(0.01) > quantize(4) > zstd")
    payload, fb = compress(codec, delta, fb, seed=round)   # bytes that cross the wire
    delta_hat = decode(codec, payload, names=sorted(delta))

Payload: b"FZ", a version byte, crc32 of the codec spec, crc32 of the tensor names, then the
packed frame. The decoder knows the codec (from the run config) and the tensor names (from
the global state), so names never travel; shapes do (a few varint bytes each), which lets
clients of different LoRA ranks send tensors of different shapes.

Error feedback (Seide et al., 2014; Karimireddy et al., 2019, EF-SGD): the sender adds the
residual of what compression dropped last time to this update, so the decoded updates sum
to the true updates up to one bounded residual.
"""

from __future__ import annotations

from typing import Any

from fedllm.compression.codecs import CODECS, PRESETS, Codec, chain, cluster, parse, quantize, register_codec, topk, zstd

_PAYLOAD = ("HEADER", "MAGIC", "Feedback", "compress", "decode", "encode")  # fedllm.compression.payload (torch)


def __getattr__(name: str) -> Any:
    """The payload functions, imported on first use: parsing a codec (a config check) needs no torch."""
    if name in _PAYLOAD:
        from fedllm.compression import payload

        return getattr(payload, name)
    raise AttributeError(f"module 'fedllm.compression' has no attribute {name!r}")


__all__ = [
    "CODECS", "PRESETS", "Codec", "Feedback", "chain", "cluster", "compress", "decode", "encode", "parse",
    "quantize", "register_codec", "topk", "zstd",
]
