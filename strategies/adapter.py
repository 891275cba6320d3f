"""The one Flower Strategy: plumbing between Flower's Message API, a method's server half and
a rule chain.

    strategy = build(cfg)                          # method from train.method, chain from server.strategy
    messages = strategy.configure_train(rnd, ArrayRecord(), config, grid)
    result = strategy.round(rnd, grid.send_and_receive(messages))      # a RoundResult value
    flwr = strategy.start(grid, ArrayRecord(), num_rounds=3, train_config=ConfigRecord(cfg.to_flat()))
    flwr.arrays                                    # Flower's loop: the method's state (strategies.arrays)

Every reply is checked before it touches the global state (`screen`: error, record names,
metrics, round number, payload size; the method's `decode`: names, shapes, dtypes, finite
values; then the update's norm); a bad reply is dropped with its reason, never raised.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedllm.config import Config
from fedllm.ledger.scoring import SCORERS
from fedllm.errors import ConfigError, PayloadError
from fedllm.methods import METHODS, ServerHalf, check_spec, spec_of
from fedllm.protocol import CONFIG, RoundResult, Update, screen, update_norm
from fedllm.registry import load
from strategies.arrays import state_arrays
from strategies import scaffold
from strategies.chain import Chain, parse_chain
from strategies.fold import MEAN, Running
from strategies.rules import Aggregate
from strategies.tree import SumTree

log = logging.getLogger(__name__)


class FedLLMStrategy(Strategy):
    """Samples nodes, sends each what the method encodes for it, validates replies into
    Updates, aggregates them with the chain and has the method apply the aggregate."""

    def __init__(self, cfg: Config, method: ServerHalf, chain: Chain) -> None:
        self.cfg, self.method, self.chain = cfg, method, chain

    def summary(self) -> None:
        log.info("method %s, strategy %s: fraction-train %.2f, min-clients %d, compression up %r down %r",
                 self.cfg.train.method, self.chain.name, self.cfg.server.fraction_train, self.cfg.server.min_clients,
                 self.cfg.compression.up, self.cfg.compression.down)

    def sample(self, grid: Grid) -> list[int]:
        """Node ids for this round, in increasing order: server.clients-per-round of them, else
        server.fraction-train of the connected ones (waits until server.min-clients, and as many
        as are sampled, are connected)."""
        server = self.cfg.server
        size = server.clients_per_round or max(int(len(list(grid.get_node_ids())) * server.fraction_train),
                                               server.min_clients)
        node_ids, _ = sample_nodes(grid, server.min_clients, size)
        return sorted(node_ids)

    def round_config(self, server_round: int) -> dict[str, Any]:
        """Per-round values sent beside the run config (keys without a dot)."""
        extra: dict[str, Any] = {"server-round": server_round, **self.chain.round_config()}
        if self.cfg.dp.clipping_norm > 0:
            from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

            extra[KEY_CLIPPING_NORM] = self.cfg.dp.clipping_norm  # what Flower's fixedclipping_mod reads
        return extra

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """`arrays` is ignored (Flower's `start` passes back what `aggregate_train` returned): the
        method's server half holds the global state and encodes what each node needs."""
        return [self.train_message(server_round, config, node) for node in self.sample(grid)]

    def train_message(self, server_round: int, config: ConfigRecord, node: int,
                      extra: Mapping[str, Any] | None = None) -> Message:
        """The train message that brings `node` to the global state, with the run `config`, the
        round's values and `extra` per-message values (keys without a dot)."""
        config = ConfigRecord({**dict(config), **self.round_config(server_round), **dict(extra or {})})
        return Message(content=RecordDict({CONFIG: config, **self.method.encode_down(node)}),
                       message_type=MessageType.TRAIN, dst_node_id=node)

    def max_reply_bytes(self) -> int:
        """server.max-reply-bytes, or else the method's `largest_reply()`."""
        return self.cfg.server.max_reply_bytes or self.method.largest_reply()

    def accept(self, msg: Message, server_round: int, sent: frozenset[str] = frozenset()) -> Update:
        """screen, decode, then bound the update's norm (server.max-update-norm)."""
        screen(msg, server_round, self.method.reply_records, self.max_reply_bytes(), sent)
        update = self.method.decode(msg)
        norm, bound = update_norm(update.delta), self.cfg.server.max_update_norm
        if bound > 0 and norm > bound:
            raise PayloadError(f"update norm {norm:.4g} exceeds server.max-update-norm={bound:g}")
        update.metrics["update-norm"] = norm  # measured by the server, beside what the client reports
        return update

    def accumulator(self, pending: int) -> Running | SumTree | None:
        """Where a streamed round folds its updates (`pending` replies expected): in this
        process, or a tree of server.aggregators worker processes; None for a round that keeps
        the list (the rule needs every update, the ledger scores them, or
        server.aggregation=list)."""
        if not self.streams(pending):
            return None
        workers = self.cfg.server.aggregator_count(pending)
        # the tree computes the weighted mean: a rule with a fold of its own folds in this process
        return SumTree(workers) if workers > 1 and self.chain.fold is MEAN else Running(self.chain.fold)

    def streams(self, pending: int) -> bool:
        """Whether a round of `pending` replies folds them as they arrive: server.aggregation=stream,
        or auto when the rule is a sum (its `streams` metadata), the ledger (whose scorers and
        flags need every update) is off, and the replies could hold more than server.stream-bytes.
        Below that a list round sums in partition order, whatever order the replies came in."""
        server = self.cfg.server
        if server.aggregation != "auto":
            return server.aggregation == "stream"
        return (self.chain.fold is not None and not self.cfg.ledger.enabled
                and pending * self.method.largest_reply() > server.stream_bytes)

    def collect(self, server_round: int, replies: Iterable[Message], sent: Iterable[Message] = (),
                into: Running | SumTree | None = None) -> tuple[list[Update], list[tuple[int, str]]]:
        """Every reply validated: the accepted updates (in partition order, so that sums are
        taken in the same order every run) and the dropped ones with their reasons. With `sent`
        (the round's messages, as the grid stamped them), a reply must answer one of them.
        With `into`, each accepted update is folded into it as it arrives and kept without its
        tensors (its node, examples and metrics stay for the round's row)."""
        updates, dropped = [], []
        sent_ids = frozenset(m.metadata.message_id for m in sent if m.metadata.message_id)
        for msg in replies:
            try:
                update = self.accept(msg, server_round, sent_ids)
            except PayloadError as err:
                dropped.append((msg.metadata.src_node_id, str(err)))
                log.warning("round %d: dropped reply of node %d: %s", server_round, msg.metadata.src_node_id, err)
                continue
            except Exception as err:  # a validation bug must not end the round: log it loudly
                dropped.append((msg.metadata.src_node_id, f"unexpected {type(err).__name__}: {err}"))
                log.exception("round %d: reply of node %d could not be checked", server_round,
                              msg.metadata.src_node_id)
                continue
            updates.append(self.fold(update, into))
        updates.sort(key=lambda u: (u.metrics.get("partition-id", 0.0), u.node_id))
        return updates, dropped

    @staticmethod
    def fold(update: Update, into: Running | SumTree | None) -> Update:
        """The update as a round keeps it: with `into` (a streamed round), folded into it and kept
        without its tensors (its node, examples and metrics stay for the round's row)."""
        if into is None:
            return update
        into.add(update.delta, update.num_examples)
        return dataclasses.replace(update, delta={})

    def round(self, server_round: int, replies: Iterable[Message], sent: Iterable[Message] = ()) -> RoundResult:
        """Validate, aggregate and apply one round's replies (to the messages `sent`, when
        given); with fewer than server.min-replies valid ones nothing is applied (`applied`
        False). Replies are consumed as the iterable yields them: a streamed round folds each
        into a running sum and holds none of their tensors."""
        sent = list(sent)
        into = self.accumulator(len(sent))
        try:
            updates, dropped = self.collect(server_round, replies, sent, into)
            return self.conclude(server_round, updates, dropped, into, self.cfg.server.min_replies)
        finally:
            if into is not None:
                into.close()

    def conclude(self, server_round: int, updates: list[Update], dropped: list[tuple[int, str]],
                 into: Running | SumTree | None, min_replies: int) -> RoundResult:
        """Aggregate the accepted `updates` (or what `into` folded of them) with the chain and have the
        method apply it; with fewer than `min_replies` nothing is applied (`applied` False)."""
        metrics: dict[str, float] = {"clients-ok": len(updates), "clients-dropped": len(dropped)}
        if updates:
            weights = [u.num_examples for u in updates]
            metrics["train-loss"] = sum(w * u.metrics.get("train-loss", 0.0)
                                        for w, u in zip(weights, updates)) / sum(weights)
        if len(updates) < min_replies:
            return RoundResult(server_round, tuple(updates), tuple(dropped), (), metrics, applied=False)
        agg = self.chain(updates) if into is None else self.chain.finish(Aggregate(into.result()))
        metrics.update(self.method.apply(agg.delta, updates, server_round))
        return RoundResult(server_round, tuple(updates), tuple(dropped), agg.outliers, metrics, applied=True)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's API: the method's global state after the round, in ArrayRecord form (what
        Flower's `Strategy.start` keeps as `result.arrays` and hands its `evaluate_fn`; see
        strategies.arrays), and the round's metrics. The method's server half stays the
        state's owner: the record is a copy, which `configure_train` ignores."""
        metrics = MetricRecord(self.round(server_round, replies).metrics)
        return state_arrays(self.method.state_dict()), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation is server-side, on the held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "chain": self.chain.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.method.load_state_dict(state["method"])
        self.chain.load_state_dict(state["chain"])


def resolve(cfg: Config) -> tuple[Any, Chain]:
    """The method entry for train.method and the chain for server.strategy, with every
    cross-check that needs both (read from the registries' metadata).

    Raises:
        ConfigError: naming the key that does not fit.
    """
    entry = METHODS.get(cfg.train.method)
    spec = spec_of(cfg)
    check_spec(cfg)  # the spec's checks that need no chain (the pre-flight runs them before torch)
    scorer = SCORERS.get(cfg.ledger.scorer)
    if cfg.ledger.enabled and scorer.meta.get("needs_utility") and not spec.utility:
        plain = ", ".join(s.name for s in SCORERS.entries() if not s.meta.get("needs_utility"))
        raise ConfigError(f"ledger.scorer: {scorer.name} needs a validation loss per subset of updates, which "
                          f"train.method={entry.name} does not give; use {plain}")
    chain = parse_chain(cfg.server.strategy, cfg, spec.delta_kind, spec.default_rule,
                        {name: load(rule, "server.strategy") for name, rule in spec.rules})
    if cfg.server.aggregation == "stream" and (chain.fold is None or cfg.ledger.enabled):
        why = (f"rule {chain.rule.name!r} needs every update at once" if chain.fold is None
               else "the ledger's scorers and flags need every update")
        raise ConfigError(f"server.aggregation: cannot stream ({why}); use auto or list")
    if cfg.secagg.enabled:
        secure_aggregation_fits(cfg, entry, chain)
    if chain.rule.name == "fedprox" and not spec.proximal:
        raise ConfigError(f"server.strategy: train.method={entry.name} adds no proximal term to its local loss; "
                          "use fedavg (or another rule) instead of fedprox")
    scaffold.check(cfg, chain, entry.name, spec.variates)
    if chain.optimizers and not spec.server_optimizers:
        raise ConfigError(f"server.strategy: train.method={entry.name} takes its own outer step on the aggregate "
                          f"(diloco's outer optimizer; ferret's bases change every round); name an aggregation rule "
                          f"only, not {', '.join(o.name for o in chain.optimizers)}")
    return entry, chain


def secure_aggregation_fits(cfg: Config, entry: Any, chain: Chain) -> None:
    """What secagg.enabled cannot go with: anything that needs to see one client's update.

    Raises:
        ConfigError: naming the key, with the reason, in one line.
    """
    if not spec_of(cfg).secagg:
        raise ConfigError(f"secagg.enabled: train.method={entry.name}'s aggregate is not a weighted sum of its uploads "
                          "(exact-lora stacks every client's factors); use lora")
    if chain.fold is None:
        raise ConfigError(f"secagg.enabled: rule {chain.rule.name!r} needs every client's update, which secure "
                          "aggregation hides; use fedavg (optionally > fedadam, fedyogi, ...)")
    if cfg.compression.up:
        raise ConfigError("compression.up: masked uploads are uniform random integers, which no codec shrinks; "
                          "leave it empty with secagg.enabled (compression.down still applies)")
    if cfg.server.max_update_norm > 0:
        raise ConfigError("server.max-update-norm: the server cannot measure one client's update under secagg; "
                          "set it to 0 and bound updates on the clients with dp.clipping-norm")
    if cfg.ledger.enabled and SCORERS.get(cfg.ledger.scorer).meta.get("needs_utility"):
        raise ConfigError(f"ledger.scorer: {cfg.ledger.scorer} scores each client's update, which secure aggregation "
                          "hides; with secagg.enabled the ledger records participation (equal shares) whatever the "
                          "scorer: leave it cosine")


def build(cfg: Config, method: ServerHalf | None = None) -> FedLLMStrategy:
    """The strategy for a run: the method's server half (built here from train.method, loading
    what it needs, unless given) and the chain."""
    entry, chain = resolve(cfg)
    return FedLLMStrategy(cfg, method if method is not None else entry.impl.server(server_side(cfg)), chain)


def server_side(cfg: Config) -> Config:
    """The config the method's server half is built with: its model on server.device, whole (the
    clients' model.device and model.device-map are theirs; the run config they get is unchanged)."""
    if cfg.model.device == cfg.server.device and not cfg.model.device_map:
        return cfg
    return cfg.replace(model__device=cfg.server.device, model__device_map="")
