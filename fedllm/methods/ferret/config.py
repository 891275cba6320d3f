"""The [ferret] section: what trains, the random bases each round projects onto, and the wire."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.config import choice, option, positive, register_section
from fedllm.errors import ConfigError


@dataclass
class FerretConfig:
    params: str = option("What trains and is projected: lora (the [lora] adapter on a frozen base) or all (every "
                         "weight of the model: full-parameter tuning).", "lora")
    num_bases: int = option("K: random bases per round, spread over the blocks in proportion to their sizes (at "
                            "least one each); the upload is one coefficient per basis.", 4096, check="[1, 1048576]")
    block_size: int = option("Largest block in elements: each trained tensor is a block, cut into pieces of at "
                             "most this many (a basis costs its block's size to draw: K x this bounds a round's "
                             "draws).", 65536, check="> 0")
    scale: float = option("Multiplies the reconstruction sum_k gamma_k z_k / K_b of each block: 1 makes it unbiased "
                          "(E = the update), smaller trades the projection's noise for a shorter step.", 1.0,
                          check="> 0")
    seed: int = option("Seed of the bases: round v's basis j is drawn from a seed of (this, v, j), the same on "
                       "every party.", 42, check=">= 0")
    bits: int = option("Bits per coefficient on the wire, up and down (8 or 4, a scale per block, stochastic "
                       "rounding; 0 sends float32).", 8, check="[0, 8]")

    def __post_init__(self) -> None:
        choice("ferret.params", self.params, ("lora", "all"))
        if not 1 <= self.num_bases <= 1 << 20:
            raise ConfigError(f"ferret.num-bases: must be in 1..1048576, got {self.num_bases}")
        if self.block_size <= 0:
            raise ConfigError(f"ferret.block-size: must be > 0, got {self.block_size}")
        positive("ferret.scale", self.scale)
        if self.seed < 0:
            raise ConfigError(f"ferret.seed: must be >= 0, got {self.seed}")
        if self.bits not in (0, 4, 8):
            raise ConfigError(f"ferret.bits: must be 0, 4 or 8, got {self.bits}")


register_section("ferret", FerretConfig)
