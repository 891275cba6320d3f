"""The [zo] section: FedKSeed's pool, perturbation, step and upload; the sparse subset it may
perturb (zo.mask) and the first-order warm-up it may start with (zo.warmup-rounds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedllm.config import choice, option, positive, register_section
from fedllm.errors import ConfigError

if TYPE_CHECKING:
    from fedllm.config import Config
    from fedllm.methods.base import MethodSpec

MASKS = ("magnitude", "random")


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
    mask: float = option("Sparse ZO: the fraction of the zo.params weights perturbed and trained, a fixed subset "
                         "every party derives from the base weights (e.g. 0.001; 0: all of them).", 0.0, check="[0, 1)")
    mask_by: str = option("How the zo.mask subset is chosen: magnitude (the largest |w| of the base weights) or "
                          "random (a uniform subset drawn from zo.pool-seed).", "magnitude")
    warmup_rounds: int = option("First-order warm-up: the first N rounds take AdamW steps on the perturbed "
                                "weights and upload dense deltas (needs zo.mask > 0 or zo.params=lora), then zo "
                                "continues from the warmed-up weights.", 0, check=">= 0")
    warmup_lr: float = option("AdamW learning rate of the zo.warmup-rounds steps.", 1e-4, check="> 0")

    def __post_init__(self) -> None:
        if not 1 <= self.num_seeds <= 65536:
            raise ConfigError(f"zo.num-seeds: must be in 1..65536, got {self.num_seeds}")
        positive("zo.eps", self.eps)
        positive("zo.lr", self.lr)
        positive("zo.warmup-lr", self.warmup_lr)
        choice("zo.dist", self.dist, ("gaussian", "rademacher"))
        choice("zo.params", self.params, ("all", "lora"))
        choice("zo.mask-by", self.mask_by, MASKS)
        if not 0 <= self.mask < 1:
            raise ConfigError(f"zo.mask: must be in [0, 1), got {self.mask}")
        if self.warmup_rounds < 0:
            raise ConfigError(f"zo.warmup-rounds: must be >= 0, got {self.warmup_rounds}")
        if self.warmup_rounds and self.mask == 0 and self.params == "all":
            raise ConfigError("zo.warmup-rounds: the warm-up uploads dense deltas of the perturbed weights: "
                              "set zo.mask (e.g. 0.001) or zo.params=lora, not all the weights")
        if self.bits not in (0, 2, 4, 8):
            raise ConfigError(f"zo.bits: must be 0, 2, 4 or 8, got {self.bits}")


def check_zo(cfg: Config, spec: MethodSpec) -> None:
    """zo's cross-checks: the [lora] keys (fedllm.methods.adapters), and the warm-up's dense uploads,
    which secure aggregation does not take.

    Raises:
        ConfigError: naming the key that does not fit.
    """
    from fedllm.methods.adapters.config import check_adapter

    check_adapter(cfg, spec)
    if cfg.zo.warmup_rounds and cfg.secagg.enabled:
        raise ConfigError("zo.warmup-rounds: the warm-up's dense deltas do not go through secure aggregation "
                          "(secagg.enabled): set zo.warmup-rounds=0")
    if cfg.zo.warmup_rounds and cfg.server.mode == "async":
        raise ConfigError("zo.warmup-rounds: a warm-up ends at a round, and an asynchronous version may take replies "
                          "trained before it ended; set zo.warmup-rounds=0 with server.mode=async")


register_section("zo", ZOConfig)
