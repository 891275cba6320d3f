"""Checkpoints: what the server needs to go on after a crash, written after every round.

RUN_DIR/checkpoint.safetensors holds the round number, the config, the strategy's
`state_dict()` (the method's: global state, downlink history, error-feedback residual; the
rule chain's: server optimizer states, by position and name), the random number generators'
states, the ledger cursor and the metrics rows so far. What each node holds is not kept: a
resumed run is a new Flower run whose nodes start empty, so they get the full state first.

The format is data only, so a run folder someone sends you cannot run code when resumed: the
tensors (and byte strings, as uint8 tensors) are safetensors entries, and everything else is
JSON in the safetensors header's metadata, with each tensor, byte string, tuple and dict
written as a small tagged object. Nothing is unpickled. It is written to a temporary file,
flushed to disk and renamed over the old one, so a kill at any moment leaves the previous
round's checkpoint or the new one, never half of one.

    fedllm simulate --resume runs/NAME            # continues after the last finished round
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fedllm.errors import ConfigError
from fedllm.files import FileFormatError, check, parse_json
from fedllm.reporting.runlog import row_spec
from fedllm.states import from_data, to_data

log = logging.getLogger(__name__)

FILE = "checkpoint.safetensors"
FORMAT = 3  # 3: data only (safetensors + JSON); 2 and 1 were pickles
KEY = "fedllm-checkpoint"  # the safetensors metadata entry holding the JSON
# keys a resumed run may change: where it runs, how long, and what it evaluates and reports to
MAY_DIFFER = frozenset({"server.resume", "server.num-rounds", "server.run-dir", "server.run-name",
                        "server.eval-tasks", "server.eval-limit", "server.eval-include-path", "server.trackers",
                        # where a run trains, not what: a run started on the CPU may go on on a GPU
                        "model.device", "model.device-map", "server.device"})


def save(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Write RUN_DIR/checkpoint.safetensors atomically (temporary file, fsync, rename, fsync
    the folder)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(to_data({"format": FORMAT, **payload}, tensors))
    path = Path(run_dir) / FILE
    tmp = path.with_name(FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(save(tensors, metadata={KEY: meta}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read(path: Path) -> dict[str, Any]:
    """A checkpoint file's content (no config checks: see `load`).

    Raises:
        ConfigError: naming server.resume when the file is not a readable fedllm checkpoint.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # truncated, foreign or tampered file: data only, so nothing ran
        raise ConfigError(f"server.resume: cannot read {path}: {type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0][:200]}") from err
    return decode(meta, tensors, str(path))


def decode(meta: str | None, tensors: dict[str, torch.Tensor], where: str) -> dict[str, Any]:
    """The checkpoint held in a safetensors header's JSON `meta` (its tensors by key), checked to
    have what resuming indexes; `where` names the file in errors.

    Raises:
        ConfigError: naming server.resume and the file (and field) of a damaged or foreign checkpoint.
    """
    try:
        data = parse_json(meta, where) if meta else None
        ckpt = from_data(data, tensors)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise FileFormatError(f"{where} is not a fedllm checkpoint of format {FORMAT}")
        check(ckpt, {"round": int, "config": {"*": object}, "metrics": [row_spec()],
                     "strategy": {"method": dict, "chain": {"optimizers": dict}},
                     "rng": {"python": object, "numpy": object, "torch": object},
                     "ledger": (None, {"contract": str, "round": int, "accounts": dict, "history": object})}, where)
    except FileFormatError as err:
        raise ConfigError(f"server.resume: {err}") from None
    except Exception as err:  # a tag or tensor reference that is not there, a foreign dtype
        raise ConfigError(f"server.resume: cannot read {where}: {type(err).__name__}: "
                          f"{(str(err).splitlines() or [''])[0][:200]}") from None
    return ckpt


def restore(strategy: Any, ckpt: dict[str, Any], where: str) -> None:
    """`strategy.load_state_dict` of a checkpoint's state: a state the run's method cannot take (a
    foreign or damaged file that passed `decode`'s shape check) is one line naming the file.

    Raises:
        ConfigError: naming server.resume, the file and train.method.
    """
    try:
        strategy.load_state_dict(ckpt["strategy"])
    except ConfigError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        method = ckpt["config"].get("train.method", "?")
        raise ConfigError(f"server.resume: {where}: its state does not fit train.method={method} "
                          f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})") from None


def saved_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The checkpointed run's flat config; a key added since it was written had its default then."""
    from fedllm.config import Config

    return {**Config().to_flat(), **ckpt["config"]}


def load(run_dir: Path, flat_config: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint of `run_dir`, checked against the config of the run that resumes it.

    Raises:
        ConfigError: naming server.resume when there is no readable checkpoint, or the first
            config key that differs from the checkpointed run's.
    """
    path = Path(run_dir) / FILE
    if not path.exists():
        raise ConfigError(f"server.resume: {path} does not exist (no round finished, or server.checkpoint was off)")
    ckpt = read(path)
    saved = saved_config(ckpt)
    for key in sorted(set(saved) | set(flat_config)):
        if key not in MAY_DIFFER and saved.get(key) != flat_config.get(key):
            raise ConfigError(f"server.resume: {key} is {flat_config.get(key)!r}, the checkpointed run had "
                              f"{saved.get(key)!r}; a resumed run keeps its config (only server.num-rounds may grow)")
    if flat_config["server.num-rounds"] < ckpt["round"]:
        raise ConfigError(f"server.num-rounds: {flat_config['server.num-rounds']} is below the "
                          f"{ckpt['round']} rounds the checkpoint has done")
    return ckpt

