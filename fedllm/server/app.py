"""Flower ServerApp: `fedllm.server.app:app` (started by `flwr run .` or `fedllm simulate`) runs
the server's recipe (fedllm.server.loop.run) on the run config; why a run stopped goes in one
line to RUN_DIR/error.txt."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm.config import Config
from fedllm.errors import FedLLMError
from fedllm.protocol import short_reason
from fedllm.server.loop import run
from fedllm.server.round import ERROR_FILE, RoundFailed

# Why this process's ServerApp failed, if it did: `fedllm simulate` runs the ServerApp in its
# engine process and ends the engine when this fills (Flower's engine would wait on).
SERVER_FAILED: list[str] = []


def _log_through_flower() -> None:
    """Under `flwr run` nobody configures logging: send fedllm's progress to Flower's handler,
    so that it shows in the run's log stream."""
    ours = logging.getLogger("fedllm")
    if not ours.handlers and not logging.getLogger().handlers:
        ours.handlers = list(logging.getLogger("flwr").handlers)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is the run_config with `overrides` on top."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_through_flower()
        cfg = Config.from_flat({**dict(context.run_config), **dict(overrides or {})})
        try:
            run(grid, cfg)
        except Exception as err:  # why the run stopped, in one line beside its results (if the disk lets us)
            if isinstance(err, RoundFailed):  # it wrote error.txt itself
                SERVER_FAILED.append(str(err))
                raise
            said = str(err) if isinstance(err, FedLLMError) else f"{type(err).__name__}: {err}"
            reason = f"the server stopped: {short_reason(said)}"
            run_dir = Path(cfg.server.resume or Path(cfg.server.run_dir).expanduser() / cfg.server.run_name)
            if cfg.server.run_name and run_dir.is_dir():
                with contextlib.suppress(OSError):
                    (run_dir / ERROR_FILE).write_text(reason + "\n")
            SERVER_FAILED.append(reason)  # for `fedllm simulate`'s engine, which Flower would keep waiting
            raise

    return server_app


app = make_app()
