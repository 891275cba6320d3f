"""The [server] section: rounds, sampling, timeouts, evaluation, aggregation, the run directory, and
asynchronous rounds (server.mode)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from fedllm.config.fields import check_device, choice, option, positive
from fedllm.errors import ConfigError


@dataclass
class ServerConfig:
    num_rounds: int = option("Federated rounds.", 3, check="> 0")
    strategy: str = option(
        "Rule chain: an aggregation rule then server optimizers, each with optional literal arguments, e.g. 'fedavg', "
        "'trimmed-mean(fraction=0.2) > fedadam(lr=0.01)', 'krum(f=2)', 'fedprox(mu=0.1)', 'fedadam', or a rule "
        "function 'module:function(arg=1)' (called with updates, cfg and its arguments as keywords); '' picks the "
        "method's default rule (fedavg; exact-lora: stack).", "")
    fraction_train: float = option("Share of connected clients sampled each round.", 1.0, check="(0, 1]")
    clients_per_round: int = option("Clients sampled each round; 0: server.fraction-train of the connected clients.",
                                   0, check=">= 0")
    min_clients: int = option("Fewest clients a round needs.", 2, check="> 0")
    round_timeout: float = option("Seconds to wait for client replies; a client that has not replied by then is "
                                  "counted as missing.", 3600.0, check="> 0")
    min_replies: int = option("Fewest valid replies a round needs; with fewer the round is retried.", 1, check="> 0")
    round_retries: int = option("Times a round with too few valid replies is tried again before the run stops "
                                "(its checkpoint kept for --resume).", 1, check=">= 0")
    max_reply_bytes: int = option("Largest update payload accepted, in bytes; 0: the strategy's default (three "
                                  "times the dense float32 adapter for LoRA, the largest valid factors for exact-lora, "
                                  "the largest possible upload for zo).", 0, check=">= 0")
    max_update_norm: float = option("Replies whose update has a larger L2 norm are dropped (LoRA delta, or zo "
                                    "per-seed sums); 0: no bound.", 0.0, check=">= 0")
    checkpoint: bool = option("Write RUN_DIR/checkpoint.safetensors after every round (atomically, data only), for --resume.", True)
    resume: str = option("A run directory to continue from its checkpoint (what `fedllm simulate --resume` "
                         "sets); the config must match that run's.", "")
    evaluate: bool = option("Evaluate the global model on the held-out split.", True)
    eval_every: int = option("Evaluate every N rounds (0: only before the first and after the last).", 1, check=">= 0")
    eval_batch_size: int = option("Batch size of server-side evaluation.", 16, check="> 0")
    exact_match_examples: int = option("Held-out examples scored by greedy generation.", 16, check=">= 0")
    max_new_tokens: int = option("Generation limit for exact match.", 16, check="> 0")
    eval_tasks: str = option("lm-eval tasks run on the global model at every evaluation (server.eval-every), e.g. "
                             "'fedllm_builtin,fedllm_builtin_mc' (fedllm's own, offline) or hub tasks such as 'mmlu' "
                             "(need their data reachable or cached); '' runs none.", "")
    eval_limit: int = option("Examples per lm-eval task (0: all).", 0, check=">= 0")
    eval_include_path: str = option("Folders of your own lm-eval task YAML, comma separated.", "")
    trackers: str = option("Experiment trackers through accelerate, comma separated: tensorboard, mlflow, wandb, aim. "
                           "Offline, inside the run directory: tensorboard/ (event files), mlruns/ (MLflow: mlflow.db, SQLite), "
                           "wandb/ (offline mode: `wandb sync` uploads it), .aim (`aim up` shows it); or one a "
                           "server.plugins module registers (fedllm.reporting.tracking.TRACKERS).", "")
    plugins: str = option("Your own modules, comma separated (e.g. 'my_pkg.codecs, my_pkg.rules'), imported when the "
                          "config is built, on the server and on every client, before any key names what they register "
                          "(codecs, rules, server optimizers, metrics, trackers, attacks).", "")
    run_dir: str = option("Parent folder of run directories.", "runs")
    run_name: str = option("Run directory name; '' picks a timestamp.", "")
    merge: bool = option("Also save the adapter merged into a full model.", False)
    init_from: str = option("An adapter folder (a run's RUN_DIR/adapter, PEFT format) the global adapter starts from "
                            "instead of a fresh one: e.g. DPO rounds after SFT rounds. Its rank, alpha, modules and "
                            "adapter type must match lora.*; '' starts fresh.", "")
    aggregation: str = option(
        "auto: fold each reply into a running sum as it arrives when the rule is a sum (fedavg, fedprox, fedkseed), "
        "the ledger is off and the round's replies could exceed server.stream-bytes, else keep the round's list "
        "(summed in partition order: bit-reproducible whatever the arrival order); stream (refused for rules that "
        "need every update); list.", "auto")
    stream_bytes: int = option("With server.aggregation=auto, stream when sampled clients x the largest valid reply "
                               "exceeds this many bytes.", 268435456, check="> 0")
    aggregators: str = option(
        "Processes that fold a streamed round: 1 (the server's own), N >= 2 (a tree of N shared-memory workers), or "
        "auto (one per 16 sampled clients, at most half the cores).", "1")
    device: str = option("Where the server evaluates, merges and scores: auto (a GPU where this process sees one, "
                         "else the CPU), cpu, cuda or cuda:N.", "auto")
    node_state: int = option("Nodes whose downlink version the server remembers (the most recently sampled); a node "
                             "beyond that is sent the full state next time.", 4096, check="> 0")
    mode: str = option("sync: each round waits for its sampled clients (or server.round-timeout); async: buffered "
                       "asynchronous rounds (FedBuff): server.concurrency clients train at all times, every "
                       "server.buffer-size replies make a new global version (a row of metrics.jsonl; "
                       "server.num-rounds counts versions), and an idle client is sent the newest.", "sync")
    concurrency: int = option("server.mode=async: clients training at once; 0: server.clients-per-round, else every "
                              "connected client.", 0, check=">= 0")
    buffer_size: int = option("server.mode=async: accepted replies per global version; 0: half of "
                              "server.concurrency, rounded up.", 0, check=">= 0")
    staleness_exponent: float = option("server.mode=async: a reply trained s versions ago weighs (1 + s)^-a "
                                       "(FedBuff's 1/sqrt(1 + s) at 0.5; 0: no discount).", 0.5, check=">= 0")
    max_staleness: int = option("server.mode=async: replies trained more than this many versions ago are dropped "
                                "(0: none are).", 16, check=">= 0")
    async_lr: float = option("server.mode=async: server learning rate on each version's aggregate of the "
                             "staleness-weighted updates.", 1.0, check="> 0")
    version_wait: float = option("server.mode=async: an idle client waits for the version being made, rather than "
                                 "train on the current one, when the replies in flight are expected to make it "
                                 "within this fraction of the client's own work time (each node's: a moving average "
                                 "of its replies' seconds); 0: never waits (FedBuff as published).", 0.5,
                                 check=">= 0")
    simulate_delay: str = option("Simulated slow clients, 'partition=factor,...' (e.g. '3=8'): that client "
                                 "waits (factor - 1) x its own work's seconds (sync, train, encode; not the model's "
                                 "first load) before it replies, as a site factor times slower would; for tests and "
                                 "benchmarks of server.mode.", "")

    def __post_init__(self) -> None:
        # first: the sections built after [server] (compression, attack, ...) check names against
        # registries that these modules may add to
        from fedllm.plugins import import_plugins

        import_plugins(self.plugins)
        positive("server.num-rounds", self.num_rounds)
        if self.run_name and (self.run_name.strip(". ") == "" or any(c in self.run_name for c in "/\\\0")):
            raise ConfigError(f"server.run-name: a folder name, not a path ({self.run_name!r}); server.run-dir is "
                              "the folder it goes in")
        check_device(self.device, "server.device")
        choice("server.aggregation", self.aggregation, ("auto", "stream", "list"))
        choice("server.mode", self.mode, ("sync", "async"))
        self.delays()
        if self.mode == "async" and self.concurrency and self.buffer_size > self.concurrency:
            raise ConfigError(f"server.buffer-size: {self.buffer_size} replies per version cannot come from "
                              f"server.concurrency={self.concurrency} clients in flight without each sending "
                              "several of one version; at most the concurrency")
        self.aggregator_count(1)
        self.tracker_names()
        positive("server.min-clients", self.min_clients)
        positive("server.min-replies", self.min_replies)
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
            return max(1, min(usable_cores() // 2, math.ceil(pending / 16)))
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"server.aggregators: must be auto or a whole number >= 1, got {self.aggregators!r}")
        return int(value)

    def delays(self) -> dict[int, float]:
        """server.simulate-delay as {partition id: slowness factor >= 1}.

        Raises:
            ConfigError: for an item that is not partition=factor with a finite factor >= 1.
        """
        out: dict[int, float] = {}
        for item in filter(None, (x.strip() for x in self.simulate_delay.split(","))):
            pid, eq, factor = (x.strip() for x in item.partition("="))
            try:
                value = float(factor)
            except ValueError:
                value = math.nan
            if not eq or not pid.isdigit() or not math.isfinite(value) or value < 1:
                raise ConfigError(f"server.simulate-delay: {item!r} is not partition=factor with a factor >= 1 "
                                  "(e.g. '3=8': partition 3 is 8 times slower)")
            out[int(pid)] = value
        return out

    def in_flight(self, connected: int) -> int:
        """server.mode=async: clients training at once (server.concurrency, else
        server.clients-per-round, else every connected client)."""
        return self.concurrency or self.clients_per_round or connected

    def buffer(self, connected: int) -> int:
        """server.mode=async: accepted replies per global version."""
        return self.buffer_size or max(1, math.ceil(self.in_flight(connected) / 2))

    def tracker_names(self) -> list[str]:
        """server.trackers as a list (fedllm.reporting.tracking.check_installed checks the names against its
        registry, which lives above this module)."""
        return [t.strip() for t in self.trackers.split(",") if t.strip()]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity where the OS tells, else every core): what
    bounds the numbers that fork processes (fedllm.server.checks.check_machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)
