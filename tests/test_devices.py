"""Devices: resolution, GPU shares, precision, the model cache by device, and Ray's logical GPUs."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from fedllm import devices
from fedllm.config import Config, ModelConfig
from fedllm.errors import ConfigError, ModelError

CUDA = torch.cuda.is_available()


def test_resolve_on_this_machine():
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    assert devices.resolve(" cpu ") == torch.device("cpu")


@pytest.mark.skipif(CUDA, reason="the refusals of a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:7"])
def test_cuda_without_cuda_is_refused_naming_the_key(spec):
    with pytest.raises(ConfigError, match=rf"^server.device={spec}: torch .* sees no CUDA device here"):
        devices.resolve(spec, "server.device")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", "", "cuda:0,1"])
def test_a_misspelt_device_is_refused_at_parse_time(spec):
    with pytest.raises(ConfigError, match=r"^model.device: must be auto, cpu, cuda or cuda:N"):
        Config.from_flat({"model.device": spec})
    with pytest.raises(ConfigError, match=r"^server.device: must be auto"):
        Config.from_flat({"server.device": spec})


def test_device_map_needs_gpus():
    with pytest.raises(ConfigError, match=r"^model.device-map=auto: .* model.device is cpu"):
        Config.from_flat({"model.device": "cpu", "model.device-map": "auto"})
    with pytest.raises(ConfigError, match=r"^model.device-map: must be one of"):
        Config.from_flat({"model.device-map": "balanced"})


@pytest.mark.parametrize("env, count", [("0,1", 2), ("3", 1), ("", 0), ("-1", 0), ("0,-1,2", 1), ("NoDevFiles", 0),
                                        ("GPU-1a2b,GPU-3c4d", 2), (" 0 , 1 ", 2), ("MIG-9f", 1), ("abc", 0), ("0,abc,1", 1)])
def test_visible_gpus_counts_cuda_visible_devices_as_cuda_does(monkeypatch, env, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
    assert devices.visible_gpus() == count


def test_visible_gpus_without_the_variable_is_the_drivers_count(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.visible_gpus() == (torch.cuda.device_count() if CUDA else 0)


def test_gpu_share_defaults_and_checks():
    assert devices.gpu_share(None, 0) == 0.0 and devices.gpu_share(None, 4) == 1.0
    assert devices.gpu_share(0.25, 1) == 0.25 and devices.gpu_share(2, 2) == 2.0 and devices.gpu_share(0, 0) == 0.0
    for bad, why in ((-1, "must be a finite number >= 0"), (math.nan, "must be a finite number >= 0"),
                     (math.inf, "finite number >= 0"),
                     (1.5, "whole number of GPUs"), (3, "but 2 are visible"), (0.5, None)):
        if why is None:
            assert devices.gpu_share(bad, 2) == 0.5
            continue
        with pytest.raises(ConfigError, match=rf"^--gpus-per-client: .*{why}"):
            devices.gpu_share(bad, 2)
    with pytest.raises(ConfigError, match="but 0 are visible"):
        devices.gpu_share(0.5, 0)
    assert devices.gpu_share(64, None) == 64.0  # a cluster's: the form only
    with pytest.raises(ConfigError, match="whole number"):
        devices.gpu_share(1.5, None)


def test_precision_auto_is_bf16_on_a_gpu_with_it_and_none_on_the_cpu():
    cpu = torch.device("cpu")
    assert devices.precision("auto", cpu) == "no"
    assert devices.precision("bf16", cpu) == "bf16" and devices.precision("no", cpu) == "no"
    with pytest.raises(ConfigError, match="^train.precision=fp16: the model is on the CPU"):
        devices.precision("fp16", cpu)
    with devices.autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with devices.autocast(cpu, "no"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_the_model_cache_keys_models_by_device(tiny_model_dir):
    from fedllm.model import MODEL_CACHE, load_base_model, placement

    MODEL_CACHE.clear()
    cfg = ModelConfig(name=str(tiny_model_dir), device="cpu")
    model, _ = load_base_model(cfg)
    again, _ = load_base_model(ModelConfig(name=str(tiny_model_dir), device="auto"))  # auto is the cpu here
    assert again is model and MODEL_CACHE.loads == 1
    assert placement(cfg) == ("cpu", "")
    assert devices.of(model) == torch.device("cpu")
    assert model.config._attn_implementation == "sdpa"  # transformers' SDPA attention
    MODEL_CACHE.clear()


def test_a_node_config_device_becomes_the_clients_model_device():
    from flwr.app import Context, RecordDict

    from fedllm.client.round import on_node_device

    cfg = Config()
    ctx = Context(run_id=1, node_id=1, node_config={"device": "cuda:1"}, state=RecordDict(), run_config={})
    assert on_node_device(cfg, ctx).model.device == "cuda:1"
    assert on_node_device(cfg, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                                       run_config={})) is cfg
    bad = Context(run_id=1, node_id=1, node_config={"device": "tpu"}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="^node config device: must be auto, cpu, cuda or cuda:N"):
        on_node_device(cfg, bad)


def test_the_server_half_gets_server_device():
    from strategies.adapter import server_side

    cfg = Config.from_flat({"model.device": "cuda:1", "server.device": "cpu"})
    side = server_side(cfg)
    assert side.model.device == "cpu" and cfg.model.device == "cuda:1"  # the clients' config is unchanged
    same = Config()
    assert server_side(same) is same


def test_bitsandbytes_without_a_kernel_for_the_device_is_one_line():
    from fedllm.model import check_quantization

    check_quantization(ModelConfig(quantize="nf4"), torch.device("cpu"))  # bitsandbytes' CPU kernels
    with pytest.raises(ModelError, match=r"^model.quantize=nf4: bitsandbytes .* has no nf4 kernel on meta"):
        check_quantization(ModelConfig(quantize="nf4"), torch.device("meta"))


def test_a_paged_optimizer_needs_a_gpu_and_a_lora_method():
    from fedllm.methods.adapters.engine import check_optimizer
    from strategies import resolve

    cfg = Config.from_flat({"train.optimizer": "paged-adamw-8bit"})
    with pytest.raises(ConfigError, match="^train.optimizer=paged-adamw-8bit: bitsandbytes' paged optimizers need a"):
        check_optimizer(cfg.train, torch.device("cpu"))
    with pytest.raises(ConfigError, match="^train.optimizer: train.method=zo takes adamw, not paged-adamw-8bit"):
        resolve(Config.from_flat({"train.optimizer": "paged-adamw-8bit", "train.method": "zo"}))
    resolve(cfg)  # lora takes it


# --- the command line: bad resources in one line, before any engine ------------------------------

@pytest.mark.parametrize("args, message", [
    (["--gpus-per-client", "-1"], "--gpus-per-client: must be a finite number >= 0, got -1.0"),
    (["--gpus-per-client", "nan"], "--gpus-per-client: must be a finite number >= 0, got nan"),
    (["--gpus-per-client", "2.5"], "--gpus-per-client: above 1 it must be a whole number"),
    (["--gpus-per-client", "1"], "--gpus-per-client: 1 GPUs a client, but 0 are visible here"),
    (["--engine", "inprocess", "--gpus-per-client", "0.5"], "--gpus-per-client: shares GPUs among Ray's actors"),
    (["--set", "model.device=cuda"], "model.device=cuda: torch"),
    (["--set", "model.device=cuda:7"], "model.device=cuda:7: torch"),
    (["--set", "server.device=cuda"], "server.device=cuda: torch"),
    (["--set", "model.device=tpu"], "model.device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--set", "train.precision=fp16", "--set", "model.device=cpu"], "train.precision=fp16: the model is on the CPU"),
    (["--set", "train.optimizer=paged-adamw-8bit"], "train.optimizer=paged-adamw-8bit: bitsandbytes' paged optimizers"),
])
@pytest.mark.skipif(CUDA, reason="the refusals of a machine without GPUs")
def test_bad_resources_are_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys, monkeypatch, args, message):
    from fedllm.cli import main

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    t0 = time.perf_counter()
    code = main(["simulate", "--num-clients", "2", "--set", f"model.name={tiny_model_dir}",
                 "--set", f"server.run-dir={tmp_path}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"fedllm: error: {err.removeprefix('fedllm: error: ')}"
    assert message in err and len(err.splitlines()) == 1, err
    assert time.perf_counter() - t0 < 5  # before any engine starts
    assert not list(tmp_path.iterdir())  # nothing written


def test_default_cpus_are_split_among_the_clients_the_gpus_run(monkeypatch):
    from fedllm.preflight import resources

    cores = float(os.cpu_count() or 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resources(None, None) == (cores, 0.0, 0)  # no GPU: one client at a time on every core
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert resources(None, None) == (cores / 2, 1.0, 2)  # a GPU each: two at once
    assert resources(None, 0.5) == (cores / 4, 0.5, 2)  # four at once
    assert resources(1.0, 0.25) == (1.0, 0.25, 2)
    assert resources(None, None, ray_address="127.0.0.1:1") == (cores, None, 2)  # the cluster's GPUs decide
    assert resources(None, 4, ray_address="127.0.0.1:1") == (cores, 4.0, 2)  # checked once joined


# --- Ray's logical GPUs: each client is given its share -------------------------------------------

@pytest.mark.slow
def test_ray_gives_each_client_its_share_of_the_gpus(tiny_model_dir, tmp_path):
    """CUDA_VISIBLE_DEVICES=0,1 makes Ray start with two logical GPUs on this CPU machine; with half a
    GPU each, four clients run at once, two on each GPU, and Ray sets CUDA_VISIBLE_DEVICES per actor.
    model.device=auto then trains on the CPU (torch has no CUDA here): the scheduling is what is tested."""
    sets = {"model.name": tiny_model_dir, "server.run-dir": tmp_path, "server.run-name": "gpus",
            "server.num-rounds": 1, "data.families": "parity", "data.train-per-family": 16,
            "data.eval-per-family": 4, "train.local-steps": 2, "server.exact-match-examples": 0}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "0,1"}
    proc = subprocess.run([sys.executable, "-m", "fedllm", "simulate", "--num-clients", "4", "--gpus-per-client", "0.5",
                           "--cpus-per-client", "0.5", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpus" / "metrics.jsonl").read_text().splitlines()]
    clients = rows[1]["clients"].values()
    assert len(clients) == 4
    given = [c["gpu"] for c in clients]
    assert set(given) == {0, 1}, given  # every client on one of the two GPUs, both in use


@pytest.mark.usefixtures("task_identity")
def test_eight_inprocess_clients_on_one_device_hold_one_base(tiny_model_dir, tmp_path, monkeypatch):
    """The in-process engine's 8 clients and its server, all on model.device, train and evaluate one
    cached PEFT model: one base in memory, not nine."""
    from conftest import tiny_run_config
    from fedllm.server.grid import LocalGrid
    from fedllm.model import MODEL_CACHE
    from fedllm.server.loop import run

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    MODEL_CACHE.clear()
    cfg = tiny_run_config(tiny_model_dir, tmp_path, **{"server.num-rounds": 1, "model.device": "cpu",
                                                       "server.device": "cpu", "data.partition": "iid",
                                                       "data.train-per-family": 16})
    run_dir = run(LocalGrid(8), cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients-ok"] == 8 and all(c["gpu"] == -1 for c in rows[1]["clients"].values())
    models = [key for key in MODEL_CACHE._items if key[0] == "lora"]
    assert len(models) == 1 and models[0][-2:] == ("cpu", "")  # keyed by its device
    assert MODEL_CACHE.loads == 1
    MODEL_CACHE.clear()


def test_a_run_may_resume_on_another_device(tmp_path):
    from fedllm.server import checkpoint

    from fedllm import rng

    checkpoint.save(tmp_path, {"round": 1, "config": Config().to_flat(), "metrics": [], "ledger": None,
                               "strategy": {"method": {}, "chain": {"optimizers": {}}}, "rng": rng.rng_state()})
    moved = Config.from_flat({"model.device": "cuda:1", "server.device": "cpu", "model.device-map": "auto"})
    assert checkpoint.load(tmp_path, moved.to_flat())["round"] == 1
    with pytest.raises(ConfigError, match="^server.resume: lora.rank is 16, the checkpointed run had 8"):
        checkpoint.load(tmp_path, Config.from_flat({"lora.rank": 16}).to_flat())
