"""A SuperNode's warm worker: one long-lived process that keeps the model between messages.

Flower's SuperNode starts a new ClientApp process for every message. With node config
`worker="warm"`, that process (which imports no torch) passes the message's content and the
node's context to this worker over a Unix socket and returns the reply; the worker imported
torch and loaded the model once, so a round starts in well under a second instead of ~10 s.

    python -m fedllm.worker --address /tmp/fedllm-worker-0-123.sock --watch-pid 4567

The first message of a node starts the worker (and waits for it); the worker exits when the
process it watches (the SuperNode's process that started the ClientApp) ends, or after
`--idle` seconds without a message. The socket lives in a 0700 directory of the user's, and
connections must present the key kept beside it (multiprocessing's HMAC handshake).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

from fedllm.errors import FedLLMError, PayloadError

log = logging.getLogger(__name__)
START_TIMEOUT = 300.0  # seconds for a cold worker to answer (imports and the model load)


def worker_dir() -> Path:
    path = Path(os.environ.get("FEDLLM_WORKER_DIR") or Path(tempfile.gettempdir()) / f"fedllm-workers-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def address_for(node_id: int) -> Path:
    return worker_dir() / f"node-{node_id}.sock"


def call(request: Any, context: Any, started: float | None = None) -> Any:
    """Run `client_train.handle(request, context)` in the node's warm worker (started if none
    runs); context.state comes back updated.

    Raises:
        PayloadError: with the worker's error message, when the round failed there.
    """
    address = address_for(context.node_id)
    conn = _connect(address)
    if conn is None:
        with open(address.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one start per node, however many messages race
            conn = _connect(address) or _start(address)
    with conn:
        conn.send((request, context, started))
        status, payload, state = conn.recv()
    if status != "ok":
        raise PayloadError(f"warm worker: {payload}")
    context.state = state
    return payload


def _connect(address: Path) -> Any:
    key = address.with_suffix(".key")
    if not address.exists() or not key.exists():
        return None
    try:
        return Client(str(address), family="AF_UNIX", authkey=key.read_bytes())
    except (ConnectionRefusedError, FileNotFoundError):
        return None


def _start(address: Path) -> Any:
    address.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "fedllm.worker", "--address", str(address), "--watch-pid", str(os.getppid())]
    with open(address.with_suffix(".log"), "a") as log_file:
        subprocess.Popen(cmd, start_new_session=True, stdin=subprocess.DEVNULL, stdout=log_file,
                         stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        conn = _connect(address)
        if conn is not None:
            return conn
        time.sleep(0.1)
    raise FedLLMError(f"warm worker did not start within {START_TIMEOUT:.0f} s; see {address.with_suffix('.log')}")


def serve(address: Path, watch_pid: int, idle: float) -> None:
    """Answer requests until the watched process ends or `idle` seconds pass without one."""
    from fedllm.client_train import handle  # the imports a per-message process would pay for

    key = secrets.token_bytes(32)
    key_file = address.with_suffix(".key")
    with contextlib.suppress(FileNotFoundError):
        key_file.unlink()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, key)
    os.close(fd)
    last = [time.monotonic()]

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            gone = watch_pid > 1 and not _alive(watch_pid)
            if gone or time.monotonic() - last[0] > idle:
                log.info("warm worker %s: exiting (%s)", address.name, "parent gone" if gone else "idle")
                for path in (address, key_file):
                    path.unlink(missing_ok=True)
                os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    with Listener(str(address), family="AF_UNIX", authkey=key) as listener:
        log.info("warm worker %s: ready", address.name)
        while True:
            with listener.accept() as conn:
                request, context, started = conn.recv()
                last[0] = time.monotonic()
                try:
                    reply = handle(request, context, started)
                    conn.send(("ok", reply, context.state))
                except Exception as err:  # reported to the ClientApp, which fails the message
                    log.exception("warm worker: round failed")
                    conn.send(("error", f"{type(err).__name__}: {err}", None))
                last[0] = time.monotonic()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description="fedllm's warm worker for one SuperNode")
    parser.add_argument("--address", type=Path, required=True)
    parser.add_argument("--watch-pid", type=int, default=0)
    parser.add_argument("--idle", type=float, default=1800.0, help="seconds without a message before exiting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.address, args.watch_pid, args.idle)


if __name__ == "__main__":
    main()
