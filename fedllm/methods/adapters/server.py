"""LoRA's server half: the global adapter, sent whole or as encoded deltas, and updated by the
rule chain's aggregate of the clients' deltas (local - global)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message

from fedllm.compression import Feedback, compress, decode, parse
from fedllm.config import Config
from fedllm.ledger.scoring import needs_utility
from fedllm.evaluation.held_out import eval_loss
from fedllm.methods.base import Ask, UtilityOf
from fedllm.methods.downlink import Downlink
from fedllm.methods.adapters import engine as lora
from fedllm.methods.adapters import modules, personal, scaffold
from fedllm.model import load_tokenizer, save_merged
from fedllm.errors import PayloadError
from fedllm.protocol import (ARRAYS, DOWN, LEDGER, METRICS, PEFT, SCORES, UPDATE, State, Update, check_like,
                             read_arrays, reply_metrics, weighted_mean)


def needs_model(cfg: Config) -> bool:
    """Whether the server loads the base model: to evaluate, merge, or score or flag on validation
    (a scorer with needs_utility, or the harmful flag's validation gains)."""
    return cfg.server.evaluate or cfg.server.merge or (cfg.ledger.enabled and needs_utility(cfg.ledger))


class LoraServer:
    """The global adapter. The server holds the base model only to evaluate, merge or score.

    With compression.up set, clients send encoded deltas; with compression.down set, the
    server sends each node the encoded round deltas it has not applied yet (or the full state
    when that is smaller or its version is unknown) and applies the same decoded delta to its
    own state, so every party holds identical weights.
    """

    reply_records = frozenset({ARRAYS, UPDATE, METRICS, LEDGER})

    def __init__(self, cfg: Config, state: State | None = None) -> None:
        """`state`: start from this adapter state instead of a fresh one (no model is loaded:
        nothing to evaluate or merge with).

        The server's model is never quantized (model.quantize is the clients'): it evaluates and
        merges the adapter on the model.dtype base. With lora.target-modules=auto the adapter is
        made once `prepare` has chosen its modules (or a checkpoint names them)."""
        self.cfg = cfg.replace(model__quantize="none")
        self.modules = ""  # lora.target-modules=auto: the chosen modules, comma separated
        self.net = self.tokenizer = None
        self.held: State = {}  # lora.personal=head: the private layers' initial tensors, never sent (personal.split)
        if state is not None:
            self.state, self.held = personal.split(dict(state), cfg)
        elif cfg.lora.auto_modules():
            self.state = {}
            self.tokenizer = load_tokenizer(cfg.model) if needs_model(cfg) else None
        else:
            self._init()
        self.before: State = self.state  # the state before the last apply (for the utility)
        self.up = parse(cfg.compression.up) if cfg.compression.up else None
        self.down = parse(cfg.compression.down) if cfg.compression.down else None
        self.downlink = Downlink(False, cfg.server.node_state)
        self.feedback = Feedback({}) if cfg.compression.error_feedback else None
        self.variate = scaffold.ServerVariate(cfg) if scaffold.on(cfg) else None  # SCAFFOLD's c
        if self.variate is not None:
            self.reply_records = self.reply_records | {scaffold.VARIATE}

    def _init(self) -> None:
        """The initial adapter of self.cfg's shape (and the model, when the server needs one)."""
        cfg = self.cfg
        if needs_model(cfg):
            self.net, self.tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
            lora.reset_adapter(self.net, cfg.train.seed)  # the cached model may hold an earlier run's adapter
            self.state = lora.adapter_state(self.net)
        else:
            self.state = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)
        if cfg.server.init_from and not cfg.server.resume:  # a resumed run's checkpoint holds the adapter
            self.state = lora.read_adapter(Path(cfg.server.init_from), self.state, cfg.lora)
        self.state, self.held = personal.split(self.state, cfg)

    # --- before round 1 ---------------------------------------------------------------------------
    def prepare(self, ask: Ask) -> dict[str, Any]:
        """lora.target-modules=auto: ask the sampled clients for their module scores, keep the best
        modules within lora.module-budget (each client's scores normalised to sum 1, then weighted
        by its examples: no client outweighs its data), and make the adapter. Returns what to log.

        Raises:
            PayloadError: no client sent valid scores.
        """
        if not self.cfg.lora.auto_modules() or self.modules:
            return {}
        shapes = modules.candidate_shapes(self.cfg.model)
        total: dict[str, float] = dict.fromkeys(shapes, 0.0)
        weights, dropped, used = 0.0, [], 0
        for reply in ask({}):
            try:
                scores, n = read_scores(reply, shapes)
            except PayloadError as err:
                dropped.append((reply.metadata.src_node_id, str(err)))
                continue
            norm = sum(scores.values()) or 1.0
            for name, value in scores.items():
                total[name] += n * value / norm
            weights += n
            used += 1
        if weights == 0:
            why = "; ".join(f"node {node}: {reason}" for node, reason in dropped[:3]) or "no replies"
            raise PayloadError(f"lora.target-modules=auto: no client sent valid module scores ({why})")
        chosen = modules.select_modules(total, shapes, self.cfg.lora.module_budget)
        self.choose(",".join(chosen))
        share = sum(sum(shapes[n]) for n in chosen) / sum(sum(s) for s in shapes.values())
        return {"modules": len(chosen), "of": len(shapes), "parameter-share": round(share, 4),
                "clients": used, "dropped": dropped}

    def choose(self, modules: str) -> None:
        self.modules = modules
        self.cfg = self.cfg.replace(lora__target_modules=modules)
        self._init()
        self.before = self.state

    # --- the wire -----------------------------------------------------------------------------
    def encode_down(self, node: int) -> dict[str, Any]:
        """The global arrays, or (compression.down) the encoded deltas `node` lacks when that
        is smaller than the arrays; with lora.target-modules=auto also the chosen modules."""
        extra = {PEFT: ConfigRecord({"target-modules": self.modules})} if self.modules else {}
        if self.variate is not None:
            extra.update(self.variate.down(self.state))
        return {**self._encode(node), **extra}

    def _encode(self, node: int) -> dict[str, Any]:
        arrays = ArrayRecord(self.state)
        if self.down is None:
            return {ARRAYS: arrays}
        missing, version = self.downlink.missing(node), self.downlink.version
        known = self.downlink.version_of(node)
        self.downlink.sent(node)
        if missing is None or sum(map(len, missing)) >= arrays.count_bytes():
            return {ARRAYS: arrays, DOWN: ConfigRecord({"version": version})}
        return {DOWN: ConfigRecord({"version": version, "base": known, "deltas": missing})}

    def decode(self, msg: Message) -> Update:
        """The reply's local adapter as arrays (no upload codec; the update is local - global; with
        server.mode=async the client sends local - the version it trained on), or with compression.up
        the encoded delta, checked against the global names and shapes. The node holds the version
        it was sent (the downlink's next message to it may be a delta)."""
        n, metrics = reply_metrics(msg)
        if self.variate is not None:
            self.variate.read(msg, self.state)
        self.downlink.accepted(msg.metadata.src_node_id)
        if self.up is not None:
            payload = msg.content.config_records.get(UPDATE, {}).get("payload")
            if not isinstance(payload, bytes):
                raise PayloadError(f"reply lacks the {UPDATE!r} payload bytes")
            delta = decode(self.up, payload, sorted(self.state))
            check_like(delta, self.state, check_dtype=False)
            return Update(msg.metadata.src_node_id, delta, n, metrics, len(payload))
        local, nbytes = read_arrays(msg, self.state)
        check_like(local, self.state)
        if self.cfg.server.mode == "async":  # the client's delta against the version it trained on
            return Update(msg.metadata.src_node_id, local, n, metrics, nbytes)
        return Update(msg.metadata.src_node_id, {k: t - self.state[k] for k, t in local.items()}, n, metrics, nbytes)

    def largest_reply(self) -> int:
        """Three times the dense float32 adapter (a codec's indices and headers stay well
        inside it) plus 64 KiB."""
        return (6 if self.variate is not None else 3) * 4 * sum(t.numel() for t in self.state.values()) + 65536

    def apply(self, aggregate: State, updates: list[Update], server_round: int) -> dict[str, float]:
        """global += aggregate; with compression.down the aggregate is encoded (through the
        server's error feedback), kept in the history, and the decoded delta applied."""
        for u in updates:
            self.downlink.accepted(u.node_id)
        if self.down is not None:
            payload, self.feedback = compress(self.down, aggregate, self.feedback, seed=server_round)
            self.downlink.append(payload)
            aggregate = decode(self.down, payload, sorted(aggregate))
        self.before = self.state
        self.state = {k: t + aggregate[k].to(t.dtype) for k, t in self.state.items()}
        return self.variate.apply([u.node_id for u in updates]) if self.variate is not None else {}

    # --- the model at the global state -----------------------------------------------------------
    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        lora.set_adapter_state(self.net, {**self.held, **self.state})
        yield self.net

    def utility(self, updates: list[Update], examples: list[dict[str, str]]) -> UtilityOf | None:
        """Minus the validation loss of the state before the last apply moved by the
        example-weighted mean of the chosen updates' deltas."""
        before = self.before

        def utility_of(indices: list[int]) -> float:
            ups = [updates[i] for i in indices]
            delta = weighted_mean([u.delta for u in ups], [u.num_examples for u in ups]) if ups else {}
            lora.set_adapter_state(self.net, {**self.held, **{k: t + delta[k].to(t.dtype) if delta else t
                                                              for k, t in before.items()}})
            return -eval_loss(self.net, self.tokenizer, examples, self.cfg.data, self.cfg.server.eval_batch_size)

        return utility_of

    def digest(self) -> bytes:
        return state_digest(self.state)

    def save(self, run_dir: Path) -> None:
        """adapter/ loads with PeftModel.from_pretrained; merged/ with AutoModelForCausalLM."""
        lora.save_adapter({**self.held, **self.state}, self.cfg.model, self.cfg.lora, run_dir / "adapter")
        if self.cfg.server.merge:
            with self.model() as net:
                save_merged(net, self.tokenizer, run_dir / "merged")

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global": self.state, "downlink": self.downlink.state_dict(), "modules": self.modules,
                "feedback": self.feedback.residual if self.feedback is not None else None,
                **({"scaffold": self.variate.state_dict()} if self.variate is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("modules"):
            self.choose(str(state["modules"]))
        self.state = self.before = state["global"]
        self.downlink.load_state_dict(state["downlink"])
        if state["feedback"] is not None:
            self.feedback = Feedback(state["feedback"])
        if self.variate is not None and "scaffold" in state:
            self.variate.load_state_dict(state["scaffold"])


def read_scores(reply: Message, shapes: dict[str, Any]) -> tuple[dict[str, float], float]:
    """A query reply's module scores (known modules, finite, >= 0) and example count.

    Raises:
        PayloadError: naming what is wrong.
    """
    n, _ = reply_metrics(reply)
    content = reply.content
    if SCORES not in content.metric_records:
        raise PayloadError(f"reply lacks the {SCORES!r} record")
    scores = {}
    for name, value in content.metric_records[SCORES].items():
        if name not in shapes:
            raise PayloadError(f"score for unknown module {name[:80]!r}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise PayloadError(f"score of {name} is not a finite number >= 0")
        scores[name] = float(value)
    return scores, float(n)


def state_digest(state: State) -> bytes:
    """keccak256 over the sorted names and bytes of a state."""
    from eth_utils import keccak  # the [ledger] extra: only runs with the ledger on ask

    return keccak(b"".join(k.encode() + state[k].numpy().tobytes() for k in sorted(state)))
