"""A client's round: global state in, local steps, update out, for any registered method.

`handle(request, context)` turns a train request's content into the reply's content; the
ClientApp (fedllm/client/app.py) runs it in its own process or in the node's warm worker
(fedllm/client/worker.py). The run config travels in every request, so a client needs no config of its
own beyond its node config (partition-id, num-partitions; or data-path, a site's own data
file). The method's client half (train.method) syncs, trains and encodes the upload; the edges
of `handle` are the only places that know about attacks (attack.clients) and the ledger's
signature.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedllm.client.attacks import ATTACKS, Attack
from fedllm.config import Config, check_device
from fedllm.data import encode, load_source, load_splits, pair_text, partition
from fedllm.errors import DataError, PayloadError
from fedllm.methods import METHODS, uses_pairs
from fedllm.methods.base import Transform
from fedllm.model import MODEL_CACHE
from fedllm.protocol import CONFIG, LEDGER, METRICS

log = logging.getLogger(__name__)


def config_from_request(request: RecordDict) -> Config:
    """The run config; keys without a dot are per-round values (server-round, proximal-mu,
    Flower's clipping_norm), not config."""
    flat = {k: v for k, v in request.config_records[CONFIG].items() if "." in k}
    return Config.from_flat(flat)


@functools.lru_cache(maxsize=8)
def client_rows(cfg_items: tuple, tokenizer: Any, partition_id: int, num_partitions: int, site_data: str = "",
                attack: str = "", attack_seed: int = 0) -> tuple[list, int]:
    """Encoded training rows (cached per process) and the example count: the file `site_data`
    (a site's own data, named in its node config as data-path), else one partition of data.source.
    With `attack` (an attack.clients kind with a `data` hook) the examples are what it makes of
    them, seeded by `attack_seed` (label-flip shuffles the responses; pairs swap chosen and
    rejected). A method that trains on pairs (dpo) gets their texts (`pair_text`)."""
    cfg = Config.from_flat(dict(cfg_items))
    pairs = uses_pairs(cfg)
    if site_data:
        mine = load_source(site_data, cfg.data, pairs)
    else:
        train, _ = load_splits(cfg.data, pairs)
        mine = partition(train, cfg.data, num_partitions, partition_id)
    if attack:
        mine = ATTACKS.get(attack).impl.data(mine, attack_seed)
    if pairs:
        return [pair_text(tokenizer, e, cfg.data.system_prompt) for e in mine], len(mine)
    rows = [encode(tokenizer, e, cfg.data.max_length, cfg.data.system_prompt) for e in mine]
    return rows, len(mine)


def node_partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    return int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))


def node_rows(cfg: Config, context: Context, tokenizer: Any, as_partition: int | None = None,
              attack: str | None = None) -> tuple[list, int]:
    """This node's rows; `as_partition` trains on another partition's (the duplicate attack);
    `attack` rewrites the examples where that kind has a `data` hook (label-flip)."""
    pid, n = node_partition(context)
    pid = pid if as_partition is None else as_partition
    data_attack = attack if attack and ATTACKS.get(attack).impl.data is not None else ""
    return client_rows(tuple(sorted(cfg.to_flat().items())), tokenizer, pid, n,
                       str(context.node_config.get("data-path", "")), data_attack,
                       cfg.train.seed + pid if data_attack else 0)


def round_seed(cfg: Config, server_round: int, pid: int) -> int:
    return cfg.train.seed * 1_000_003 + server_round * 1009 + pid


REPLAY = "attack-replay-"  # context.state: a replay attacker's last update records, under this prefix


def replayed(context: Context, metrics: dict[str, Any]) -> RecordDict | None:
    """A replay attacker's previous update records with this round's metrics, or None in its
    first round."""
    held = {key[len(REPLAY):]: context.state[key] for key in list(context.state.keys()) if key.startswith(REPLAY)}
    return RecordDict({**held, METRICS: MetricRecord(metrics)}) if held else None


def keep_for_replay(context: Context, reply: RecordDict) -> None:
    for name in reply.keys():
        if name not in (METRICS, LEDGER):
            context.state[REPLAY + name] = reply[name]


def client_half(request: RecordDict, context: Context) -> tuple[Config, int, Any]:
    """The request's run config, this node's partition id, and the method's client half for them."""
    cfg = on_node_device(config_from_request(request), context)
    pid, _ = node_partition(context)
    return cfg, pid, METHODS.get(cfg.train.method).impl.client(cfg, context, pid)


def given_gpu() -> int:
    """The GPU this client's process was given (the first entry of CUDA_VISIBLE_DEVICES, as Ray sets
    it for an actor with GPUs), -1 for none or one named by UUID: the metric `gpu` of each client."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else -1


def on_node_device(cfg: Config, context: Context) -> Config:
    """The run config with this SuperNode's node config `device` (auto, cpu, cuda, cuda:N) as
    model.device, where it has one: a site decides where its client trains.

    Raises:
        ConfigError: naming the node config key, for a value that is not a device.
    """
    device = context.node_config.get("device")
    if device is None or device == cfg.model.device:
        return cfg
    check_device(device, "node config device")
    return cfg.replace(model__device=str(device).strip())


def handle(request: RecordDict, context: Context, started: float | None = None) -> RecordDict:
    """A train request's content in, the reply's content out (context.state updated).
    `started` (time.time() when the message reached the ClientApp) gives the metric
    start-seconds, the wait until the first training step."""
    started = time.time() if started is None else started
    cfg, pid, half = client_half(request, context)
    loaded = time.time()  # the model is in this process's cache from here on
    server_round = int(request.config_records[CONFIG].get("server-round", 0))
    attack = cfg.attack.kinds().get(pid)
    hooks = ATTACKS.get(attack).impl if attack else Attack()  # an honest client: no hooks
    if hooks.start is not None:
        hooks.start(pid, server_round)
    as_pid = hooks.partition(cfg, pid) if hooks.partition is not None else pid
    # server.mode=async may send a node one version twice: the dispatch number makes each its own run
    seed = round_seed(cfg, server_round, as_pid) + 7919 * int(request.config_records[CONFIG].get("dispatch", 0))
    synced = half.sync(request, seed)
    rows, num_examples = node_rows(cfg, context, half.tokenizer, as_pid, attack)
    if not rows:
        raise DataError(f"partition {as_pid} of {node_partition(context)[1]} has no training examples "
                        "(more clients than examples?)")
    metrics: dict[str, Any] = {
        "num-examples": num_examples,
        "partition-id": pid,
        "server-round": server_round,
        "model-loads": MODEL_CACHE.loads,
        "gpu": given_gpu(),
        **synced,
        "start-seconds": time.time() - started,
    }
    if hooks.replay and (again := replayed(context, {**metrics, "train-loss": 0.0, "steps": 0})):
        return signed(again, request, context, cfg, pid)
    stats = half.train(rows, seed) if hooks.train else {"train-loss": 0.0, "steps": 0}  # a free rider does no work
    metrics.update(stats)
    log.info("client %d round %d: loss %.4f", pid, server_round, stats["train-loss"])
    records = half.upload(poisoning(cfg, hooks, seed))
    slow = cfg.server.delays().get(pid)
    if slow is not None:  # server.simulate-delay: a site `slow` times slower at the round's work (not the model's load)
        time.sleep((slow - 1.0) * (time.time() - loaded))
    metrics["client-seconds"] = time.time() - started  # the message's whole work here: sync, train, encode
    reply = RecordDict({**records, METRICS: MetricRecord(metrics)})
    if hooks.replay:
        keep_for_replay(context, reply)
    return signed(reply, request, context, cfg, pid)


def answer(request: RecordDict, context: Context) -> RecordDict:
    """A query's content in (a method's question before round 1), the reply's content out."""
    cfg, pid, half = client_half(request, context)
    if not hasattr(half, "answer"):
        raise PayloadError(f"train.method={cfg.train.method} answers no queries")
    records = half.answer(request, lambda tokenizer: node_rows(cfg, context, tokenizer), round_seed(cfg, 0, pid))
    return RecordDict(records)


def poisoning(cfg: Config, hooks: Attack, seed: int) -> Transform | None:
    """What a model-poisoning attacker does to its update before encoding it (None: honest)."""
    if hooks.update is None:
        return None
    return lambda delta: hooks.update(delta, seed, cfg)


def signed(content: RecordDict, request: RecordDict, context: Context, cfg: Config, pid: int) -> RecordDict:
    """With the ledger on, add this client's account and its signature over (contract, round,
    update hash), so the server credits or penalises the right account."""
    if not cfg.ledger.enabled:
        return content
    from fedllm.ledger import chain as ledger  # web3 is the optional [ledger] extra
    config = request.config_records[CONFIG]
    if cfg.ledger.client_keys == "simulated":
        account = ledger.derived_account(cfg.ledger.seed, f"client-{pid}")
    else:
        spec = context.node_config.get("ledger-key")
        if not spec:
            raise PayloadError("ledger.client-keys=node: this SuperNode's node config lacks ledger-key")
        account = ledger.read_key(str(spec), "node config ledger-key")
    digest = ledger.update_hash(content)
    if cfg.ledger.commit_reveal:  # on chain before the reply (the reveal) leaves: an original commits first
        from fedllm.ledger.commit import commit_upload

        commit_upload(cfg.ledger, account, str(config["ledger-contract"]), int(config["server-round"]), digest, pid)
    signature = ledger.sign_update(account, str(config["ledger-contract"]), int(config["server-round"]), digest)
    content[LEDGER] = ConfigRecord({"account": account.address, "signature": signature})
    return content
