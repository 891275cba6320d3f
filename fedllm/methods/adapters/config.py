"""The [lora] section: the PEFT adapter every adapter-training method builds (lora and the PEFT
family, exact-lora, dpo, diloco and zo with params=lora), and the cross-checks of its keys against
the method's spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedllm.config import choice, option, positive, register_section
from fedllm.errors import ConfigError

if TYPE_CHECKING:
    from fedllm.config import Config
    from fedllm.methods.base import MethodSpec

PEFT_TYPES = ("lora", "dora", "ia3", "prefix", "prompt", "p-tuning")
PROMPT_TYPES = ("prefix", "prompt", "p-tuning")  # virtual tokens: no weights to merge into the base


@dataclass
class LoraConfig:
    peft: str = option(
         "The PEFT adapter, through PEFT's own configs: lora, dora (weight-decomposed LoRA), ia3 (learned scaling "
         "vectors on lora.target-modules), prefix (prefix tuning), prompt (prompt tuning) or p-tuning; all are "
         "averaged tensor by tensor. exact-lora, zo and diloco take lora only.", "lora")
    rank: int = option("LoRA rank r.", 8, check="> 0")
    alpha: float = option("LoRA scaling alpha (the update is scaled by alpha / r).", 16.0, check="> 0")
    dropout: float = option("Dropout on the LoRA input.", 0.05, check="[0, 1)")
    target_modules: str = option(
         "Comma-separated module names to adapt, or auto: clients score every linear module of the decoder layers on "
         "a few batches of their data before round 1 and the server keeps the best within lora.module-budget.",
         "q_proj,v_proj")
    module_budget: float = option("With lora.target-modules=auto: the share of the adapter parameters of all linear "
                                  "modules to keep.", 0.5, check="(0, 1]")
    calibration_batches: int = option("With lora.target-modules=auto: batches each client scores modules on.", 4,
                                      check="> 0")
    virtual_tokens: int = option("Virtual tokens of prefix, prompt and p-tuning adapters.", 8, check="> 0")
    client_ranks: str = option(
         "Per-client ranks by partition id, e.g. '4,8,16' (cycled); '' gives every client lora.rank. With "
         "train.method=lora a rank below lora.rank trains the first r rows of the global factors (the rest is sent "
         "back unchanged); exact-lora aggregates any ranks exactly. A SuperNode's node config 'lora-rank' wins.", "")
    policy: str = option(
         "none, or resources: each SuperNode's node config memory-mb (and compute, a relative speed, default 1) picks "
         "its model.quantize and LoRA rank (README: Resource-aware clients).", "none")
    personal: str = option(
         "none, head or dual: a private part of each client's adapter that never leaves its node (train.method=lora, "
         "lora.peft=lora). dual trains a second LoRA adapter of the same modules and rank beside the shared one "
         "(FedDPA); head keeps the adapter's tensors on the top quarter of the adapted decoder layers private "
         "(FedPer). Clients report global-eval-loss and personal-eval-loss on their held-out share.", "none")
    personal_lr: float = option("With lora.personal=dual: the private adapter's learning rate (0: train.lr). It trains "
                                "on one client's data alone, where FedAvg's train.lr (tuned for the average of many "
                                "clients' steps) overfits.", 0.0, check=">= 0")

    def __post_init__(self) -> None:
        choice("lora.peft", self.peft, PEFT_TYPES)
        choice("lora.policy", self.policy, ("none", "resources"))
        choice("lora.personal", self.personal, ("none", "head", "dual"))
        positive("lora.rank", self.rank)
        try:
            ranks = [int(r) for r in self.client_ranks.split(",") if r.strip()]
        except ValueError:
            raise ConfigError(f"lora.client-ranks: expected comma-separated integers, got {self.client_ranks!r}") from None
        if any(r <= 0 for r in ranks):
            raise ConfigError(f"lora.client-ranks: ranks must be positive, got {self.client_ranks!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if not self.modules():
            raise ConfigError("lora.target-modules: name at least one module")
        if self.auto_modules() and self.peft not in ("lora", "dora"):
            raise ConfigError(f"lora.target-modules: auto scores LoRA modules; lora.peft={self.peft} names no modules "
                              "to score (use lora or dora)")

    def modules(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def auto_modules(self) -> bool:
        return self.target_modules.strip() == "auto"

    def rank_of(self, partition_id: int) -> int:
        """The LoRA rank of the client with this partition id."""
        ranks = [int(r) for r in self.client_ranks.split(",") if r.strip()]
        return ranks[partition_id % len(ranks)] if ranks else self.rank


register_section("lora", LoraConfig)


def check_adapter(cfg: Config, spec: MethodSpec) -> None:
    """The [lora] keys against what train.method takes (its spec), and against server.init-from,
    server.merge and secagg.enabled: run by the pre-flight (fedllm.server.checks) through
    strategies.resolve, before any engine starts.

    Raises:
        ConfigError: naming the key that does not fit.
    """
    method, lora = cfg.train.method, cfg.lora
    if lora.policy != "none" and not spec.quantize:
        raise ConfigError(f"lora.policy: train.method={method} takes no per-client quantization; set the "
                          "node config lora-rank per node instead, or use train.method=lora")
    if lora.peft not in spec.peft:
        raise ConfigError(f"lora.peft: train.method={method} takes {', '.join(spec.peft)}, not "
                          f"{lora.peft} (use train.method=lora)")
    if lora.auto_modules() and not spec.auto_modules:
        raise ConfigError(f"lora.target-modules: auto needs a method that asks its clients before round 1 "
                          f"(train.method=lora), not {method}")
    if cfg.server.init_from and lora.auto_modules():
        raise ConfigError("server.init-from: the adapter fixes its modules; set lora.target-modules to its "
                          "target_modules instead of auto")
    if cfg.server.init_from and lora.peft == "p-tuning":
        raise ConfigError("server.init-from: a saved P-tuning adapter holds the prompt its encoder computed, not "
                          "the encoder that trains; start P-tuning fresh")
    if cfg.server.merge and lora.peft in PROMPT_TYPES:
        raise ConfigError(f"server.merge: lora.peft={lora.peft} adds virtual tokens, not weights: there is "
                          "nothing to merge into the base (save the adapter only)")
    ranks = [int(r) for r in lora.client_ranks.split(",") if r.strip()]
    if ranks and max(ranks) > lora.rank and spec.delta_kind != "factors":
        raise ConfigError(f"lora.client-ranks: {max(ranks)} is above lora.rank={lora.rank} (the global adapter's "
                          "rank, the largest a client trains); raise lora.rank or use train.method=exact-lora")
    if cfg.secagg.enabled and lora.auto_modules():
        raise ConfigError("lora.target-modules: auto sends each client's module scores before round 1 in the clear; "
                          "name the modules with secagg.enabled")
