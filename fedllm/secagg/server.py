"""The server's half of SecAgg+ (Bell et al., CCS 2020) on Flower's Message API: one round of
the protocol around a method's train round.

    attempt = secure_round(strategy, server_round, run_config, grid, timeout)   # an Attempt

The round reads as its stages: `setup` (public keys), `share` (encrypted key shares), `train`
(the masked uploads, checked by fedllm.secagg.replies), `unmask` (the shares that remove the
masks) and `finish` (the mean through the method's decode, the chain's later stages, apply).

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
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedllm.errors import PayloadError
from fedllm.methods import spec_of
from fedllm.protocol import CONFIG, LEDGER, METRICS, RoundResult, Update, payload_bytes, receive, short_reason
from fedllm.secagg import core
from fedllm.secagg.core import check
from fedllm.secagg.replies import (Layout, masked_vector, mean_records, plain_metrics, public_key, record_of, share_reply,
                                   unmask, unmask_reply)
from strategies import FedLLMStrategy
from strategies.rules import Aggregate

log = logging.getLogger(__name__)


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


class Failed(Exception):
    """A stage ended the attempt; `why` is the attempt's failure."""

    def __init__(self, why: str, with_row: bool = False) -> None:
        super().__init__(why)
        self.why, self.with_row = why, with_row


def secure_round(strategy: FedLLMStrategy, server_round: int, run_config: ConfigRecord, grid: Grid,
                 timeout: float | None) -> Attempt:
    """One attempt at a secure round (see the module docstring); the aggregate is applied
    when `result.applied`.

    Raises:
        ConfigError: when the threshold, neighbours or bits do not fit the sampled nodes.
    """
    r = _SecureRound(strategy, server_round, grid, timeout)
    try:
        r.setup()
        r.share()
        r.train(run_config)
        r.unmask()
        return r.finish()
    except Failed as stop:
        return r.fail(stop.why, r.row() if stop.with_row else None)


class _SecureRound:
    """The state of one attempt, built up stage by stage."""

    def __init__(self, strategy: FedLLMStrategy, server_round: int, grid: Grid, timeout: float | None) -> None:
        self.strategy, self.cfg, self.sa = strategy, strategy.cfg, strategy.cfg.secagg
        self.round, self.grid, self.timeout = server_round, grid, timeout
        self.out = Attempt()
        self.dropped: dict[int, str] = {}
        self.missing: set[int] = set()
        self.clip = clip_range(self.cfg)
        self.nodes = strategy.sample(grid)
        self.t, self.n_levels = check(self.cfg, len(self.nodes))
        self.neighbours = core.graph(self.nodes, self.sa.neighbours, self.cfg.train.seed * 1_000_003 + server_round)
        self.need = max(2, self.cfg.server.min_replies)
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.live: set[int] = set()
        self.packets: dict[int, dict[int, bytes]] = collections.defaultdict(dict)  # dst -> src -> ciphertext
        self.commits: dict[int, bytes] = {}
        self.share_commits: dict[int, dict[int, tuple[bytes, bytes]]] = {}  # dealer -> holder -> (sha256 b, sk)
        self.shared: set[int] = set()
        self.vectors: dict[int, np.ndarray] = {}
        self.layouts: dict[int, Layout] = {}
        self.metrics_of: dict[int, dict[str, float]] = {}
        self.train_replies: dict[int, Message] = {}
        self.survivors: list[int] = []
        self.gone: list[int] = []
        self.total: np.ndarray | None = None

    def fail(self, why: str, metrics: dict[str, float] | None = None) -> Attempt:
        self.out.failure = why
        self.out.missing = sorted(self.missing)
        self.out.result = RoundResult(self.round, (), tuple(self.dropped.items()), (), metrics or {"clients-ok": 0},
                                      applied=False)
        return self.out

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


    def setup(self) -> None:
        """1. public keys from every sampled node."""
        params = {"round": self.round, "threshold": self.t, "bits": self.sa.bits, "clip-range": self.clip,
                  "max-weight": self.sa.max_weight, "levels": self.n_levels}
        got = self.exchange("setup", {n: RecordDict({core.SECAGG: ConfigRecord(
            {"stage": "setup", **params, "neighbours": self.neighbours[n]})}) for n in self.nodes})
        for n, msg in got.items():
            try:
                rec = record_of(msg)
                self.keys[n] = (public_key(rec, "pk-enc"), public_key(rec, "pk-mask"))
            except PayloadError as err:
                self.drop(n, f"secagg setup: {err}")
        self.live = _holders_ok(set(self.keys), self.neighbours, self.t)
        for n in set(self.keys) - self.live:
            self.drop(n, f"secagg setup: fewer than {self.t} of its share holders answered")
        if len(self.live) < self.need:
            raise Failed(f"secagg: {len(self.live)} nodes finished key setup, {self.need} needed")

    def share(self) -> None:
        """2. encrypted key shares, routed unread, with each dealer's commitments."""
        live, keys = self.live, self.keys
        got = self.exchange("share", {n: RecordDict({core.SECAGG: ConfigRecord({
            "stage": "share", "round": self.round, "ids": (ids := [j for j in self.neighbours[n] if j in live]),
            "pk-enc": [keys[j][0] for j in ids], "pk-mask": [keys[j][1] for j in ids]})}) for n in sorted(live)})
        for n, msg in got.items():
            expected = [j for j in self.neighbours[n] if j in live]
            try:
                cts, commit, hashes = share_reply(record_of(msg), expected, n)
            except PayloadError as err:
                self.drop(n, f"secagg share: {err}")
                continue
            self.commits[n] = commit
            self.share_commits[n] = {h: (hb, hs) for h, hb, hs in zip([n, *expected], *hashes)}
            for j, c in zip(expected, cts):
                self.packets[j][n] = c
        self.shared = _holders_ok(set(self.commits), self.neighbours, self.t)
        for n in set(self.commits) - self.shared:
            self.drop(n, f"secagg share: fewer than {self.t} of its share holders sent shares")
        if len(self.shared) < self.need:
            raise Failed(f"secagg: {len(self.shared)} nodes shared their keys, {self.need} needed")

    def train(self, run_config: ConfigRecord) -> None:
        """3. the train message with each node's shares, answered by a masked upload."""
        strategy, shared, packets = self.strategy, self.shared, self.packets
        config = ConfigRecord({**dict(run_config), **strategy.round_config(self.round)})
        got = self.exchange("train", {n: RecordDict({
            CONFIG: config, **strategy.method.encode_down(n), core.SECAGG: ConfigRecord({
                "stage": "train", "round": self.round, "peers": [j for j in self.neighbours[n] if j in shared],
                "src": (src := sorted(j for j in packets[n] if j in shared)), "ct": [packets[n][j] for j in src]})})
            for n in sorted(shared)})
        # a masked value is an integer of up to 8 bytes, whatever the method's upload dtype
        size_limit = self.cfg.server.max_reply_bytes or 2 * strategy.method.largest_reply() + 65536
        sent: dict[int, bytes] = {}  # the layouts as sent (compared between nodes)
        accused: dict[int, list[int]] = collections.defaultdict(list)
        for n, msg in got.items():
            try:
                rec = record_of(msg, (METRICS, core.MASKED, LEDGER))
                bad = rec.get("bad", [])
                if not isinstance(bad, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in bad):
                    raise PayloadError("'bad' is not a list of node ids")
                metrics = plain_metrics(msg, self.round)
                if payload_bytes(msg.content) > size_limit:
                    raise PayloadError(f"payload exceeds the limit of {size_limit} bytes (server.max-reply-bytes)")
                vec, layout = masked_vector(msg, rec.get("layout"), self.sa.bits)
            except PayloadError as err:
                self.drop(n, f"secagg train: {err}")
                continue
            except Exception as err:  # a checking bug must not end the round: this node's reply is the problem
                log.exception("round %d: secagg: reply of node %d could not be checked", self.round, n)
                self.drop(n, f"secagg train: unexpected {type(err).__name__}: {err}")
                continue
            self.vectors[n], sent[n], self.layouts[n], self.metrics_of[n] = vec, rec.get("layout"), layout, metrics
            self.train_replies[n] = msg
            for b in bad:
                if b in packets[n]:
                    accused[b].append(n)
        self._screen(sent, accused)
        self.survivors = sorted(self.vectors)
        self.gone = sorted(shared - set(self.survivors))  # shared keys, then dropped: their pairwise masks come off
        if len(self.survivors) < self.need:
            raise Failed(f"secagg: {len(self.survivors)} masked uploads survived, {self.need} needed", with_row=True)
        if not _connected(self.survivors, self.neighbours):
            raise Failed("secagg: the survivors' graph fell apart into groups whose sums would unmask separately; "
                         "not unmasking", with_row=True)

    def _screen(self, sent: dict[int, bytes], accused: dict[int, list[int]]) -> None:
        """Drop the uploads that cannot be summed with the others: another layout, an accusation
        (the server cannot tell who lies: accuser and accused both leave), or a metric the method's
        decode checks that differs from the others'."""
        vectors = self.vectors
        if vectors:  # the layout most nodes sent is the method's; another one cannot be summed with it
            common, _ = collections.Counter(sent.values()).most_common(1)[0]
            for n in [n for n in vectors if sent[n] != common]:
                self.drop(n, "secagg train: its upload's arrays differ from the other nodes'")
                del vectors[n]
        for b, by in accused.items():
            for node, why in [(b, f"its key shares to node(s) {', '.join(map(str, sorted(by)))} did not decrypt")] + [
                    (a, f"it says node {b}'s key shares did not decrypt (accuser and accused both leave)") for a in by]:
                vectors.pop(node, None)
                self.drop(node, f"secagg train: {why}")
        for key in spec_of(self.cfg).secagg_agree:  # what decode checks, checked per node
            values = collections.Counter(self.metrics_of[n].get(key) for n in vectors)
            if len(values) > 1:
                value = values.most_common(1)[0][0]
                for n in [n for n in vectors if self.metrics_of[n].get(key) != value]:
                    del vectors[n]
                    self.drop(n, f"secagg train: {key} {self.metrics_of[n].get(key)!r} differs from the other "
                                 f"nodes' {value!r}")

    def unmask(self) -> None:
        """4. the shares that remove the survivors' self masks and the dropped nodes' pairwise masks
        (only when every secret to rebuild keeps t live holders: else the attempt ends here)."""
        survivors, gone, packets, t = self.survivors, self.gone, self.packets, self.t
        live4 = set(survivors)
        for n in [*survivors, *(j for j in gone if set(self.neighbours[j]) & live4)]:
            holders = len(set(self.neighbours[n]) & live4) + (n in live4)
            if holders < t:
                raise Failed(f"secagg: {len(live4)} of {len(self.shared)} nodes left after sharing: node {n}'s "
                             f"secrets have {holders} live share holders, secagg threshold {t}", with_row=True)
        asked = {n: (sorted(({n} | set(packets[n])) & live4), sorted(set(packets[n]) & set(gone))) for n in survivors}
        got = self.exchange("unmask", {n: RecordDict({core.SECAGG: ConfigRecord({
            "stage": "unmask", "round": self.round, "b-of": asked[n][0], "sk-of": asked[n][1]})}) for n in survivors})
        b_shares: dict[int, list[bytes]] = collections.defaultdict(list)
        sk_shares: dict[int, list[bytes]] = collections.defaultdict(list)
        for n, msg in got.items():
            try:
                unmask_reply(record_of(msg), n, asked[n], self.share_commits, b_shares, sk_shares)
            except PayloadError as err:
                self.drop(n, f"secagg unmask: {err} (its shares are not used; its upload still is)")
        t0 = time.perf_counter()
        try:
            self.total = unmask(survivors, gone, self.vectors, b_shares, sk_shares, self.commits, self.keys,
                                self.neighbours, self.shared, t, self.sa.bits)
        except PayloadError as err:
            raise Failed(f"secagg: {err}", with_row=True) from None
        self.out.seconds["unmask-sum"] = round(time.perf_counter() - t0, 3)

    def finish(self) -> Attempt:
        """The unmasked sum as the mean upload, through the method's decode (the checks of any reply),
        the chain's later stages (server optimizers, DP noise) and the method's apply."""
        survivors, sa, strategy = self.survivors, self.sa, self.strategy
        sums, weight = core.dequantize(self.total, len(survivors), self.clip, self.n_levels)
        if weight <= 0:
            raise Failed("secagg: the summed example weight is zero", with_row=True)
        content = RecordDict({METRICS: MetricRecord({**_common(self.metrics_of, survivors),
                                                     "num-examples": weight * sa.max_weight}),
                              **mean_records(sums / weight, self.layouts[survivors[0]])})
        try:  # the sum passes the method's own checks, as a reply would
            mean = strategy.method.decode(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=0))
        except PayloadError as err:
            raise Failed(f"secagg: the unmasked mean was refused: {err}", with_row=True) from None
        updates = [Update(n, {}, 1.0, self.metrics_of[n], self.out.up[n]) for n in survivors]
        metrics = self.row()
        metrics.update({"secagg-weight": weight * sa.max_weight, "secagg-threshold": self.t,
                        # the values' rounding, and half as much again for the summed weight's
                        "secagg-error-bound": 1.5 * len(survivors) * 2 * self.clip / self.n_levels / weight,
                        "secagg-clipped": sum(self.metrics_of[n].get("secagg-clipped", 0.0) for n in survivors)})
        if metrics["secagg-clipped"]:
            log.warning("round %d: secagg: %d uploaded values were clipped to +-%g (secagg.clip-range)", self.round,
                        int(metrics["secagg-clipped"]), self.clip)
        agg = strategy.chain.finish(Aggregate(mean.delta))
        metrics.update(strategy.method.apply(agg.delta, updates, self.round))
        self.out.missing = sorted(self.missing)
        self.out.replies = [self.train_replies[n] for n in survivors]
        self.out.result = RoundResult(self.round, tuple(updates), tuple(self.dropped.items()), (), metrics,
                                      applied=True)
        return self.out

    def row(self) -> dict[str, float]:
        """The round's metrics so far (the per-client example counts are secret: the train loss is
        the plain mean)."""
        survivors = self.survivors
        row: dict[str, float] = {"clients-ok": len(survivors), "clients-dropped": len(self.dropped)}
        if survivors:
            row["train-loss"] = sum(self.metrics_of[n].get("train-loss", 0.0) for n in survivors) / len(survivors)
        row.update({f"secagg-seconds-{k}": v for k, v in self.out.seconds.items()})
        return row


def _holders_ok(live: set[int], neighbours: dict[int, list[int]], t: int) -> set[int]:
    """The live nodes that keep at least t share holders (themselves included), to a fixed point."""
    live = set(live)
    while True:
        short = {n for n in live if len(set(neighbours[n]) & live) + 1 < t}
        if not short:
            return live
        live -= short


def _common(metrics_of: dict[int, dict[str, float]], nodes: list[int]) -> dict[str, float]:
    """The metrics every survivor reported with one value (the method's version or fragment)."""
    first = metrics_of[nodes[0]]
    return {k: v for k, v in first.items() if all(metrics_of[n].get(k) == v for n in nodes)}


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
