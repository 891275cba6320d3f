"""Exact LoRA aggregation by stacking factors (FLoRA), with clients of different ranks.

FedAvg of A and B separately gives mean(B) @ mean(A), which is not mean(B @ A). Here every
round each client trains a fresh adapter (rank r_i, its own) on top of the frozen global
delta; the `stack` rule stacks the factors, which is exact:

    sum_i w_i s_i B_i A_i = [B_1 ... B_n] @ [w_1 s_1 A_1; ...; w_n s_n A_n]     (s_i = alpha / r_i)

and the server half folds them into the frozen delta, kept as factors (B_g, A_g) per module.
The stacked rank grows by sum r_i a round, so the server compacts (B_g, A_g) to their
numerical rank (QR of both, SVD of the small core): exact up to float rounding, and never
above min(in, out). strategy.exact-max-rank caps the rank further, trading exactness for bytes.

Trade-off: downloads carry the frozen delta's factors, R (in + out) floats per module,
which grows with the rounds until R reaches min(in, out), where FedAvg sends r (in + out);
uploads are the clients' own adapters, as with FedAvg. Wang et al., "FLoRA", NeurIPS 2024,
https://arxiv.org/abs/2409.05976.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import torch
from flwr.app import ArrayRecord, Message

from fedllm.config import Config
from fedllm.errors import PayloadError
from fedllm.methods.base import UtilityOf
from fedllm.methods.adapters import engine as lora
from fedllm.methods.adapters.server import state_digest
from fedllm.model import save_merged
from fedllm.protocol import ARRAYS, FROZEN, LEDGER, METRICS, State, Update, read_arrays, reply_metrics

A, B = ".lora_A.weight", ".lora_B.weight"


def stack_factors(updates: list[tuple[State, float, float]], frozen: State) -> State:
    """Fold clients' (adapter state, weight, scaling) into the frozen factors, exactly.

    Weights are normalised to sum to 1. Modules are the NAME of NAME.lora_A.weight keys.
    """
    total = sum(w for _, w, _ in updates)
    out: State = {}
    for key in sorted(k for k in updates[0][0] if k.endswith(A)):
        name = key[: -len(A)]
        a_parts = [frozen[key]] if key in frozen else []
        b_parts = [frozen[name + B]] if key in frozen else []
        for state, w, scaling in updates:
            a_parts.append(state[key].float() * (w / total * scaling))  # (r_i, in)
            b_parts.append(state[name + B].float())  # (out, r_i)
        out[key], out[name + B] = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
    return out


def compact(a: torch.Tensor, b: torch.Tensor, max_rank: int = 0, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A', B') with B' @ A' = B @ A at its numerical rank (singular values above
    rtol * the largest), optionally capped at max_rank (then the best rank-max_rank fit)."""
    qb, rb = torch.linalg.qr(b.double())  # (out, k), (k, R)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, j), (j, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # core (k, j)
    keep = int((s > rtol * s.max()).sum()) if s.numel() and s.max() > 0 else 0
    if max_rank:
        keep = min(keep, max_rank)
    new_b = (qb @ u[:, :keep]) * s[:keep]  # (out, keep)
    new_a = vh[:keep] @ qa.T  # (keep, in)
    return new_a.float(), new_b.float()


def stack(updates: list[Update], cfg: Config) -> State:
    """The `stack` rule: the round's adapters stacked, example-weighted, scaling alpha / r_i
    folded into A (exact-lora's aggregate)."""
    return stack_factors([(u.delta, u.num_examples, cfg.lora.alpha / u.metrics["lora-rank"]) for u in updates], {})


def pad_ranks(factors: State) -> tuple[State, int]:
    """Zero-pad every module's factors to the largest rank (B @ A is unchanged), as one PEFT
    rank r needs; returns the padded factors and r."""
    rank = max(1, max(t.shape[0] for k, t in factors.items() if k.endswith(A)))
    out = {}
    for k, t in factors.items():
        pad = rank - (t.shape[0] if k.endswith(A) else t.shape[1])
        out[k] = torch.nn.functional.pad(t, (0, 0, 0, pad) if k.endswith(A) else (0, pad))
    return out, rank


class ExactLoraServer:
    """The global state is the frozen delta's factors; the adapter shapes come from lora.*."""

    reply_records = frozenset({ARRAYS, METRICS, LEDGER})

    def __init__(self, cfg: Config, shapes: State | None = None) -> None:
        """`shapes`: an adapter state that gives the modules and their shapes instead of the
        model's (no model is loaded)."""
        self.cfg = cfg
        if shapes is not None:
            self.net = self.tokenizer = None
            self.shapes = dict(shapes)
        elif cfg.server.evaluate or cfg.server.merge:
            self.net, self.tokenizer = lora.lora_model(cfg.model, cfg.lora, cfg.train.seed)
            self.shapes = lora.adapter_state(self.net)
        else:
            self.net = self.tokenizer = None
            self.shapes = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)
        self.frozen: State = {}

    def encode_down(self, node: int) -> dict[str, Any]:
        return {FROZEN: ArrayRecord(self.frozen)}

    def largest_reply(self) -> int:
        """The largest factors `decode` accepts: rank min(in, out), plus 64 KiB."""
        total = 65536
        for key in (k for k in self.shapes if k.endswith(A)):
            fan_in, fan_out = self.shapes[key].shape[1], self.shapes[key.replace(A, B)].shape[0]
            total += 4 * min(fan_in, fan_out) * (fan_in + fan_out)
        return total

    def decode(self, msg: Message) -> Update:
        """The client's adapter itself (not a delta): any rank r >= 1, the same for A and B."""
        n, metrics = reply_metrics(msg)
        state, nbytes = read_arrays(msg, self.shapes)
        ranks = set()
        for key in (k for k in state if k.endswith(A)):
            a, b = state[key], state[key.replace(A, B)]
            ref_a, ref_b = self.shapes[key], self.shapes[key.replace(A, B)]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != ref_a.shape[1] or b.shape[0] != ref_b.shape[0] \
                    or a.shape[0] != b.shape[1] or not 1 <= a.shape[0] <= min(a.shape[1], b.shape[0]):
                raise PayloadError(f"{key}: factor shapes {list(a.shape)} and {list(b.shape)} do not fit")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise PayloadError(f"{key}: non-finite values")
            ranks.add(a.shape[0])
        if len(ranks) != 1:
            raise PayloadError(f"adapter ranks differ between modules: {sorted(ranks)}")
        metrics["lora-rank"] = float(ranks.pop())
        return Update(msg.metadata.src_node_id, state, n, metrics, nbytes)

    def apply(self, aggregate: State, updates: list[Update], server_round: int) -> dict[str, float]:
        """Fold the stacked factors into the frozen delta and compact each module."""
        out: State = {}
        for key in sorted(k for k in aggregate if k.endswith(A)):
            b_key = key.replace(A, B)
            a = torch.cat([self.frozen[key], aggregate[key]]) if key in self.frozen else aggregate[key]
            b = torch.cat([self.frozen[b_key], aggregate[b_key]], dim=1) if key in self.frozen else aggregate[b_key]
            out[key], out[b_key] = compact(a, b, self.cfg.strategy.exact_max_rank)
        self.frozen = out
        return {"frozen-rank": max(t.shape[0] for k, t in out.items() if k.endswith(A))}

    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        """A zero adapter (B = 0) over the frozen delta."""
        lora.reset_adapter(self.net, self.cfg.train.seed)
        with lora.frozen_delta(self.net, self.frozen):
            yield self.net

    def utility(self, updates: list[Update], examples: list[dict[str, str]]) -> UtilityOf | None:
        return None  # the loo and shapley scorers evaluate averaged adapters, which this method does not build

    def digest(self) -> bytes:
        return state_digest(self.frozen)

    def save(self, run_dir: Path) -> None:
        """adapter/ (the frozen delta padded to one rank, scaling 1: lora_alpha = r) loads with
        PeftModel.from_pretrained; merged/ with AutoModelForCausalLM."""
        state, rank = pad_ranks(self.frozen)
        lora.save_adapter(state, self.cfg.model, dataclasses.replace(self.cfg.lora, rank=rank, alpha=float(rank)),
                          run_dir / "adapter")
        if self.cfg.server.merge:
            with self.model() as net:
                save_merged(net, self.tokenizer, run_dir / "merged")

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frozen = state["frozen"]
