"""The Method interface: a training method owns its whole protocol, in two typed halves.

    register_method("lora", server=LoraServer, client=LoraClient, config=LoraConfig, default_rule="fedavg",
                    compression=True, dp=True, utility=True, delta_kind="dense")

The server half holds the global state: it encodes what each node needs to reach it (through
the shared `Downlink` bookkeeping), decodes and validates an upload into an `Update`, applies
an aggregate, gives the model at the global state for evaluation, and saves, digests and
checkpoints its state by name. The client half syncs to the global state, trains, and encodes
its upload. Nothing outside a method's folder names it; the round loop, the rules, the ledger
and the report see only these Protocols and `Update` / `RoundResult` values.

Metadata a method registers with (read by the cross-checks in `strategies.resolve`):
- default_rule: the rule server.strategy='' picks;
- delta_kind: what its updates are ("dense" named tensors of fixed shapes, "sums" per-seed
  scalars, "factors" LoRA factors of any rank), matched against a rule's `accepts`;
- rules: rules of its own, (name, function) pairs (exact-lora's stack);
- server_optimizers: whether server.strategy may chain server optimizers (fedadam, ...) after
  the rule (default True; diloco takes its own outer step);
- compression: whether compression.up/down apply (its uploads are named tensors);
- dp: whether Flower's client-side clipping mod applies (it clips float32 arrays);
- utility: whether `utility` gives the validation loss that scorers with needs_utility call;
- quantize: whether model.quantize and lora.policy apply (clients train an adapter on a frozen base);
- optimizers: the train.optimizer values it takes (default: adamw only);
- peft: the lora.peft adapters it takes (default: lora only).

Optional, before round 1 of a new run: a server half with `prepare(ask)` may query the sampled
clients (`ask(records)` sends them a query message with the run config and yields the replies); a
client half answers with `answer(request, rows_of, seed)` (LoRA's module scoring).

Optional at every evaluation: a server half with `evaluate(model, held_out)` adds its own figures
to the row (dpo: the held-out rewards).

More metadata: preference (its clients train on preference pairs: the data layer loads pairs,
`fedllm.methods.data_splits`), init_from (server.init-from applies: the global adapter may start
from a saved one), proximal (whether fedprox's proximal term reaches its local loss; default True),
secagg (whether secagg.enabled applies: with it on, its client half uploads float arrays whose
example-weighted mean its `decode` reads as the mean update, and its server half takes that mean
through `decode` and `apply` as a streamed round does; fedllm.secagg), secagg_range (the
clip range secagg.clip-range=0 takes: what its uploaded values span), secagg_agree (metrics its
`decode` checks, which every masked upload must report alike: zo's version, diloco's fragment).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

from flwr.app import Context, Message, RecordDict

from fedllm.config import Config
from fedllm.protocol import State, Update
from fedllm.registry import Registry

Ask = Callable[[dict[str, Any]], Iterator[Message]]  # records -> the replies of a query to the sampled nodes
UtilityOf = Callable[[list[int]], float]  # indices of accepted updates -> minus a validation loss
Transform = Callable[[State], State]  # what an attack hook does to an update before it is encoded


class ServerHalf(Protocol):
    """The server's side of a method; built once per run as `server(cfg)`."""

    reply_records: frozenset[str]  # the record names a reply may hold
    tokenizer: Any

    def encode_down(self, node: int) -> dict[str, Any]:
        """The records that bring `node` to the global state (named by fedllm.protocol)."""

    def decode(self, msg: Message) -> Update:
        """A screened reply as a validated Update. Raises PayloadError."""

    def largest_reply(self) -> int:
        """The default reply size limit in bytes (server.max-reply-bytes overrides it)."""

    def apply(self, aggregate: State, updates: list[Update], server_round: int) -> dict[str, float]:
        """Move the global state by the round's aggregate; returns metrics for the row."""

    def model(self) -> contextlib.AbstractContextManager[Any]:
        """The model at the global state (for evaluation and merging)."""

    def utility(self, updates: list[Update], examples: list[dict[str, str]]) -> UtilityOf | None:
        """For the loo and shapley scorers: minus the validation loss of the state before the
        last `apply`, moved by the mean of the chosen updates; None where unsupported."""

    def digest(self) -> bytes:
        """keccak256 of the global state (the model hash on the ledger)."""

    def save(self, run_dir: Path) -> None:
        """Write the result in a format the ecosystem loads."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ClientHalf(Protocol):
    """A client's side of a method, for one train message: `client(cfg, context, partition_id)`."""

    tokenizer: Any

    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        """Bring the local model to the global state the request describes; returns metrics.
        Raises PayloadError when the request cannot be applied."""

    def train(self, rows: list[dict[str, Any]], seed: int) -> dict[str, float]:
        """Local steps on encoded rows (token ids; pair texts for a preference method); returns stats
        (train-loss, steps, ...)."""

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        """The reply's update records; `transform` (an attack) rewrites the update first."""


ServerFactory = Callable[[Config], ServerHalf]
ClientFactory = Callable[[Config, Context, int], ClientHalf]


class MethodImpl:
    """What register_method stores: the two half factories."""

    def __init__(self, server: ServerFactory, client: ClientFactory) -> None:
        self.server, self.client = server, client


METHODS: Registry[MethodImpl] = Registry("method", "train.method")


def register_method(name: str, *, server: ServerFactory, client: ClientFactory, config: type | None = None,
                    **meta: Any) -> MethodImpl:
    """Add a method under `name` (what train.method selects)."""
    return METHODS.register(name, MethodImpl(server, client), config=config, **meta)
