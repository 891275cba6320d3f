"""Flower ServerApp: `fedllm.server.app:app` (started by `flwr run .` or `fedllm simulate`) checks
the run config (fedllm.server.checks, as `fedllm simulate`'s pre-flight does: in a simulation
against its number of nodes) and runs the server's recipe (fedllm.server.loop.run) on it; why a
run stopped goes in one line to RUN_DIR/error.txt."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from fedllm.privacy import quiet_environment

quiet_environment()  # before the imports below load huggingface_hub or a tracker (fedllm.privacy)

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm.config import Config
from fedllm.errors import FedLLMError
from fedllm.protocol import short_reason
from fedllm.server.checks import check_config
from fedllm.server.grid import LocalGrid
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


def simulated_nodes(grid: Grid, settle: float = 0.2, wait: float = 5.0) -> int | None:
    """The number of nodes of a simulation's grid (fedllm's in-process one, or Flower's in-memory
    one, whose nodes the engine registers all at once as the ServerApp starts: counted once the
    count holds for `settle` seconds, waiting at most `wait`); None for a deployment's grid, where
    nodes connect when they will.
    """
    if isinstance(grid, LocalGrid):
        return grid.num_nodes
    # Flower's simulation engine has imported its grid's module; this process imports it for
    # nothing else (seconds), so a grid of a module not loaded is not one
    inmemory = sys.modules.get("flwr.superlink.grid.inmemory_grid")
    if inmemory is None or not isinstance(grid, inmemory.InMemoryGrid):
        return None
    seen, since, deadline = -1, time.monotonic(), time.monotonic() + wait
    while time.monotonic() < deadline:
        count = len(list(grid.get_node_ids()))
        if count != seen:
            seen, since = count, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle:
            return count
        time.sleep(settle / 4)
    return None  # no nodes yet, or still arriving: the round's own wait decides


def make_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is the run_config with `overrides` on top."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _log_through_flower()
        cfg = Config.from_flat({**dict(context.run_config), **dict(overrides or {})})
        try:
            check_config(cfg, simulated_nodes(grid))  # the pre-flight's checks, before anything waits for nodes
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
