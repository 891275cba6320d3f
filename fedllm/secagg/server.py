"""The server's half of SecAgg+ (Bell et al., CCS 2020) on Flower's Message API: one round of
the protocol around a method's train round.

    attempt = secure_round(strategy, server_round, run_config, grid, timeout)

Four exchanges with the sampled nodes (fedllm.secagg.client answers them): public keys; the
encrypted key shares, which the server routes without reading; the train message with the
shares for its node, answered by a masked upload; and the unmask request, answered with the
shares that remove the survivors' self masks and the dropped nodes' pairwise masks. The server
sums the masked vectors, removes the masks, and decodes the sum into the method's mean
upload, which goes through the method's own `decode` (the same checks as any reply) and the
rule chain's later stages (server optimizers, DP noise).

A node that does not answer a stage, or answers with an error or a malformed payload, is
dropped with its reason; so are both nodes when one says the other's shares do not decrypt,
and a node whose metrics the method checks on the mean (zo's version) differ from the others'.
A share returned at unmasking must be one the server asked for and match its dealer's hash.
The round goes on while every secret keeps `threshold` live share holders, the survivors'
graph stays connected and at least max(2, server.min-replies) masked uploads survive, and
otherwise returns without applying anything, saying why.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedllm.errors import ConfigError, PayloadError
from fedllm.methods import spec_of
from fedllm.protocol import (CONFIG, LEDGER, METRICS, RoundResult, Update, finite_metrics, payload_bytes, receive,
                             short_reason)
from fedllm.secagg import core
from strategies import FedLLMStrategy
from strategies.rules import Aggregate

log = logging.getLogger(__name__)

MAX_KEY = 1024  # bytes of a PEM public key (SECP384R1's is 215)
MAX_PACKET = 4096  # bytes of one encrypted share packet (about 500 for SECP384R1 keys)


@dataclass
class Attempt:
    """One try at a secure round: bytes each node got and sent, the replies, the result (not
    applied when `failure` says why), and the nodes that never answered."""

    down: dict[str, int] = field(default_factory=dict)
    up: dict[int, int] = field(default_factory=lambda: collections.defaultdict(int))
    result: RoundResult | None = None
    missing: list[int] = field(default_factory=list)
    replies: list[Message] = field(default_factory=list)  # the masked replies summed (the ledger reads signatures)
    failure: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def clip_range(cfg: Any) -> float:
    """secagg.clip-range, or for 0 the method's own range (its registry metadata)."""
    return float(cfg.secagg.clip_range or spec_of(cfg).secagg_range)


def check(cfg: Any, sampled: int) -> tuple[int, int]:
    """(threshold, levels) for `sampled` nodes.

    Raises:
        ConfigError: naming the secagg key that does not fit.
    """
    sa = cfg.secagg
    holders = core.holders(sampled, sa.neighbours)
    t = core.threshold(sa.threshold, holders)
    if t > holders:
        raise ConfigError(f"secagg.threshold: {t} share holders needed, but each node has {holders} (secagg.neighbours "
                          f"+ 1, at most the {sampled} sampled nodes)")
    if 2 * t <= holders:
        raise ConfigError(f"secagg.threshold: {t} of {holders} share holders is not a majority: a server could rebuild "
                          "both secrets of a node")
    n_levels = core.levels(sa.bits, sampled)
    if n_levels < 256:
        raise ConfigError(f"secagg.bits: 2^{sa.bits} / {sampled} clients leaves {n_levels} levels per value; raise it")
    return t, n_levels


class _Round:
    """The bookkeeping of one attempt."""

    def __init__(self, server_round: int, grid: Grid, timeout: float | None) -> None:
        self.round, self.grid, self.timeout = server_round, grid, timeout
        self.out = Attempt()
        self.dropped: dict[int, str] = {}
        self.missing: set[int] = set()

    def drop(self, node: int, reason: str) -> None:
        if node not in self.dropped:
            self.dropped[node] = reason
            log.warning("round %d: secagg: dropped node %d: %s", self.round, node, reason)

    def exchange(self, stage: str, contents: dict[int, RecordDict]) -> dict[int, Message]:
        """Send each node its content and return the valid-looking replies by node (error replies
        and silence are recorded)."""
        t0 = time.perf_counter()
        messages = [Message(content=c, message_type=MessageType.TRAIN, dst_node_id=n) for n, c in contents.items()]
        for m in messages:
            key = str(m.metadata.dst_node_id)
            self.out.down[key] = self.out.down.get(key, 0) + payload_bytes(m.content)
        got: dict[int, Message] = {}
        for reply in receive(self.grid, messages, self.timeout):
            node = reply.metadata.src_node_id
            if node not in contents or node in got:
                continue
            if reply.has_error():
                self.drop(node, f"secagg {stage}: client error: {short_reason(reply.error.reason)}")
                continue
            self.out.up[node] += payload_bytes(reply.content)
            got[node] = reply
        for node in contents:
            if node not in got and node not in self.dropped:
                self.missing.add(node)
                self.drop(node, f"secagg {stage}: no reply within server.round-timeout")
        self.out.seconds[stage] = round(time.perf_counter() - t0, 3)
        return got


def _record(msg: Message, names: Iterable[str] = ()) -> ConfigRecord:
    allowed = {core.SECAGG, *names}
    if set(msg.content.keys()) - allowed:
        raise PayloadError(f"unexpected records {sorted(set(msg.content.keys()) - allowed)}")
    record = msg.content.config_records.get(core.SECAGG)
    if record is None:
        raise PayloadError(f"reply lacks the {core.SECAGG!r} record")
    return record


def _blob(record: ConfigRecord, key: str, limit: int) -> bytes:
    value = record.get(key)
    if not isinstance(value, bytes) or not 0 < len(value) <= limit:
        raise PayloadError(f"{key!r} is not a byte string of at most {limit} bytes")
    return value


def _holders_ok(live: set[int], neighbours: dict[int, list[int]], t: int) -> set[int]:
    """The live nodes that keep at least t share holders (themselves included), to a fixed point."""
    live = set(live)
    while True:
        short = {n for n in live if len(set(neighbours[n]) & live) + 1 < t}
        if not short:
            return live
        live -= short


def secure_round(strategy: FedLLMStrategy, server_round: int, run_config: ConfigRecord, grid: Grid,
                 timeout: float | None) -> Attempt:
    """One attempt at a secure round (see the module docstring); the aggregate is applied
    when `result.applied`.

    Raises:
        ConfigError: when the threshold, neighbours or bits do not fit the sampled nodes.
    """
    cfg, sa = strategy.cfg, strategy.cfg.secagg
    clip = clip_range(cfg)
    nodes = strategy.sample(grid)
    t, n_levels = check(cfg, len(nodes))
    neighbours = core.graph(nodes, sa.neighbours, cfg.train.seed * 1_000_003 + server_round)
    r = _Round(server_round, grid, timeout)
    need = max(2, cfg.server.min_replies)

    def fail(why: str, metrics: dict[str, float] | None = None) -> Attempt:
        r.out.failure = why
        r.out.missing = sorted(r.missing)
        r.out.result = RoundResult(server_round, (), tuple(r.dropped.items()), (), metrics or {"clients-ok": 0},
                                   applied=False)
        return r.out

    # 1. public keys
    params = {"round": server_round, "threshold": t, "bits": sa.bits, "clip-range": clip,
              "max-weight": sa.max_weight, "levels": n_levels}
    got = r.exchange("setup", {n: RecordDict({core.SECAGG: ConfigRecord(
        {"stage": "setup", **params, "neighbours": neighbours[n]})}) for n in nodes})
    keys: dict[int, tuple[bytes, bytes]] = {}
    for n, msg in got.items():
        try:
            rec = _record(msg)
            keys[n] = (_public_key(rec, "pk-enc"), _public_key(rec, "pk-mask"))
        except PayloadError as err:
            r.drop(n, f"secagg setup: {err}")
    live = _holders_ok(set(keys), neighbours, t)
    for n in set(keys) - live:
        r.drop(n, f"secagg setup: fewer than {t} of its share holders answered")
    if len(live) < need:
        return fail(f"secagg: {len(live)} nodes finished key setup, {need} needed")

    # 2. encrypted shares, routed unread
    got = r.exchange("share", {n: RecordDict({core.SECAGG: ConfigRecord({
        "stage": "share", "round": server_round, "ids": (ids := [j for j in neighbours[n] if j in live]),
        "pk-enc": [keys[j][0] for j in ids], "pk-mask": [keys[j][1] for j in ids]})}) for n in sorted(live)})
    packets: dict[int, dict[int, bytes]] = collections.defaultdict(dict)  # dst -> src -> ciphertext
    commits: dict[int, bytes] = {}
    share_commits: dict[int, dict[int, tuple[bytes, bytes]]] = {}  # dealer -> holder -> (sha256 b share, sk share)
    for n, msg in got.items():
        try:
            rec = _record(msg)
            dst, cts = rec.get("dst"), rec.get("ct")
            expected = [j for j in neighbours[n] if j in live]
            if dst != expected:
                raise PayloadError(f"shares addressed to {str(dst)[:60]}, not to its live neighbours {expected}")
            if not isinstance(cts, list) or len(cts) != len(expected) or not all(
                    isinstance(c, bytes) and 0 < len(c) <= MAX_PACKET and c[:1] == b"g" for c in cts):
                raise PayloadError("malformed share packets (not one Fernet token per neighbour)")
            commit = _blob(rec, "commit", 32)
            holders = [n, *expected]
            hashes = [rec.get("b-hashes"), rec.get("sk-hashes")]
            if len(commit) != 32 or not all(isinstance(h, list) and len(h) == len(holders) and all(
                    isinstance(x, bytes) and len(x) == 32 for x in h) for h in hashes):
                raise PayloadError("the commitments are not 32-byte hashes, one per share holder")
        except PayloadError as err:
            r.drop(n, f"secagg share: {err}")
            continue
        commits[n] = commit
        share_commits[n] = {h: (hb, hs) for h, hb, hs in zip(holders, *hashes)}
        for j, c in zip(expected, cts):
            packets[j][n] = c
    shared = _holders_ok(set(commits), neighbours, t)
    for n in set(commits) - shared:
        r.drop(n, f"secagg share: fewer than {t} of its share holders sent shares")
    if len(shared) < need:
        return fail(f"secagg: {len(shared)} nodes shared their keys, {need} needed")

    # 3. train and mask
    config = ConfigRecord({**dict(run_config), **strategy.round_config(server_round)})
    got = r.exchange("train", {n: RecordDict({
        CONFIG: config, **strategy.method.encode_down(n), core.SECAGG: ConfigRecord({
            "stage": "train", "round": server_round, "peers": [j for j in neighbours[n] if j in shared],
            "src": (src := sorted(j for j in packets[n] if j in shared)), "ct": [packets[n][j] for j in src]})})
        for n in sorted(shared)})
    # a masked value is an integer of up to 8 bytes, whatever the method's upload dtype
    size_limit = cfg.server.max_reply_bytes or 2 * strategy.method.largest_reply() + 65536
    vectors: dict[int, np.ndarray] = {}
    layouts: dict[int, bytes] = {}  # as sent (compared between nodes)
    parsed: dict[int, list[tuple[str, str, str, tuple[int, ...]]]] = {}
    metrics_of: dict[int, dict[str, float]] = {}
    accused: dict[int, list[int]] = collections.defaultdict(list)
    train_replies: dict[int, Message] = {}
    wire = core.wire_dtype(sa.bits)
    for n, msg in got.items():
        try:
            rec = _record(msg, (METRICS, core.MASKED, LEDGER))
            bad = rec.get("bad", [])
            if not isinstance(bad, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bad):
                raise PayloadError("'bad' is not a list of node ids")
            metrics = _metrics(msg, server_round)
            if payload_bytes(msg.content) > size_limit:
                raise PayloadError(f"payload exceeds the limit of {size_limit} bytes (server.max-reply-bytes)")
            layout_raw = rec.get("layout")
            try:
                layout = core.parse_layout(layout_raw)
            except (ValueError, UnicodeDecodeError, RecursionError) as err:
                raise PayloadError(f"bad layout: {err}") from None
            arrays = msg.content.array_records.get(core.MASKED)
            if arrays is None or list(arrays) != ["y"]:
                raise PayloadError("reply lacks the masked vector")
            y = arrays["y"]
            if y.dtype != np.dtype(wire).name or len(y.shape) != 1 or y.shape[0] != core.layout_size(layout) + 1:
                raise PayloadError(f"masked vector is {y.dtype}{list(y.shape)}, expected {np.dtype(wire).name}"
                                   f"[{core.layout_size(layout) + 1}]")
            try:
                raw = y.numpy()
            except Exception as err:
                raise PayloadError(f"cannot decode the masked vector: {err}") from None
            if raw.dtype != np.dtype(wire) or raw.shape != (core.layout_size(layout) + 1,):
                raise PayloadError(f"masked vector's data is {raw.dtype}{list(raw.shape)}, not what it declares")
            vec = raw.astype(np.uint64)
            if int(vec.max(initial=0)) > (1 << sa.bits) - 1:
                raise PayloadError(f"masked values exceed 2^{sa.bits}")
        except PayloadError as err:
            r.drop(n, f"secagg train: {err}")
            continue
        except Exception as err:  # a checking bug must not end the round: this node's reply is the problem
            log.exception("round %d: secagg: reply of node %d could not be checked", server_round, n)
            r.drop(n, f"secagg train: unexpected {type(err).__name__}: {err}")
            continue
        vectors[n], layouts[n], parsed[n], metrics_of[n] = vec, layout_raw, layout, metrics
        train_replies[n] = msg
        for b in bad:
            if b in packets[n]:
                accused[b].append(n)
    if vectors:  # the layout most nodes sent is the method's; another one cannot be summed with it
        common, _ = collections.Counter(layouts.values()).most_common(1)[0]
        for n in [n for n in vectors if layouts[n] != common]:
            r.drop(n, "secagg train: its upload's arrays differ from the other nodes'")
            del vectors[n]
    for b, by in accused.items():  # the server cannot tell who lies: both leave the round
        for node, why in [(b, f"its key shares to node(s) {', '.join(map(str, sorted(by)))} did not decrypt")] + [
                (a, f"it says node {b}'s key shares did not decrypt (accuser and accused both leave)") for a in by]:
            vectors.pop(node, None)
            r.drop(node, f"secagg train: {why}")
    for key in spec_of(cfg).secagg_agree:  # what decode checks, checked per node
        values = collections.Counter(metrics_of[n].get(key) for n in vectors)
        if len(values) > 1:
            value = values.most_common(1)[0][0]
            for n in [n for n in vectors if metrics_of[n].get(key) != value]:
                del vectors[n]
                r.drop(n, f"secagg train: {key} {metrics_of[n].get(key)!r} differs from the other nodes' {value!r}")
    survivors = sorted(vectors)
    gone = sorted(shared - set(survivors))  # shared keys, then dropped: their pairwise masks must come off
    if len(survivors) < need:
        return fail(f"secagg: {len(survivors)} masked uploads survived, {need} needed", _row(metrics_of, survivors, r))
    if not _connected(survivors, neighbours):
        return fail("secagg: the survivors' graph fell apart into groups whose sums would unmask separately; not "
                    "unmasking", _row(metrics_of, survivors, r))

    # 4. unmask (only when every secret to rebuild keeps t live holders: else the attempt ends here)
    live4 = set(survivors)
    for n in [*survivors, *(j for j in gone if set(neighbours[j]) & live4)]:
        holders = len(set(neighbours[n]) & live4) + (n in live4)
        if holders < t:
            return fail(f"secagg: {len(live4)} of {len(shared)} nodes left after sharing: node {n}'s secrets have "
                        f"{holders} live share holders, secagg threshold {t}", _row(metrics_of, survivors, r))
    asked = {n: (sorted(({n} | set(packets[n])) & live4), sorted(set(packets[n]) & set(gone))) for n in survivors}
    got = r.exchange("unmask", {n: RecordDict({core.SECAGG: ConfigRecord({
        "stage": "unmask", "round": server_round, "b-of": asked[n][0], "sk-of": asked[n][1]})}) for n in survivors})
    b_shares: dict[int, list[bytes]] = collections.defaultdict(list)
    sk_shares: dict[int, list[bytes]] = collections.defaultdict(list)
    for n, msg in got.items():
        try:
            rec = _record(msg)
            stages = (("b-ids", "b-shares", b_shares, asked[n][0]), ("sk-ids", "sk-shares", sk_shares, asked[n][1]))
            for kind, (ids_key, shares_key, into, allowed) in enumerate(stages):
                ids, shares = rec.get(ids_key, []), rec.get(shares_key, [])
                if (not isinstance(ids, list) or not isinstance(shares, list) or len(ids) != len(shares)
                        or len(set(ids)) != len(ids) or not all(isinstance(i, int) and i in allowed for i in ids)
                        or not all(isinstance(s, bytes) and 0 < len(s) <= MAX_PACKET for s in shares)):
                    raise PayloadError(f"malformed {shares_key} (only the shares asked for, once each)")
                for i, share in zip(ids, shares):  # a share must be the one its dealer committed to for this holder
                    if hashlib.sha256(share).digest() != share_commits[i][n][kind]:
                        raise PayloadError(f"its share of node {i}'s secret is not the one node {i} committed to")
                    into[i].append(share)
        except PayloadError as err:
            r.drop(n, f"secagg unmask: {err} (its shares are not used; its upload still is)")
    t0 = time.perf_counter()
    try:
        total = _unmask(survivors, gone, vectors, b_shares, sk_shares, commits, keys, neighbours, shared, t, sa.bits)
    except PayloadError as err:
        return fail(f"secagg: {err}", _row(metrics_of, survivors, r))
    sums, weight = core.dequantize(total, len(survivors), clip, n_levels)
    r.out.seconds["unmask-sum"] = round(time.perf_counter() - t0, 3)
    if weight <= 0:
        return fail("secagg: the summed example weight is zero", _row(metrics_of, survivors, r))
    mean = sums / weight
    layout = parsed[survivors[0]]
    records: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    offset = 0
    for name, key, dtype, shape in layout:
        size = math.prod(shape)
        records[name][key] = Array(mean[offset:offset + size].reshape(shape).astype(dtype))
        offset += size
    common = _common(metrics_of, survivors)
    content = RecordDict({METRICS: MetricRecord({**common, "num-examples": weight * sa.max_weight}),
                          **{name: ArrayRecord(arrays) for name, arrays in records.items()}})
    try:  # the sum passes the method's own checks, as a reply would
        mean_update = strategy.method.decode(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=0))
    except PayloadError as err:
        return fail(f"secagg: the unmasked mean was refused: {err}", _row(metrics_of, survivors, r))
    updates = [Update(n, {}, 1.0, metrics_of[n], r.out.up[n]) for n in survivors]
    metrics = _row(metrics_of, survivors, r)
    metrics.update({"secagg-weight": weight * sa.max_weight, "secagg-threshold": t,
                    # the values' rounding, and half as much again for the summed weight's
                    "secagg-error-bound": 1.5 * len(survivors) * 2 * clip / n_levels / weight,
                    "secagg-clipped": sum(metrics_of[n].get("secagg-clipped", 0.0) for n in survivors)})
    if metrics["secagg-clipped"]:
        log.warning("round %d: secagg: %d uploaded values were clipped to +-%g (secagg.clip-range)", server_round,
                    int(metrics["secagg-clipped"]), clip)
    agg = strategy.chain.finish(Aggregate(mean_update.delta))
    metrics.update(strategy.method.apply(agg.delta, updates, server_round))
    r.out.missing = sorted(r.missing)
    r.out.replies = [train_replies[n] for n in survivors]
    r.out.result = RoundResult(server_round, tuple(updates), tuple(r.dropped.items()), (), metrics, applied=True)
    return r.out


def _metrics(msg: Message, server_round: int) -> dict[str, float]:
    """A masked reply's plain metrics, checked (it carries no example count: that is in the sum)."""
    if METRICS not in msg.content.metric_records:
        raise PayloadError(f"reply lacks the {METRICS!r} record")
    out = finite_metrics(msg.content.metric_records[METRICS])
    if out.get("server-round", server_round) != server_round:
        raise PayloadError(f"reply is for round {out.get('server-round')!r}, this is round {server_round}")
    return out


def _common(metrics_of: dict[int, dict[str, float]], nodes: list[int]) -> dict[str, float]:
    """The metrics every survivor reported with one value (the method's version or fragment)."""
    first = metrics_of[nodes[0]]
    return {k: v for k, v in first.items() if all(metrics_of[n].get(k) == v for n in nodes)}


def _row(metrics_of: dict[int, dict[str, float]], survivors: list[int], r: _Round) -> dict[str, float]:
    row: dict[str, float] = {"clients-ok": len(survivors), "clients-dropped": len(r.dropped)}
    if survivors:  # the per-client example counts are secret: the train loss is the plain mean
        row["train-loss"] = sum(metrics_of[n].get("train-loss", 0.0) for n in survivors) / len(survivors)
    row.update({f"secagg-seconds-{k}": v for k, v in r.out.seconds.items()})
    return row


def _rebuild(shares: list[bytes], t: int, verify: Any) -> bytes | None:
    """The secret of t of `shares` (each checked against its dealer's commitment) if it passes
    `verify` (a dealer whose shares do not make its committed secret), else None."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares

    try:
        secret = combine_shares(shares[:t])
    except Exception:  # shares of mixed lengths, a bad pad
        return None
    return secret if verify(secret) else None


def _connected(nodes: list[int], neighbours: dict[int, list[int]]) -> bool:
    """Whether the graph's edges among `nodes` connect them all (else each group's masks cancel
    within it, and unmasking would give each group's sum)."""
    seen, todo = {nodes[0]}, [nodes[0]]
    live = set(nodes)
    while todo:
        for j in neighbours[todo.pop()]:
            if j in live and j not in seen:
                seen.add(j)
                todo.append(j)
    return seen == live


def _public_key(record: ConfigRecord, key: str) -> bytes:
    """A P-384 public key in canonical PEM (what the clients' key agreement takes).

    Raises:
        PayloadError: for anything else.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, public_key_to_bytes

    raw = _blob(record, key, MAX_KEY)
    try:
        pk = bytes_to_public_key(raw)
        ok = isinstance(pk, ec.EllipticCurvePublicKey) and isinstance(pk.curve, ec.SECP384R1) \
            and public_key_to_bytes(pk) == raw
    except Exception:  # not PEM, not a key
        ok = False
    if not ok:
        raise PayloadError(f"{key!r} is not a P-384 public key in PEM")
    return raw


def _unmask(survivors: list[int], gone: list[int], vectors: dict[int, np.ndarray], b_shares: dict[int, list[bytes]],
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
