"""lora.personal: a private part of each client's adapter that never leaves its node.

    lora.personal = dual   # each node trains a second, private LoRA adapter beside the shared one
    lora.personal = head   # the LoRA tensors of the top quarter of the adapted decoder layers stay on the node

dual, after FedDPA (Yang et al., 2024, "Dual-Personalizing Adapter for Federated Foundation Models",
https://arxiv.org/abs/2403.06131; its FedDPA-T trains both adapters in every round): the client's model
holds two LoRA adapters of the same modules and rank, "default" (the shared one: synced, uploaded,
averaged) and "private"; the personalised model has both active (h = W x + s B A x + s B' A' x). A
round trains each in turn on the same batches: first the private one for train.local-steps with the
shared one frozen at the global state just received and both active (it learns what the global
adapter leaves of this client's data), then the shared adapter alone (the private one off: exactly
FedAvg's local steps, so the global adapter learns what it learns without personal adapters).
Measured on bench/quality.py (row personal) before this order: training both at once in every step
left the averaged shared adapter 43% above FedAvg's eval loss (the private adapters took the clients'
data); training the private adapter after the shared one fitted it on top of the client's locally
trained shared adapter, a residual that did not carry over to the next global state (personalised
loss 1.05 of the global adapter's). The private steps take lora.personal-lr (0: train.lr): they fit
one client's data alone, where FedAvg's rate (tuned for the average of many clients' steps) overfits.
Only the shared adapter is read for the upload. The private adapter starts with B' = 0 (no change)
from its own seed and lives in the node state (context.state[PRIVATE]); a node that has none yet
starts from that fresh adapter, so nothing of one node's adapter reaches another node's round through
the process's cached model.

head, after FedPer (Arivazhagan et al., 2019, https://arxiv.org/abs/1912.00818: shared base layers,
personal top layers): the adapter's tensors on the top quarter (at least one) of the adapted decoder
layers are private. The server leaves them out of the global state (`split`), so they are never sent,
uploaded, aggregated, encoded or checkpointed; its own model and saved adapter hold them at their initial
value (B = 0: the base's layer unchanged), so "the global model" is the shared adapter alone.

Either way each client, in the rounds after the server evaluates (server.eval-every) and in the last,
reports on its own share of the held-out split (partitioned as its training data) the loss of the
global adapter alone at the global state it just received (global-eval-loss) and of its personalised
model, that global state + its private part (personal-eval-loss): dual's private adapter as its
private steps of the round left it (fitted on top of that global state), head's private layers as
its last round left them. The run's summary carries their means over the last evaluated round's
clients (fedllm.reporting.runlog.personal_figures).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any, Callable, Iterable

from fedllm.config import Config
from fedllm.errors import ConfigError, DataError
from fedllm.protocol import State

log = logging.getLogger(__name__)

PERSONAL = ("none", "head", "dual")
PRIVATE = "personal-adapter"  # context.state: this node's private tensors (never sent)
DEFAULT, SECOND = "default", "private"  # PEFT adapter names of dual's shared and private adapters
LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")  # a decoder layer's number in a tensor name


def check(cfg: Config) -> None:
    """lora.personal against the rest of the config (run by check_adapter, before any engine starts).

    Raises:
        ConfigError: naming lora.personal and why the combination does not fit.
    """
    kind, method = cfg.lora.personal, cfg.train.method
    if cfg.lora.personal_lr and kind != "dual":
        raise ConfigError(f"lora.personal-lr: only lora.personal=dual trains an adapter of its own "
                          f"(lora.personal={kind}); leave it 0")
    if kind == "none":
        return
    if method != "lora":
        raise ConfigError(f"lora.personal: train.method={method} has no shared/private split of a LoRA adapter "
                          "(exact-lora's frozen global delta, zo's and ferret's seeded steps and diloco's "
                          "fragments average the whole model; dpo's reference is the global adapter); "
                          "use train.method=lora")
    if cfg.lora.peft != "lora":
        raise ConfigError(f"lora.personal: lora.peft={cfg.lora.peft} is not a LoRA adapter whose private part adds "
                          "to the shared one; use lora.peft=lora")
    if cfg.secagg.enabled:
        raise ConfigError("lora.personal: each client reports its held-out losses with its masked upload, in the "
                          "clear, and SecAgg+'s reply screening knows no such figures; set secagg.enabled=false")
    if scaffold_rule(cfg):
        raise ConfigError("lora.personal: SCAFFOLD's control variates correct each client's drift from the "
                          "global direction, the drift a private part is there to keep; use another server.strategy")
    if kind == "head" and cfg.server.init_from:
        raise ConfigError("lora.personal=head: the clients start their private layers from the fresh adapter, not "
                          "from server.init-from's; use lora.personal=dual or leave server.init-from empty")


def scaffold_rule(cfg: Config) -> bool:
    from fedllm.plugins import parse_stages

    stages = parse_stages(cfg.server.strategy, "server.strategy")
    return bool(stages) and stages[0].name == "scaffold"


def layer_of(name: str) -> int | None:
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def head_names(names: Iterable[str]) -> set[str]:
    """The private tensor names of lora.personal=head: those on the top quarter (at least one) of
    the adapted decoder layers.

    Raises:
        ConfigError: when the names carry no layer number, or every adapted layer would be private.
    """
    names = list(names)
    layers = sorted({n for n in map(layer_of, names) if n is not None})
    if not layers:
        raise ConfigError("lora.personal=head: the adapter's tensor names carry no decoder layer number "
                          f"(e.g. {names[0] if names else '-'!r}); use lora.personal=dual")
    top = set(layers[-math.ceil(len(layers) / 4):])
    private = {n for n in names if layer_of(n) in top}
    if len(private) == len(names):
        raise ConfigError("lora.personal=head: the adapter spans one decoder layer, which would leave nothing "
                          "shared; use lora.personal=dual")
    return private


def split(state: State, cfg: Config) -> tuple[State, State]:
    """The server's (global state, held-back tensors): with lora.personal=head the private layers'
    tensors leave the global state and are held at their initial values (for the server's model
    and the saved adapter); otherwise (state, {})."""
    if cfg.lora.personal != "head":
        return state, {}
    private = head_names(state)
    return {k: t for k, t in state.items() if k not in private}, {k: state[k] for k in private}


def due(cfg: Config, server_round: int) -> bool:
    """Whether the clients evaluate this round: after each server evaluation (server.eval-every)
    and in the last round (the latest global state the clients see)."""
    every = cfg.server.eval_every
    return server_round == cfg.server.num_rounds or (every > 0 and (server_round - 1) % every == 0)


@functools.lru_cache(maxsize=8)
def held_out_share(cfg_items: tuple, partition_id: int, num_partitions: int) -> tuple[dict[str, str], ...]:
    """This client's share of the held-out split, partitioned as its training data (cached per process)."""
    from fedllm.data import partition
    from fedllm.methods import data_splits

    cfg = Config.from_flat(dict(cfg_items))
    _, held_out = data_splits(cfg)
    try:
        return tuple(partition(held_out, cfg.data, num_partitions, partition_id))
    except DataError as err:
        log.warning("lora.personal: no held-out share for partition %d (%s)", partition_id, err)
        return ()


class Personal:
    """A client's private part for one train message: build the model, load the node's private
    tensors beside the global state, evaluate, keep them after training, and strip them from the
    upload."""

    def __init__(self, cfg: Config, context: Any, partition_id: int) -> None:
        self.cfg, self.context, self.partition_id = cfg, context, partition_id
        self.kind = cfg.lora.personal
        self.private: set[str] = set()  # head: the private tensor names
        self.loss: Callable[[], float] | None = None  # this round's held-out loss of the model as it is, when due

    def build(self, model_cfg: Any, lora_cfg: Any, seed: int) -> tuple[Any, Any]:
        """(PeftModel, tokenizer) from the process cache; dual's carries the second adapter."""
        from fedllm.methods.adapters import engine as lora

        if self.kind != "dual":
            net, tokenizer = lora.lora_model(model_cfg, lora_cfg, seed)
            if self.kind == "head":
                self.private = head_names(net.fedllm_initial)
            return net, tokenizer
        from fedllm.model import MODEL_CACHE, placement

        key = ("lora-dual", model_cfg.name, model_cfg.dtype, model_cfg.quantize, lora_cfg.peft, lora_cfg.rank,
               lora_cfg.alpha, lora_cfg.dropout, lora_cfg.target_modules, seed, *placement(model_cfg))
        return MODEL_CACHE.get(key, lambda: dual_model(model_cfg, lora_cfg, seed))

    def held(self) -> State | None:
        record = self.context.state.array_records.get(PRIVATE)
        return record.to_torch_state_dict() if record is not None else None

    def whole(self, net: Any, shared: State) -> State:
        """The adapter state to load for the shared `shared`: dual loads the node's private adapter
        (or a fresh one) into the second adapter and returns `shared`; head adds the node's private
        tensors (or their initial values)."""
        held = self.held()
        if self.kind == "dual":
            set_private(net, held if held is not None else net.fedllm_private_initial)
            net.base_model.set_adapter(DEFAULT)  # the round's first phase trains the shared adapter alone
            return shared
        mine = held if held is not None else {k: net.fedllm_initial[k] for k in self.private}
        return {**shared, **mine}

    def evaluate(self, net: Any, tokenizer: Any, shared: State, server_round: int) -> dict[str, float]:
        """global-eval-loss (and with head personal-eval-loss) on this client's held-out share, at the
        global state just received; nothing when the round is not due or the client has no share
        (dual's personal-eval-loss comes after its private steps, in `before`). Leaves the model as
        training starts from it (dual: the shared adapter alone active)."""
        from fedllm.methods.adapters import engine as lora

        self.loss = None
        if not due(self.cfg, server_round) or "data-path" in self.context.node_config:
            return {}
        pid, n = self.partition_id, int(self.context.node_config.get("num-partitions", 1))
        examples = list(held_out_share(tuple(sorted(self.cfg.to_flat().items())), pid, n))
        if not examples:
            return {}
        self.loss = functools.partial(held_out_loss, net, tokenizer, examples, self.cfg)
        if self.kind == "dual":
            return {"global-eval-loss": self.loss()}
        personal = lora.adapter_state(net)
        lora.set_adapter_state(net, {**shared, **{k: net.fedllm_initial[k] for k in self.private}})
        try:
            alone = self.loss()
        finally:
            lora.set_adapter_state(net, personal)
        return {"global-eval-loss": alone, "personal-eval-loss": self.loss()}

    def before(self, net: Any, rows: list[dict[str, list[int]]], pad_id: int, seed: int,
               clock: tuple[int, int]) -> dict[str, float]:
        """Before the round's local steps: dual trains the private adapter for train.local-steps on the
        same batches (a fresh AdamW; the shared adapter frozen at the global state, both active), keeps
        it in the node state, and leaves the shared adapter alone active for the shared steps. Returns
        its private-train-loss, and when the round is due personal-eval-loss: the global state just
        received with the private adapter just trained on it (what the node holds for its own use)."""
        from flwr.app import ArrayRecord

        from fedllm.methods.adapters import engine as lora

        if self.kind != "dual":
            return {}
        net.base_model.set_adapter([DEFAULT, SECOND])
        for _, module in lora.lora_layers(net):  # the shared adapter stays as its upload will read it
            module.lora_A[DEFAULT].requires_grad_(False)
            module.lora_B[DEFAULT].requires_grad_(False)
        try:
            steps = self.cfg.train if not self.cfg.lora.personal_lr else dataclasses.replace(
                self.cfg.train, lr=self.cfg.lora.personal_lr)
            stats = lora.train(net, rows, steps, pad_id, seed=seed, clock=clock)
            figures = {"personal-eval-loss": self.loss()} if self.loss is not None else {}
        finally:
            net.base_model.set_adapter(DEFAULT)
        self.context.state[PRIVATE] = ArrayRecord(private_state(net))
        return {"private-train-loss": stats["train-loss"], **figures}

    def keep(self, net: Any) -> None:
        """After the round's local steps: head's private tensors go to the node state (dual's went in
        `before`)."""
        from flwr.app import ArrayRecord

        from fedllm.methods.adapters import engine as lora

        if self.kind == "head":
            state = lora.adapter_state(net)
            self.context.state[PRIVATE] = ArrayRecord({k: state[k] for k in sorted(self.private)})

    def shared(self, state: State) -> State:
        """What may leave the node: `state` without head's private tensors (dual's adapter state
        holds the shared adapter only)."""
        return {k: t for k, t in state.items() if k not in self.private}


def held_out_loss(net: Any, tokenizer: Any, examples: list[dict[str, str]], cfg: Config) -> float:
    from fedllm.evaluation.held_out import eval_loss

    return eval_loss(net, tokenizer, examples, cfg.data, cfg.server.eval_batch_size)


def dual_model(model_cfg: Any, lora_cfg: Any, seed: int) -> tuple[Any, Any]:
    """A new (PeftModel, tokenizer) with the shared adapter "default" and a second adapter of the
    same config, both active; the second one's fresh state (B = 0, A from seed + 1, so that the two
    do not start symmetric) is kept as `fedllm_private_initial`."""
    import torch

    from fedllm.methods.adapters import engine as lora

    model, tokenizer = lora.build_lora_model(model_cfg, lora_cfg, seed)
    model.add_adapter(SECOND, lora.peft_config(lora_cfg))
    torch.manual_seed(seed + 1)
    for _, module in lora.lora_layers(model):
        module.reset_lora_parameters(SECOND, init_lora_weights=True)
    model.base_model.set_adapter([DEFAULT, SECOND])
    model.fedllm_private_initial = private_state(model)
    model.eval()
    return model, tokenizer


def private_state(model: Any) -> State:
    """A detached CPU copy of the second adapter's tensors, keyed as PEFT saves an adapter."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True)
            for k, v in get_peft_model_state_dict(model, adapter_name=SECOND).items()}


def set_private(model: Any, state: State) -> None:
    """Load the second adapter's tensors in place (the same names as `private_state`).

    Raises:
        ConfigError: when the names differ (a node state from another adapter shape).
    """
    from peft import set_peft_model_state_dict

    if set(state) != set(model.fedllm_private_initial):
        raise ConfigError("lora.personal=dual: this node's private adapter does not fit the configured adapter "
                          "(lora.rank or lora.target-modules changed)")
    set_peft_model_state_dict(model, state, adapter_name=SECOND)
