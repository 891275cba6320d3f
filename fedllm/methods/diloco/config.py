"""The [diloco] section: Streaming DiLoCo's inner steps, fragments and outer optimizer."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.config import choice, option, positive, register_section
from fedllm.errors import ConfigError


@dataclass
class DiLoCoConfig:
    inner_steps: int = option("H: inner AdamW steps between two syncs of a fragment; one round runs H / fragments "
                              "of them (train.local-steps is not used).", 40, check="> 0")
    fragments: int = option("P: parameter fragments synced in turn, one per round (1: plain DiLoCo); at most the "
                            "model's transformer blocks.", 4, check="> 0")
    pattern: str = option("Blocks of a fragment: strided (block i in fragment i mod P, every fragment spans the "
                          "depth) or sequential (consecutive blocks).", "strided")
    outer_lr: float = option("Outer SGD learning rate on the averaged outer gradient.", 0.7, check="> 0")
    momentum: float = option("Outer SGD momentum.", 0.9, check="[0, 1)")
    nesterov: bool = option("Nesterov momentum for the outer step.", True)
    alpha: float = option("Merge on arrival: local <- alpha local + (1 - alpha) global (0 takes the global; the "
                          "paper's overlapped setting uses 0.5).", 0.0, check="[0, 1]")
    tau: int = option("Rounds a fragment's global arrives late: 0 merges before the next round's steps, 1 after "
                      "them (overlapped); below diloco.fragments.", 0, check=">= 0")
    final_sync: bool = option("The run's last round (server.num-rounds) syncs every fragment, each with its own "
                              "momentum, so none ends without its clients' last inner steps; that round uploads the "
                              "whole model (false: the last round syncs one fragment, as every other).", True)
    params: str = option("What is trained and synced: full (every weight, the paper's setting) or lora (the LoRA "
                         "adapter of [lora] on a frozen base).", "full")

    def __post_init__(self) -> None:
        positive("diloco.inner-steps", self.inner_steps)
        positive("diloco.fragments", self.fragments)
        choice("diloco.pattern", self.pattern, ("strided", "sequential"))
        choice("diloco.params", self.params, ("full", "lora"))
        if self.inner_steps % self.fragments:
            raise ConfigError(f"diloco.inner-steps: H={self.inner_steps} is not divisible by diloco.fragments="
                              f"{self.fragments} (a round runs H / P inner steps)")
        if self.tau >= self.fragments:
            raise ConfigError(f"diloco.tau: {self.tau} must be below diloco.fragments={self.fragments} (a fragment's "
                              "global must arrive before its next sync)")

    def round_steps(self) -> int:
        """Inner steps in one round: H / P."""
        return self.inner_steps // self.fragments


register_section("diloco", DiLoCoConfig)
