"""What the server checks in a SecAgg+ reply, and the unmasking arithmetic (fedllm.secagg.server
runs the stages). Every check raises PayloadError with the reason the node is dropped for."""

from __future__ import annotations

import collections
import hashlib
import math
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedllm.errors import PayloadError
from fedllm.protocol import METRICS, finite_metrics
from fedllm.secagg import core

MAX_KEY = 1024  # bytes of a PEM public key (SECP384R1's is 215)
MAX_PACKET = 4096  # bytes of one encrypted share packet (about 500 for SECP384R1 keys)


def record_of(msg: Message, names: Iterable[str] = ()) -> ConfigRecord:
    """The reply's secagg record; any record besides it and `names` is refused."""
    allowed = {core.SECAGG, *names}
    if set(msg.content.keys()) - allowed:
        raise PayloadError(f"unexpected records {sorted(set(msg.content.keys()) - allowed)}")
    record = msg.content.config_records.get(core.SECAGG)
    if record is None:
        raise PayloadError(f"reply lacks the {core.SECAGG!r} record")
    return record


def blob(record: ConfigRecord, key: str, limit: int) -> bytes:
    """record[key] as a non-empty byte string of at most `limit` bytes."""
    value = record.get(key)
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise PayloadError(f"{key!r} is not a byte string of at most {limit} bytes")
    return value


def plain_metrics(msg: Message, server_round: int) -> dict[str, float]:
    """A masked reply's plain metrics, checked (it carries no example count: that is in the sum)."""
    if METRICS not in msg.content.metric_records:
        raise PayloadError(f"reply lacks the {METRICS!r} record")
    out = finite_metrics(msg.content.metric_records[METRICS])
    if out.get("server-round", server_round) != server_round:
        raise PayloadError(f"reply is for round {out.get('server-round')!r}, this is round {server_round}")
    return out


def public_key(record: ConfigRecord, key: str) -> bytes:
    """A P-384 public key in canonical PEM (what the clients' key agreement takes).

    Raises:
        PayloadError: for anything else.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

    raw = blob(record, key, MAX_KEY)
    try:
        pk = bytes_to_public_key(raw)
        ok = isinstance(pk, ec.EllipticCurvePublicKey) and isinstance(pk.curve, ec.SECP384R1) \
            and public_key_to_bytes(pk) == raw
    except Exception:  # not PEM, not a key
        ok = False
    if not ok:
        raise PayloadError(f"{key!r} is not a P-384 public key in PEM")
    return raw


Layout = list[tuple[str, str, str, tuple[int, ...]]]  # (record, key, dtype, shape) of each uploaded array


def masked_vector(msg: Message, layout_raw: Any, bits: int) -> tuple[np.ndarray, Layout]:
    """The masked upload of a train reply (as uint64) and its parsed layout, checked against the
    wire dtype and the modulus of `bits`."""
    wire = core.wire_dtype(bits)
    try:
        layout = core.parse_layout(layout_raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise PayloadError(f"bad layout: {err}") from None
    arrays = msg.content.array_records.get(core.MASKED)
    if arrays is None or list(arrays) != ["y"]:
        raise PayloadError("reply lacks the masked vector")
    y, size = arrays["y"], core.layout_size(layout) + 1
    if y.dtype != np.dtype(wire).name or len(y.shape) != 1 or y.shape[0] != size:
        raise PayloadError(f"masked vector is {y.dtype}{list(y.shape)}, expected {np.dtype(wire).name}[{size}]")
    try:
        raw = y.numpy()
    except Exception as err:
        raise PayloadError(f"cannot decode the masked vector: {err}") from None
    if raw.dtype != np.dtype(wire) or raw.shape != (size,):
        raise PayloadError(f"masked vector's data is {raw.dtype}{list(raw.shape)}, not what it declares")
    vec = raw.astype(np.uint64)
    if int(vec.max(initial=0)) > (1 << bits) - 1:
        raise PayloadError(f"masked values exceed 2^{bits}")
    return vec, layout


def share_reply(rec: ConfigRecord, expected: list[int], n: int) -> tuple[list[bytes], bytes, list[list[bytes]]]:
    """A share reply's packets (one per live neighbour, in order), its commitment to the self-mask
    seed, and the hashes of its b and sk shares, one per holder (itself first)."""
    dst, cts = rec.get("dst"), rec.get("ct")
    if dst != expected:
        raise PayloadError(f"shares addressed to {str(dst)[:60]}, not to its live neighbours {expected}")
    if not isinstance(cts, list) or len(cts) != len(expected) or not all(
            isinstance(c, bytes) and 0 < len(c) <= MAX_PACKET and c[:1] == b"g" for c in cts):
        raise PayloadError("malformed share packets (not one Fernet token per neighbour)")
    commit = blob(rec, "commit", 32)
    hashes = [rec.get("b-hashes"), rec.get("sk-hashes")]
    if len(commit) != 32 or not all(isinstance(h, list) and len(h) == len(expected) + 1 and all(
            isinstance(x, bytes) and len(x) == 32 for x in h) for h in hashes):
        raise PayloadError("the commitments are not 32-byte hashes, one per share holder")
    return cts, commit, hashes


def unmask_reply(rec: ConfigRecord, n: int, asked: tuple[list[int], list[int]],
                  share_commits: dict[int, dict[int, tuple[bytes, bytes]]], b_shares: dict[int, list[bytes]],
                  sk_shares: dict[int, list[bytes]]) -> None:
    """Add node n's returned shares to `b_shares` / `sk_shares`: only the ones asked for, once each,
    each the one its dealer committed to for this holder."""
    stages = (("b-ids", "b-shares", b_shares, asked[0]), ("sk-ids", "sk-shares", sk_shares, asked[1]))
    for kind, (ids_key, shares_key, into, allowed) in enumerate(stages):
        ids, shares = rec.get(ids_key, []), rec.get(shares_key, [])
        if (not isinstance(ids, list) or not isinstance(shares, list) or len(ids) != len(shares)
                or len(set(ids)) != len(ids) or not all(isinstance(i, int) and i in allowed for i in ids)
                or not all(isinstance(s, bytes) and 0 < len(s) <= MAX_PACKET for s in shares)):
            raise PayloadError(f"malformed {shares_key} (only the shares asked for, once each)")
        for i, share in zip(ids, shares):
            if hashlib.sha256(share).digest() != share_commits[i][n][kind]:
                raise PayloadError(f"its share of node {i}'s secret is not the one node {i} committed to")
            into[i].append(share)


def mean_records(mean: np.ndarray, layout: Layout) -> dict[str, ArrayRecord]:
    """The mean vector cut back into the method's records by the upload layout."""
    records: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    offset = 0
    for name, key, dtype, shape in layout:
        size = math.prod(shape)
        records[name][key] = Array(mean[offset:offset + size].reshape(shape).astype(dtype))
        offset += size
    return {name: ArrayRecord(arrays) for name, arrays in records.items()}


def _rebuild(shares: list[bytes], t: int, verify: Any) -> bytes | None:
    """The secret of t of `shares` (each checked against its dealer's commitment) if it passes
    `verify` (a dealer whose shares do not make its committed secret), else None."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    try:
        secret = combine_shares(shares[:t])
    except Exception:  # shares of mixed lengths, a bad pad
        return None
    return secret if verify(secret) else None


def unmask(survivors: list[int], gone: list[int], vectors: dict[int, np.ndarray], b_shares: dict[int, list[bytes]],
            sk_shares: dict[int, list[bytes]], commits: dict[int, bytes], keys: dict[int, tuple[bytes, bytes]],
            neighbours: dict[int, list[int]], shared: set[int], t: int, bits: int) -> np.ndarray:
    """Sum of the survivors' vectors minus their self masks and the pairwise masks they added for
    nodes that dropped after sharing, mod 2^bits.

    Raises:
        PayloadError: when a secret cannot be rebuilt from the shares that came back.
    """
    mask = core.modulus_mask(bits)
    size = vectors[survivors[0]].size
    total = np.zeros(size, dtype=np.uint64)
    for n in survivors:
        total += vectors[n]
        shares = b_shares.get(n, [])
        if len(shares) < t:
            raise PayloadError(f"{len(shares)} shares of node {n}'s self mask came back, secagg threshold {t}")
        seed = _rebuild(shares, t, lambda s, n=n: len(s) == 32 and core.digest(s) == commits[n])
        if seed is None:
            raise PayloadError(f"node {n}'s self mask does not match its commitment from any {t} of its shares")
        total -= core.stream(seed, size, bits)
    for j in gone:
        live = [i for i in neighbours[j] if i in survivors and i in shared]
        if not live:
            continue
        shares = sk_shares.get(j, [])
        if len(shares) < t:
            raise PayloadError(f"{len(shares)} shares of dropped node {j}'s mask key came back, secagg threshold {t}")
        sk = _rebuild(shares, t, lambda s, j=j: _public_matches(s, keys[j][1]))
        if sk is None:
            raise PayloadError(f"dropped node {j}'s mask key does not match its public key from any {t} of its shares")
        for i in live:
            total -= core.pair_mask(i, j, sk, keys[i][1], size, bits)
    return total & mask


def _public_matches(private_pem: bytes, public_pem: bytes) -> bool:
    try:
        return core.public_of(private_pem) == public_pem
    except Exception:  # not a key
        return False
