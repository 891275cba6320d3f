"""The sections of how the federation runs: [compression], [strategy], [dp], [secagg], [ledger] and
[attack]; [server] is fedllm/config/server.py (re-exported here)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from fedllm.config.fields import choice, option, positive
from fedllm.config.server import ServerConfig, usable_cores  # noqa: F401  (imported from here too)
from fedllm.errors import ConfigError


@dataclass
class CompressionConfig:
    up: str = option(
        "Codec chain for client uploads (LoRA deltas), e.g. 'topk(0.01) > quantize(4) > zstd' or a "
        "preset (int8, topk-int4, topk-int2, fedzip); '' sends float32 arrays.", "")
    down: str = option("Codec chain for the global delta sent to clients; '' sends the full global adapter.", "")
    error_feedback: bool = option("Carry what compression dropped into the next round (per node, and on the server).",
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

    proximal_mu: float = option("Deprecated: fedprox(mu=...). FedProx: weight mu of the proximal term "
                                "(mu / 2) ||w - w_global||^2.", 0.01, check=">= 0")
    server_lr: float = option("Deprecated: fedadam(lr=...), fedavgm(lr=...), ... Server learning rate of "
                              "fedavgm/fedadam/fedyogi/fedadagrad; 0 picks 1.0 for fedavgm and 1e-3 for the adaptive "
                              "ones (Flower's FedAdam, FedYogi, FedAdagrad: 0.1, 0.01, 0.1; fedadam(flavor=flower) "
                              "takes Flower's defaults and formula).", 0.0, check=">= 0")
    momentum: float = option("Deprecated: fedavgm(momentum=...). FedAvgM server momentum (Flower's FedAvgM: 0.0, "
                             "fedavgm(flavor=flower)).", 0.9, check="[0, 1)")
    beta1: float = option("Deprecated: fedadam(beta1=...). FedAdam/FedYogi/FedAdagrad first-moment decay (Flower's "
                          "FedAdagrad has no first moment: fedadagrad(flavor=flower)).", 0.9, check="[0, 1)")
    beta2: float = option("Deprecated: fedadam(beta2=...). FedAdam/FedYogi second-moment decay (FedAdagrad sums the "
                          "squares).", 0.99, check="[0, 1)")
    tau: float = option("Deprecated: fedadam(tau=...). FedAdam/FedYogi/FedAdagrad adaptivity (added to the root of "
                        "the second moment, which starts at tau^2 as in Reddi et al.; at 0, with FedAdam's bias "
                        "correction, in Flower's: fedadam(flavor=flower)).", 1e-3, check="> 0")
    trim_fraction: float = option("Deprecated: trimmed-mean(fraction=...). Trimmed mean: share of clients cut from "
                                  "each end, per coordinate.", 0.2, check="[0, 0.5)")
    byzantine: int = option("Deprecated: krum(f=...), multikrum(f=...). Krum/Multi-Krum: number f of Byzantine "
                            "clients tolerated (Flower's Krum/MultiKrum: 0, krum(flavor=flower)).", 1, check=">= 0")
    multikrum_keep: int = option("Deprecated: multikrum(keep=...). Multi-Krum: updates averaged; 0 keeps n - f "
                                 "(Flower's MultiKrum keeps 1, which is Krum: multikrum(flavor=flower)).", 0,
                                 check=">= 0")
    max_norm: float = option("Deprecated: norm-bounded(max_norm=...). Norm-bounded averaging: each update is scaled "
                             "down to this L2 norm.", 1.0, check="> 0")
    exact_max_rank: int = option("exact-lora: cap on the rank of the frozen global delta (0: exact, no cap).", 0, check=">= 0")

    def __post_init__(self) -> None:
        for key, value in (("strategy.momentum", self.momentum), ("strategy.beta1", self.beta1),
                           ("strategy.beta2", self.beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key}: must be in [0, 1), got {value}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"strategy.trim-fraction: must be in [0, 0.5), got {self.trim_fraction}")


@dataclass
class DPConfig:
    clipping_norm: float = option("Client-side fixed clipping of each update's L2 norm (Flower's DP wrapper); "
                                  "0 turns differential privacy off.", 0.0, check=">= 0")
    noise_multiplier: float = option("Gaussian noise std on the aggregate = multiplier x clipping-norm / "
                                     "sampled clients.", 1.0, check=">= 0")
    sampled_clients: int = option("Clients sampled per round, for the noise scale; 0 uses server.min-clients.", 0, check=">= 0")


@dataclass
class SecAggConfig:
    enabled: bool = option("Secure aggregation (SecAgg+): the server sees only the sum of the sampled clients' "
                           "masked uploads, never one client's update.", False)
    threshold: float = option("Share holders (a node's neighbours and the node) whose shares rebuild a node's "
                              "secrets: a fraction in (0.5, 1] of them, or a count >= 2. A round survives dropouts "
                              "after key sharing while every node keeps this many holders.", 0.67, check="> 0.5")
    neighbours: int = option("k of the k-regular graph each node shares masks and keys with (SecAgg+, rounded up "
                             "to even); 0 = every sampled node (SecAgg).", 0, check=">= 0")
    clip_range: float = option("Every uploaded value is clipped to [-clip-range, clip-range] before fixed-point "
                               "quantization (clients report how many they clipped); 0 takes the method's range "
                               "(4 for adapters and outer gradients, 1024 for zo's per-seed sums).", 0.0, check=">= 0")
    bits: int = option("Masked sums are taken modulo 2^bits (uint32 on the wire up to 32, else uint64); each "
                       "value gets 2^bits / sampled clients levels.", 32, check="[20, 62]")
    max_weight: int = option("Example counts weigh as min(count, max-weight) / max-weight, summed securely "
                             "beside the update.", 1024, check=">= 1")

    def __post_init__(self) -> None:
        t = self.threshold
        if not (0.5 < t <= 1 or (t >= 2 and float(t).is_integer())):
            raise ConfigError(f"secagg.threshold: must be a fraction in (0.5, 1] or a whole count >= 2, got {t}")


PENALTY_FLAGS = ("free-rider", "noise", "opposed", "harmful", "oversized", "duplicate", "replay", "stale", "outlier",
                 "invalid")


@dataclass
class LedgerConfig:
    enabled: bool = option("Record contributions, rewards and penalties on an Ethereum-compatible chain.", False)
    chain: str = option("'tester' (an in-process EVM, no set-up) or a node's JSON-RPC URL, http(s):// (web3 8 "
                        "talks WebSocket only through its async API, which fedllm does not use).", "tester")
    contract: str = option("Address of a deployed FedLedger; '' deploys a new one at the start of the run.", "")
    owner_key: str = option("Owner's key, 'env:NAME' or 'file:PATH'; '' derives one from ledger.seed and funds it "
                            "from the node's dev account (tester, anvil).", "")
    aggregator_key: str = option("Aggregator's (this server's) key, 'env:NAME' or 'file:PATH'; '' uses the "
                                 "owner's.", "")
    client_keys: str = option("'simulated': client keys derived from ledger.seed and partition id, registered "
                              "and staked by the server (simulation only, the keys are not secret); 'node': each "
                              "SuperNode signs with the key in its node config ledger-key and registers itself.",
                              "simulated")
    seed: int = option("Seed of the derived (simulation) keys.", 0, check=">= 0")
    pool: float = option("Ether the owner puts in the reward pool when deploying.", 100.0, check=">= 0")
    stake: float = option("Ether each simulated client stakes; above 0 and at least ledger.min-stake (FedLedger "
                          "refuses a zero stake, which would lock the account).", 1.0, check="> 0")
    min_stake: float = option("Smallest stake the contract accepts (ether), when deploying; above 0 (FedLedger "
                              "refuses 0).", 0.5, check="> 0")
    reward_per_round: float = option("Ether shared among the round's clients by score (less if the pool is "
                                     "smaller).", 1.0, check=">= 0")
    unbonding_seconds: int = option("Seconds between a client's unbond request and its withdrawal; penalties "
                                    "apply until then.", 86400, check=">= 0")
    slashed_to: str = option("Where slashed stake goes: 'pool' (funds rewards) or 'burn' (locked for good).", "pool")
    scorer: str = option("Contribution scorer from the registry: cosine (to the aggregate, no data), loo "
                         "(leave-one-out validation loss) or shapley (GTG-Shapley; for a few clients).", "cosine")
    validation_examples: int = option("Held-out examples of the loo and shapley validation loss.", 16, check="> 0")
    shapley_permutations: int = option("GTG-Shapley: most permutations sampled per round.", 20, check="> 0")
    penalties: str = option("Share of the stake slashed per flag, 'flag=fraction,...' (flags: "
                            + ", ".join(PENALTY_FLAGS) + ").",
                            "free-rider=0.5,noise=0.5,opposed=0.5,harmful=0.5,oversized=0.25,duplicate=0.25,"
                            "replay=0.5,stale=0.25,outlier=0.1,invalid=0.1")
    free_rider_ratio: float = option("An update whose norm is below this share of the median norm is a free "
                                     "rider's.", 0.05, check=">= 0")
    noise_z: float = option("An update less aligned with the others' coordinate-wise median than |cos| sqrt(D) < "
                            "noise-z is noise (a random direction gives about 1), one with cos sqrt(D) <= -noise-z is "
                            "opposed (a flipped sign); 0 turns both tests off (they are off for zo).", 4.0, check=">= 0")
    oversize_ratio: float = option("An update whose norm exceeds this multiple of the median norm is oversized "
                                   "(a scaled update); 0 turns the test off.", 5.0, check=">= 0")
    harmful_ratio: float = option("Validation gain test, against the round's median gain m (a gain: the loss on "
                                  "ledger.validation-examples of the pre-round state minus that state moved by one "
                                  "update alone): a gain below -harmful-ratio x m is harmful (it moves the loss the "
                                  "wrong way), one of at least harmful-ratio x m is never noise or opposed (a non-IID "
                                  "minority's honest step). One evaluation per client and round; 0 turns it off.",
                                  0.5, check=">= 0")
    commit_reveal: bool = option("Each client commits keccak256(contract, round, account, update hash) on chain "
                                 "before its reply leaves (the reveal): of identical uploads only the later "
                                 "committed are duplicates, and a reply without its commitment is invalid. Needs a "
                                 "chain node the clients reach (ledger.chain=URL, not tester).", False)
    challenge_window: int = option("Seconds after a round is recorded during which a registered client may dispute it "
                                   "on chain with a bond (FedLedger, when deploying); a round's rewards are claimable "
                                   "after it; 0: disputes off, rewards claimable at once.", 0, check=">= 0")
    voting_seconds: int = option("With disputes on: seconds a dispute's vote stays open to verifiers (registered "
                                 "clients but the aggregator) posting the root they recomputed.", 3600, check="> 0")
    dispute_bond: float = option("With disputes on: least ether a challenger bonds; lost when its dispute is upheld.",
                                 0.1, check="> 0")
    aggregator_bond: float = option("With disputes on: ether the aggregator bonds before recording rounds (posted at "
                                    "the run's start); what an overturned round costs it, half to the challenger.",
                                    1.0, check="> 0")
    dispute_quorum: float = option("With disputes on: share of the staked ether the votes must carry for a "
                                   "decision (else the round stands and the challenger's bond is returned).", 0.5,
                                   check="(0, 1]")

    def __post_init__(self) -> None:
        choice("ledger.client-keys", self.client_keys, ("simulated", "node"))
        if self.chain != "tester" and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.chain):
            why = " (ws(s):// needs web3's async API; use the node's http(s) URL)" if self.chain.startswith("ws") else ""
            raise ConfigError(f"ledger.chain: {self.chain!r} is neither 'tester' nor an http(s):// URL{why}")
        if self.contract and not re.fullmatch(r"0x[0-9a-fA-F]{40}", self.contract.strip()):
            raise ConfigError(f"ledger.contract: {self.contract!r} is not an address (0x and 40 hex digits)")
        choice("ledger.slashed-to", self.slashed_to, ("pool", "burn"))
        for key, value in (("ledger.pool", self.pool), ("ledger.reward-per-round", self.reward_per_round),
                           ("ledger.unbonding-seconds", self.unbonding_seconds),
                           ("ledger.free-rider-ratio", self.free_rider_ratio), ("ledger.noise-z", self.noise_z),
                           ("ledger.oversize-ratio", self.oversize_ratio), ("ledger.harmful-ratio", self.harmful_ratio)):
            if value < 0:
                raise ConfigError(f"{key}: must be >= 0, got {value}")
        for key, value in (("ledger.stake", self.stake), ("ledger.min-stake", self.min_stake)):
            if math.isfinite(value) and int(Decimal(str(value)) * 10**18) < 1:  # FedLedger refuses a zero stake:
                # it would pass registration and then fail commit and unbond, the account locked for good
                raise ConfigError(f"{key}: must be at least 1 wei (1e-18 ether): FedLedger refuses a zero stake, "
                                  f"got {value}")
        if (self.client_keys == "simulated" and not self.contract and math.isfinite(self.min_stake)
                and self.stake < self.min_stake):
            raise ConfigError(f"ledger.stake: {self.stake} is below ledger.min-stake ({self.min_stake}), which the "
                              "contract deployed for this run would refuse")
        positive("ledger.validation-examples", self.validation_examples)
        self.check_disputes()
        positive("ledger.shapley-permutations", self.shapley_permutations)
        self.penalty_map()

    def check_disputes(self) -> None:
        """The dispute keys: only checked beyond their sign when disputes are on."""
        if self.challenge_window < 0:
            raise ConfigError(f"ledger.challenge-window: must be >= 0 seconds (0: disputes off), got "
                              f"{self.challenge_window}")
        if self.challenge_window == 0:
            return
        positive("ledger.voting-seconds", self.voting_seconds)
        for key, value in (("ledger.dispute-bond", self.dispute_bond), ("ledger.aggregator-bond", self.aggregator_bond)):
            if not math.isfinite(value) or int(Decimal(str(value)) * 10**18) < 1:
                raise ConfigError(f"{key}: must be at least 1 wei (1e-18 ether) with disputes on, got {value}")
        if not 0 < self.dispute_quorum <= 1:
            raise ConfigError(f"ledger.dispute-quorum: must be in (0, 1], got {self.dispute_quorum}")
        if not self.contract and self.unbonding_seconds < self.voting_seconds:  # FedLedger's BadDisputeRules
            raise ConfigError(f"ledger.unbonding-seconds: must be at least ledger.voting-seconds ({self.voting_seconds}) "
                              f"with disputes on, or a voter could withdraw and vote again; got {self.unbonding_seconds}")

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
    """The attack.clients kinds: fedllm.client.attacks' registry (a light module), with server.plugins'."""
    from fedllm.client.attacks import ATTACKS

    return tuple(ATTACKS.names())


@dataclass
class AttackConfig:
    clients: str = option("Simulation only: dishonest clients, 'partition=kind,...'; kinds: zero (a free rider: "
                          "sends the global state back), noise (Gaussian update of noise-scale x its honest norm), "
                          "sign-flip (minus its update), scale (its update x attack.scale), replay (its previous "
                          "round's reply again), duplicate (a copy of partition attack.victim's update), label-flip "
                          "(trains on its examples with the responses shuffled), crash (raises mid-round: a fault "
                          "for dropout tests).", "")
    noise_scale: float = option("Norm of the noise attacker's update relative to its honest update's.", 1.0, check="> 0")
    scale: float = option("Factor the scale attacker multiplies its update by.", 10.0, check="finite")
    victim: int = option("Partition whose update the duplicate attacker copies.", 0, check=">= 0")

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
