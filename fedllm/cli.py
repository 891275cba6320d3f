"""The `fedllm` command (also `python -m fedllm`).

    fedllm simulate --num-clients 4 --set server.num-rounds=3 --set lora.rank=16
    fedllm simulate --resume runs/NAME         # continue a stopped run from its checkpoint
    fedllm simulate --engine inprocess         # no Ray: the clients one after another in one process
    fedllm simulate --ray-address 10.0.0.5:6379  # on a running Ray cluster
    fedllm simulate --gpus-per-client 0.25     # four clients share each GPU (default: one GPU a client)
    fedllm prepare-model                       # convert the default GGUF once
    fedllm config                              # every config key, its default and help
    fedllm ledger runs/NAME                    # stakes, scores, rewards and penalties of a run
    fedllm verify runs/NAME [--round N]        # recompute posted rounds from their artifacts (exit 1: differs)
    fedllm report runs/NAME                    # runs/NAME/report.html (also written at the end of a run)
    fedllm compare runs/A runs/B --out cmp.html  # several runs' plots overlaid
    fedllm eval runs/NAME --tasks fedllm_builtin,fedllm_builtin_mc   # lm-eval tasks on a run's result
    fedllm tasks DIR                           # fedllm's lm-eval tasks, for `lm_eval --include_path DIR`

Errors print one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fedllm.config import Config, help_table, parse_overrides
from fedllm.errors import FedLLMError
from fedllm.privacy import quiet_environment
from fedllm.simulation import ENGINE_JOB, ENGINES, EngineFailed, Stopped, run_engine, simulate

log = logging.getLogger("fedllm")


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand each."""
    top = argparse.ArgumentParser(prog="fedllm", description="Federated LLM fine-tuning on Flower.")
    top.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = top.add_subparsers(dest="command", required=True)
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
    ver = sub.add_parser("verify", help="recompute a run's posted rounds from their artifacts and compare with "
                         "what was posted")
    ver.add_argument("run_dir", type=Path)
    ver.add_argument("--round", type=int, action="append", dest="rounds", metavar="N",
                     help="only round N (repeatable; default: every posted round)")
    ver.add_argument("--chain", metavar="URL", help="read what was posted from this JSON-RPC node (default: the run's "
                     "ledger.chain)")
    ver.add_argument("--json", action="store_true", help="print the verdicts as JSON (a verifier's votes)")
    rep = sub.add_parser("report", help="write RUN_DIR/report.html: plots, final figures, config (no network)")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--plugins", action="store_true",
                     help="import the modules the run's server.plugins names (their metrics join the page); "
                     "off by default: a run folder from elsewhere runs no code")
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
    return top


def simulate_command(args: argparse.Namespace) -> None:
    overrides = parse_overrides(args.set)
    if args.init_adapter is not None:
        overrides["server.init-from"] = str(args.init_adapter)  # prepare() makes it absolute
    run_dir = simulate(overrides, args.num_clients, args.cpus_per_client, args.resume, args.engine,
                       args.ray_address, args.gpus_per_client)
    print(f"run directory: {run_dir}")


def prepare_model_command(args: argparse.Namespace) -> None:
    from fedllm.model import resolve

    print(resolve(Config.from_flat(parse_overrides(args.set)).model))


def ledger_command(args: argparse.Namespace) -> None:
    from fedllm.reporting.runlog import ledger_view

    if not (args.run_dir / "ledger" / "chain.json").exists():
        raise FedLLMError(f"{args.run_dir}: no ledger in this run directory (ledger.enabled was off?)")
    print(ledger_view(args.run_dir))


def verify_command(args: argparse.Namespace) -> int:
    """Exit 0 when every round checked reproduces, 1 otherwise."""
    from fedllm.ledger.verify import verify

    if not args.run_dir.is_dir():
        raise FedLLMError(f"{args.run_dir}: no such run directory")
    checks = verify(args.run_dir, args.rounds, args.chain)
    if args.json:
        print(json.dumps([{"round": c.round, "status": c.status, "posted": c.posted, "recomputed": c.recomputed,
                           "vote": c.vote(), "problems": c.problems, "source": c.source, "leaves": c.leaves}
                          for c in checks], indent=1))
    else:
        print(f"compared with {checks[0].source}" if checks else "no round was posted")
        for c in checks:
            print(c.line())
    return 0 if all(c.status == "reproduced" for c in checks) else 1


def report_command(args: argparse.Namespace) -> None:
    from fedllm.reporting.report import render_compare, render_report

    dirs = [args.run_dir] if args.command == "report" else args.run_dirs
    for d in dirs:
        if not (d / "metrics.jsonl").exists():
            raise FedLLMError(f"{d}: no metrics.jsonl; not a fedllm run directory")
    print(render_report(args.run_dir, args.plugins) if args.command == "report" else render_compare(dirs, args.out))


def eval_command(args: argparse.Namespace) -> None:
    from fedllm.evaluation.harness import parse_tasks
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


def tasks_command(args: argparse.Namespace) -> None:
    from fedllm.data import load_splits
    from fedllm.evaluation.harness import write_tasks

    cfg = Config.from_flat(parse_overrides(args.set))
    print(write_tasks(args.out_dir, load_splits(cfg.data)[1], cfg.data, cfg.server.max_new_tokens))


def config_command(args: argparse.Namespace) -> None:
    for key, text, default in help_table():
        print(f"{key:28} {default!r:32} {text}")


COMMANDS = {
    "_engine": lambda args: run_engine(json.loads(os.environ[ENGINE_JOB])),  # the supervised child of simulate
    "simulate": simulate_command, "prepare-model": prepare_model_command, "config": config_command,
    "ledger": ledger_command, "verify": verify_command, "report": report_command, "compare": report_command, "eval": eval_command,
    "tasks": tasks_command,
}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; errors print one line and give exit 2 (130/143 for a signal)."""
    quiet_environment()  # first: the dependencies' telemetry off (fedllm.privacy)
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("flwr").propagate = False  # Flower logs through its own handler
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Flower's state database set-up
    try:
        code = COMMANDS[args.command](args)
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
    return int(code or 0)  # a command may return its exit status (verify: 1 for a round that differs)


if __name__ == "__main__":
    sys.exit(main())
