"""What does the federation cost? The same LoRA steps on the same samples, run
(a) centralized with plain PEFT + torch, and (b) as a fedllm simulation on each engine: Ray
(Flower's simulation) and in-process (the same apps through fedllm's in-process Grid).

    python bench/simulation_overhead.py [--clients 2] [--rounds 3] [--steps 20] [--out FILE]

Every row runs as child processes from a cold start (imports, model load from the safetensors
cache, training, saving the adapter); server-side evaluation is off in (b) so that only training
is compared. Memory is the peak, over time, of the summed RSS of the whole process tree (for Ray:
the driver, Ray's raylet and GCS, and the worker). Prints a table and writes JSON.
Goals: in-process <= 1.05x the centralized time and <= 1.2x its memory; Ray <= 1.10x time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

# The centralized baseline: the clients' work done back to back in one process with plain
# PEFT and torch (fresh AdamW per client-round, the same seeded batches as the clients).
CENTRAL = r"""
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from fedllm.config import Config
from fedllm.data import collate, encode, load_splits, partition
from fedllm.model import resolve

cfg = Config.from_flat(dict(a.split("=", 1) for a in sys.argv[3:]))
clients, rounds = int(sys.argv[1]), int(sys.argv[2])
path = resolve(cfg.model)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
torch.manual_seed(cfg.train.seed)
model = get_peft_model(model, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
    lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.modules(), task_type="CAUSAL_LM"))
train, _ = load_splits(cfg.data)
data = [[encode(tok, e, cfg.data.max_length, cfg.data.system_prompt)
         for e in partition(train, cfg.data, clients, pid)] for pid in range(clients)]
params = [p for p in model.parameters() if p.requires_grad]
model.train()
for rnd in range(1, rounds + 1):
    for pid, rows in enumerate(data):
        opt = torch.optim.AdamW(params, lr=cfg.train.lr)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + rnd * 1009 + pid)
        order = []
        for _ in range(cfg.train.local_steps):
            if len(order) < cfg.train.batch_size:
                order += torch.randperm(len(rows), generator=gen).tolist()
            picked, order = order[:cfg.train.batch_size], order[cfg.train.batch_size:]
            loss = model(**collate([rows[i] for i in picked], tok.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
model.save_pretrained(cfg.server.run_dir + "/central-adapter")  # beside the federated run, in its temp dir
"""


def measure(cmd: list[str], env: dict) -> dict:
    """Wall time and peak summed RSS of a command's process tree (sampled every 200 ms)."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            peak = max(peak, total)
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    if proc.returncode != 0:
        sys.stderr.write(out.decode()[-4000:])
        raise SystemExit(f"{cmd[:4]} failed with exit code {proc.returncode}")
    return {"seconds": seconds, "peak_rss_mb": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="local steps per client per round")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(ROOT / "bench" / "simulation_overhead.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedllm-bench-"))
    sets = {
        "model.name": args.model, "data.partition": "iid", "data.train-per-family": 16,
        "train.local-steps": args.steps, "train.batch-size": 4, "lora.dropout": 0.0,
        "server.num-rounds": args.rounds, "server.min-clients": args.clients,
        "server.evaluate": "false", "server.run-dir": str(work), "server.run-name": "fed",
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "fedllm", "prepare-model", "--set", f"model.name={args.model}"],
                   env=env, check=True, capture_output=True)
    flat = [f"{k}={v}" for k, v in sets.items()]
    central = measure([sys.executable, "-c", CENTRAL, str(args.clients), str(args.rounds), *flat], env)
    engines = {}
    for engine in ENGINES:
        cmd = [sys.executable, "-m", "fedllm", "simulate", "--engine", engine, "--num-clients", str(args.clients)]
        for kv in flat:
            cmd += ["--set", kv.replace("server.run-name=fed", f"server.run-name=fed-{engine}")]
        engines[engine] = measure(cmd, env)
    steps = args.clients * args.rounds * args.steps
    ratios = {e: {"time": m["seconds"] / central["seconds"], "memory": m["peak_rss_mb"] / central["peak_rss_mb"]}
              for e, m in engines.items()}
    result = {
        "model": args.model, "clients": args.clients, "rounds": args.rounds, "lora_steps": steps,
        "centralized": central, "engines": engines, "ratios": ratios,
        # the Ray engine's figures under their earlier names
        "federated": engines["ray"], "time_ratio": ratios["ray"]["time"], "memory_ratio": ratios["ray"]["memory"],
        "goal": GOALS,
    }
    print(f"{'':14}{'seconds':>10}{'peak RSS MB':>14}{'time ratio':>12}{'memory ratio':>14}")
    print(f"{'centralized':14}{central['seconds']:>10.1f}{central['peak_rss_mb']:>14.0f}")
    for e, m in engines.items():
        print(f"{e:14}{m['seconds']:>10.1f}{m['peak_rss_mb']:>14.0f}{ratios[e]['time']:>12.3f}"
              f"{ratios[e]['memory']:>14.3f}")
    print(f"goals: in-process <= 1.05 time, <= 1.2 memory; ray <= 1.10 time ({steps} LoRA steps each)")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


ENGINES = ("ray", "inprocess")
GOALS = {"inprocess": {"time": 1.05, "memory": 1.2}, "ray": {"time": 1.10}}


if __name__ == "__main__":
    main()
