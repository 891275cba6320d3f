"""zo's canonical global state: the accumulators (per-seed sums of the applied scalars, their
magnitudes, the warm-up's dense delta, the version) that the server and every client build
identically from the same round payloads, and the down message that brings a node to them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from fedllm.errors import PayloadError
from fedllm.methods.zo.wire import decode

WARM = b"ZW"  # a warm-up round's payload: WARM, n (uint32), then n float32 deltas


def encode_warm(delta: torch.Tensor) -> bytes:
    """A warm-up round's payload: the aggregate dense delta (n,) of the perturbed weights, float32."""
    return WARM + struct.pack("<I", delta.numel()) + delta.detach().float().cpu().numpy().astype("<f4").tobytes()


def decode_warm(payload: bytes, n: int) -> torch.Tensor:
    """Raises:
        PayloadError: on a wrong size or a non-finite value."""
    if len(payload) != 6 + 4 * n or struct.unpack_from("<I", payload, 2)[0] != n:
        raise PayloadError(f"zo warm-up payload: {len(payload)} bytes, expected {6 + 4 * n} (n={n})")
    delta = torch.frombuffer(bytearray(payload[6:]), dtype=torch.float32).clone()
    if not torch.isfinite(delta).all():
        raise PayloadError("zo warm-up payload: non-finite delta")
    return delta


@dataclass
class Accumulators:
    """acc: per-seed sum of the applied scalars; mag: sum of their magnitudes (for -Pro);
    warm: the sum of the warm-up rounds' dense deltas (n,) over the perturbed weights (n=0: no
    warm-up), warm_rounds how many there were. version counts every applied payload."""

    k: int
    acc: torch.Tensor = field(default=None)  # type: ignore[assignment]
    mag: torch.Tensor = field(default=None)  # type: ignore[assignment]
    version: int = 0
    n: int = 0
    warm: torch.Tensor = field(default=None)  # type: ignore[assignment]
    warm_rounds: int = 0

    def __post_init__(self) -> None:
        self.acc = torch.zeros(self.k) if self.acc is None else self.acc
        self.mag = torch.zeros(self.k) if self.mag is None else self.mag
        self.warm = torch.zeros(self.n) if self.warm is None else self.warm

    def apply(self, payload: bytes) -> torch.Tensor:
        """Add one round's decoded update (float32, the same order everywhere): a warm-up delta
        or per-seed scalars."""
        if payload[:2] == WARM:
            update = decode_warm(payload, self.n)
            self.warm = self.warm + update
            self.warm_rounds += 1
        else:
            update = decode(payload, self.k)
            self.acc = self.acc + update
            self.mag = self.mag + update.abs()
        self.version += 1
        return update

    def copy(self) -> "Accumulators":
        return Accumulators(self.k, self.acc.clone(), self.mag.clone(), self.version, self.n, self.warm.clone(),
                            self.warm_rounds)

    def probabilities(self) -> torch.Tensor:
        """FedKSeed-Pro: seeds with larger scalar history are drawn more often; the mean
        magnitude is added to every seed so that none is starved."""
        weight = self.mag.double()
        weight = weight + (weight.mean() if weight.sum() > 0 else 1.0)
        return weight / weight.sum()

    def to_bytes(self) -> bytes:
        raw = struct.pack("<II", self.k, self.version) + self.acc.numpy().tobytes() + self.mag.numpy().tobytes()
        if self.n:
            raw += struct.pack("<I", self.warm_rounds) + self.warm.numpy().tobytes()
        return raw

    @classmethod
    def from_bytes(cls, raw: bytes, k: int, n: int = 0) -> "Accumulators":
        expected = 8 + 8 * k + (4 + 4 * n if n else 0)
        if len(raw) != expected:
            raise PayloadError(f"zo state: {len(raw)} bytes, expected {expected}")
        k_in, version = struct.unpack_from("<II", raw)
        if k_in != k:
            raise PayloadError(f"zo state: made for K={k_in}, expected K={k}")
        acc = torch.frombuffer(bytearray(raw[8:8 + 4 * k]), dtype=torch.float32).clone()
        mag = torch.frombuffer(bytearray(raw[8 + 4 * k:8 + 8 * k]), dtype=torch.float32).clone()
        warm, warm_rounds = None, 0
        if n:
            (warm_rounds,) = struct.unpack_from("<I", raw, 8 + 8 * k)
            warm = torch.frombuffer(bytearray(raw[12 + 8 * k:]), dtype=torch.float32).clone()
        if not (torch.isfinite(acc).all() and torch.isfinite(mag).all() and (warm is None or torch.isfinite(warm).all())):
            raise PayloadError("zo state: non-finite accumulator")
        return cls(k, acc, mag, version, n, warm, warm_rounds)


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
        return Accumulators.from_bytes(raw[1:], local.k, local.n)
    if raw[:1] != HISTORY or len(raw) < 9:
        raise PayloadError("zo down message: bad header")
    since, n = struct.unpack_from("<II", raw, 1)
    if local.version < since:
        raise PayloadError(f"zo sync: local state is at version {local.version}, history starts at {since}; "
                           "the server sends the full state next round")
    if local.version > since + n:
        raise PayloadError(f"zo sync: local state version {local.version} is newer than the server's")
    out = local.copy()
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
