"""The Method interface: a training method owns its whole protocol, in two typed halves.

    register_method("zo", server="fedllm.methods.zo.server:ZOServer", client="fedllm.methods.zo.client:ZOClient",
                    spec=MethodSpec(compression=False, dp=False, delta_kind="sums", check=my_checks))

The server half holds the global state: it encodes what each node needs to reach it (through
the shared `Downlink` bookkeeping), decodes and validates an upload into an `Update`, applies
an aggregate, gives the model at the global state for evaluation, and saves, digests and
checkpoints its state by name. The client half syncs to the global state, trains, and encodes
its upload. Nothing outside a method's folder names it; the round loop, the rules, the ledger
and the report see only these Protocols and `Update` / `RoundResult` values.

What a method is, besides its halves, is a typed `MethodSpec` (the cross-checks in
`strategies.resolve` and the round read its fields); its config section lives in its folder
(`methods/<m>/config.py`, `fedllm.config.register_section`), and `spec.check(cfg, spec)` holds the
cross-checks only it knows. The halves may be given as "module:object" strings, imported on first
use: registering a method (and reading the config) imports no torch.

Optional, before round 1 of a new run: a server half with `prepare(ask)` may query the sampled
clients (`ask(records)` sends them a query message with the run config and yields the replies); a
client half answers with `answer(request, rows_of, seed)` (LoRA's module scoring).

Optional at every evaluation: a server half with `evaluate(model, held_out)` adds its own figures
to the row (dpo: the held-out rewards).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

from fedllm.config import Config
from fedllm.registry import Registry, load

if TYPE_CHECKING:
    from flwr.app import Context, Message, RecordDict

    from fedllm.protocol import State, Update

Ask = Callable[[dict[str, Any]], Iterator["Message"]]  # records -> the replies of a query to the sampled nodes
UtilityOf = Callable[[list[int]], float]  # indices of accepted updates -> minus a validation loss
Transform = Callable[["State"], "State"]  # what an attack hook does to an update before it is encoded


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
ClientFactory = Callable[[Config, "Context", int], ClientHalf]


@dataclass(frozen=True)
class MethodSpec:
    """What a method works with; `strategies.resolve` and the round read these fields.

    default_rule: the rule server.strategy='' picks. delta_kind: what its updates are ("dense"
    named tensors of fixed shapes, "sums" per-seed scalars, "factors" LoRA factors of any rank),
    matched against a rule's `accepts`. rules: rules of its own, (name, function or
    "module:function") pairs (exact-lora's stack). server_optimizers: whether server.strategy
    may chain server optimizers (fedadam, ...) after the rule (diloco takes its own outer step).
    compression: whether compression.up/down apply (its uploads are named tensors). dp: whether
    Flower's client-side clipping mod applies (it clips float32 arrays). utility: whether
    `utility` gives the validation loss the scorers with needs_utility call. quantize: whether
    model.quantize and lora.policy apply (clients train an adapter on a frozen base). optimizers:
    the train.optimizer values it takes. peft: the lora.peft adapters it takes. auto_modules:
    whether lora.target-modules=auto applies (its server half scores modules in `prepare`).
    init_from: whether server.init-from applies (the global adapter may start from a saved one).
    preference: its clients train on preference pairs (the data layer loads pairs). proximal:
    whether fedprox's proximal term reaches its local loss. secagg: whether secagg.enabled applies
    (its client half uploads float arrays whose example-weighted mean its `decode` reads as the
    mean update). secagg_range: the clip range secagg.clip-range=0 takes. secagg_agree: metrics
    its `decode` checks, which every masked upload must report alike (zo's version). schedule: whether
    its client steps at train.lr (so train.lr-schedule and train.warmup-steps apply; zo's step is zo.lr).
    keep_optimizer: whether train.keep-optimizer applies (a client's AdamW over the same tensors each round).
    variates: whether server.strategy=scaffold applies (its halves carry SCAFFOLD's control variates).
    round_steps: its local steps in a round, for the schedule's clock (None: train.local-steps). buffered:
    whether server.mode=async applies (its updates are deltas the server may apply to a later version than
    the one they were trained on); why_sync: what server.mode=async's refusal says otherwise. check: the
    cross-checks only this method knows, `check(cfg, spec)` raising ConfigError (run by resolve).
    """

    default_rule: str = "fedavg"
    delta_kind: str = "dense"
    rules: tuple[tuple[str, Any], ...] = ()
    server_optimizers: bool = True
    compression: bool = True
    dp: bool = True
    utility: bool = False
    quantize: bool = False
    optimizers: tuple[str, ...] = ("adamw",)
    peft: tuple[str, ...] = ("lora",)
    auto_modules: bool = False
    init_from: bool = False
    preference: bool = False
    proximal: bool = True
    secagg: bool = False
    secagg_range: float = 4.0
    secagg_agree: tuple[str, ...] = ()
    schedule: bool = True
    keep_optimizer: bool = False
    variates: bool = False
    round_steps: Callable[[Config], int] | None = None
    buffered: bool = False
    why_sync: str = "its updates are not deltas that a later global version can take"
    check: Callable[[Config, "MethodSpec"], None] | None = None


class MethodImpl:
    """What register_method stores: the two half factories (imported on first use when given as
    "module:object") and the spec."""

    def __init__(self, server: ServerFactory | str, client: ClientFactory | str, spec: MethodSpec) -> None:
        self._server, self._client, self.spec = server, client, spec

    def server(self, cfg: Config) -> ServerHalf:
        return load(self._server, "train.method")(cfg)

    def client(self, cfg: Config, context: "Context", partition_id: int) -> ClientHalf:
        return load(self._client, "train.method")(cfg, context, partition_id)


METHODS: Registry[MethodImpl] = Registry("method", "train.method")


def register_method(name: str, *, server: ServerFactory | str, client: ClientFactory | str,
                    spec: MethodSpec | None = None, **fields_: Any) -> MethodImpl:
    """Add a method under `name` (what train.method selects); `spec`, or its fields as keywords.

    Raises:
        ValueError: for a keyword that is not a MethodSpec field.
    """
    unknown = set(fields_) - {f.name for f in fields(MethodSpec)}
    if unknown:
        raise ValueError(f"method {name!r}: {', '.join(sorted(unknown))} not MethodSpec fields")
    if spec is None:
        spec = MethodSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields_.items()})
    return METHODS.register(name, MethodImpl(server, client, spec))


def spec_of(cfg: Config) -> MethodSpec:
    """The spec of train.method (a registered name, or a user's MethodImpl by module:object)."""
    impl = METHODS.get(cfg.train.method).impl
    return impl.spec if isinstance(impl, MethodImpl) else MethodSpec()


def check_spec(cfg: Config) -> None:
    """The cross-checks of train.method's spec against the rest of the config that need no rule
    chain (so no torch): codecs, DP, a quantized base, the optimizer, server.init-from, then the
    method's own `check`. strategies.resolve runs them first; the pre-flight runs them alone.

    Raises:
        ConfigError: naming the key that does not fit.
    """
    from fedllm.errors import ConfigError
    from fedllm.methods import schedule
    from fedllm.methods.adapters import personal

    spec, name = spec_of(cfg), METHODS.get(cfg.train.method).name
    if cfg.server.strategy.strip() in METHODS:
        raise ConfigError(f"server.strategy: {cfg.server.strategy!r} is a method: set train.method="
                          f"{cfg.server.strategy.strip()} (server.strategy picks the aggregation rule)")
    if not spec.compression and (cfg.compression.up or cfg.compression.down):
        raise ConfigError(f"compression.up/down: train.method={name} does not take codecs (its uploads "
                          "are not dense float tensors); leave them empty")
    if not spec.dp and cfg.dp.clipping_norm > 0:
        raise ConfigError(f"dp.clipping-norm: differential privacy needs float32 arrays on the wire (Flower's "
                          f"clipping mod), which train.method={name} does not send")
    if cfg.dp.clipping_norm > 0 and (cfg.compression.up or cfg.compression.down):
        raise ConfigError("dp.clipping-norm: differential privacy needs uploads without compression "
                          "(Flower's clipping mod works on the float32 arrays)")
    if (cfg.model.quantize != "none" or cfg.model.client_quantize.strip()) and not spec.quantize:
        raise ConfigError(f"model.quantize: train.method={name} changes or adds into the base weights, which "
                          "a quantized base cannot take; quantized bases train with train.method=lora")
    if cfg.train.optimizer not in spec.optimizers:
        raise ConfigError(f"train.optimizer: train.method={name} takes {', '.join(spec.optimizers)}"
                          f", not {cfg.train.optimizer}")
    if cfg.server.init_from and not spec.init_from:
        raise ConfigError(f"server.init-from: train.method={name} does not start from a saved adapter; "
                          "lora and dpo do")
    if cfg.train.keep_optimizer and not spec.keep_optimizer:
        raise ConfigError(f"train.keep-optimizer: train.method={name} does not train the same tensors with a fresh "
                          "AdamW each round (lora and dpo do); leave it false")
    schedule.check(cfg)
    personal.check(cfg)  # lora.personal: train.method=lora only
    if cfg.server.mode == "async":
        check_buffered(cfg, spec, name)
    if spec.check is not None:
        spec.check(cfg, spec)


def check_buffered(cfg: Config, spec: MethodSpec, name: str) -> None:
    """What server.mode=async cannot go with.

    Raises:
        ConfigError: naming the key, with the reason, in one line.
    """
    from fedllm.errors import ConfigError

    if not spec.buffered:
        takers = ", ".join(sorted(e.name for e in METHODS.entries()
                                  if isinstance(e.impl, MethodImpl) and e.impl.spec.buffered))
        raise ConfigError(f"server.mode: train.method={name} takes no asynchronous rounds ({spec.why_sync}); "
                          f"use server.mode=sync, or a method that does: {takers}")
    if cfg.secagg.enabled:
        raise ConfigError("secagg.enabled: SecAgg+'s masks cancel only in the sum of one round's cohort, and an "
                          "asynchronous version sums replies sent at different versions; use server.mode=sync")
