"""The [zo] section: FedKSeed's pool, perturbation, step and upload."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.config import choice, option, positive, register_section
from fedllm.errors import ConfigError


@dataclass
class ZOConfig:
    num_seeds: int = option("K: size of the seed pool fixed for the run.", 4096, check="[1, 65536]")
    pool_seed: int = option("Seed that draws the pool of K seeds.", 42, check=">= 0")
    eps: float = option("Perturbation scale of the two forward passes.", 1e-3, check="> 0")
    lr: float = option("Learning rate of theta -= lr * g * z.", 1e-5, check="> 0")
    dist: str = option("Perturbation distribution: gaussian or rademacher.", "gaussian")
    params: str = option("Perturbed parameters: all (full fine-tuning) or lora.", "all")
    pro: bool = option("FedKSeed-Pro: sample seeds by their history of scalar magnitudes.", False)
    bits: int = option("Bits per uploaded scalar (8, 4 or 2; 0 sends float32).", 8, check="[0, 8]")
    rebuild_every: int = option("Rebuild the model from base + accumulators every N syncs (0: never).", 0, check=">= 0")

    def __post_init__(self) -> None:
        if not 1 <= self.num_seeds <= 65536:
            raise ConfigError(f"zo.num-seeds: must be in 1..65536, got {self.num_seeds}")
        positive("zo.eps", self.eps)
        positive("zo.lr", self.lr)
        choice("zo.dist", self.dist, ("gaussian", "rademacher"))
        choice("zo.params", self.params, ("all", "lora"))
        if self.bits not in (0, 2, 4, 8):
            raise ConfigError(f"zo.bits: must be 0, 2, 4 or 8, got {self.bits}")


register_section("zo", ZOConfig)
