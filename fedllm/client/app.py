"""Flower ClientApp: hands each train message to `fedllm.client.round.handle`.

Started by Flower (`flwr run .`, `fedllm simulate`, or a SuperNode). In simulation the
ClientApp lives in a long-lived Ray worker, so the model loads once per worker. A SuperNode
starts a new process for every message, which would pay for the imports and the model load
every round (about 10 s on 2 cores, bench/client_start.py); with node config `worker="warm"`
the message goes to the node's warm worker process instead (fedllm/client/worker.py), which keeps
the model between rounds. This module imports no torch, so that hand-off stays fast.
"""

from __future__ import annotations

import time
from typing import Any

from fedllm.privacy import quiet_environment

quiet_environment()  # before the imports below load huggingface_hub or a tracker (fedllm.privacy)

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedllm.secagg.client import secagg_mod


def dp_clipping(msg: Message, context: Context, call_next: Any) -> Message:
    """Flower's client-side fixed clipping, for messages that ask for it (dp.clipping-norm > 0)."""
    if KEY_CLIPPING_NORM in msg.content.config_records.get("config", {}):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secagg_mod, dp_clipping])  # secagg masks what the DP mod has clipped


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.time()
    if str(context.node_config.get("worker", "")) == "warm":
        from fedllm.client.worker import call

        content = call(msg.content, context, started)
    else:
        from fedllm.client.round import handle

        content = handle(msg.content, context, started)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """A method's question before round 1 (LoRA's module scores with lora.target-modules=auto),
    answered in this process."""
    from fedllm.client.round import answer

    return Message(answer(msg.content, context), reply_to=msg)
