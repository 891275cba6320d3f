"""A SuperNode's warm worker: one long-lived process that keeps the model between messages.

Flower's SuperNode starts a new ClientApp process for every message. With node config
`worker="warm"`, that process (which imports no torch) passes the message's content and the
node's context to this worker over a Unix socket and returns the reply; the worker imported
torch and loaded the model once, so a round starts in well under a second instead of ~10 s.

    python -m fedllm.client.worker --address /tmp/fedllm-worker-0-123.sock --watch-pid 4567

The first message of a node starts the worker (and waits for it); the worker exits when the
process it watches (the SuperNode's process that started the ClientApp) ends, or after
`--idle` seconds without a message. The socket lives in a directory that must be the user's
own, mode 0700, and not a link (checked with lstat; otherwise the call is refused), and both
ends prove they hold the key kept beside it (multiprocessing's HMAC challenge, each way). What
crosses the socket is data only: Flower's protobuf encoding of the RecordDicts and the
Context, and a JSON header; nothing is unpickled. A connection that fails the handshake or
sends garbage is logged and the worker goes on serving.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from fedllm.errors import FedLLMError, PayloadError
from fedllm.files import nesting_line
from fedllm.privacy import quiet_environment

log = logging.getLogger(__name__)
START_TIMEOUT = 300.0  # seconds for a cold worker to answer (imports and the model load)


MAX_MESSAGE = 1 << 31  # bytes one part of a message may have


def worker_dir() -> Path:
    """The user's private directory of worker sockets and keys.

    Raises:
        FedLLMError: when it is a link, not a directory, someone else's, or open to others
            (another user could answer in the worker's place).
    """
    path = Path(os.environ.get("FEDLLM_WORKER_DIR") or Path(tempfile.gettempdir()) / f"fedllm-workers-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise FedLLMError(f"warm worker directory {path}: must be a directory (not a link) of this user's with mode "
                          f"0700; it is {stat.filemode(st.st_mode)}, owner uid {st.st_uid}. Remove it or set "
                          "FEDLLM_WORKER_DIR to a private directory")
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
    from flwr.common.serde import context_to_proto, recorddict_from_proto, recorddict_to_proto

    with conn:
        send_parts(conn, {"started": started}, recorddict_to_proto(request).SerializeToString(),
                   context_to_proto(context).SerializeToString())
        head, *parts = recv_parts(conn)
    if head.get("status") != "ok" or len(parts) != 2:
        raise PayloadError(f"warm worker: {head.get('error', 'malformed answer')}")
    reply, state = (recorddict_from_proto(_parse_recorddict(raw)) for raw in parts)
    context.state = state
    return reply


def send_parts(conn: Connection, head: dict[str, Any], *parts: bytes) -> None:
    """A JSON header, then byte strings, each its own frame (no pickle)."""
    body = json.dumps({**head, "parts": len(parts)}).encode()
    conn.send_bytes(body)
    for part in parts:
        conn.send_bytes(part)


def recv_parts(conn: Connection) -> list[Any]:
    """[header, part, ...] as send_parts sent them.

    Raises:
        PayloadError: for a header that is not a JSON object or a wrong number of parts.
    """
    try:
        raw = conn.recv_bytes(MAX_MESSAGE).decode()
        if nesting_line(raw):  # before the parser: its C recursion can crash the process
            raise ValueError("header nests too deep")
        head = json.loads(raw)
        if not isinstance(head, dict) or not isinstance(head.get("parts"), int) or not 0 <= head["parts"] <= 2:
            raise ValueError("bad header")
        return [head, *(conn.recv_bytes(MAX_MESSAGE) for _ in range(head["parts"]))]
    except (ValueError, OSError, EOFError) as err:
        raise PayloadError(f"malformed message on the worker socket: {err}") from err


def _parse_recorddict(raw: bytes) -> Any:
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(raw)
    return proto


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
    cmd = [sys.executable, "-m", "fedllm.client.worker", "--address", str(address), "--watch-pid", str(os.getppid())]
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
    from fedllm.client.round import handle  # the imports a per-message process would pay for

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
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as err:  # a wrong key or a dropped peer: go on
                log.warning("warm worker %s: refused a connection: %s", address.name, err)
                continue
            with conn:
                last[0] = time.monotonic()
                answer(conn, handle)
                last[0] = time.monotonic()


def answer(conn: Connection, handle: Any) -> None:
    """Read one request from `conn`, run it, send the reply or the error (never raises)."""
    from flwr.common.serde import context_from_proto, recorddict_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext

    try:
        head, raw_request, raw_context = recv_parts(conn)
        proto = ProtoContext()
        proto.ParseFromString(raw_context)
        context = context_from_proto(proto)
        request = recorddict_from_proto(_parse_recorddict(raw_request))
        started = head.get("started")
        started = float(started) if isinstance(started, (int, float)) else None
    except Exception as err:  # not what a ClientApp sends: refuse it, keep serving
        log.warning("warm worker: malformed request: %s", err)
        with contextlib.suppress(OSError):
            send_parts(conn, {"status": "error", "error": f"malformed request: {type(err).__name__}"})
        return
    try:
        reply = handle(request, context, started)
        send_parts(conn, {"status": "ok"}, recorddict_to_proto(reply).SerializeToString(),
                   recorddict_to_proto(context.state).SerializeToString())
    except Exception as err:  # reported to the ClientApp, which fails the message
        log.exception("warm worker: round failed")
        with contextlib.suppress(OSError):
            send_parts(conn, {"status": "error", "error": f"{type(err).__name__}: {err}"})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def main() -> None:
    quiet_environment()  # before the model's imports (fedllm.privacy)
    parser = argparse.ArgumentParser(description="fedllm's warm worker for one SuperNode")
    parser.add_argument("--address", type=Path, required=True)
    parser.add_argument("--watch-pid", type=int, default=0)
    parser.add_argument("--idle", type=float, default=1800.0, help="seconds without a message before exiting")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.address, args.watch_pid, args.idle)


if __name__ == "__main__":
    main()
