"""Streaming DiLoCo's server half: the global parameters and the outer optimizer's momentum.

Round t syncs fragment p = t mod P: each client uploads its fragment's local - global (the
negative outer gradient; float32 arrays, or encoded with compression.up), the rule chain
aggregates them (fedavg: the example-weighted mean; a robust rule works per coordinate as
well) and the server takes the outer Nesterov step on that fragment alone. The run's last round
(server.num-rounds, counted across resumes; diloco.final-sync) syncs every fragment: the clients
upload the whole model's local - global and the server takes each fragment's outer step with
that fragment's own momentum, so no fragment ends without its clients' last steps. Every node is sent,
in the next round's message, what changed since the version it holds: the new global values of
the fragments synced since (uncompressed), or the encoded outer steps (compression.down, through
the server's error feedback, the server applying the decoded step itself so every party holds
the same bytes), or the whole global state when its version is unknown or that is smaller.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedllm.compression import Feedback, compress, decode, parse
from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.base import UtilityOf
from fedllm.methods.diloco import engine
from fedllm.methods.downlink import Downlink
from fedllm.model import save_merged
from fedllm.protocol import (ARRAYS, DILOCO, LEDGER, METRICS, UPDATE, State, Update, check_like, read_arrays,
                             reply_metrics)

log = logging.getLogger(__name__)


class DiLoCoServer:
    """The global parameters, the outer momentum (per tensor, moved only when its fragment
    syncs), and the history of the round changes for the downlink."""

    reply_records = frozenset({ARRAYS, UPDATE, METRICS, LEDGER})

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.dc = cfg, cfg.diloco
        if self.dc.params == "full" and cfg.train.lr > 1e-4:
            log.warning("diloco.params=full with train.lr=%g: a LoRA learning rate; full-parameter AdamW steps "
                        "usually want 1e-5 to 5e-5", cfg.train.lr)
        self.net, self.tokenizer = engine.trainable_model(cfg)
        self.state: State = {k: t.clone() for k, t in engine.initial_state(cfg).items()}
        self.parts = engine.fragments(self.state, self.dc.fragments, self.dc.pattern)
        self.momentum: State = {}
        self.up = parse(cfg.compression.up) if cfg.compression.up else None
        self.down = parse(cfg.compression.down) if cfg.compression.down else None
        self.feedback = Feedback({}) if cfg.compression.error_feedback else None  # the downlink's error feedback
        self.downlink = Downlink(True, cfg.server.node_state)  # every party starts from the base (or the seeded adapter)
        self.rounds: list[int] = []  # the round each downlink version synced
        self.synced: list[int] = []  # what it synced: its fragment, or engine.ALL
        self.last = cfg.server.num_rounds if self.dc.final_sync else None  # the round that syncs ALL
        self.next_round = 1
        self._sent: dict[tuple[int, int | None], ArrayRecord] = {}  # this version's downlink records

    # --- the wire -----------------------------------------------------------------------------
    def encode_down(self, node: int) -> dict[str, Any]:
        """The round and its fragment, and what `node` lacks: the global values of the fragments
        synced since its version (or their encoded outer steps), or the whole state."""
        r, version = self.next_round, self.downlink.version
        info: dict[str, Any] = {"round": r, "fragment": self.fragment(), "version": version}
        base, missing = self.downlink.version_of(node), self.downlink.missing(node)
        self.downlink.sent(node)
        full = sum(t.numel() * t.element_size() for t in self.state.values())
        if base is None or missing is None or (self.down is not None and sum(map(len, missing)) >= full):
            return {DILOCO: ConfigRecord({**info, "kind": "full", "rounds": self.rounds, "synced": self.synced}),
                    ARRAYS: self._arrays(version, None)}
        info.update(base=base, rounds=self.rounds[base:], synced=self.synced[base:])
        if self.down is not None:
            return {DILOCO: ConfigRecord({**info, "kind": "steps", "steps": missing})}
        return {DILOCO: ConfigRecord({**info, "kind": "values"}), ARRAYS: self._arrays(version, base)}

    def _arrays(self, version: int, base: int | None) -> ArrayRecord:
        """The global values a node at `base` (None: the whole state) lacks, as one record shared by
        the round's messages (in one process, the nodes at the same version hold one copy)."""
        key = (version, base)
        if key not in self._sent:
            if base is None:
                values = self.state
            else:
                synced = {q for code in self.synced[base:] for q in engine.members(code, self.dc.fragments)}
                values = self.take([k for q in sorted(synced) for k in self.parts[q]])
            self._sent = {**{k: v for k, v in self._sent.items() if k[0] == version}, key: ArrayRecord(values)}
        return self._sent[key]

    def take(self, keys: list[str]) -> State:
        return engine.take(self.state, keys, self.dc.fragments)

    def fragment(self) -> int:
        """What this round syncs: its fragment, or engine.ALL (the run's last round)."""
        return engine.synced_by(self.next_round, self.dc.fragments, self.last)

    def keys(self) -> list[str]:
        """The tensors this round syncs."""
        return engine.keys_of(self.parts, self.fragment())

    def decode(self, msg: Message) -> Update:
        """The reply's local - global of this round's fragment (every fragment in the last
        round): float32 arrays, or with compression.up the encoded payload; names, shapes and
        finiteness checked."""
        n, metrics = reply_metrics(msg)
        p = self.fragment()
        if metrics.get("diloco-fragment", p) != p:
            raise PayloadError(f"update is for fragment {metrics.get('diloco-fragment')!r}, round "
                               f"{self.next_round} syncs fragment {p}")
        ref = self.take(self.keys())
        if self.up is not None:
            payload = msg.content.config_records.get(UPDATE, {}).get("payload")
            if not isinstance(payload, bytes):
                raise PayloadError(f"reply lacks the {UPDATE!r} payload bytes")
            delta, nbytes = decode(self.up, payload, sorted(ref)), len(payload)
        else:
            delta, nbytes = read_arrays(msg, ref)
        check_like(delta, ref, check_dtype=False)
        return Update(msg.metadata.src_node_id, {k: t.float() for k, t in delta.items()}, n, metrics, nbytes)

    def largest_reply(self) -> int:
        """Three times the largest fragment in float32, plus 64 KiB; in the round that syncs every
        fragment, three times the model."""
        parts = [self.keys()] if self.fragment() == engine.ALL else self.parts
        return 3 * 4 * max(sum(t.numel() for t in self.take(part).values()) for part in parts) + 65536

    def apply(self, aggregate: State, updates: list[Update], server_round: int) -> dict[str, float]:
        """The outer step on this round's fragment (on each fragment, the last round): g =
        -aggregate (the mean outer gradient), then Nesterov SGD with the fragment's momentum;
        with compression.down the change is encoded (through the server's error feedback) and
        the decoded change applied, as every client will apply it."""
        for u in updates:
            self.downlink.accepted(u.node_id)
        p = self.fragment()
        change: State = {}
        for q in engine.members(p, self.dc.fragments):  # a fragment never synced before starts its momentum
            grad = {k: -aggregate[k].float() for k in self.parts[q]}
            held = {k: self.momentum[k] for k in grad} if all(k in self.momentum for k in grad) else None
            step, momentum = engine.outer_step(grad, held, self.dc.outer_lr, self.dc.momentum, self.dc.nesterov)
            change.update(step)
            if self.dc.momentum > 0:  # no momentum: nothing to keep
                self.momentum.update(momentum)
        payload = b""
        if self.down is not None:
            payload, self.feedback = compress(self.down, change, self.feedback, seed=server_round)
            change = decode(self.down, payload, sorted(change))
        start = self.take(list(change))
        engine.put(self.state, {k: engine.advance(start[k], c) for k, c in change.items()}, self.dc.fragments)
        self.downlink.append(payload)
        self.rounds.append(server_round)
        self.synced.append(p)
        self.next_round = server_round + 1
        norm = float(torch.sqrt(sum((c.float() ** 2).sum() for c in change.values())))
        return {"diloco-fragment": p, "outer-step-norm": norm}

    # --- the model at the global state -----------------------------------------------------------
    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        engine.set_state(self.net, self.dc.params, self.state)
        yield self.net

    def utility(self, updates: list[Update], examples: list[dict[str, str]]) -> UtilityOf | None:
        return None

    def digest(self) -> bytes:
        from fedllm.methods.adapters.server import state_digest

        return state_digest(self.state)

    def save(self, run_dir: Path) -> None:
        """params=full: model/ (loads with AutoModelForCausalLM); params=lora: adapter/ (loads
        with PeftModel.from_pretrained) and, with server.merge, merged/."""
        if self.dc.params == "full":
            with self.model() as net:
                save_merged(net, self.tokenizer, run_dir / "model")
            return
        from fedllm.methods.adapters import engine as lora

        lora.save_adapter(self.state, self.cfg.model, self.cfg.lora, run_dir / "adapter")
        if self.cfg.server.merge:
            with self.model() as net:
                save_merged(net, self.tokenizer, run_dir / "merged")

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"global": self.state, "momentum": self.momentum, "downlink": self.downlink.state_dict(),
                "rounds": list(self.rounds), "synced": list(self.synced), "next-round": self.next_round,
                "feedback": self.feedback.residual if self.feedback is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: t.clone() for k, t in state["global"].items()}  # moved in place: never share
        self.momentum = dict(state["momentum"])
        self.downlink.load_state_dict(state["downlink"])
        # after a restart nobody knows what a node holds: the whole state, which a node that kept
        # its own (it holds this version and trained the last round) may ignore
        self.downlink.start_known = self.downlink.version == 0
        self.rounds, self.next_round = list(state["rounds"]), int(state["next-round"])
        # a checkpoint written before diloco.final-sync existed synced one fragment a round
        self.synced = [int(c) for c in state["synced"]] if "synced" in state else [
            engine.fragment_of(r, self.dc.fragments) for r in self.rounds]
        self._sent = {}
        self.feedback = Feedback(dict(state["feedback"])) if state["feedback"] is not None else None
