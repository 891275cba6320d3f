"""The `fedllm` command (also `python -m fedllm`).

    fedllm simulate --num-clients 4 --set server.num-rounds=3 --set lora.rank=16
    fedllm simulate --resume runs/NAME         # continue a stopped run from its checkpoint
    fedllm simulate --engine inprocess         # no Ray: the clients one after another in one process
    fedllm simulate --ray-address 10.0.0.5:6379  # on a running Ray cluster
    fedllm simulate --gpus-per-client 0.25     # four clients share each GPU (default: one GPU a client)
    fedllm prepare-model                       # convert the default GGUF once
    fedllm config                              # every config key, its default and help
    fedllm ledger runs/NAME                    # stakes, scores, rewards and penalties of a run
    fedllm report runs/NAME                    # runs/NAME/report.html (also written at the end of a run)
    fedllm compare runs/A runs/B --out cmp.html  # several runs' plots overlaid
    fedllm eval runs/NAME --tasks fedllm_builtin,fedllm_builtin_mc   # lm-eval tasks on a run's result
    fedllm tasks DIR                           # fedllm's lm-eval tasks, for `lm_eval --include_path DIR`

Errors print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fedllm.config import Config, help_table, parse_overrides
from fedllm.errors import FedLLMError

log = logging.getLogger("fedllm")


ENGINES = ("ray", "inprocess")


def simulate(overrides: dict[str, Any], num_clients: int, cpus_per_client: float | None = None,
             resume: Path | None = None, engine: str = "ray", ray_address: str = "",
             gpus_per_client: float | None = None) -> Path:
    """Run a simulation of `num_clients` virtual clients; with `resume`, continue that run
    directory from its checkpoint (its config.json, `overrides` on top).

    Engines: "ray", Flower's simulation (a local Ray instance, or the cluster at `ray_address`,
    e.g. "127.0.0.1:6379" of a `ray start --head`); "inprocess", the same ServerApp and
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
    # a config error answers here, before torch, transformers or Ray is imported
    Config.from_flat(overrides if resume is None else {**resumed_config(resume), **overrides})
    if gpus_per_client is None and str(overrides.get("model.device", "")).strip() == "cpu":
        gpus_per_client = 0.0  # clients told to train on the CPU reserve no GPU
    cpus, gpus, gpus_total = resources(cpus_per_client, gpus_per_client, ray_address)
    overrides, run_dir = prepare(overrides, num_clients, cpus, resume, local_clients=not ray_address)
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


def resources(cpus_per_client: float | None, gpus_per_client: float | None,
              ray_address: str = "") -> tuple[float, float | None, int]:
    """(CPUs a client, GPUs a client, GPUs of this machine) for a simulation (see `simulate`). A
    cluster's GPUs are its own: its share is checked (or, left out, chosen: None here) once the
    driver has joined it (`check_cluster`).

    Raises:
        FedLLMError: naming --gpus-per-client for a share this machine cannot give.
    """
    from fedllm import devices

    available = devices.visible_gpus()
    if ray_address:
        gpus = None if gpus_per_client is None else devices.gpu_share(gpus_per_client, None)
    else:
        gpus = devices.gpu_share(gpus_per_client, available)
    cores = float(os.cpu_count() or 1)
    if cpus_per_client is None:  # split the cores among the clients that run at once
        at_once = int(available // gpus) if gpus and available and not ray_address else 1
        cpus_per_client = cores / max(at_once, 1)
    return cpus_per_client, gpus, available


def prepare(overrides: dict[str, Any], num_clients: int, cpus_per_client: float,
            resume: Path | None, local_clients: bool = True) -> tuple[dict[str, Any], Path]:
    """Every check that can run before Ray starts; returns the final overrides (with the run
    name fixed) and the run directory. `local_clients`: the clients run on this machine (not on
    a Ray cluster's nodes), so their model.device is checked here too."""
    from fedllm.methods import data_splits
    from fedllm.model import check_available
    from fedllm.tracking import check_installed
    from strategies import resolve as resolve_strategy

    if resume is not None:
        overrides = {**resumed_config(resume), **overrides, "server.resume": str(resume),
                     "server.run-dir": str(resume.parent), "server.run-name": resume.name}
    overrides = dict(overrides)
    overrides.setdefault("server.run-name", time.strftime("%Y%m%d-%H%M%S"))
    if overrides.get("server.init-from"):  # saved in the run's config: absolute, whatever the cwd later
        overrides["server.init-from"] = str(Path(str(overrides["server.init-from"])).expanduser().resolve())
    cfg = Config.from_flat(overrides)
    if num_clients < 1 or not 0 < cpus_per_client <= (os.cpu_count() or 1) * 64:
        raise FedLLMError(f"--num-clients must be >= 1 and --cpus-per-client in (0, {(os.cpu_count() or 1) * 64}]; "
                          f"got {num_clients} and {cpus_per_client}")
    if num_clients < cfg.server.min_clients:
        raise FedLLMError(f"--num-clients: {num_clients} is below server.min-clients={cfg.server.min_clients}")
    resolve_strategy(cfg)  # the method and rule chain may refuse the config (e.g. zo with compression)
    check_installed(cfg)  # server.trackers
    check_tasks(cfg)
    if cfg.ledger.enabled:
        from fedllm.ledger import preflight

        preflight(cfg)
    train, _ = data_splits(cfg)
    check_partitions(train, cfg, num_clients)
    check_devices(cfg, local_clients)
    check_available(cfg.model)  # converts a GGUF once, before workers start; a hub id fails fast
    if cfg.server.init_from and resume is None:  # the adapter fits the run's lora.* (before any round starts)
        from fedllm.methods.adapters.engine import init_adapter_state, read_adapter

        read_adapter(Path(cfg.server.init_from), init_adapter_state(cfg.model, cfg.lora, cfg.train.seed), cfg.lora)
    run_dir = Path(cfg.server.run_dir).expanduser() / cfg.server.run_name
    check_writable(run_dir)
    if resume is None and (run_dir / "metrics.jsonl").exists():
        raise FedLLMError(f"server.run-name: {run_dir} holds a run already; pick another name")
    if resume is not None:
        from fedllm.server import checkpoint

        checkpoint.load(resume, cfg.to_flat())  # fails here, before Ray starts
    return overrides, run_dir


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
        from flwr.simulation import run_simulation

        from fedllm.client_app import app as client_app

        init: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False}
        gpus = job.get("gpus_per_client")
        if job.get("ray_address"):
            init["address"] = job["ray_address"]  # the cluster's own resources; this process is its driver
            gpus = check_cluster(init, gpus)
        else:  # the machine's GPUs, as CUDA_VISIBLE_DEVICES (or the driver) shows them
            init.update(num_cpus=os.cpu_count() or 1, num_gpus=int(job.get("gpus", 0)), include_dashboard=False)
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


ENGINE_JOB = "FEDLLM_ENGINE_JOB"  # the child's job, as JSON in its environment


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


def check_partitions(train: list[dict[str, str]], cfg: Config, num_clients: int) -> None:
    """Every client's partition of the training data is non-empty (checked before Ray starts).

    Raises:
        FedLLMError: naming --num-clients, the empty partition and the data's size.
    """
    from fedllm.data import partition

    for pid in range(num_clients):
        try:
            mine = partition(train, cfg.data, num_clients, pid)
        except FedLLMError:
            raise
        except Exception as err:  # the partitioners refuse too little data in their own words
            raise FedLLMError(f"--num-clients: cannot split {len(train)} training examples {num_clients} ways "
                              f"(data.partition={cfg.data.partition}): {err}") from None
        if not mine:
            raise FedLLMError(f"--num-clients: partition {pid} of {num_clients} gets no examples ({len(train)} training "
                              f"examples, data.partition={cfg.data.partition}); use fewer clients or more data")


def check_devices(cfg: Config, local_clients: bool) -> None:
    """server.device (the ServerApp runs in this process's engine) and, for clients on this machine,
    model.device exist here; model.quantize has a bitsandbytes kernel on the clients' device; a
    paged optimizer has a GPU. The clients' devices in Ray are the GPUs Ray gives them: checked as
    this process sees the machine's GPUs.

    Raises:
        ConfigError: naming the key.
    """
    from fedllm import devices
    from fedllm.methods.adapters.engine import check_optimizer
    from fedllm.model import check_quantization

    devices.resolve(cfg.server.device, "server.device")
    if local_clients:
        device = devices.resolve(cfg.model.device, "model.device")
        check_quantization(cfg.model, device)
        check_optimizer(cfg.train, device)
        devices.precision(cfg.train.precision, device)


def check_tasks(cfg: Config) -> None:
    """server.eval-tasks known to lm-eval (fedllm's own tasks written to a scratch folder)."""
    import tempfile

    from fedllm.harness import parse_tasks
    from fedllm.methods import data_splits
    from fedllm.server.evaluator import eval_tasks

    if parse_tasks(cfg.server.eval_tasks):
        with tempfile.TemporaryDirectory() as tmp:
            eval_tasks(cfg, Path(tmp), data_splits(cfg)[1][:1])


def check_writable(run_dir: Path, min_free: int = 64 << 20) -> None:
    """The run directory can be created and written, with some room left (checked on its
    nearest existing folder, which this creates nothing in).

    Raises:
        FedLLMError: naming server.run-dir.
    """
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise FedLLMError(f"server.run-dir: {existing} is not a writable folder (for the run directory {run_dir})")
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise FedLLMError(f"server.run-dir: only {free >> 20} MiB free on {existing}; a run needs room for its "
                          "checkpoints and results")


def written_since(path: Path, since: float) -> bool:
    """Whether `path` exists and was (re)written at or after `since` (a second of slack for
    file systems with coarse times)."""
    return path.exists() and path.stat().st_mtime >= since - 1.0


def resumed_config(run_dir: Path) -> dict[str, Any]:
    """The flat config a run directory was started with (its config.json)."""
    path = run_dir / "config.json"
    if not path.exists():
        raise FedLLMError(f"--resume: {path} does not exist; not a fedllm run directory")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise FedLLMError(f"--resume: {path} is not valid JSON: {err}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedllm", description="Federated LLM fine-tuning on Flower.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated simulation on this machine")
    sim.add_argument("--num-clients", type=int, default=4, help="virtual clients (SuperNodes)")
    sim.add_argument("--cpus-per-client", type=float, default=None,
                     help="Ray CPUs per client; by default the cores are split among the clients that run at once "
                     "(one at a time without GPUs)")
    sim.add_argument("--gpus-per-client", type=float, default=None, metavar="F",
                     help="Ray GPUs per client: a fraction shares one (0.25: four clients a GPU) or a whole number; "
                     "default 1 where the machine has GPUs, 0 without")
    sim.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="config override, e.g. lora.rank=16 (see `fedllm config`)")
    sim.add_argument("--engine", choices=ENGINES, default="ray",
                     help="ray: Flower's simulation engine (Ray); inprocess: the clients one after another in this "
                     "process, no Ray (one device, debugging)")
    sim.add_argument("--ray-address", default="", metavar="HOST:PORT",
                     help="join a running Ray cluster (`ray start --head` prints its address) instead of starting one")
    sim.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a run from its checkpoint (its config; --set server.num-rounds=N may extend it)")
    sim.add_argument("--init-adapter", type=Path, metavar="ADAPTER_DIR",
                     help="start the global adapter from a saved one (server.init-from), e.g. an SFT run's "
                     "RUN_DIR/adapter before DPO rounds")
    prep = sub.add_parser("prepare-model", help="convert a GGUF model into the safetensors cache")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("config", help="list every config key with its default and help")
    led = sub.add_parser("ledger", help="show a run's ledger: stakes, scores, rewards, penalties")
    led.add_argument("run_dir", type=Path, help="a run directory (server.run-dir/server.run-name)")
    rep = sub.add_parser("report", help="write RUN_DIR/report.html: plots, final figures, config (no network)")
    rep.add_argument("run_dir", type=Path)
    cmp_ = sub.add_parser("compare", help="one HTML page with several runs' plots overlaid")
    cmp_.add_argument("run_dirs", type=Path, nargs="+")
    cmp_.add_argument("--out", type=Path, default=Path("compare.html"), help="the page to write")
    ev = sub.add_parser("eval", help="evaluate a run's result on lm-eval tasks (RUN_DIR/lm-eval/results.json)")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks, e.g. fedllm_builtin,fedllm_builtin_mc "
                    "(offline) or mmlu (needs its data reachable or cached)")
    ev.add_argument("--include-path", type=Path, action="append", default=[], metavar="DIR",
                    help="a folder of your own lm-eval task YAML (repeatable)")
    ev.add_argument("--limit", type=int, default=0, help="examples per task (0: all)")
    ev.add_argument("--batch-size", type=int, default=16)
    tsk = sub.add_parser("tasks", help="write fedllm's lm-eval tasks (from the config's held-out split) into DIR")
    tsk.add_argument("out_dir", type=Path)
    tsk.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("_engine")  # the supervised child of `simulate` (its job in $FEDLLM_ENGINE_JOB)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database set-up
    try:
        if args.command == "_engine":
            run_engine(json.loads(os.environ[ENGINE_JOB]))
        elif args.command == "simulate":
            overrides = parse_overrides(args.set)
            if args.init_adapter is not None:
                overrides["server.init-from"] = str(args.init_adapter)  # prepare() makes it absolute
            run_dir = simulate(overrides, args.num_clients, args.cpus_per_client, args.resume, args.engine,
                               args.ray_address, args.gpus_per_client)
            print(f"run directory: {run_dir}")
        elif args.command == "prepare-model":
            from fedllm.model import resolve

            print(resolve(Config.from_flat(parse_overrides(args.set)).model))
        elif args.command == "ledger":
            from fedllm.report import ledger_view

            if not (args.run_dir / "ledger" / "chain.json").exists():
                raise FedLLMError(f"{args.run_dir}: no ledger in this run directory (ledger.enabled was off?)")
            print(ledger_view(args.run_dir))
        elif args.command in ("report", "compare"):
            from fedllm.report import render_compare, render_report

            dirs = [args.run_dir] if args.command == "report" else args.run_dirs
            for d in dirs:
                if not (d / "metrics.jsonl").exists():
                    raise FedLLMError(f"{d}: no metrics.jsonl; not a fedllm run directory")
            print(render_report(args.run_dir) if args.command == "report" else render_compare(dirs, args.out))
        elif args.command == "eval":
            from fedllm.harness import parse_tasks
            from fedllm.server.evaluator import evaluate_run

            tasks = parse_tasks(args.tasks)
            if not tasks or args.limit < 0 or args.batch_size < 1:
                raise FedLLMError("--tasks: name at least one task; --limit >= 0 and --batch-size >= 1")
            if not args.run_dir.is_dir():
                raise FedLLMError(f"{args.run_dir}: no such run directory")
            figures = evaluate_run(args.run_dir, tasks, args.include_path, args.limit, args.batch_size)
            for task, metrics in figures.items():
                print(f"{task:24} " + "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
            print(f"results: {args.run_dir / 'lm-eval' / 'results.json'}")
        elif args.command == "tasks":
            from fedllm.data import load_splits
            from fedllm.harness import write_tasks

            cfg = Config.from_flat(parse_overrides(args.set))
            print(write_tasks(args.out_dir, load_splits(cfg.data)[1], cfg.data, cfg.server.max_new_tokens))
        else:
            for key, text, default in help_table():
                print(f"{key:28} {default!r:32} {text}")
    except Stopped as err:
        print(f"fedllm: {err}", file=sys.stderr)
        return err.exit_code
    except EngineFailed:
        return 2  # the child printed its one-line reason already
    except KeyboardInterrupt:
        print("fedllm: stopped by SIGINT", file=sys.stderr)
        return 130
    except FedLLMError as err:
        if args.debug:
            raise
        print(f"fedllm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be read or written: named in one line
        if args.debug:
            raise
        print(f"fedllm: error: {err.filename or ''}: {err.strerror or err}".lstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
