"""Upload compression versus final eval loss, against uncompressed FedAvg with the same seeds.

    python bench/compression.py [--quick] [--only LABEL ...] [--rounds N --steps N] [--out FILE]

Setting (the LoRA demo's): SmolLM2-135M-Instruct, the built-in suite (7 families), 4 clients
with task-partitioned data, 4 rounds x 10 local AdamW steps, LoRA r=8 on q_proj,v_proj,
FedAvg. Each codec chain is a full `fedllm simulate` run in its own process; evaluation on
the held-out split before the first and after the last round. Uploads are the bytes of the
encoded payload each client sent (metrics.jsonl "bytes-up"). Goal: >= 100x smaller uploads
at <= 1% relative eval-loss gap. `--quick` runs a tiny random model for 2 rounds (a smoke
test of the script, not a figure). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).with_suffix(".json")
SETTING = {
    "data.partition": "task",
    "data.train-per-family": 48,
    "data.eval-per-family": 8,
    "server.exact-match-examples": 21,
    "server.eval-every": 0,
    "server.num-rounds": 4,
    "train.local-steps": 10,
    "train.batch-size": 4,
    "train.lr": 0.002,
    "lora.rank": 8,
}
QUICK = {"server.num-rounds": 2, "train.local-steps": 4, "data.train-per-family": 8, "data.eval-per-family": 2,
         "server.exact-match-examples": 4, "server.max-new-tokens": 4}
# (label, compression.up, error feedback)
CHAINS = [
    ("none", "", True),
    ("int8", "int8", True),
    ("int2", "quantize(2, block=256) > zstd", True),
    ("topk10-int2", "topk(0.1) > quantize(2) > zstd", True),
    ("topk5-int4", "topk(0.05) > quantize(4) > zstd", True),
    ("topk2-int4", "topk(0.02) > quantize(4) > zstd", True),
    ("topk2-int4-noEF", "topk(0.02) > quantize(4) > zstd", False),
    ("topk1-int4", "topk-int4", True),
    ("randk10-int2-unbiased", "randk(0.1) > quantize(2, block=256) > zstd", False),
    ("randk10-int2-EF", "randk(0.1, unbiased=False) > quantize(2, block=256) > zstd", True),
    ("randk5-int2-unbiased", "randk(0.05) > quantize(2, block=256) > zstd", False),
    ("fedzip", "fedzip", True),
]


def run_one(label: str, chain: str, feedback: bool, setting: dict, run_dir: Path) -> dict:
    sets = {**setting, "compression.up": chain, "compression.error-feedback": feedback,
            "server.run-dir": run_dir, "server.run-name": label}
    args = [sys.executable, "-m", "fedllm", "simulate", "--num-clients", "4"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise SystemExit(f"{label}: fedllm simulate failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / label / "metrics.jsonl").read_text().splitlines()]
    ups = [b for r in rows[1:] for b in r["bytes-up"].values()]
    return {
        "label": label, "chain": chain or "float32 arrays", "error_feedback": feedback,
        "upload_bytes": statistics.mean(ups), "eval_loss_before": rows[0]["eval-loss"],
        "eval_loss": rows[-1]["eval-loss"], "exact_match": rows[-1]["exact-match"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def tiny_model(path: Path) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, for --quick."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedllm.config import ModelConfig
    from fedllm.model import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve(ModelConfig())))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: checks the script runs")
    ap.add_argument("--only", nargs="*", help="labels to run (default: all)")
    ap.add_argument("--rounds", type=int, help="server.num-rounds (default 4)")
    ap.add_argument("--steps", type=int, help="train.local-steps per round (default 10)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setting = dict(SETTING)
        if args.quick:
            setting.update(QUICK, **{"model.name": tiny_model(Path(tmp) / "tiny")})
        setting.update({k: v for k, v in (("server.num-rounds", args.rounds), ("train.local-steps", args.steps))
                        if v is not None})
        results = []
        for label, chain, feedback in CHAINS:
            if args.only and label not in args.only:
                continue
            results.append(run_one(label, chain, feedback, setting, Path(tmp) / "runs"))
            print(f"{label}: {results[-1]}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["label"] == "none"), results[0])
    for r in results:
        r["upload_ratio"] = base["upload_bytes"] / r["upload_bytes"]
        r["relative_gap"] = (r["eval_loss"] - base["eval_loss"]) / base["eval_loss"]
        r["meets_goal"] = r["upload_ratio"] >= 100 and r["relative_gap"] <= 0.01
    print(f"| codec chain | error feedback | upload B/client/round | smaller | eval loss "
          f"(before {base['eval_loss_before']:.4f}) | gap vs none | exact match | goal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['chain']} | {'on' if r['error_feedback'] else 'off'} | {r['upload_bytes']:,.0f} | "
              f"{r['upload_ratio']:.1f}x | {r['eval_loss']:.4f} | {100 * r['relative_gap']:+.2f}% | "
              f"{r['exact_match']:.3f} | {'met' if r['meets_goal'] else '-'} |")
    Path(args.out).write_text(json.dumps({"setting": setting, "quick": args.quick, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
