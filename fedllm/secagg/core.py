"""The arithmetic both halves of SecAgg+ share: the communication graph, the share threshold,
fixed-point quantization, the masks and the encrypted share packets. numpy only (the client
mod runs before the hand-off to a warm worker, so it imports no torch).

Cryptography is Flower's (`flwr.common.secure_aggregation`: ECDH key agreement with HKDF,
Fernet encryption, Shamir sharing; `flwr.supercore.primitives.asymmetric`: the key pairs).
The one primitive not taken from Flower is the mask generator: Flower's `pseudo_rand_gen` folds
the agreed seed to 32 bits and draws from numpy's Mersenne twister, so 2^32 guesses would
recover a mask; here a mask is the ChaCha20 key stream of the full 256-bit agreed key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedllm.errors import ConfigError

SECAGG = "secagg"  # the protocol's config record, both ways
MASKED = "masked"  # a client's masked vector, up (array record holding one uint array "y")


def graph(nodes: list[int], k: int, seed: int) -> dict[int, list[int]]:
    """Each node's neighbours: a k-regular ring (Harary) graph over a random order of `nodes`
    (k rounded up to even; 0, or k >= len(nodes) - 1, connects every pair)."""
    n = len(nodes)
    if holders(n, k) == n:
        return {a: [b for b in nodes if b != a] for a in nodes}
    order = sorted(nodes)
    random.Random(seed).shuffle(order)
    half = (k + 1) // 2
    out: dict[int, set[int]] = {a: set() for a in nodes}
    for p, a in enumerate(order):
        for d in range(1, half + 1):
            b = order[(p + d) % n]
            out[a].add(b)
            out[b].add(a)
    return {a: sorted(v) for a, v in out.items()}


def holders(n: int, k: int) -> int:
    """Share holders of each node (its neighbours and itself) in `graph` over n nodes."""
    return n if k <= 0 or k >= n - 1 else min(n, 2 * ((k + 1) // 2) + 1)


def threshold(value: float, holders: int) -> int:
    """The share count that rebuilds a secret held by `holders` nodes: a fraction of them
    (rounded up, at least 2) or a count."""
    if value <= 1:
        return max(2, math.ceil(value * holders))
    return int(value)


def levels(bits: int, clients: int) -> int:
    """Quantization levels per value: the sum of `clients` values in [0, levels] stays below
    2^bits. Even, so that 0 is exactly levels / 2: a value that is 0 at every client (a seed no
    zo client drew) sums to exactly 0."""
    return (((1 << bits) - 1) // max(clients, 1)) & ~1


def check(cfg: Any, sampled: int) -> tuple[int, int]:
    """(threshold, levels) of secagg.* for rounds of `sampled` nodes: the config alone decides it,
    so the pre-flight (fedllm.server.checks) runs it before any engine starts, and each secure
    round again on the nodes it sampled.

    Raises:
        ConfigError: naming the secagg key that does not fit.
    """
    sa = cfg.secagg
    n_holders = holders(sampled, sa.neighbours)
    t = threshold(sa.threshold, n_holders)
    if t > n_holders:
        raise ConfigError(f"secagg.threshold: {t} share holders needed, but each node has {n_holders} "
                          f"(secagg.neighbours + 1, at most the {sampled} sampled nodes)")
    if 2 * t <= n_holders:
        raise ConfigError(f"secagg.threshold: {t} of {n_holders} share holders is not a majority: a server could "
                          "rebuild both secrets of a node")
    n_levels = levels(sa.bits, sampled)
    if n_levels < 256:
        raise ConfigError(f"secagg.bits: 2^{sa.bits} / {sampled} clients leaves {n_levels} levels per value; raise it")
    return t, n_levels


def wire_dtype(bits: int) -> Any:
    return np.uint32 if bits <= 32 else np.uint64


def quantize(x: np.ndarray, weight: float, clip: float, n_levels: int,
             rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """[weight, weight x clip(x)] as integers in [0, n_levels] with stochastic (unbiased)
    rounding: the weight over [0, 1], the values over [-clip, clip]. Returns them (uint64) and
    how many values were clipped."""
    clipped = int(np.count_nonzero(np.abs(x) > clip))
    v = np.empty(x.size + 1, dtype=np.float64)
    v[0] = weight * n_levels
    v[1:] = np.clip(x, -clip, clip) * (weight * n_levels / (2 * clip))  # centred: 0 stays 0
    q = np.floor(v + rng.random(v.size)).astype(np.int64)
    q[1:] += n_levels // 2  # the offset in integers (a float near 2^47 has no room for the rounding)
    return np.clip(q, 0, n_levels).astype(np.uint64), clipped


def dequantize(total: np.ndarray, survivors: int, clip: float, n_levels: int) -> tuple[np.ndarray, float]:
    """The inverse for a sum over `survivors` clients: (sum of weight x value, sum of weights).
    The offsets come off in integers, so a sum of zeros is exactly 0."""
    centred = total[1:].astype(np.int64) - survivors * (n_levels // 2)
    return centred * (2 * clip / n_levels), float(total[0]) / n_levels


def stream(key: bytes, size: int, bits: int) -> np.ndarray:
    """`size` pseudo-random integers mod 2^bits (uint64) from a 32-byte key: the ChaCha20 key
    stream (a fixed nonce: every key is used for one mask)."""
    width = 4 if bits <= 32 else 8
    raw = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(size * width))
    out = np.frombuffer(raw, dtype=np.uint32 if width == 4 else np.uint64).astype(np.uint64)
    return out & np.uint64((1 << bits) - 1)


def modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def pair_key(private_pem: bytes, public_pem: bytes) -> bytes:
    """The 32-byte seed two nodes agree on (ECDH + HKDF, Flower's)."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    return base64.urlsafe_b64decode(generate_shared_key(bytes_to_private_key(private_pem),
                                                        bytes_to_public_key(public_pem)))


def pair_mask(own: int, other: int, private_pem: bytes, public_pem: bytes, size: int, bits: int) -> np.ndarray:
    """What `own` adds for its neighbour `other`: +stream for the lower id, -stream for the
    higher (mod 2^bits), so that the pair's masks cancel in the sum."""
    s = stream(pair_key(private_pem, public_pem), size, bits)
    return s if own < other else (np.uint64(0) - s) & modulus_mask(bits)


def digest(secret: bytes) -> bytes:
    """The commitment to a self-mask seed a node sends with its shares (sha256)."""
    return hashlib.sha256(b"fedllm-secagg-self-mask" + secret).digest()


def public_of(private_pem: bytes) -> bytes:
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, public_key_to_bytes

    return public_key_to_bytes(bytes_to_private_key(private_pem).public_key())


def layout_bytes(layout: list[tuple[str, str, str, list[int]]]) -> bytes:
    return json.dumps(layout, separators=(",", ":")).encode()


def parse_layout(raw: Any, limit: int = 1 << 20) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """A reply's layout (record, key, dtype, shape per array) checked; ValueError if malformed."""
    if not isinstance(raw, bytes) or len(raw) > limit:
        raise ValueError("layout is not bytes of a sane size")
    if _depth(raw) > 3:  # [[record, key, dtype, [dims]]]: deeper nesting would only stress the parser's stack
        raise ValueError("layout is nested deeper than [[..., [dims]]]")
    items = json.loads(raw.decode())
    out = []
    if not isinstance(items, list) or not items:
        raise ValueError("layout is not a non-empty list")
    for item in items:
        if (not isinstance(item, list) or len(item) != 4 or not all(isinstance(x, str) for x in item[:3])
                or item[2] not in FLOATS or not isinstance(item[3], list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 31 for d in item[3])):
            raise ValueError(f"layout entry {str(item)[:80]} is not [record, key, float dtype, shape]")
        out.append((item[0], item[1], item[2], tuple(item[3])))
    return out


def _depth(raw: bytes) -> int:
    """The deepest bracket nesting of JSON text (strings skipped), counted without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x5D, 0x7D):
            depth -= 1
    return deepest


FLOATS = ("float16", "bfloat16", "float32", "float64")


def layout_size(layout: list[tuple[str, str, str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for *_, shape in layout)
