"""Asynchronous buffered rounds, server.mode=async (FedBuff: Nguyen et al., 2022, "Federated
Learning with Buffered Asynchronous Aggregation"), on Flower's Message API (push, then pull
replies as they come).

    pump = Buffered(cfg, strategy, grid)
    outcome = pump.version(v, run_config)      # a RoundOutcome, as fedllm.server.round.train_round's

server.concurrency clients train at all times. Each reply is screened and decoded as it arrives,
against the message it answers (the version that message carried, its round number); every
server.buffer-size accepted replies make global version v: update i, trained on version v_i,
weighs server.async-lr x (1 + s_i)^-a with staleness s_i = (v - 1) - v_i and a =
server.staleness-exponent, and the rule chain folds the weighted updates as in a synchronous
round (streaming where it streams). A client is sent the newest version as soon as its reply is
in, unless the replies in flight are about to make a newer one (within server.version-wait of its
own work time: at equal speeds no client retrains a version about to be replaced, so the versions
match synchronous rounds; a slow client's reply is not waited for). One row of metrics.jsonl per version.

What goes wrong has a named reason, and nothing applied is lost:
- a second reply to one message (a client answering an old version twice), or a reply to a message
  no longer awaited (timed out, or sent before a restart): dropped;
- a reply more than server.max-staleness versions old: dropped;
- a client that vanishes mid-training: its message times out (server.round-timeout), its slot
  goes to an idle client;
- no accepted reply for (server.round-retries + 1) x server.round-timeout: RoundFailed, and a
  resume (server.resume) continues from the last version's checkpoint; the replies then in
  flight are not awaited (their clients are sent the newest version).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.protocol import Update, payload_bytes
from fedllm.server.round import RoundFailed, RoundOutcome
from strategies import FedLLMStrategy

log = logging.getLogger(__name__)

REMEMBERED = 65536  # answered message ids kept to name a second reply a duplicate


@dataclass(frozen=True)
class Flight:
    """A train message in flight: its node, the global version it carried, the round number it
    was sent as (the version it helps make), when the server stops waiting for it, and when it was
    sent (time.monotonic())."""

    node: int
    version: int
    server_round: int
    deadline: float
    sent: float = 0.0


def staleness_weight(staleness: int, exponent: float) -> float:
    """(1 + s)^-a: FedBuff's 1/sqrt(1 + s) at a = 0.5; 1 at a = 0."""
    return (1.0 + staleness) ** -exponent


def scaled(update: Update, factor: float, staleness: int) -> Update:
    """The update with its delta times `factor` and its staleness among its metrics."""
    delta = update.delta if factor == 1.0 else {k: t * factor for k, t in update.delta.items()}
    return dataclasses.replace(update, delta=delta, metrics={**update.metrics, "staleness": staleness})


class Buffered:
    """The asynchronous loop's state between versions: the messages in flight, the answered ones,
    the replies pulled beyond the last version's buffer, and whose turn it is."""

    def __init__(self, cfg: Config, strategy: FedLLMStrategy, grid: Grid, interval: float = 0.05) -> None:
        self.cfg, self.strategy, self.grid, self.interval = cfg, strategy, grid, interval
        self.flights: dict[str, Flight] = {}
        self.answered: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.early: collections.deque[Message] = collections.deque()  # pulled, not yet read
        self.last_sent: dict[int, int] = {}  # node -> dispatch number (idle nodes go oldest first)
        self.dispatched = 0
        self.work: dict[int, float] = {}  # node -> moving average of its replies' seconds (send to reply)
        self.heard: dict[int, int] = {}  # node -> replies read

    # --- sending --------------------------------------------------------------------------------
    def idle(self, connected: list[int]) -> list[int]:
        """The `connected` nodes without a message in flight, the longest idle first."""
        busy = {f.node for f in self.flights.values()}
        nodes = [n for n in connected if n not in busy]
        return sorted(nodes, key=lambda n: (self.last_sent.get(n, -1), n))

    def work_of(self, node: int) -> float | None:
        """A node's expected seconds from send to reply: its own moving average, else the mean of the
        others' (None while no reply has come)."""
        if node in self.work:
            return self.work[node]
        return sum(self.work.values()) / len(self.work) if self.work else None

    def version_eta(self, needed: int) -> float:
        """When the messages in flight are expected to have brought the `needed` replies the version
        being made lacks (time.monotonic(); inf when they cannot, or nothing is known yet)."""
        etas = sorted(f.sent + w for f in self.flights.values() if (w := self.work_of(f.node)) is not None)
        return etas[needed - 1] if 0 < needed <= len(etas) else math.inf

    def holds(self, node: int, eta: float, now: float) -> bool:
        """Whether idle `node` waits for the version being made rather than train on the current one:
        the replies in flight are expected to make it within server.version-wait x the node's own work
        time (and are not overdue by more than that)."""
        wait, work = self.cfg.server.version_wait, self.work_of(node)
        return wait > 0 and work is not None and abs(eta - now) < wait * work

    def fill(self, current: int, run_config: ConfigRecord, down: dict[str, int], needed: int = 1) -> None:
        """Send the global version `current` to idle nodes until server.concurrency are in flight,
        except to those that wait for the version being made (`needed` replies away; `holds`)."""
        if needed <= 0:  # a full buffer: the newer version is a moment away
            return
        connected = list(self.grid.get_node_ids())  # once a call: a deployment's grid asks the SuperLink
        want = self.cfg.server.in_flight(len(connected)) - len(self.flights)
        if want <= 0:
            return
        now = time.monotonic()
        eta = self.version_eta(needed)
        nodes = [n for n in self.idle(connected) if not self.holds(n, eta, now)][:want]
        if not nodes:
            return
        messages = []
        for node in nodes:
            self.dispatched += 1
            self.last_sent[node] = self.dispatched
            # the dispatch number varies the client's seed: a node sent one version twice trains anew
            messages.append(self.strategy.train_message(current + 1, run_config, node, {"dispatch": self.dispatched}))
        sent = time.monotonic()
        for m, mid in zip(messages, self.grid.push_messages(messages)):
            self.flights[mid] = Flight(m.metadata.dst_node_id, current, current + 1,
                                       sent + self.cfg.server.round_timeout, sent)
            node = str(m.metadata.dst_node_id)
            down[node] = down.get(node, 0) + payload_bytes(m.content)

    # --- receiving ------------------------------------------------------------------------------
    def arrivals(self) -> Iterator[Message]:
        """Replies pulled earlier first, then what the grid has now. A lazy grid (the in-process
        engine runs a client when its reply is pulled) is read one reply at a time; a grid that
        hands over a batch has the rest kept for the next read."""
        while self.early:
            yield self.early.popleft()
        if not self.flights:
            return
        pulled = self.grid.pull_messages(list(self.flights))
        if isinstance(pulled, Iterator):
            yield from pulled
            return
        self.early.extend(pulled)
        while self.early:
            yield self.early.popleft()

    def admit(self, reply: Message, current: int) -> tuple[Update | None, str | None, Flight | None]:
        """One reply read against its flight: (the staleness-weighted update, None, flight), or
        (None, why it was dropped, flight or None). Never raises for a bad reply."""
        mid = reply.metadata.reply_to_message_id
        flight = self.flights.pop(mid, None)
        if flight is None:
            why = ("a second reply to one message (answered before)" if mid in self.answered
                   else "answers no message in flight (timed out, or sent before a restart)")
            return None, why, None
        self.answered[mid] = None
        while len(self.answered) > REMEMBERED:
            self.answered.popitem(last=False)
        took = time.monotonic() - flight.sent
        heard = self.heard.get(flight.node, 0)
        # a node's first reply carries its model's load: its second replaces it, later ones average in
        self.work[flight.node] = took if heard < 2 else 0.5 * (self.work[flight.node] + took)
        self.heard[flight.node] = heard + 1
        staleness = current - flight.version
        bound = self.cfg.server.max_staleness
        if bound and staleness > bound:
            return None, (f"trained on version {flight.version}, {staleness} versions old "
                          f"(server.max-staleness={bound})"), flight
        try:
            update = self.strategy.accept(reply, flight.server_round, frozenset({mid}))
        except PayloadError as err:
            return None, str(err), flight
        except Exception as err:  # a validation bug must not end the run: log it loudly
            log.exception("version %d: reply of node %d could not be checked", current + 1, flight.node)
            return None, f"unexpected {type(err).__name__}: {err}", flight
        factor = self.cfg.server.async_lr * staleness_weight(staleness, self.cfg.server.staleness_exponent)
        return scaled(update, factor, staleness), None, flight

    def expire(self, missing: list[int]) -> None:
        """Stop waiting for messages past their deadline (their nodes count as missing)."""
        now = time.monotonic()
        for mid, flight in list(self.flights.items()):
            if now >= flight.deadline:
                del self.flights[mid]
                missing.append(flight.node)
                log.warning("node %d: no reply within server.round-timeout=%gs to version %d (vanished "
                            "mid-training?); its slot goes to an idle client", flight.node,
                            self.cfg.server.round_timeout, flight.version)

    # --- one version ----------------------------------------------------------------------------
    def version(self, server_round: int, run_config: ConfigRecord, keep_replies: bool = False) -> RoundOutcome:
        """Make global version `server_round` (from version server_round - 1) out of the next
        server.buffer-size accepted replies; returns the outcome, applied.

        Raises:
            RoundFailed: when no reply is accepted for (server.round-retries + 1) x
                server.round-timeout seconds (the reason also goes to error.txt by the caller).
        """
        cfg, current = self.cfg, server_round - 1
        size = cfg.server.buffer(len(list(self.grid.get_node_ids())))
        t0 = time.perf_counter()
        patience = cfg.server.round_timeout * (cfg.server.round_retries + 1)
        give_up = time.monotonic() + patience
        down: dict[str, int] = {}
        updates: list[Update] = []
        dropped: list[tuple[int, str]] = []
        missing: list[int] = []
        replies: list[Message] = []
        into = self.strategy.accumulator(size)
        try:
            while len(updates) < size:
                self.fill(current, run_config, down, size - len(updates))
                got = False
                for reply in self.arrivals():
                    got = True
                    update, why, flight = self.admit(reply, current)
                    if update is None:
                        dropped.append((reply.metadata.src_node_id, why))
                        log.warning("version %d: dropped reply of node %d: %s", server_round,
                                    reply.metadata.src_node_id, why)
                    else:
                        give_up = time.monotonic() + patience
                        if keep_replies:
                            replies.append(reply)
                        updates.append(self.strategy.fold(update, into))
                    if flight is not None:
                        self.fill(current, run_config, down, size - len(updates))  # its node is idle
                    if len(updates) >= size:
                        break
                self.expire(missing)
                if len(updates) >= size:
                    break
                if time.monotonic() >= give_up:
                    raise RoundFailed(f"version {server_round}: {len(updates)} of server.buffer-size={size} "
                                      f"replies accepted in {patience:g}s (server.round-timeout x "
                                      f"(server.round-retries + 1)); {len(dropped)} dropped, {len(missing)} "
                                      "timed out")
                if not got:
                    time.sleep(self.interval)
            updates.sort(key=lambda u: (u.metrics.get("partition-id", 0.0), u.node_id))
            result = self.strategy.conclude(server_round, updates, dropped, into, size)
        finally:
            if into is not None:
                into.close()
        stale = collections.Counter(int(u.metrics["staleness"]) for u in updates)
        extra = {"staleness": {str(s): stale[s] for s in sorted(stale)}, "in-flight": len(self.flights)}
        return RoundOutcome(result, down, tuple(replies), tuple(missing), 1, time.perf_counter() - t0, extra)
