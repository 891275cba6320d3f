"""Streaming DiLoCo's client half: the node keeps its own local parameters, its inner AdamW
state and the last global value of every fragment (the snapshot an outer gradient is taken
against) in its context.state from round to round.

A round: take in what the message says changed (new global fragments, held back until due:
tau rounds after the round that synced them, or the round that syncs them next if that comes
first, then merged as alpha local + (1 - alpha) global), run H / P inner AdamW steps, and upload
the synced fragment's local - snapshot. The run's last round syncs every fragment (engine.ALL):
everything held is merged before its steps (with tau = 1 the fragment the round before synced
comes one round early), so every snapshot is the newest global and the whole model's
local - snapshot counts no step the server has already applied. A node
sent the whole global state adopts it (a new node, or one that missed a version) unless it
already holds that version and trained the previous round (a server that resumed while the node
kept its state: it goes on where it was, bit for bit).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedllm.compression import decode, parse
from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.base import Transform
from fedllm.methods.diloco import engine
from fedllm.methods.adapters.client import send_compressed
from fedllm.methods.adapters.optimizer import adamw_state, make_adamw
from fedllm.methods.schedule import clock
from fedllm.protocol import ARRAYS, CONFIG, DILOCO, UPDATE, State, check_like

log = logging.getLogger(__name__)

LOCAL, SNAPSHOT, ADAM, PENDING, META = (f"diloco-{x}" for x in (
    "local", "snapshot", "adam", "pending", "meta"))  # context.state names


class DiLoCoClient:
    def __init__(self, cfg: Config, context: Context, partition_id: int) -> None:
        self.cfg, self.dc, self.context = cfg, cfg.diloco, context
        self.net, self.tokenizer = engine.trainable_model(cfg)
        self.reference = engine.initial_state(cfg)  # names, shapes and dtypes of the trained tensors
        self.parts = engine.fragments(self.reference, self.dc.fragments, self.dc.pattern)
        self.round = self.fragment = 0
        self.mu, self.seed = 0.0, 0
        self.local: State = {}
        self.snapshot: State = {}
        self.adam: State = {}
        self.pending: dict[int, tuple[int, State]] = {}  # fragment -> (due round, its global)
        self.meta: dict[str, int] = {}

    # --- the node's state -----------------------------------------------------------------------
    def _load(self) -> bool:
        """The node's held state from context.state; False when it holds none (or holds a state
        that does not read back: it is dropped, and the server's whole state brings the node back)."""
        st = self.context.state
        if META not in st.config_records or LOCAL not in st.array_records:
            return False
        try:
            return self._read(st)
        except (KeyError, ValueError, TypeError) as err:
            log.warning("diloco: dropping this node's unreadable state (%s)", err)
            for name in (LOCAL, SNAPSHOT, ADAM, PENDING, META):
                if name in st:
                    del st[name]
            return False

    def _read(self, st: RecordDict) -> bool:
        meta = st.config_records[META]
        self.meta = {"version": int(meta["version"]), "trained": int(meta["trained"])}
        self.local, self.snapshot = _pop(st, LOCAL), _pop(st, SNAPSHOT)  # one copy in memory, not two
        self.adam, held = _pop(st, ADAM), _pop(st, PENDING)
        if set(self.local) != set(self.reference) or set(self.snapshot) != set(self.reference):
            raise ValueError("its tensors are not the model's")
        self.pending = {q: (due, {k: held[k] for k in self.parts[q]})
                        for q, due in zip(meta.get("pending", []), meta.get("due", []))}
        return True

    def _fresh(self, state: State, version: int) -> None:
        self.local = {k: t.clone() for k, t in state.items()}
        self.snapshot = {k: t.clone() for k, t in state.items()}
        self.adam, self.pending = {}, {}
        self.meta = {"version": version, "trained": 0}

    def _store(self) -> None:
        """Move the node's state into context.state (the tensors are let go one by one: the
        last step of a round)."""
        st = self.context.state
        st[META] = ConfigRecord({**self.meta, "pending": sorted(self.pending),
                                 "due": [self.pending[q][0] for q in sorted(self.pending)]})
        st[PENDING] = ArrayRecord({k: t for _, values in self.pending.values() for k, t in values.items()})
        st[LOCAL], self.local = ArrayRecord(self.local), {}
        st[SNAPSHOT], self.snapshot = ArrayRecord(self.snapshot), {}
        if self.adam:
            st[ADAM], self.adam = ArrayRecord(self.adam), {}
        self.pending = {}

    # --- a round --------------------------------------------------------------------------------
    def sync(self, request: RecordDict, seed: int) -> dict[str, float]:
        if DILOCO not in request.config_records:
            raise PayloadError(f"diloco: the message lacks the {DILOCO!r} record")
        info = request.config_records[DILOCO]
        self.seed, self.round, self.fragment = seed, int(info["round"]), int(info["fragment"])
        self.mu = float(request.config_records[CONFIG].get("proximal-mu", 0.0))
        version, kind = int(info["version"]), str(info["kind"])
        rounds, codes = [int(s) for s in info["rounds"]], self._codes(info)
        held = self._load()
        resynced = 0
        if kind == "full":
            full = self._arrays(request, self.reference)
            if held and self.meta["trained"] == self.round - 1 and self.meta["version"] <= version:
                # it kept its state through the server's restart: take only what changed since
                rounds, codes = rounds[self.meta["version"]:], codes[self.meta["version"]:]
                values = {k: t.clone() for k, t in self._take(full, self._keys(codes)).items()}
                self._arrive(rounds, codes, values=values)
            else:
                self._fresh(full, version)
                resynced = 1
        else:
            base = int(info["base"])
            if not held:
                if base != 0:
                    raise PayloadError(f"diloco: this node holds no state, the message starts at version {base}")
                self._fresh(engine.initial_state(self.cfg), 0)
            elif self.meta["version"] != base:
                raise PayloadError(f"diloco: this node holds version {self.meta['version']}, not {base}")
            if kind == "values":
                self._arrive(rounds, codes, values=self._arrays(request, self._take(self.reference, self._keys(codes))))
            else:
                self._arrive(rounds, codes, steps=list(info["steps"]))
        self.meta["version"] = version
        merged = self._merge_due()
        return {"diloco-fragment": self.fragment, "diloco-resynced": resynced, "diloco-merged": merged}

    def _take(self, state: State, keys: list[str]) -> State:
        return engine.take(state, keys, self.dc.fragments)

    def _arrays(self, request: RecordDict, like: State) -> State:
        """The message's arrays, with the names, shapes and dtypes of `like`."""
        if ARRAYS not in request.array_records:
            raise PayloadError(f"diloco: the message lacks the {ARRAYS!r} record")
        try:
            got = request.array_records[ARRAYS].to_torch_state_dict()
        except Exception as err:
            raise PayloadError(f"diloco: cannot decode the global arrays: {err}") from err
        check_like(got, like, check_dtype=False)
        return {k: t.to(like[k].dtype) for k, t in got.items()}

    def _codes(self, info: ConfigRecord) -> list[int]:
        """What each round of the message synced (a fragment, or engine.ALL), checked with what
        this round syncs."""
        codes, p = [int(c) for c in info["synced"]], self.dc.fragments
        known = all(c == engine.ALL or 0 <= c < p for c in [*codes, self.fragment])
        if len(codes) != len(info["rounds"]) or not known:
            raise PayloadError(f"diloco: the synced fragments {codes} (this round: {self.fragment}) do not fit "
                               f"{len(info['rounds'])} rounds of {p} fragments")
        return codes

    def _keys(self, codes: list[int]) -> list[str]:
        """The tensors of the fragments these rounds synced."""
        synced = {q for c in codes for q in engine.members(c, self.dc.fragments)}
        return [k for q in sorted(synced) for k in self.parts[q]]

    def _arrive(self, rounds: list[int], codes: list[int], values: State | None = None,
                steps: list[bytes] | None = None) -> None:
        """Hold the fragments `rounds` synced (`codes`: a fragment or engine.ALL each) until they
        are due: their global `values`, or the global reached by applying the encoded outer
        `steps` (compression.down) in order."""
        synced = [engine.members(c, self.dc.fragments) for c in codes]
        if values is not None:
            arrived = {q: {k: values[k] for k in self.parts[q]} for qs in synced for q in qs}
        else:
            if len(steps) != len(rounds):
                raise PayloadError(f"diloco: {len(steps)} encoded steps for {len(rounds)} rounds")
            codec, arrived = parse(self.cfg.compression.down), {}
            for code, qs, payload in zip(codes, synced, steps):
                change = decode(codec, payload, sorted(engine.keys_of(self.parts, code)))
                for q in qs:
                    start = arrived.get(q) or (self.pending[q][1] if q in self.pending else
                                               self._take(self.snapshot, self.parts[q]))
                    arrived[q] = {k: engine.advance(start[k], change[k]) for k in self.parts[q]}
        for s, qs in zip(rounds, synced):  # the latest round that synced q decides when it is due
            for q in qs:
                due = s + 1 + self.dc.tau
                self.pending[q] = (min(due, self.pending[q][0]) if q in self.pending else due, arrived[q])

    def _merge_due(self) -> int:
        """Merge every held fragment that is due this round, or that this round syncs (its
        outer gradient must be taken against its newest global); returns how many."""
        now = engine.members(self.fragment, self.dc.fragments)
        due = [q for q, (when, _) in self.pending.items() if when <= self.round or q in now]
        for q in due:
            _, arrived = self.pending.pop(q)
            local = self._take(self.local, list(arrived))
            engine.put(self.local, {k: engine.merge(local[k], g, self.dc.alpha) for k, g in arrived.items()},
                       self.dc.fragments)
            engine.put(self.snapshot, {k: g.clone() for k, g in arrived.items()}, self.dc.fragments)
        return len(due)

    def train(self, rows: list[dict[str, list[int]]], seed: int) -> dict[str, float]:
        from fedllm.methods.adapters import engine as lora

        engine.set_state(self.net, self.dc.params, self.local)
        opt = make_adamw(self.net, self.cfg.train, self.adam)
        self.adam = {}  # the optimizer holds the moments now
        steps = dataclasses.replace(self.cfg.train, local_steps=self.dc.round_steps())
        stats = lora.train(self.net, rows, steps, self.tokenizer.pad_token_id, seed=seed, proximal_mu=self.mu,
                           optimizer=opt, clock=clock(self.cfg, self.round))
        self.local, self.adam = engine.get_state(self.net, self.dc.params), adamw_state(opt)
        self.meta["trained"] = self.round
        return stats

    def upload(self, transform: Transform | None) -> dict[str, Any]:
        """This round's fragment (every fragment in the last round) of local - snapshot
        (float32); with compression.up encoded through this node's error-feedback residual."""
        names = engine.keys_of(self.parts, self.fragment)
        local, snapshot = self._take(self.local, names), self._take(self.snapshot, names)
        delta = {k: local[k].float() - snapshot[k].float() for k in names}
        if transform is not None:
            delta = transform(delta)
        self._store()
        if not self.cfg.compression.up:
            return {ARRAYS: ArrayRecord(delta)}
        payload = send_compressed(delta, self.context, self.cfg, self.seed)
        return {UPDATE: ConfigRecord({"payload": payload})}


def _pop(state: RecordDict, name: str) -> State:
    """An array record of context.state as tensors, removed from the state (empty if absent)."""
    if name not in state.array_records:
        return {}
    tensors = state.array_records[name].to_torch_state_dict()
    del state[name]
    return tensors
