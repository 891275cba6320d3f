"""Nothing calls out unasked: the usage telemetry and update checks of fedllm's dependencies are off
by default, in every fedllm process (the CLI, the ServerApp, the ClientApp and the warm worker call
`quiet_environment()` first).

    from fedllm.privacy import quiet_environment
    quiet_environment()          # before torch, transformers, mlflow, wandb or ray is imported

Each variable is set only where it is unset (`os.environ.setdefault`): a user who exports one, e.g.
`WANDB_MODE=online` or `FLWR_TELEMETRY_ENABLED=1`, opts back in. Several libraries read theirs once,
at import (huggingface_hub, Flower, Ray), hence "first". The names are the installed packages' own
(checked by tests/test_privacy.py against their sources).
"""

from __future__ import annotations

import os
from typing import MutableMapping

# variable -> value, and which library reads it for what
QUIET: dict[str, str] = {
    "DO_NOT_TRACK": "1",                  # https://donottrack.sh: huggingface_hub, MLflow (as "true") and others
    "HF_HUB_DISABLE_TELEMETRY": "1",      # huggingface_hub's send_telemetry (transformers, TRL, datasets)
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",     # datasets' download-count ping to S3 on every load_dataset, local files too
    "MLFLOW_DISABLE_TELEMETRY": "true",   # MLflow's usage events and its installation id in ~/.config/mlflow
    "WANDB_MODE": "offline",              # wandb: runs stay on disk (`wandb sync` uploads one on purpose)
    "WANDB_ERROR_REPORTING": "false",     # wandb's crash reports (Sentry)
    "RAY_USAGE_STATS_ENABLED": "0",       # Ray's usage stats report
    "FLWR_TELEMETRY_ENABLED": "0",        # Flower's telemetry events
    "FLWR_DISABLE_UPDATE_CHECK": "1",     # Flower's check for a newer flwr on PyPI
}


def quiet_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Turn off the dependencies' telemetry where the user has not chosen: QUIET's variables, each
    only when unset. Returns the ones this call set (an empty dict when the user set them all)."""
    env = os.environ if environ is None else environ
    chosen: dict[str, str] = {}
    for name, value in QUIET.items():
        if name not in env:
            env[name] = value
            chosen[name] = value
    return chosen
