"""SCAFFOLD's control variates for the LoRA family: the server's c and each client's c_i over the
trainable adapter tensors, which correct every local gradient for the drift between the client's
data and everyone's.

    server.strategy = "scaffold"                                  # or "scaffold > fedavgm(lr=1.5, momentum=0.0)"

Karimireddy et al., ICML 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
https://arxiv.org/abs/1910.06378, Algorithm 1 with option II:

    local step k:   y <- y - eta_k (g(y) + c - c_i)               (the correction: before AdamW's step too)
    after K steps:  c_i+ = c_i - c + (x - y) / sum_k eta_k        (K eta at a constant train.lr)
    reply:          delta y = y - x,  delta c_i = c_i+ - c_i = (x - y) / sum_k eta_k - c
    server:         x += the rule chain's aggregate of delta y (scaffold folds fedavg's weighted mean)
                    c += (|S| / N) mean_{i in S} delta c_i = sum_{i in S} delta c_i / N

It is a rule, not a method key, because the user's choice is how the server aggregates (as with
fedprox, whose term reaches the client loss too), and a rule composes with server optimizers in the
one grammar; the variates are this module's because a method owns what travels and is saved (c goes
down with each train message and delta c_i up with each reply, through compression.down / .up when
set, both checked like the adapter). N is the number of distinct clients whose variate the server
has accepted so far (the server cannot count nodes that never answered); with every client in every
round it is |S|. A node with no c_i yet (its first round, or a resumed run's fresh node state) starts
at c_i = c: its first correction is zero, and c = mean c_i holds again after a resume. The client
keeps c_i + the delta the server decodes (a lossy codec's, not its own), so both sides agree.
train.optimizer AdamW gets the corrected gradient, as common implementations do (the paper's
step is SGD); the correction is added after train.max-grad-norm's clipping of the gradient.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedllm.compression import compress, decode, parse
from fedllm.config import Config, TrainConfig
from fedllm.errors import PayloadError
from fedllm.methods.schedule import lr_factor
from fedllm.plugins import parse_stages
from fedllm.protocol import CONFIG, State, check_like

RULE = "scaffold"  # the server.strategy rule that turns it on (strategies.scaffold registers it)
VARIATE = "scaffold"  # record name: c down, delta c_i up (arrays; a ConfigRecord's payload with a codec)
HELD = "scaffold-ci"  # this node's c_i, in context.state
CORRECT = "scaffold-correct"  # the round config's key: where the correction goes (the rule's `correct`)
WHERE = ("gradient", "step")


def on(cfg: Config) -> bool:
    """Whether server.strategy's rule is SCAFFOLD's."""
    stages = parse_stages(cfg.server.strategy, "server.strategy")
    return bool(stages) and stages[0].name == RULE


# --- the maths ----------------------------------------------------------------------------------
def client_delta(c: State, x: State, y: State, lr_sum: float) -> State:
    """delta c_i = c_i+ - c_i = (x - y) / lr_sum - c (option II; lr_sum = sum_k eta_k, K eta)."""
    return {k: (x[k].float() - y[k].float()) / lr_sum - c[k].float() for k in c}


def server_step(c: State, deltas: list[State], known: int) -> State:
    """c + (|S| / N) mean(delta c_i) = c + sum(delta c_i) / N, with N = `known` >= |S|."""
    if not deltas:
        return c
    return {k: c[k] + torch.stack([d[k].float() for d in deltas]).sum(0) / known for k in c}


def corrected(grad: torch.Tensor, c: torch.Tensor, c_i: torch.Tensor) -> torch.Tensor:
    """g + c - c_i: the gradient a SCAFFOLD step takes."""
    return grad + (c - c_i).to(grad.dtype)


def lr_sum(train: TrainConfig, clock: tuple[int, int]) -> float:
    """sum_k eta_k over this round's train.local-steps (train.lr-schedule's rates; K x train.lr when constant)."""
    return sum(train.lr * lr_factor(train, clock[0] + i, clock[1]) for i in range(train.local_steps))


# --- the wire -----------------------------------------------------------------------------------
def write(tensors: State, codec_spec: str, seed: int) -> tuple[Any, State]:
    """The record carrying `tensors` (arrays, or codec_spec's payload) and what its reader decodes."""
    if not codec_spec:
        return ArrayRecord({k: t.float().contiguous() for k, t in tensors.items()}), tensors
    codec = parse(codec_spec)
    payload, _ = compress(codec, tensors, None, seed)
    return ConfigRecord({"payload": payload}), decode(codec, payload, sorted(tensors))


def read(content: RecordDict, like: State, codec_spec: str, what: str) -> State:
    """The variate in `content` (written by `write`), float32, checked against `like`'s names and
    shapes and for finite values.

    Raises:
        PayloadError: naming `what` and what is wrong (missing, other names or shapes, not finite).
    """
    try:
        if VARIATE in content.array_records and not codec_spec:
            tensors = content.array_records[VARIATE].to_torch_state_dict()
        elif VARIATE in content.config_records and codec_spec:
            payload = content.config_records[VARIATE].get("payload")
            if not isinstance(payload, bytes):
                raise PayloadError(f"lacks the {VARIATE!r} payload bytes")
            tensors = decode(parse(codec_spec), payload, sorted(like))
        else:
            raise PayloadError(f"lacks the {VARIATE!r} record" + (" (encoded)" if codec_spec else " (arrays)"))
        check_like(tensors, like, check_dtype=False)
    except PayloadError as err:
        raise PayloadError(f"{what}: {err}") from None
    except Exception as err:  # malformed array bytes
        raise PayloadError(f"{what}: cannot decode: {err}") from None
    return {k: t.float() for k, t in tensors.items()}


# --- the server's c -----------------------------------------------------------------------------
class ServerVariate:
    """c, the clients known so far (N), and the round's accepted delta c_i by node until `apply`
    (one adapter-sized tensor set per client of the round, also when the rule streams)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.c: State = {}
        self.known: set[int] = set()
        self.pending: dict[int, State] = {}
        self._down: tuple[Any, ...] | None = None  # (record,) of the current c, encoded once per round

    def down(self, like: State) -> dict[str, Any]:
        """The record bringing c to a node (zeros like the adapter before any round applied)."""
        if not self.c:
            self.c = {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in like.items()}
        if self._down is None:
            self._down = (write(self.c, self.cfg.compression.down, len(self.known))[0],)
        return {VARIATE: self._down[0]}

    def read(self, msg: Message, like: State) -> None:
        """Check the reply's delta c_i and hold it until the round applies.

        Raises:
            PayloadError: the variate is missing, of other names or shapes, or not finite.
        """
        self.pending[msg.metadata.src_node_id] = read(msg.content, like, self.cfg.compression.up, "control variate")

    def apply(self, node_ids: list[int]) -> dict[str, float]:
        """c += sum of the accepted nodes' delta c_i / N (those of other replies are discarded)."""
        deltas = [self.pending[n] for n in node_ids if n in self.pending]
        self.known |= {n for n in node_ids if n in self.pending}
        self.pending = {}
        self.c, self._down = server_step(self.c, deltas, max(len(self.known), 1)), None
        norm = sum(float(t.float().pow(2).sum()) for t in self.c.values()) ** 0.5
        return {"scaffold-c-norm": norm, "scaffold-clients-known": float(len(self.known))}

    def state_dict(self) -> dict[str, Any]:
        return {"c": dict(self.c), "known": torch.tensor(sorted(self.known), dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c, self.known = dict(state["c"]), {int(n) for n in state["known"].tolist()}
        self.pending, self._down = {}, None


# --- the client's c_i ---------------------------------------------------------------------------
class Held(NamedTuple):
    """What a node trains a round with: the server's c (as decoded), its own c_i, and where the
    correction goes ("gradient" or "step": the rule's `correct` argument)."""

    c: State
    c_i: State
    where: str = "gradient"


def receive(request: RecordDict, context: Context, cfg: Config, like: State) -> Held | None:
    """c from the train message and this node's c_i (c itself when it holds none that fits);
    None when SCAFFOLD is off.

    Raises:
        PayloadError: the message's variate is missing or does not fit the adapter.
    """
    if not on(cfg):
        return None
    c = read(request, like, cfg.compression.down, "the server's control variate")
    held = context.state.array_records.get(HELD)
    c_i = held.to_torch_state_dict() if held is not None else {}
    if set(c_i) != set(c) or any(c_i[k].shape != c[k].shape for k in c):
        c_i = {k: t.clone() for k, t in c.items()}
    where = request.config_records.get(CONFIG, {}).get(CORRECT, "gradient")
    if where not in WHERE:
        raise PayloadError(f"{CORRECT}: {where!r} is not one of {', '.join(WHERE)}")
    return Held(c, c_i, str(where))


def correction(net: Any, held: Held | None) -> Callable[[str, float], None] | None:
    """The correction train calls at each local step, `correct(stage, lr)`; None when SCAFFOLD is off.
    With held.where "gradient" it adds c - c_i to the gradients of the trainable adapter tensors at stage
    "gradient" (after backward, before the optimizer's step); with "step" it moves them by -lr (c - c_i)
    at stage "step" (after the optimizer's step: NVFlare's way, in the units of (x - y) / sum eta).
    PEFT's state dict shares storage with the parameters, which matches each variate to its parameter
    (lora, dora and ia3; strategies.scaffold refuses the adapters whose saved tensors are computed).

    Raises:
        PayloadError: an adapter tensor that is not a trainable parameter (nothing to correct).
    """
    if held is None:
        return None
    from peft import get_peft_model_state_dict

    params = {p.data_ptr(): p for p in net.parameters() if p.requires_grad}
    pairs = []
    for name, tensor in get_peft_model_state_dict(net).items():
        if name not in held.c:  # a tensor the server does not hold (a personal one) has no variate
            continue
        p = params.get(tensor.data_ptr())
        if p is None or p.shape != tensor.shape:
            raise PayloadError(f"scaffold: adapter tensor {name} is not a trainable parameter")
        pairs.append((p, held.c[name].to(p.device), held.c_i[name].to(p.device)))

    def correct(stage: str, lr: float) -> None:
        if stage != held.where:
            return
        with torch.no_grad():
            for p, c, c_i in pairs:
                if stage == "step":
                    p.sub_((lr * (c - c_i)).to(p.dtype))
                elif p.grad is not None:
                    p.grad.copy_(corrected(p.grad, c, c_i))

    return correct


def reply(held: Held | None, start: State, local: State, context: Context, cfg: Config, clock: tuple[int, int],
          seed: int) -> dict[str, Any]:
    """The reply's delta c_i record (none when SCAFFOLD is off); the node keeps c_i + the delta as the
    server will decode it."""
    if held is None:
        return {}
    delta = client_delta(held.c, start, local, lr_sum(cfg.train, clock))
    record, sent = write(delta, cfg.compression.up, seed)
    context.state[HELD] = ArrayRecord({k: (held.c_i[k].float() + sent[k].float()).contiguous() for k in held.c})
    return {VARIATE: record}
