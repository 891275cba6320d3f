"""Every check the config alone decides, in one place: `fedllm simulate`'s pre-flight runs it
before any engine starts, and the ServerApp (so also `flwr run`) before its first round, so all
three refuse a config with the same one line.

    check_config(cfg, num_clients=4)   # a simulation of 4 clients: its size is known
    check_config(cfg)                  # a deployment: nodes come and go

The checks that need no rule chain import no torch and come first, so they answer in well under
a second; strategies.resolve (the method and the rule chain's cross-checks) comes last. Numbers
that size this machine's work (server.aggregators) are bounded by what it has: checked where the
server runs, never when a client builds the same config on a smaller machine.
"""

from __future__ import annotations

from fedllm.config import Config
from fedllm.config.federation import usable_cores
from fedllm.errors import ConfigError


def check_config(cfg: Config, num_clients: int | None = None, chain: bool = True) -> None:
    """The config's cross-checks: the method's own (e.g. no server.merge of a prompt-type adapter),
    the round size against server.min-replies and secagg.*, and with `num_clients` (a simulation)
    against the federation's size, lora.policy and attack.*; this machine's bounds; with `chain`,
    the rule chain's (strategies.resolve, which imports torch).

    Raises:
        ConfigError: naming the first key that does not fit.
    """
    from fedllm.methods import check_spec

    check_spec(cfg)  # the method's spec against the config (codecs, DP, quantization, ...) and its own check
    if num_clients is not None:
        check_simulation(cfg, num_clients)
    check_round(cfg, num_clients)
    check_machine(cfg)
    if chain:
        from strategies import resolve  # torch: after every check that needs none

        resolve(cfg)


def round_size(cfg: Config, num_clients: int | None) -> int | None:
    """Clients a round samples (as FedLLMStrategy.sample): server.clients-per-round, or else
    server.fraction-train of the `num_clients` connected, at least server.min-clients; None when
    that depends on how many nodes connect."""
    server = cfg.server
    if server.clients_per_round:
        return server.clients_per_round
    if num_clients is None:
        return None
    return max(int(num_clients * server.fraction_train), server.min_clients)


def check_round(cfg: Config, num_clients: int | None = None) -> None:
    """server.min-replies and secagg.* against the clients a round samples (a round of unknown
    size is checked at server.min-clients, its smallest; each secure round checks its own again).

    Raises:
        ConfigError: naming server.min-replies or the secagg key.
    """
    size = round_size(cfg, num_clients)
    if size is not None and cfg.server.min_replies > size:
        raise ConfigError(f"server.min-replies: {cfg.server.min_replies} valid replies needed, but a round samples "
                          f"{size} clients{_sampled_by(cfg)}: every round would fail")
    if cfg.secagg.enabled:
        from fedllm.secagg.core import check as check_secagg

        check_secagg(cfg, size if size is not None else cfg.server.min_clients)


def _sampled_by(cfg: Config) -> str:
    server = cfg.server
    if server.clients_per_round:
        return " (server.clients-per-round)"
    return f" (server.fraction-train={server.fraction_train:g}, at least server.min-clients={server.min_clients})"


def check_simulation(cfg: Config, num_clients: int) -> None:
    """What a simulation of `num_clients` clients cannot give: rounds larger than it (the round
    would wait for nodes that never come), node resources for lora.policy=resources (a
    simulated node's node config holds only its partition), attacks on partitions it lacks.

    Raises:
        ConfigError: naming the key.
    """
    server = cfg.server
    if num_clients < 1:
        raise ConfigError(f"--num-clients: a simulation needs at least 1 client, got {num_clients}")
    for key, wanted in (("server.min-clients", server.min_clients),
                        ("server.clients-per-round", server.clients_per_round)):
        if wanted > num_clients:
            raise ConfigError(f"{key}: {wanted} clients a round, but the simulation has {num_clients} "
                              "(--num-clients, or options.num-supernodes under flwr run): the round would wait for "
                              "nodes that never come")
    if server.mode == "async":
        if server.concurrency > num_clients:
            raise ConfigError(f"server.concurrency: {server.concurrency} clients in flight, but the simulation has "
                              f"{num_clients}: at most that many")
        buffer, flying = server.buffer(num_clients), server.in_flight(num_clients)
        if buffer > flying:
            raise ConfigError(f"server.buffer-size: {buffer} replies per version from {flying} clients in flight "
                              "(server.concurrency, else server.clients-per-round or every client): at most that many")
    slow = sorted(p for p in server.delays() if p >= num_clients)
    if slow:
        raise ConfigError(f"server.simulate-delay: partition {slow[0]} is not among the simulation's {num_clients} "
                          f"(0 to {num_clients - 1})")
    if cfg.lora.policy == "resources":
        raise ConfigError("lora.policy: resources reads each SuperNode's node config memory-mb, which a simulated "
                          "node lacks; use lora.client-ranks and model.client-quantize in a simulation")
    attacked = cfg.attack.kinds()
    beyond = sorted(p for p in attacked if p >= num_clients)
    if beyond:
        raise ConfigError(f"attack.clients: partition {beyond[0]} is not among the simulation's {num_clients} "
                          f"(0 to {num_clients - 1})")
    if "duplicate" in attacked.values() and cfg.attack.victim >= num_clients:
        raise ConfigError(f"attack.victim: partition {cfg.attack.victim} is not among the simulation's "
                          f"{num_clients} (0 to {num_clients - 1})")


def check_machine(cfg: Config, cores: int | None = None) -> None:
    """Numbers that fork processes on the server's machine within what it has: server.aggregators
    at most its cores (`cores`, default `usable_cores()`).

    Raises:
        ConfigError: naming server.aggregators.
    """
    cores = cores or usable_cores()
    value = str(cfg.server.aggregators).strip()
    if value != "auto" and cfg.server.aggregator_count(1) > cores:
        raise ConfigError(f"server.aggregators: {value} worker processes, but this machine has {cores} cores; "
                          f"use auto or at most {cores}")
