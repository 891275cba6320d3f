"""A local dev chain: anvil (Foundry's Ethereum node, from a checkout's npm install) on
127.0.0.1, for the tests, the benches and a first try of ledger.chain with a node URL."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from fedllm.ledger.chain import LedgerError

ANVIL = Path(__file__).resolve().parents[2] / "contracts" / "node_modules" / ".bin" / "anvil"  # a checkout's npm install


@contextlib.contextmanager
def anvil(accounts: int = 10, timeout: float = 30.0) -> Iterator[str]:
    """Start anvil (npm @foundry-rs/anvil, installed by `make` into contracts/node_modules) on
    127.0.0.1 at a free port; yields its URL and stops it after, also on failure.

    Raises:
        LedgerError: when anvil is not installed or does not answer within `timeout` seconds.
    """
    import socket
    import subprocess
    import time

    if not ANVIL.exists():
        raise LedgerError(f"{ANVIL}: not installed (npm install --prefix contracts)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(ANVIL), "--host", "127.0.0.1", "--port", str(port), "--accounts", str(accounts),
                             "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode(errors="replace")[-500:] if proc.poll() is not None else ""
                raise LedgerError(f"anvil did not start on {url}: {err or 'timed out'}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
