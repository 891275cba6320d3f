"""Every check `fedllm simulate` runs before an engine starts, so a mistake fails fast with one
line instead of inside a worker: the config (`check_config`, fedllm.server.checks: what the config
alone decides, which the ServerApp runs again under `flwr run`), the partitions, the devices, the
lm-eval tasks, the run directory, the resources a client gets; `prepare` runs them and returns the
run's overrides."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedllm.config import Config
from fedllm.errors import FedLLMError
from fedllm.server.checks import check_config

log = logging.getLogger("fedllm")


def resources(cpus_per_client: float | None, gpus_per_client: float | None,
              ray_address: str = "") -> tuple[float, float | None, int]:
    """(CPUs a client, GPUs a client, GPUs of this machine) for a simulation (see `simulate`). A
    cluster's GPUs are its own: its share is checked (or, left out, chosen: None here) once the
    driver has joined it (`check_cluster`).

    Raises:
        FedLLMError: naming --cpus-per-client for more CPUs than a node has (Ray's actor pool would
            stay empty), or --gpus-per-client for a share this machine cannot give.
    """
    most = (os.cpu_count() or 1) * (64 if ray_address else 1)  # the CPUs Ray has here; a cluster's nodes, theirs
    if cpus_per_client is not None and not 0 < cpus_per_client <= most:  # before torch: a flag's mistake is quick
        raise FedLLMError(f"--cpus-per-client in (0, {most}] (at most a Ray node's CPUs); got {cpus_per_client}")
    from fedllm import devices

    available = devices.visible_gpus()
    if ray_address:
        gpus = None if gpus_per_client is None else devices.gpu_share(gpus_per_client, None)
    else:
        gpus = devices.gpu_share(gpus_per_client, available)
    cores = float(os.cpu_count() or 1)
    if cpus_per_client is None:  # split the cores among the clients that run at once
        at_once = int(available // gpus) if gpus and available and not ray_address else 1
        cpus_per_client = cores / max(at_once, 1)
    return cpus_per_client, gpus, available


def prepare(overrides: dict[str, Any], num_clients: int, resume: Path | None,
            local_clients: bool = True) -> tuple[dict[str, Any], Path]:
    """Every check that can run before Ray starts; returns the final overrides (with the run
    name fixed) and the run directory. `local_clients`: the clients run on this machine (not on
    a Ray cluster's nodes), so their model.device is checked here too."""
    from fedllm.methods import data_splits
    from fedllm.model import check_available
    from fedllm.reporting.tracking import check_installed

    if resume is not None:
        overrides = {**resumed_config(resume), **overrides, "server.resume": str(resume),
                     "server.run-dir": str(resume.parent), "server.run-name": resume.name}
    overrides = dict(overrides)
    overrides.setdefault("server.run-name", time.strftime("%Y%m%d-%H%M%S"))
    if overrides.get("server.init-from"):  # saved in the run's config: absolute, whatever the cwd later
        overrides["server.init-from"] = str(Path(str(overrides["server.init-from"])).expanduser().resolve())
    cfg = Config.from_flat(overrides)
    if num_clients < 1:  # --cpus-per-client: bounded in `resources`, which chose it
        raise FedLLMError(f"--num-clients must be >= 1; got {num_clients}")
    check_config(cfg, num_clients)  # what the config alone decides, the rule chain's checks last
    check_installed(cfg)  # server.trackers
    check_tasks(cfg)
    if cfg.ledger.enabled:
        from fedllm.ledger.chain import preflight

        preflight(cfg)
    train, held_out = data_splits(cfg)
    check_partitions(train, cfg, num_clients, held_out)
    check_devices(cfg, local_clients)
    check_available(cfg.model)  # converts a GGUF once, before workers start; a hub id fails fast
    if cfg.server.init_from and resume is None:  # the adapter fits the run's lora.* (before any round starts)
        from fedllm.methods.adapters.engine import init_adapter_state, read_adapter

        read_adapter(Path(cfg.server.init_from), init_adapter_state(cfg.model, cfg.lora, cfg.train.seed), cfg.lora)
    run_dir = Path(cfg.server.run_dir).expanduser() / cfg.server.run_name
    check_writable(run_dir)
    if resume is None and (run_dir / "metrics.jsonl").exists():
        raise FedLLMError(f"server.run-name: {run_dir} holds a run already; pick another name")
    if resume is not None:
        from fedllm.server import checkpoint

        checkpoint.load(resume, cfg.to_flat())  # fails here, before Ray starts
    return overrides, run_dir


def check_partitions(train: list[dict[str, str]], cfg: Config, num_clients: int,
                     held_out: list[dict[str, str]] | None = None) -> None:
    """Every client's partition of the training data is non-empty, and the data sizes fit what a
    round needs (fedllm.data.check_sizes; checked before Ray starts).

    Raises:
        FedLLMError: naming the data key, the counts and what to change.
    """
    from fedllm.data import check_sizes

    check_sizes(train, held_out, cfg, num_clients)


def check_devices(cfg: Config, local_clients: bool) -> None:
    """server.device (the ServerApp runs in this process's engine) and, for clients on this machine,
    model.device exist here; model.quantize has a bitsandbytes kernel on the clients' device; a
    paged optimizer has a GPU. The clients' devices in Ray are the GPUs Ray gives them: checked as
    this process sees the machine's GPUs.

    Raises:
        ConfigError: naming the key.
    """
    from fedllm import devices
    from fedllm.methods.adapters.engine import check_optimizer
    from fedllm.model import check_quantization

    devices.resolve(cfg.server.device, "server.device")
    if local_clients:
        device = devices.resolve(cfg.model.device, "model.device")
        check_quantization(cfg.model, device)
        check_optimizer(cfg.train, device)
        devices.precision(cfg.train.precision, device)


def check_tasks(cfg: Config) -> None:
    """server.eval-tasks known to lm-eval (fedllm's own tasks written to a scratch folder)."""
    import tempfile

    from fedllm.evaluation.harness import parse_tasks
    from fedllm.methods import data_splits
    from fedllm.server.evaluator import eval_tasks

    if parse_tasks(cfg.server.eval_tasks):
        with tempfile.TemporaryDirectory() as tmp:
            eval_tasks(cfg, Path(tmp), data_splits(cfg)[1][:1])


def check_writable(run_dir: Path, min_free: int = 64 << 20) -> None:
    """The run directory can be created and written, with some room left (checked on its
    nearest existing folder, which this creates nothing in).

    Raises:
        FedLLMError: naming server.run-dir.
    """
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise FedLLMError(f"server.run-dir: {existing} is not a writable folder (for the run directory {run_dir})")
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise FedLLMError(f"server.run-dir: only {free >> 20} MiB free on {existing}; a run needs room for its "
                          "checkpoints and results")


def written_since(path: Path, since: float) -> bool:
    """Whether `path` exists and was (re)written at or after `since` (a second of slack for
    file systems with coarse times)."""
    return path.exists() and path.stat().st_mtime >= since - 1.0


def resumed_config(run_dir: Path) -> dict[str, Any]:
    """The flat config a run directory was started with (its config.json), read through the
    checked path (fedllm.files): a damaged or foreign file is one line naming it."""
    from fedllm.files import FileFormatError
    from fedllm.reporting.runlog import read_config

    path = run_dir / "config.json"
    if not path.is_file():
        raise FedLLMError(f"--resume: {path} does not exist; not a fedllm run directory")
    try:
        return read_config(run_dir)
    except FileFormatError as err:
        raise FedLLMError(f"--resume: {err}") from None
