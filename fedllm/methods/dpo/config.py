"""The [dpo] section: the DPO loss, its strength and the reference model."""

from __future__ import annotations

from dataclasses import dataclass
import math

from fedllm.config import choice, option, positive, register_section
from fedllm.errors import ConfigError

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "sigmoid_norm", "sft")


@dataclass
class DpoConfig:
    beta: float = option("beta: the strength of the pull toward the reference model (the implicit reward is beta x "
                         "the log-ratio to it).", 0.1, check="> 0")
    loss_type: str = option("TRL's DPO loss: sigmoid (DPO), hinge, ipo, robust, bco_pair, sppo_hard, nca_pair, "
                            "apo_zero, apo_down or sigmoid_norm; or several, comma separated, summed with "
                            "dpo.loss-weights (e.g. sigmoid,sft: DPO plus the chosen answers' NLL, as RPO).", "sigmoid")
    loss_weights: str = option("Weights of the dpo.loss-type terms, comma separated; '' weighs each 1.", "")
    label_smoothing: float = option("The assumed share of flipped preference labels, in [0, 0.5); TRL uses it in the "
                                    "robust loss only.", 0.0,
                                    check="[0, 0.5)")
    reference: str = option("The reference model of each round's local DPO: global (the frozen base plus the round's "
                            "global adapter, as it arrived) or base (the base alone, adapters off).", "global")

    def __post_init__(self) -> None:
        positive("dpo.beta", self.beta)
        for name in self.losses():
            choice("dpo.loss-type", name, DPO_LOSSES)
        self.weights()
        choice("dpo.reference", self.reference, ("global", "base"))
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label-smoothing: must be in [0, 0.5), got {self.label_smoothing}")

    def losses(self) -> list[str]:
        names = [n.strip() for n in self.loss_type.split(",") if n.strip()]
        if not names:
            raise ConfigError("dpo.loss-type: empty; name at least one loss (sigmoid is DPO)")
        return names

    def weights(self) -> list[float]:
        """dpo.loss-weights as numbers, one per loss (all 1 when empty)."""
        if not self.loss_weights.strip():
            return [1.0] * len(self.losses())
        try:
            values = [float(w) for w in self.loss_weights.split(",")]
        except ValueError:
            raise ConfigError(f"dpo.loss-weights: not numbers: {self.loss_weights!r}") from None
        if (len(values) != len(self.losses()) or not all(math.isfinite(v) and v >= 0 for v in values)
                or not any(values)):
            raise ConfigError(f"dpo.loss-weights: give {len(self.losses())} finite weights >= 0, not all 0 (one "
                              f"per dpo.loss-type term), got {self.loss_weights!r}")
        return values


register_section("dpo", DpoConfig)
