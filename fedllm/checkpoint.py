"""Checkpoints: what the server needs to go on after a crash, written after every round.

RUN_DIR/checkpoint.pt holds the round number, the config, the strategy's `state_dict()` (the
method's: global state, downlink history, error-feedback residual; the rule chain's: server
optimizer moments, by position and name), the random number generators' states, the ledger
cursor and the metrics rows so far. What each node holds is not kept: a resumed run is a new
Flower run whose nodes start empty, so they get the full state first.
It is written to a temporary file, flushed to disk and renamed over the old one, so a kill at
any moment leaves the previous round's checkpoint or the new one, never half of one.

    fedllm simulate --resume runs/NAME            # continues after the last finished round

The file is a pickle (torch.save) of the run's own state: load only checkpoints you wrote.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedllm.errors import ConfigError

log = logging.getLogger(__name__)

FILE = "checkpoint.pt"
FORMAT = 2  # 2: named state_dicts (1 pickled the strategy's attributes)
MAY_DIFFER = frozenset({"server.resume", "server.num-rounds", "server.run-dir", "server.run-name"})


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write RUN_DIR/checkpoint.pt atomically (temporary file, fsync, rename, fsync the folder)."""
    path = Path(run_dir) / FILE
    tmp = path.with_name(FILE + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load(run_dir: Path, flat_config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of `run_dir`, checked against the config of the run that resumes it.

    Raises:
        ConfigError: naming server.resume when there is no readable checkpoint, or the first
            config key that differs from the checkpointed run's.
    """
    path = Path(run_dir) / FILE
    if not path.exists():
        raise ConfigError(f"server.resume: {path} does not exist (no round finished, or server.checkpoint was off)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or foreign file
        raise ConfigError(f"server.resume: cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"server.resume: {path} is not a fedllm checkpoint of format {FORMAT}")
    saved = ckpt["config"]
    for key in sorted(set(saved) | set(flat_config)):
        if key not in MAY_DIFFER and saved.get(key) != flat_config.get(key):
            raise ConfigError(f"server.resume: {key} is {flat_config.get(key)!r}, the checkpointed run had "
                              f"{saved.get(key)!r}; a resumed run keeps its config (only server.num-rounds may grow)")
    if flat_config["server.num-rounds"] < ckpt["round"]:
        raise ConfigError(f"server.num-rounds: {flat_config['server.num-rounds']} is below the "
                          f"{ckpt['round']} rounds the checkpoint has done")
    return ckpt

