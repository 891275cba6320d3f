"""Exact LoRA aggregation by stacking factors (FLoRA), with clients of different ranks.

FedAvg of A and B separately gives mean(B) @ mean(A), which is not mean(B @ A). Here every
round each client trains a fresh adapter (rank r_i, its own) on top of the frozen global
delta; the server stacks the factors, which is exact:

    sum_i w_i s_i B_i A_i = [B_1 ... B_n] @ [w_1 s_1 A_1; ...; w_n s_n A_n]     (s_i = alpha / r_i)

and folds them into the frozen delta, kept as factors (B_g, A_g) per module. The stacked
rank grows by sum r_i a round, so the server compacts (B_g, A_g) to their numerical rank
(QR of both, SVD of the small core): exact up to float rounding, and never above
min(in, out). strategy.exact-max-rank caps the rank further, trading exactness for bytes.

Trade-off: downloads carry the frozen delta's factors, R (in + out) floats per module,
which grows with the rounds until R reaches min(in, out), where FedAvg sends r (in + out);
uploads are the clients' own adapters, as with FedAvg. Wang et al., "FLoRA", NeurIPS 2024,
https://arxiv.org/abs/2409.05976.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedllm.errors import ConfigError, PayloadError
from strategies.base import FedLLMStrategy, State, Update, read_arrays, reply_metrics
from strategies.registry import register

FROZEN = "frozen"


def stack_factors(updates: list[tuple[State, float, float]], frozen: State) -> State:
    """Fold clients' (adapter state, weight, scaling) into the frozen factors, exactly.

    Weights are normalised to sum to 1. Modules are the NAME of NAME.lora_A.weight keys.
    """
    total = sum(w for _, w, _ in updates)
    out: State = {}
    for key in sorted(k for k in updates[0][0] if k.endswith(".lora_A.weight")):
        name = key[: -len(".lora_A.weight")]
        a_parts = [frozen[key]] if key in frozen else []
        b_parts = [frozen[f"{name}.lora_B.weight"]] if key in frozen else []
        for state, w, scaling in updates:
            a_parts.append(state[key].float() * (w / total * scaling))  # (r_i, in)
            b_parts.append(state[f"{name}.lora_B.weight"].float())  # (out, r_i)
        out[key], out[f"{name}.lora_B.weight"] = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
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


@register("exact-lora")
class ExactLoRA(FedLLMStrategy):
    """Stacked-factor aggregation; the global state is the frozen delta (self.frozen)."""

    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        if self.cfg.compression.up or self.cfg.compression.down or self.cfg.dp.clipping_norm > 0:
            raise ConfigError("server.strategy=exact-lora sends factors as float32 arrays: leave compression.up/down "
                              "empty and dp.clipping-norm at 0")
        self.frozen: State = {}
        self.ranks: dict[str, int] = {}  # module -> rank of the frozen delta

    def round_config(self, server_round: int) -> dict[str, Any]:
        return {**super().round_config(server_round), "fresh-adapter": True}

    def global_records(self, node: int, arrays: ArrayRecord) -> dict[str, Any]:
        return {FROZEN: ArrayRecord(self.frozen)}

    def largest_reply(self) -> int:
        """The largest factors `parse` accepts: rank min(in, out), plus 64 KiB."""
        total = 65536
        for key in (k for k in self.global_state if k.endswith(".lora_A.weight")):
            fan_in, fan_out = self.global_state[key].shape[1], self.global_state[key.replace(".lora_A.", ".lora_B.")].shape[0]
            total += 4 * min(fan_in, fan_out) * (fan_in + fan_out)
        return total

    def parse(self, msg: Message) -> Update:
        """The client's adapter itself (not a delta): any rank r >= 1, the same for A and B."""
        n, metrics = reply_metrics(msg)
        state, nbytes = read_arrays(msg, self.global_state)
        ranks = set()
        for key in (k for k in state if k.endswith(".lora_A.weight")):
            a, b = state[key], state[key.replace(".lora_A.", ".lora_B.")]
            ref_a, ref_b = self.global_state[key], self.global_state[key.replace(".lora_A.", ".lora_B.")]
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

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics = self.collect(server_round, replies)
        if not self.enough():
            return None, metrics
        alpha = self.cfg.lora.alpha
        stacked = stack_factors([(u.delta, u.num_examples, alpha / u.metrics["lora-rank"]) for u in self.updates],
                                self.frozen)
        for key in [k for k in stacked if k.endswith(".lora_A.weight")]:
            b_key = key.replace(".lora_A.", ".lora_B.")
            stacked[key], stacked[b_key] = compact(stacked[key], stacked[b_key], self.cfg.strategy.exact_max_rank)
        self.frozen = stacked
        metrics["frozen-rank"] = max(t.shape[0] for k, t in stacked.items() if k.endswith(".lora_A.weight"))
        return None, metrics
