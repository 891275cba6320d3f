"""Nothing calls out unasked (fedllm.privacy): the dependencies' telemetry is off by default, a user's
own setting wins, the variables are the installed libraries' own, and a run with every tracker and
lm-eval on, then `fedllm eval`, writes nothing under HOME and opens no connection off this machine."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.privacy import QUIET, quiet_environment


def test_quiet_environment_sets_what_the_user_left_unset():
    env = {"WANDB_MODE": "online", "PATH": "/bin"}
    chosen = quiet_environment(env)
    assert env["WANDB_MODE"] == "online" and "WANDB_MODE" not in chosen  # the user opted in: kept
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert set(chosen) == set(QUIET) - {"WANDB_MODE"} and env["PATH"] == "/bin"
    assert quiet_environment(env) == {}  # a second call changes nothing


# where each library reads its variable (a renamed variable would silently turn telemetry back on)
READERS = {
    "DO_NOT_TRACK": ["huggingface_hub/constants.py", "mlflow/telemetry/utils.py"],
    "HF_HUB_DISABLE_TELEMETRY": ["huggingface_hub/constants.py"],
    "HF_UPDATE_DOWNLOAD_COUNTS": ["datasets/config.py"],
    "MLFLOW_DISABLE_TELEMETRY": ["mlflow/environment_variables.py"],
    "WANDB_MODE": ["wandb/env.py"],
    "WANDB_ERROR_REPORTING": ["wandb/env.py"],
    "RAY_USAGE_STATS_ENABLED": ["ray/_common/usage/usage_constants.py"],
    "FLWR_TELEMETRY_ENABLED": ["flwr/supercore/telemetry.py"],
    "FLWR_DISABLE_UPDATE_CHECK": ["flwr/supercore/constant.py"],
}


@pytest.mark.parametrize("name", sorted(QUIET))
def test_each_variable_is_read_by_its_library(name):
    assert name in READERS, f"{name}: say which library reads it"
    for path in READERS[name]:
        package, _, rest = path.partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None:
            pytest.skip(f"{package} is not installed")
        assert name in (Path(spec.origin).parent / rest).read_text(), f"{path} no longer reads {name}"


def test_local_ray_mode_is_rays_own():
    from fedllm.simulation import LOCAL_RAY

    spec = importlib.util.find_spec("ray")
    constants = (Path(spec.origin).parent / "_private" / "ray_constants.py").read_text()
    assert all(name in constants for name in LOCAL_RAY)


def test_lm_eval_keeps_its_copy_of_the_examples_in_the_tasks_folder(tmp_path):
    """fedllm's lm-eval tasks name a datasets cache inside their folder: the Arrow copy of the held-out
    examples goes away with the folder instead of piling up in ~/.cache/huggingface/datasets."""
    import yaml

    from fedllm.config import DataConfig
    from fedllm.evaluation.harness import DATASETS_CACHE, write_tasks

    folder = write_tasks(tmp_path / "tasks", [{"instruction": "2+2?", "input": "", "response": "4"}], DataConfig())
    for name in ("fedllm_builtin.yaml", "fedllm_builtin_mc.yaml"):
        kwargs = yaml.safe_load((folder / name).read_text().replace("!function ", ""))["dataset_kwargs"]
        assert kwargs["cache_dir"] == str(folder / DATASETS_CACHE)


AUDIT = r'''
import ipaddress, json, socket, sys

outside = []

def local(host):
    if host in (None, "", "localhost") or not isinstance(host, (str, bytes)):
        return True
    try:
        ip = ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)
    except ValueError:
        return False  # a name to resolve: somewhere else
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return ip.is_loopback

def hook(event, args):
    if event == "socket.getaddrinfo" and not local(args[0]):
        outside.append(f"resolve {args[0]}")
    elif event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        if not local(args[1][0]):
            outside.append(f"connect {args[1]}")

sys.addaudithook(hook)
from fedllm.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    json.dump({"codes": codes, "outside": outside}, f)
'''


# the one cache a run may leave in HOME: matplotlib's font list (no data of the run's)
HOME_CACHES = (".cache/matplotlib/",)


def _files(root: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    names = (str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(n for n in names if not n.startswith(allowed))


@pytest.mark.slow
def test_a_run_and_its_eval_write_nothing_outside_and_call_nobody(tiny_model_dir, tmp_path):
    """The in-process engine with every installed tracker and lm-eval's tasks, then `fedllm eval`,
    with HOME (and the temporary folder) in fresh folders: nothing lands in HOME (no MLflow
    installation id, no Flower source id, no Hugging Face datasets copy of the held-out examples,
    no wandb settings), the temporary folder is left empty, and no socket resolves or connects to
    anything but loopback (an audit hook on every thread of the process)."""
    trackers = [t for t in ("tensorboard", "mlflow", "wandb", "aim") if importlib.util.find_spec(t)]
    tasks = "fedllm_builtin" if importlib.util.find_spec("lm_eval") else ""
    home, tmp, runs = tmp_path / "home", tmp_path / "tmp", tmp_path / "runs"
    for d in (home, tmp, runs):
        d.mkdir()
    sets = {"model.name": tiny_model_dir, "server.run-dir": runs, "server.run-name": "quiet", "server.num-rounds": 1,
            "data.families": "parity,units", "data.train-per-family": 8, "data.eval-per-family": 2,
            "train.local-steps": 2, "server.exact-match-examples": 2, "server.max-new-tokens": 2,
            "server.trackers": ",".join(trackers), "server.eval-tasks": tasks, "server.eval-limit": 2}
    argv = [["simulate", "--engine", "inprocess", "--num-clients", "2",
             *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]]
    if tasks:
        argv.append(["eval", str(runs / "quiet"), "--tasks", tasks, "--limit", "2"])
    # a user's shell: no CI or pytest markers (MLflow keeps quiet under those by itself), no XDG dirs,
    # none of the variables fedllm.privacy sets
    drop = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "HF_HOME", "HF_DATASETS_CACHE", "FEDLLM_CACHE",
            "FLWR_HOME", "MPLCONFIGDIR", *QUIET}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("XDG_")}
    env.update(HOME=str(home), TMPDIR=str(tmp), TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "-c", AUDIT, json.dumps(argv), str(out)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    audit = json.loads(out.read_text())
    assert audit["outside"] == [], audit["outside"]
    assert _files(home, HOME_CACHES) == [], _files(home)
    assert _files(tmp) == [], _files(tmp)
    assert audit["codes"] == [0] * len(argv), proc.stderr[-3000:]
    run = runs / "quiet"
    assert (run / "metrics.jsonl").exists() and (not tasks or (run / "lm-eval" / "results.json").exists())
