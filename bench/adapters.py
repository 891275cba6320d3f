"""Resource-aware clients: quantized bases, gradient checkpointing, module choice and the PEFT family.

    python bench/adapters.py [--rounds 3] [--steps 10] [--clients 4] [--only ROW,...] [--fresh] [--out FILE]

SmolLM2-135M-Instruct, the built-in suite, `--clients` clients partitioned by task (non-IID), FedAvg,
`--rounds` rounds of `--steps` AdamW steps (batch 4) per client, the same for every row. LoRA rows
adapt every linear module of the decoder (q, k, v, o, gate, up, down; r = 8), the QLoRA recipe:
- fp32-lora: float32 base; int8-lora: LLM.int8 base; qlora: NF4 base; qlora-checkpointing: NF4 and
  train.gradient-checkpointing; mixed: model.client-quantize = nf4, int8, none, none;
- auto-modules: lora.target-modules=auto at lora.module-budget 0.5 (half the all-modules adapter);
- half-layers: every module of every other layer (also half the parameters, chosen without data);
- dora (same modules), ia3 (k, v, down), prefix, prompt, p-tuning (8 virtual tokens, lr 1e-2: prompt
  methods need a larger step; every other row lr 1e-3).
Runs go through `fedllm.server.loop.run` on an in-process grid. The server evaluates on the float32
base (model.quantize is the clients'). Columns: a client's peak RSS and its part above the imports
(partition 0's first round in a process of its own, as a SuperNode's ClientApp runs it; for mixed
that client is the 4-bit one), seconds per local step in that process, upload bytes per client per
round, eval loss and exact match after the last round (held-out split).
Goals: qlora client peak RSS <= 0.5x fp32-lora's, with eval loss within 3% of fp32-lora's;
auto-modules (half the adapter parameters) eval loss within 2% of fp32-lora's.
Each finished row is kept in the JSON, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rows import kept, peak_rss_mb, rss_mb, run_rows, save


ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).with_suffix(".json")
ALL = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
COMMON = {"data.partition": "task", "data.train-per-family": 48, "data.eval-per-family": 8,
          "server.exact-match-examples": 14, "train.batch-size": 4, "train.lr": 1e-3, "lora.target-modules": ALL,
          "server.min-clients": 1, "server.checkpoint": False, "server.eval-every": 0}
PROMPT = {"lora.virtual-tokens": 8, "train.lr": 1e-2}
ROWS: dict[str, dict[str, Any]] = {
    "fp32-lora": {},
    "int8-lora": {"model.quantize": "int8"},
    "qlora": {"model.quantize": "nf4"},
    "qlora-checkpointing": {"model.quantize": "nf4", "train.gradient-checkpointing": True},
    "mixed": {"model.client-quantize": "nf4,int8,none,none"},
    "auto-modules": {"lora.target-modules": "auto", "lora.module-budget": 0.5},
    "half-layers": {"lora.target-modules": ",".join(f"model.layers.{i}.{m}" for i in range(0, 30, 2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj"))},
    "dora": {"lora.peft": "dora"},
    "ia3": {"lora.peft": "ia3", "lora.target-modules": "k_proj,v_proj,down_proj"},
    "prefix": {"lora.peft": "prefix", **PROMPT},
    "prompt": {"lora.peft": "prompt", **PROMPT},
    "p-tuning": {"lora.peft": "p-tuning", **PROMPT},
}


def one_run(name: str, clients: int, rounds: int, steps: int, workdir: Path) -> dict[str, Any]:
    from fedllm.config import Config
    from fedllm.server.grid import LocalGrid
    from fedllm.reporting.runlog import read_metrics, summary
    from fedllm.server.loop import run

    over = {**COMMON, **ROWS[name], "server.num-rounds": rounds, "train.local-steps": steps}
    cfg = Config.from_flat({**over, "server.run-dir": str(workdir), "server.run-name": name})
    t0 = time.perf_counter()
    run_dir = run(LocalGrid(clients), cfg)
    seconds = time.perf_counter() - t0
    metrics = read_metrics(run_dir)
    s = summary(metrics)
    ups = [b for r in metrics if r["round"] > 0 for b in r["bytes-up"].values()]
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    if over["lora.target-modules"] == "auto":  # the client process trains the modules the server chose
        over["lora.target-modules"] = ",".join(adapter["target_modules"])
    client = client_figures(over, clients)
    return {"row": name, "eval-loss-before": s["eval-loss-before"], "eval-loss": s["eval-loss-after"],
            "exact-match": s["exact-match-after"], "upload-bytes": sum(ups) / len(ups), "seconds": round(seconds, 1),
            "adapter-parameters": adapter_parameters(run_dir), "prepare": metrics[0].get("prepare"), **client}


def adapter_parameters(run_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(run_dir / "adapter" / "adapter_model.safetensors")).values())


def client_figures(over: dict[str, Any], clients: int) -> dict[str, float]:
    """Peak RSS, RSS after the imports and seconds per step of partition 0's first round, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--client-round", json.dumps({**over, "clients": clients})],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def client_round(spec: dict[str, Any]) -> None:
    """Partition 0's round 1, the message made by the server half; prints its figures as JSON."""
    import peft  # noqa: F401  (the imports a ClientApp process holds before the model)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedllm.client.round import handle
    from fedllm.config import Config
    from fedllm.methods.adapters.server import LoraServer
    from fedllm.protocol import CONFIG

    clients = spec.pop("clients")
    cfg = Config.from_flat({**spec, "server.evaluate": False})
    records = LoraServer(cfg).encode_down(1)
    imports = rss_mb()
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": clients})
    t0 = time.perf_counter()
    reply = handle(RecordDict({CONFIG: ConfigRecord({**cfg.to_flat(), "server-round": 1}), **records}), context)
    seconds = time.perf_counter() - t0
    steps = reply.metric_records["metrics"]["steps"]
    print(json.dumps({"client-peak-rss-mb": round(peak_rss_mb(), 1),
                      "client-above-imports-mb": round(peak_rss_mb() - imports, 1),
                      "seconds-per-step": round(seconds / steps, 3)}))


def table(results: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    lines = [f"{'row':20} {'peak RSS MB':>11} {'above imports':>13} {'s/step':>7} {'upload KB':>10} "
             f"{'adapter params':>14} {'eval loss':>9} {'EM':>6}"]
    for name, r in results.items():
        lines.append(f"{name:20} {r['client-peak-rss-mb']:>11.0f} {r['client-above-imports-mb']:>13.0f} "
                     f"{r['seconds-per-step']:>7.3f} {r['upload-bytes'] / 1e3:>10.1f} {r['adapter-parameters']:>14,} "
                     f"{r['eval-loss']:>9.4f} {r['exact-match']:>6.3f}")
    goals: dict[str, Any] = {}
    base = results.get("fp32-lora")
    if base and "qlora" in results:
        q = results["qlora"]
        goals["qlora / fp32 client peak RSS"] = q["client-peak-rss-mb"] / base["client-peak-rss-mb"]
        goals["qlora / fp32 client RSS above imports"] = q["client-above-imports-mb"] / base["client-above-imports-mb"]
        goals["qlora / fp32 eval loss"] = q["eval-loss"] / base["eval-loss"]
    if base and "qlora-checkpointing" in results:
        q = results["qlora-checkpointing"]
        goals["qlora+checkpointing / fp32 client peak RSS"] = q["client-peak-rss-mb"] / base["client-peak-rss-mb"]
        goals["qlora+checkpointing / fp32 client RSS above imports"] = (q["client-above-imports-mb"]
                                                                         / base["client-above-imports-mb"])
    if base and "auto-modules" in results:
        a = results["auto-modules"]
        goals["auto-modules / fp32 adapter parameters"] = a["adapter-parameters"] / base["adapter-parameters"]
        goals["auto-modules / fp32 eval loss"] = a["eval-loss"] / base["eval-loss"]
        if "half-layers" in results:
            goals["half-layers / fp32 eval loss"] = results["half-layers"]["eval-loss"] / base["eval-loss"]
    if base and "int8-lora" in results:  # how far numerics alone move the figure
        goals["int8 / fp32 eval loss"] = results["int8-lora"]["eval-loss"] / base["eval-loss"]
    lines += [f"{k}: {v:.4g}" for k, v in goals.items()]
    return goals, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="local steps per client per round")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--only", default="", help="rows, comma separated")
    ap.add_argument("--fresh", action="store_true", help="ignore the rows already in --out")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--client-round", default="", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.client_round:
        return client_round(json.loads(opts.client_round))
    logging.basicConfig(level=logging.WARNING)
    setup = {"rounds": opts.rounds, "steps": opts.steps, "clients": opts.clients, "common": COMMON}
    done = kept(opts.out, setup, opts.fresh)
    wanted = [n for n in opts.only.split(",") if n] or list(ROWS)
    unknown = [n for n in wanted if n not in ROWS]
    if unknown:
        sys.exit(f"--only: unknown rows {', '.join(unknown)} (rows: {', '.join(ROWS)})")
    with tempfile.TemporaryDirectory(prefix="fedllm-peft-") as tmp:
        run_rows(wanted, done, lambda name: one_run(name, opts.clients, opts.rounds, opts.steps, Path(tmp)),
                 opts.out, setup)
    results = {n: done[n] for n in ROWS if n in done}
    goals, text = table(results)
    print(text)
    save(opts.out, setup, done, goals=goals, table=text)


if __name__ == "__main__":
    main()
