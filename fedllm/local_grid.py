"""A Flower Grid whose nodes run fedllm's client in this process, one message after another:
for benchmarks and tests that drive `fedllm.server_app.run` without Ray or a SuperLink.

    from fedllm.local_grid import LocalGrid
    run_dir = run(LocalGrid(10), cfg)            # 10 nodes, partitions 0..9

A client that raises becomes an error reply, as in Flower; `silent` nodes never reply, as if
they had timed out. With `spill` (a folder), each node's array records (context.state) wait on
disk as safetensors between its messages, so that only the node at work holds its state in
memory: for full-parameter methods whose per-node state is the size of the model (diloco).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict


class LocalGrid:
    """Nodes 1..n with node config partition-id = node - 1 and num-partitions = n."""

    def __init__(self, num_nodes: int, silent: Iterable[int] = (), spill: Path | None = None) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        if TaskIdentity._task_id is None:  # Flower stamps messages with the running task's identity
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                                       node_config={"partition-id": node - 1, "num-partitions": num_nodes})
                         for node in range(1, num_nodes + 1)}
        self.silent = set(silent)
        self.sent = 0
        self.spill = Path(spill) if spill is not None else None

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def reply(self, message: Message) -> RecordDict:
        """The client's reply content to `message` (override to cache or alter)."""
        from fedllm.client_train import handle

        context = self.contexts[message.metadata.dst_node_id]
        if self.spill is None:
            return handle(message.content, context)
        self._unspill(context)
        try:
            return handle(message.content, context)
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
