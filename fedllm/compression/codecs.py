"""Codecs: small composable transformations of a frame, chained like optax transforms.

Every stage is a `Codec(name, encode, decode)` of pure functions on a frame (wire.Frame). The
first frame holds the tensors flattened into one float32 vector "v" plus their shapes;
stages rewrite "v" and add their own side fields; `zstd` packs the whole frame into bytes
and compresses it. `chain` runs stages in order to encode and in reverse to decode.

    codec = chain(topk(0.01), quantize(bits=4, block=64), zstd())
    codec = parse("topk(0.01) > quantize(4) > zstd")        # the same, from a config string
    codec = parse("topk-int4")                              # a preset

Stated error bounds, per value (what tests/test_compression.py checks):
- topk: kept values exact, dropped ones become 0.
- randk(p): kept values exact times 1 / p, dropped ones 0; unbiased (the mean over masks is x).
- quantize(bits, block): |x - x^| < s (stochastic rounding, unbiased) or <= s / 2 (nearest),
  where s = max |x| in the block / (2**(bits-1) - 1).
- cluster(k): every value decodes to its nearest codebook entry; the codebook comes from
  Lloyd's k-means started on a uniform grid, so the mean squared error is at most that of
  nearest rounding to k evenly spaced levels over [min, max] (FedZip, Malekijoo et al., 2021).
- zstd: lossless.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import numpy as np

from fedllm.compression.wire import Frame, pack, pack_bits, unpack, unpack_bits, varint_decode, varint_encode
from fedllm.errors import ConfigError, PayloadError
from fedllm.plugins import check_arguments, parse_stages
from fedllm.registry import Registry

MAX_DECOMPRESSED = 1 << 30  # refuse zstd frames that claim to expand beyond 1 GiB


class Codec(NamedTuple):
    """encode(frame, rng) -> frame and decode(frame) -> frame; `name` is the spec string."""

    name: str
    encode: Callable[[Frame, np.random.Generator], Frame]
    decode: Callable[[Frame], Frame]


def dense_size(frame: Frame) -> int:
    """Number of values the tensors hold, from the varint shape list: ndim, dims, ndim, ..."""
    shapes, total = varint_decode(frame["shape"]).astype(np.int64), 0
    for dims in split_shapes(shapes):
        total += int(np.prod(dims))
    return total


def split_shapes(flat: np.ndarray) -> list[tuple[int, ...]]:
    out, i = [], 0
    while i < len(flat):
        ndim = int(flat[i])
        if ndim > 8 or i + 1 + ndim > len(flat):
            raise PayloadError("malformed shape list")
        out.append(tuple(int(d) for d in flat[i + 1: i + 1 + ndim]))
        i += 1 + ndim
    return out


def _need(frame: Frame, *names: str) -> None:
    missing = [n for n in names if n not in frame]
    if missing:
        raise PayloadError(f"frame lacks field(s) {', '.join(missing)}")


# --- stages --------------------------------------------------------------------------------
def topk(fraction: float, scope: str = "global") -> Codec:
    """Keep the largest-magnitude `fraction` of values, over all tensors ("global") or within
    each tensor ("tensor"); positions travel as varint deltas (a byte or two each, not int64).
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"topk: fraction must be in (0, 1], got {fraction}")
    if scope not in ("global", "tensor"):
        raise ConfigError(f"topk: scope must be global or tensor, got {scope!r}")

    def encode(frame: Frame, rng: np.random.Generator) -> Frame:
        v = frame["v"]
        if scope == "global":
            idx = _largest(v, fraction)
        else:
            sizes = [int(np.prod(s)) for s in split_shapes(varint_decode(frame["shape"]))]
            offsets = np.cumsum([0] + sizes)
            idx = np.concatenate([o + _largest(v[o:o + n], fraction) for o, n in zip(offsets, sizes)])
        idx.sort()
        deltas = np.diff(idx, prepend=0)
        return {**_drop(frame, "v"), "i": varint_encode(deltas), "v": v[idx]}

    def decode(frame: Frame) -> Frame:
        _need(frame, "i", "v", "shape")
        n = dense_size(frame)
        idx = np.cumsum(varint_decode(frame["i"]).astype(np.int64))
        if len(idx) != len(frame["v"]):
            raise PayloadError(f"topk: {len(idx)} positions for {len(frame['v'])} values")
        if len(idx) and (idx[-1] >= n or (len(idx) > 1 and np.any(np.diff(idx) <= 0))):
            raise PayloadError("topk: positions out of range or repeated")
        dense = np.zeros(n, dtype=np.float32)
        dense[idx] = frame["v"]
        return {**_drop(frame, "i", "v"), "v": dense}

    return Codec(f"topk({fraction!r}, scope={scope!r})", encode, decode)


def randk(fraction: float, unbiased: bool = True) -> Codec:
    """Keep each value with probability `fraction`, by a mask drawn from an 8-byte seed that
    travels instead of positions; kept values are divided by `fraction` (unbiased: the decoded
    value's expectation is the original) unless unbiased=False (then pair it with error
    feedback). Random sparsification as in Wangni et al., NeurIPS 2018 (arXiv:1710.09854)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"randk: fraction must be in (0, 1], got {fraction}")

    def mask(seed: np.ndarray, n: int) -> np.ndarray:
        return np.random.default_rng(int(seed.view(np.uint64)[0])).random(n, dtype=np.float32) < fraction

    def encode(frame: Frame, rng: np.random.Generator) -> Frame:
        seed = rng.integers(0, 2**63, size=1, dtype=np.uint64).view(np.uint8)
        v = frame["v"]
        kept = v[mask(seed, len(v))]
        return {**_drop(frame, "v"), "rs": seed, "v": (kept / fraction if unbiased else kept).astype(np.float32)}

    def decode(frame: Frame) -> Frame:
        _need(frame, "rs", "v", "shape")
        if len(frame["rs"]) != 8:
            raise PayloadError("randk: the mask seed must be 8 bytes")
        m = mask(frame["rs"], dense_size(frame))
        if int(m.sum()) != len(frame["v"]):
            raise PayloadError(f"randk: {len(frame['v'])} values for a mask of {int(m.sum())}")
        dense = np.zeros(len(m), dtype=np.float32)
        dense[m] = frame["v"]
        return {**_drop(frame, "rs", "v"), "v": dense}

    return Codec(f"randk({fraction!r}, unbiased={unbiased})", encode, decode)


def _largest(v: np.ndarray, fraction: float) -> np.ndarray:
    k = min(len(v), max(1, int(round(fraction * len(v))))) if len(v) else 0
    if k == len(v):
        return np.arange(len(v))
    return np.argpartition(np.abs(v), len(v) - k)[len(v) - k:]


def symmetric_quantize(blocks: np.ndarray, bits: int, noise: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The one scalar quantizer (the quantize codec's, and zo's scalars'): rows of `blocks`
    (num_blocks, block) to integer codes in [-qmax, qmax], qmax = 2**(bits-1) - 1, with one
    scale max|row| / qmax per row (0 for an all-zero row); stochastic rounding floor(y + u)
    with uniform `noise` u of blocks' shape (unbiased), or round-to-nearest when None.
    Computed in blocks' dtype. Returns (codes as int64, scales)."""
    qmax = (1 << (bits - 1)) - 1
    scales = (np.abs(blocks).max(axis=1) / qmax).astype(blocks.dtype)
    y = blocks / np.where(scales > 0, scales, 1.0)[:, None]
    q = np.floor(y + noise) if noise is not None else np.rint(y)
    return np.clip(q, -qmax, qmax).astype(np.int64), scales


def quantize(bits: int = 8, block: int = 64, stochastic: bool = True) -> Codec:
    """Symmetric uniform quantization to `bits` (8, 4 or 2) with one float32 scale per block of
    `block` values; stochastic rounding (unbiased) or round-to-nearest."""
    if bits not in (2, 4, 8):
        raise ConfigError(f"quantize: bits must be 2, 4 or 8, got {bits}")
    if block < 1:
        raise ConfigError(f"quantize: block must be positive, got {block}")
    qmax = (1 << (bits - 1)) - 1

    def encode(frame: Frame, rng: np.random.Generator) -> Frame:
        v = frame["v"].astype(np.float32)
        m = len(v)
        padded = np.zeros(-(-m // block) * block, dtype=np.float32)
        padded[:m] = v
        blocks = padded.reshape(-1, block)  # (num_blocks, block)
        q, scales = symmetric_quantize(blocks, bits, rng.random(blocks.shape, dtype=np.float32) if stochastic else None)
        codes = (q + qmax).astype(np.uint8).reshape(-1)[:m]
        return {**_drop(frame, "v"), "q": pack_bits(codes, bits), "qs": scales,
                "qn": varint_encode(np.array([m]))}

    def decode(frame: Frame) -> Frame:
        _need(frame, "q", "qs", "qn")
        counts = varint_decode(frame["qn"])
        if len(counts) != 1:
            raise PayloadError("quantize: malformed value count")
        m = int(counts[0])
        scales = frame["qs"]
        if len(scales) != -(-m // block) or not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise PayloadError(f"quantize: {len(scales)} scales for {m} values, or bad scales")
        codes = unpack_bits(frame["q"], bits, m)
        if np.any(codes > 2 * qmax):
            raise PayloadError(f"quantize: code out of range for {bits} bits")
        v = (codes.astype(np.float32) - qmax) * np.repeat(scales, block)[:m]
        return {**_drop(frame, "q", "qs", "qn"), "v": v.astype(np.float32)}

    return Codec(f"quantize({bits}, block={block}, stochastic={stochastic})", encode, decode)


def cluster(k: int = 16, iters: int = 10) -> Codec:
    """k-means (Lloyd, 1-D) codebook of `k` float32 centroids (k in 2, 4, 16, 256) and one
    code per value, as FedZip clusters weights before encoding."""
    if k not in (2, 4, 16, 256):
        raise ConfigError(f"cluster: k must be 2, 4, 16 or 256, got {k}")
    bits = {2: 1, 4: 2, 16: 4, 256: 8}[k]

    def encode(frame: Frame, rng: np.random.Generator) -> Frame:
        v = frame["v"].astype(np.float32)
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 0.0)
        centroids = np.linspace(lo, hi, k).astype(np.float64)
        for _ in range(iters):
            codes = nearest(v, centroids)
            sums = np.bincount(codes, weights=v, minlength=k)
            counts = np.bincount(codes, minlength=k)
            centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        book = np.sort(centroids).astype(np.float32)
        return {**_drop(frame, "v"), "c": pack_bits(nearest(v, book), bits), "cb": book,
                "cn": varint_encode(np.array([len(v)]))}

    def decode(frame: Frame) -> Frame:
        _need(frame, "c", "cb", "cn")
        book, counts = frame["cb"], varint_decode(frame["cn"])
        if len(book) != k or not np.all(np.isfinite(book)) or len(counts) != 1:
            raise PayloadError(f"cluster: expected a finite codebook of {k} entries")
        codes = unpack_bits(frame["c"], bits, int(counts[0]))
        return {**_drop(frame, "c", "cb", "cn"), "v": book[codes]}

    return Codec(f"cluster({k}, iters={iters})", encode, decode)


def nearest(v: np.ndarray, book: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of a sorted codebook, for each value."""
    return np.searchsorted((book[1:] + book[:-1]) / 2, v).astype(np.uint8 if len(book) <= 256 else np.int64)


def zstd(level: int = 3) -> Codec:
    """Lossless Zstandard over the whole packed frame (indices, codes, scales, shapes)."""
    import zstandard

    if not 1 <= level <= 22:
        raise ConfigError(f"zstd: level must be in 1..22, got {level}")

    def encode(frame: Frame, rng: np.random.Generator) -> Frame:
        data = zstandard.ZstdCompressor(level=level).compress(pack(frame))
        return {"z": np.frombuffer(data, dtype=np.uint8)}

    def decode(frame: Frame) -> Frame:
        _need(frame, "z")
        try:
            data = zstandard.ZstdDecompressor().decompress(frame["z"].tobytes(), max_output_size=MAX_DECOMPRESSED)
        except zstandard.ZstdError as err:
            raise PayloadError(f"zstd: {err}") from err
        return unpack(data)

    return Codec(f"zstd({level})", encode, decode)


def chain(*codecs: Codec) -> Codec:
    """Encode through `codecs` in order; decode in reverse order."""

    def encode(frame: Frame, rng: np.random.Generator) -> Frame:
        for c in codecs:
            frame = c.encode(frame, rng)
        return frame

    def decode(frame: Frame) -> Frame:
        for c in reversed(codecs):
            frame = c.decode(frame)
        return frame

    return Codec(" > ".join(c.name for c in codecs) or "none", encode, decode)


def _drop(frame: Frame, *names: str) -> Frame:
    return {k: v for k, v in frame.items() if k not in names}


# --- registry, presets, config strings -----------------------------------------------------
CODECS: Registry[Callable[..., Codec]] = Registry("codec", "compression")


def register_codec(name: str, factory: Callable[..., Codec], **meta: object) -> None:
    """Add a stage constructor under a unique lower-case name (usable in config strings, so no
    dashes: a stage is written as a Python call)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"codec name must be lower-case letters, digits or _: {name!r}")
    CODECS.register(name, factory, **meta)


for _name, _factory in (("topk", topk), ("randk", randk), ("quantize", quantize), ("cluster", cluster),
                       ("zstd", zstd)):
    register_codec(_name, _factory)

PRESETS = {
    "none": "",
    "int8": "quantize(8) > zstd",
    "topk-int4": "topk(0.01) > quantize(4) > zstd",
    "topk-int2": "topk(0.005) > quantize(2) > zstd",
    "fedzip": "topk(0.01) > cluster(16) > zstd",
}


def parse(spec: str, key: str = "") -> Codec:
    """A codec from a preset name or a chain such as "topk(0.01) > quantize(4, block=64) > zstd"
    (fedllm.plugins' grammar: a stage is a registered codec or a user's `module:factory`, with
    positional and keyword literal arguments, e.g. "my_pkg.codecs:sign(scale=2) > zstd").

    Raises:
        ConfigError: naming `key` (when given) and the stage that is unknown or has bad arguments.
    """
    text, prefix = PRESETS.get(spec.strip(), spec), f"{key}: " if key else ""
    stages = []
    for stage in parse_stages(text, key, "codec"):
        if ":" not in stage.name and stage.name not in CODECS:
            raise ConfigError(f"{prefix}codec stage {stage.text!r}: unknown codec; registered: {', '.join(CODECS.names())}")
        try:
            factory = CODECS.get(stage.name).impl
        except ConfigError as err:  # a module:factory that does not import
            raise ConfigError(f"{prefix}codec stage {stage.text!r}: {str(err).partition(': ')[2]}") from None
        if isinstance(factory, Codec) and not (stage.args or stage.kwargs):
            stages.append(factory)  # module:object naming a codec itself
            continue
        if not callable(factory):
            raise ConfigError(f"{prefix}codec stage {stage.text!r}: not a codec factory (got {type(factory).__name__})")
        check_arguments(factory, 0, stage, key, "codec")
        try:
            codec = factory(*stage.args, **stage.kwargs)
        except TypeError as err:
            raise ConfigError(f"{prefix}codec stage {stage.text!r}: {err}") from None
        if not isinstance(codec, Codec):
            raise ConfigError(f"{prefix}codec stage {stage.text!r}: {stage.name} made a {type(codec).__name__}, "
                              "not a Codec(name, encode, decode)")
        stages.append(codec)
    return chain(*stages)
