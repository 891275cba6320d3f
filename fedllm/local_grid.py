"""A Flower Grid whose nodes run fedllm's client in this process, one message after another:
for benchmarks and tests that drive `fedllm.server_app.run` without Ray or a SuperLink.

    from fedllm.local_grid import LocalGrid
    run_dir = run(LocalGrid(10), cfg)            # 10 nodes, partitions 0..9

A client that raises becomes an error reply, as in Flower; `silent` nodes never reply, as if
they had timed out.
"""

from __future__ import annotations

import uuid
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict


class LocalGrid:
    """Nodes 1..n with node config partition-id = node - 1 and num-partitions = n."""

    def __init__(self, num_nodes: int, silent: Iterable[int] = ()) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._task_id is None:  # Flower stamps messages with the running task's identity
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                       node_config={"partition-id": node - 1, "num-partitions": num_nodes})
                         for node in range(1, num_nodes + 1)}
        self.silent = set(silent)
        self.sent = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def reply(self, message: Message) -> RecordDict:
        """The client's reply content to `message` (override to cache or alter)."""
        from fedllm.client_train import handle

        return handle(message.content, self.contexts[message.metadata.dst_node_id])

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for m in messages:
            self.sent += 1
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids stamp what they push
            if m.metadata.dst_node_id in self.silent:
                continue
            try:
                replies.append(Message(self.reply(m), reply_to=m))
            except Exception as err:  # a failing client, reported as Flower reports a ClientApp exception
                replies.append(Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m))
        return replies
