"""The process's global generators (Python's, NumPy's and torch's) as data: a checkpoint saves
them (fedllm.server.checkpoint), and lm-eval runs between a save and a restore so that the run's
own sampling and noise do not notice it (fedllm.evaluation.harness)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
