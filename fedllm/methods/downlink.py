"""The one downlink bookkeeping every method uses: a versioned history of the round payloads
the server applied, and the version each node holds.

    dl = Downlink(start_known=False)
    since = dl.version_of(node)        # None: unknown, send the full state
    dl.sent(node)                      # unknown until its reply is accepted
    ...
    dl.accepted(node)                  # it holds the version it was sent
    dl.append(payload)                 # the round's payload: version += 1

One rule for unknown versions: a node's version is unknown from the moment it is sent a
message until its reply is accepted (a node that crashes, times out or sends an invalid reply
may hold anything), and after a restart (node versions are not saved: a resumed run's nodes
start empty). A node never contacted holds version 0 when every party starts from the same
known state (`start_known`, zo's zero accumulators), else its version is unknown.

The table is bounded (`capacity`, server.node-state): it keeps the most recently sent nodes,
and a node pushed out is unknown again (sent the full state next time). From the first
eviction on, a node not in the table may be an evicted one, so it counts as unknown even
with `start_known`: the server's memory stays independent of the number of registered nodes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class Downlink:
    """History of the applied round payloads and the version each node holds."""

    def __init__(self, start_known: bool, capacity: int = 4096) -> None:
        self.start_known, self.capacity = start_known, capacity
        self.history: list[bytes] = []
        self._node: OrderedDict[int, int | None] = OrderedDict()  # version each node holds (None: unknown)
        self._pending: dict[int, int] = {}  # version a node was sent, until its reply is accepted
        self.evicted = False

    @property
    def version(self) -> int:
        """The global version: the number of round payloads applied."""
        return len(self.history)

    def version_of(self, node: int) -> int | None:
        """The version `node` holds, or None when unknown."""
        return self._node.get(node, 0 if self.start_known and not self.evicted else None)

    def missing(self, node: int) -> list[bytes] | None:
        """The payloads `node` lacks to reach the current version, or None when its version is
        unknown."""
        since = self.version_of(node)
        return None if since is None or since > self.version else self.history[since:]

    def sent(self, node: int) -> None:
        """`node` was sent the current version; what it holds is unknown until it replies."""
        self._pending[node] = self.version
        self._node[node] = None
        self._node.move_to_end(node)
        while len(self._node) > self.capacity:  # the least recently sent node is forgotten
            old, _ = self._node.popitem(last=False)
            self._pending.pop(old, None)
            self.evicted = True

    def accepted(self, node: int) -> None:
        """`node`'s reply was accepted: it holds the version it was sent."""
        if node in self._pending:
            self._node[node] = self._pending.pop(node)

    def append(self, payload: bytes) -> None:
        self.history.append(payload)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        self._node, self._pending = OrderedDict(), {}
