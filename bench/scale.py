"""Does the server's cost depend on how many clients are registered? 10, 100 and 1000 registered
clients, 8 sampled per round, 3 rounds of a tiny random Llama (SmolLM2's tokenizer, hidden 64,
2 layers), on the in-process engine.

    python bench/scale.py [--registered 10 100 1000] [--per-round 8] [--rounds 3] [--out FILE]

Each row runs in a child process of its own (`fedllm.server.loop.run` over a LocalGrid of that
many nodes; the clients train in the same process, one after another). Every client holds 4
examples (the built-in data grows with the clients, so that a client's work is the same in
every row). Columns: the mean round seconds (metrics.jsonl's round-seconds), the server's share
of them (the round less the time the clients took, measured around each ClientApp call), the
child's peak RSS (VmHWM) and the contexts the grid made (only sampled nodes get one). Round 1
(the model load, the partitioning) is left out of the means. Goal: seconds per round and RSS
flat in the number of registered clients (within 10% from the fewest to the most).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama with SmolLM2-135M-Instruct's tokenizer (from the GGUF cache)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedllm.config import ModelConfig
    from fedllm.model import resolve

    tok = AutoTokenizer.from_pretrained(resolve(ModelConfig()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def child(registered: int, per_round: int, rounds: int, model: str, work: str) -> dict:
    from fedllm.config import Config
    from fedllm.server.grid import LocalGrid
    from fedllm.server.loop import run

    cfg = Config.from_flat({
        "model.name": model, "server.run-dir": work, "server.run-name": f"n{registered}",
        "server.num-rounds": rounds, "server.clients-per-round": per_round, "server.min-clients": 1,
        "server.evaluate": False, "data.partition": "iid", "data.train-per-family": -(-4 * registered // 7),
        "train.local-steps": 2, "train.batch-size": 2, "lora.dropout": 0.0, "compression.up": "int8"})
    grid = LocalGrid(registered, spill=Path(work) / f"spill-{registered}")
    run_dir = run(grid, cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    hwm = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmHWM:"))
    clients = [sum(grid.client_seconds[i * per_round: (i + 1) * per_round]) for i in range(rounds)]
    later = range(1, len(rows))  # round 1 loads the model and partitions the data
    return {"registered": registered, "per_round": per_round, "rounds": rounds,
            "round_seconds": [r["round-seconds"] for r in rows], "client_seconds": clients,
            "mean_round_seconds": sum(rows[i]["round-seconds"] for i in later) / len(later),
            "mean_server_seconds": sum(rows[i]["round-seconds"] - clients[i] for i in later) / len(later),
            "peak_rss_mb": hwm / 1024, "contexts": len(grid.contexts), "messages": grid.sent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registered", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--per-round", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "scale.json"))
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(child(int(args.one[0]), args.per_round, args.rounds, args.one[1], args.one[2])))
        return
    work = Path(tempfile.mkdtemp(prefix="fedllm-scale-"))
    model = tiny_model(work / "tiny")
    rows = []
    print(f"{'registered':>11}{'per round':>10}{'s / round':>11}{'server s':>10}{'peak RSS MB':>13}{'contexts':>10}")
    for n in args.registered:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n), str(model), str(work),
                               "--per-round", str(args.per_round), "--rounds", str(args.rounds)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{n} clients: failed\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{n:>11}{r['per_round']:>10}{r['mean_round_seconds']:>11.3f}{r['mean_server_seconds']:>10.3f}"
              f"{r['peak_rss_mb']:>13.0f}"
              f"{r['contexts']:>10}", flush=True)
    first, last = rows[0], rows[-1]
    goals = {"round seconds, most / fewest registered": last["mean_round_seconds"] / first["mean_round_seconds"],
             "server seconds per round, most / fewest registered":
                 last["mean_server_seconds"] / first["mean_server_seconds"],
             "peak RSS, most / fewest registered": last["peak_rss_mb"] / first["peak_rss_mb"]}
    for k, v in goals.items():
        print(f"{k}: {v:.3f} (goal <= 1.10)")
    Path(args.out).write_text(json.dumps({"rows": rows, "goals": goals, "target": "<= 1.10"}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
