"""The warm worker: a private directory or nothing, data-only messages both ways, mutual keys,
and a worker that survives a wrong key or garbage and goes on serving."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from conftest import tiny_run_config
from fedllm.client import worker
from fedllm.errors import FedLLMError

pytestmark = pytest.mark.usefixtures("task_identity")


def test_the_worker_directory_must_be_private(tmp_path, monkeypatch):
    private = tmp_path / "mine"
    monkeypatch.setenv("FEDLLM_WORKER_DIR", str(private))
    assert worker.worker_dir() == private and (os.stat(private).st_mode & 0o777) == 0o700
    private.chmod(0o755)
    with pytest.raises(FedLLMError, match="mode 0700"):
        worker.worker_dir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    monkeypatch.setenv("FEDLLM_WORKER_DIR", str(link))
    with pytest.raises(FedLLMError, match="not a link"):
        worker.worker_dir()
    if os.getuid() == 0:  # root can hand a directory to another user, as an attacker would create it
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 12345, 12345)
        monkeypatch.setenv("FEDLLM_WORKER_DIR", str(theirs))
        with pytest.raises(FedLLMError, match="owner uid 12345"):
            worker.worker_dir()


@pytest.fixture
def running_worker(tmp_path, monkeypatch):
    home = tmp_path / "workers"
    monkeypatch.setenv("FEDLLM_WORKER_DIR", str(home))
    address = worker.address_for(1)
    proc = subprocess.Popen([sys.executable, "-m", "fedllm.client.worker", "--address", str(address), "--watch-pid",
                             str(os.getpid()), "--idle", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not address.with_suffix(".key").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    yield address, proc
    proc.kill()
    proc.wait()


def test_a_round_through_the_worker_survives_a_wrong_key_and_garbage(running_worker, tiny_model_dir, tmp_path):
    from fedllm.client.round import handle
    from fedllm.methods.adapters import engine as lora

    address, proc = running_worker
    cfg = tiny_run_config(tiny_model_dir, tmp_path)
    glob = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)
    request = RecordDict({"config": ConfigRecord({**cfg.to_flat(), "server-round": 1}), "arrays": ArrayRecord(glob)})

    def context():
        return Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                       node_config={"partition-id": 0, "num-partitions": 2})

    local = context()
    via_worker = worker.call(request, local, time.time())
    direct = handle(request, context())
    a, b = (r.array_records["arrays"].to_torch_state_dict() for r in (via_worker, direct))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same round, bit for bit
    # a wrong key is refused, and the worker lives on
    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        Client(str(address), family="AF_UNIX", authkey=b"not the key")
    # the right key with garbage instead of a request: an error answer, and the worker lives on
    with Client(str(address), family="AF_UNIX", authkey=address.with_suffix(".key").read_bytes()) as conn:
        conn.send_bytes(b"\x80\x04not json")  # a pickle's opening bytes
        (head,) = worker.recv_parts(conn)
    assert head["status"] == "error" and "malformed request" in head["error"]
    again = worker.call(request, context(), time.time())
    assert "arrays" in again.array_records and proc.poll() is None
