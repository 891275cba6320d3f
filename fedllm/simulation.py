"""`fedllm simulate`: a federation on this machine, on Ray (Flower's simulation engine, a local
instance or a cluster) or in this process (fedllm's in-process Grid), supervised so that SIGINT or
SIGTERM stops every process it started and keeps the last round's checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedllm.config import Config
from fedllm.errors import FedLLMError
from fedllm.preflight import check_config, prepare, resources, resumed_config, written_since

log = logging.getLogger("fedllm")


ENGINES = ("ray", "inprocess")
ENGINE_JOB = "FEDLLM_ENGINE_JOB"  # the child's job, as JSON in its environment
LOOPBACK = "127.0.0.1"
# A Ray instance of one machine listens on loopback only. Ray turns a node address of 127.0.0.1 into
# the machine's network address, and then its GCS, raylet and workers listen on every address,
# unless its cluster mode is off (the mode Ray has on macOS and Windows); a cluster is an explicit
# --ray-address. Also what a test's `ray start --head` needs (with --node-ip-address=127.0.0.1).
LOCAL_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def simulate(overrides: dict[str, Any], num_clients: int, cpus_per_client: float | None = None,
             resume: Path | None = None, engine: str = "ray", ray_address: str = "",
             gpus_per_client: float | None = None) -> Path:
    """Run a simulation of `num_clients` virtual clients; with `resume`, continue that run
    directory from its checkpoint (its config.json, `overrides` on top).

    Engines: "ray", Flower's simulation (a local Ray instance, on loopback only, or the cluster at
    `ray_address`, e.g. "127.0.0.1:6379" of a `ray start --head`); "inprocess", the same ServerApp and
    ClientApp driven through fedllm's in-process Grid (`fedllm.server.grid`): the clients run
    one after another in this process, without Ray's daemons, their states spilled to disk
    between their rounds.

    Resources (Ray): each client's actor gets `cpus_per_client` CPUs and `gpus_per_client` GPUs
    (a fraction shares one: 0.25 puts four clients on a GPU; Ray sets CUDA_VISIBLE_DEVICES per
    actor, and model.device=auto trains on it). By default a client gets one GPU where the machine
    has GPUs (none without), and the CPUs are split among the clients the GPUs run at once (all of
    them, one client at a time, without GPUs). The in-process engine uses model.device.

    The config, the model and the data are checked here first, so a mistake fails fast with
    one line instead of inside a worker. A Ray simulation then runs in a child process of its
    own session, which this process watches: SIGINT or SIGTERM kills it and every Ray process it
    started at once, keeping the last finished round's checkpoint (written atomically). The
    in-process engine runs in this process and stops the same way.

    Raises:
        Stopped: after SIGINT or SIGTERM (exit 130 or 143).
    """
    if engine not in ENGINES:
        raise FedLLMError(f"--engine: must be one of {', '.join(ENGINES)}, got {engine!r}")
    if ray_address and engine != "ray":
        raise FedLLMError("--ray-address: joins a Ray cluster, which only --engine ray uses")
    if gpus_per_client is not None and engine != "ray":
        raise FedLLMError("--gpus-per-client: shares GPUs among Ray's actors; the in-process engine trains on "
                          "model.device (e.g. --set model.device=cuda:0)")
    # a config error answers here, before torch, transformers or Ray is imported (the rule chain's in prepare)
    check_config(Config.from_flat(overrides if resume is None else {**resumed_config(resume), **overrides}),
                 num_clients, chain=False)
    if gpus_per_client is None and str(overrides.get("model.device", "")).strip() == "cpu":
        gpus_per_client = 0.0  # clients told to train on the CPU reserve no GPU
    cpus, gpus, gpus_total = resources(cpus_per_client, gpus_per_client, ray_address)
    overrides, run_dir = prepare(overrides, num_clients, resume, local_clients=not ray_address)
    job = {"overrides": overrides, "num_clients": num_clients, "cpus_per_client": cpus, "gpus_per_client": gpus,
           "gpus": gpus_total, "run_dir": str(run_dir), "parent": os.getpid(), "engine": engine,
           "ray_address": ray_address}
    if engine == "inprocess":  # nothing to supervise: no Ray processes, and no second copy of the imports
        in_this_process(job, run_dir)
    else:
        supervise(job, run_dir)
    return run_dir


def in_this_process(job: dict[str, Any], run_dir: Path) -> None:
    """Run the in-process engine here; SIGINT or SIGTERM stop it between two instructions (the
    checkpoint is written atomically) with the same hint as a supervised run.

    Raises:
        Stopped: when a signal stopped the run.
    """
    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(signum)  # a KeyboardInterrupt: no `except Exception` on the way swallows it

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_engine(job, watch=False)
    except Interrupted as err:
        raise Stopped(f"stopped by {signal.Signals(err.signum).name}; {resume_hint(run_dir)}",
                      128 + err.signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during an in-process run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def resume_hint(run_dir: Path) -> str:
    from fedllm.server import checkpoint

    if (run_dir / checkpoint.FILE).exists():
        done = checkpoint.read(run_dir / checkpoint.FILE)["round"]
        return f"round {done} is checkpointed; go on with: fedllm simulate --resume {run_dir}"
    return f"no round finished (run directory {run_dir})"


def run_engine(job: dict[str, Any], watch: bool = True) -> None:
    """The child's side of `simulate`: the job's engine (Flower's simulation, or the in-process
    Grid) running fedllm's ServerApp and ClientApp.

    Raises:
        FedLLMError: with error.txt's reason, or when the run wrote no summary.
    """
    from fedllm.server.app import make_app
    from fedllm.server.round import ERROR_FILE

    run_dir = Path(job["run_dir"])
    if watch:
        _watch(int(job["parent"]))  # also when the parent died before this (getppid differs at once)
    started = time.time()  # an earlier attempt's summary.json or error.txt stays until a new one replaces it
    if job.get("engine", "ray") == "inprocess":
        import tempfile

        from flwr.app import Context, RecordDict

        from fedllm.server.grid import LocalGrid

        with tempfile.TemporaryDirectory(prefix="fedllm-nodes-") as spill:
            grid = LocalGrid(job["num_clients"], spill=Path(spill))
            make_app(job["overrides"])(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                     run_config={}))
    else:
        if not job.get("ray_address"):
            os.environ.update(LOCAL_RAY)  # before Ray's import, which reads it
        # Flower's simulation writes an id for its telemetry into FLWR_HOME, telemetry on or off: here
        # into the run directory, not ~/.flwr
        os.environ.setdefault("FLWR_HOME", str(run_dir / "flwr-home"))
        from flwr.simulation import run_simulation

        from fedllm.client.app import app as client_app

        init: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
        gpus = job.get("gpus_per_client")
        if job.get("ray_address"):
            init["address"] = job["ray_address"]  # the cluster's own resources; this process is its driver
            gpus = check_cluster(init, gpus)
        else:  # the machine's GPUs, as CUDA_VISIBLE_DEVICES (or the driver) shows them; loopback only
            init.update(num_cpus=os.cpu_count() or 1, num_gpus=int(job.get("gpus", 0)), include_dashboard=False,
                        _node_ip_address=LOOPBACK)
        backend = {"client_resources": {"num_cpus": job["cpus_per_client"], "num_gpus": float(gpus or 0.0)},
                   "init_args": init}
        run_simulation(make_app(job["overrides"]), client_app, num_supernodes=job["num_clients"],
                       backend_config=backend)
    if not written_since(run_dir / "summary.json", started):
        if written_since(run_dir / ERROR_FILE, started):
            raise FedLLMError((run_dir / ERROR_FILE).read_text().strip())
        raise FedLLMError(f"the simulation did not finish; see the log above (run directory {run_dir})")


def check_cluster(init: dict[str, Any], gpus_per_client: float | None) -> float:
    """A client's GPUs on a Ray cluster: one where its nodes have GPUs (none where they have none) by
    default; a share no node can give is refused (else Ray would wait for one forever).

    Raises:
        FedLLMError: naming --gpus-per-client and the cluster's GPUs.
    """
    import ray

    from fedllm import devices

    ray.init(**init)
    try:
        nodes = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    largest = max(nodes, default=0.0)
    share = devices.gpu_share(gpus_per_client, None) if gpus_per_client is not None else float(largest >= 1)
    if share > largest:
        raise FedLLMError(f"--gpus-per-client: {share:g} GPUs a client, but the largest node of the Ray cluster at "
                          f"{init['address']} has {largest:g}")
    return share


def _watch(parent: int) -> None:
    """End this process group (the engine and every Ray process) at once when the supervising
    `fedllm simulate` (pid `parent`) dies, even by SIGKILL, rather than run on orphaned: the
    kernel's parent-death signal on Linux, turned into a kill of the group, with a polling
    thread as the fallback elsewhere. The same thread ends the group once the ServerApp has
    failed (fedllm.server.app fills SERVER_FAILED with why), after printing the reason: Flower's
    engine would wait on."""
    from fedllm.server.app import SERVER_FAILED

    signal.signal(signal.SIGTERM, lambda signum, frame: os.killpg(0, signal.SIGKILL))  # the whole group
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent and not SERVER_FAILED:
            time.sleep(0.5)
        if SERVER_FAILED:
            time.sleep(1.0)  # let the server's last log lines out
            print(f"fedllm: error: {SERVER_FAILED[0]}", file=sys.stderr, flush=True)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="fedllm-engine-watch").start()


class EngineFailed(FedLLMError):
    """The simulation's child process failed; it printed its one-line reason already."""


class Stopped(FedLLMError):
    """The run was stopped by a signal; `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def supervise(job: dict[str, Any], run_dir: Path) -> None:
    """Run `run_engine(job)` in a child process in a session of its own (Ray's processes join its
    process group) and wait for it; SIGINT or SIGTERM here stops the whole group.

    Raises:
        Stopped: when a signal stopped the run.
        EngineFailed: when the child failed (its one-line reason is already printed).
    """
    proc = subprocess.Popen([sys.executable, "-m", "fedllm", "_engine"], start_new_session=True,
                            env={**os.environ, ENGINE_JOB: json.dumps(job)})
    signals: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        # the checkpoint is written atomically, so killing at once loses at most the round in
        # flight, and the engine gets no chance to print its tracebacks over the one-line reason
        signals.append(signum)
        _kill_group(proc.pid, signal.SIGKILL)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _kill_group(proc.pid, signal.SIGKILL)  # whatever of the group outlived the engine
    if signals:
        raise Stopped(f"stopped by {signal.Signals(signals[0]).name}; {resume_hint(run_dir)}", 128 + signals[0])
    if proc.returncode != 0:
        raise EngineFailed(f"the simulation failed (exit {proc.returncode}); see above")


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
