"""The in-process engine's Grid: nodes whose ClientApp runs in this process, one message after
another, when the server pulls their replies (`fedllm simulate --engine inprocess`, the
benchmarks, the tests). No Ray and no SuperLink: for one-device users and for debugging.

    from fedllm.server.grid import LocalGrid
    run_dir = run(LocalGrid(10), cfg)            # 10 nodes, partitions 0..9

Messages wait in the grid when pushed; `pull_messages` runs each waiting client lazily, so the
server folds one reply before the next client trains (a streamed round holds one update). A
client that raises becomes an error reply, as in Flower; `silent` nodes never reply, so the
server counts them missing after server.round-timeout. A node's Context is made the first
time it gets a message (1000 registered nodes cost nothing until sampled). With `spill` (a
folder), each node's array records (context.state) wait on disk as safetensors between its
messages, so that only the node at work holds its state in memory: for many nodes, or for
full-parameter methods whose per-node state is the size of the model (diloco).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict


class LocalGrid:
    """Nodes 1..n with node config partition-id = node - 1 and num-partitions = n, running
    `app` (fedllm's ClientApp, with its mods, unless given)."""

    def __init__(self, num_nodes: int, silent: Iterable[int] = (), spill: Path | None = None,
                 app: Any = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._task_id is None:  # Flower stamps messages with the running task's identity
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.num_nodes = num_nodes
        self.contexts: dict[int, Context] = {}
        self.silent = set(silent)
        self.sent = 0
        self.spill = Path(spill) if spill is not None else None
        self.app = app
        self.waiting: dict[str, Message] = {}  # pushed, not yet run
        self.client_seconds: list[float] = []  # time each reply took its client, in order

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_nodes + 1))

    def context(self, node: int) -> Context:
        """Node `node`'s Context (made on first use)."""
        if node not in self.contexts:
            self.contexts[node] = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                          node_config={"partition-id": node - 1, "num-partitions": self.num_nodes})
        return self.contexts[node]

    def reply(self, message: Message) -> RecordDict:
        """The client's reply content to `message` (override to cache or alter)."""
        if self.app is None:
            from fedllm.client.app import app

            self.app = app
        context = self.context(message.metadata.dst_node_id)
        if self.spill is None:
            return self.app(message, context).content
        self._unspill(context)
        try:
            return self.app(message, context).content
        finally:
            self._spill(context)

    def _files(self, context: Context) -> dict[str, Path]:
        names = context.state.config_records.get("local-grid-spilled", {}).get("names", [])
        return {name: self.spill / f"node{context.node_id}-{name}.safetensors" for name in names}

    def _spill(self, context: Context) -> None:
        from flwr.app import ConfigRecord
        from safetensors.torch import save_file

        self.spill.mkdir(parents=True, exist_ok=True)
        names = list(context.state.array_records)
        context.state["local-grid-spilled"] = ConfigRecord({"names": names})
        for name, path in self._files(context).items():
            save_file(context.state.array_records[name].to_torch_state_dict(), str(path))
            del context.state[name]

    def _unspill(self, context: Context) -> None:
        from flwr.app import ArrayRecord
        from safetensors.torch import load_file

        for name, path in self._files(context).items():
            context.state[name] = ArrayRecord(load_file(str(path)))
            path.unlink()
        if "local-grid-spilled" in context.state.config_records:
            del context.state["local-grid-spilled"]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            if not 1 <= m.metadata.dst_node_id <= self.num_nodes:
                raise ValueError(f"no node {m.metadata.dst_node_id} in this grid (nodes 1..{self.num_nodes})")
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids stamp what they push
            self.sent += 1
            if m.metadata.dst_node_id not in self.silent:
                self.waiting[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterator[Message]:
        """Runs each waiting message among `message_ids`, in push order, yielding its reply."""
        wanted = set(message_ids)
        for mid in [mid for mid in self.waiting if mid in wanted]:
            m = self.waiting.pop(mid)
            started = time.perf_counter()
            try:
                out = Message(self.reply(m), reply_to=m)
            except Exception as err:  # a failing client, reported as Flower reports a ClientApp exception
                out = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m)
            self.client_seconds.append(time.perf_counter() - started)
            yield out

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        return list(self.pull_messages(self.push_messages(messages)))
