"""Server-side aggregation at scale: the list (every reply held, then FedAvg), the streaming fold
(each reply folded as it arrives) and the shared-memory tree (server.aggregators=2), for
updates the size of a LoRA r=8 adapter on SmolLM2-135M (q, v: 1.8 MB) and of its full
parameters (538 MB), with 4 to 256 clients.

    python bench/aggregation.py [--clients 4 16 64 256] [--sizes lora full] [--out FILE]

Each cell runs in a child process of its own: the replies are made one at a time (a new tensor
each, as a decoded reply would be), handed to the aggregation, and dropped unless the list mode
keeps them. Columns: the child's peak RSS (VmHWM, its baseline of imports and the one template
update included), the seconds spent aggregating (fold / tree calls and the final reduce; making
the replies excluded), and throughput (update bytes aggregated per second) over a memcpy of the
same bytes measured in the same child. The list mode stops where its replies would not fit in
memory. Goals: streaming memory flat in the number of clients (within 10% from 4 to 64);
throughput >= 0.5x memcpy.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTER, LAYERS, KV, VOCAB, RANK = 576, 1536, 30, 192, 49152, 8  # SmolLM2-135M


def shapes(size: str) -> dict[str, tuple[int, ...]]:
    if size == "lora":  # q_proj and v_proj, r = 8
        return {f"l{i}.{m}.{ab}": s for i in range(LAYERS) for m, out in (("q", HIDDEN), ("v", KV))
                for ab, s in (("A", (RANK, HIDDEN)), ("B", (out, RANK)))}
    per = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
           "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER), "n1": (HIDDEN,), "n2": (HIDDEN,)}
    out = {f"l{i}.{k}": s for i in range(LAYERS) for k, s in per.items()}
    return {"embed": (VOCAB, HIDDEN), "norm": (HIDDEN,), **out}


def vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(mode: str, size: str, clients: int, workers: int) -> dict:
    import torch

    from fedllm.protocol import Update
    from strategies.fold import MEAN, Running
    from strategies.rules import fedavg
    from strategies.tree import SumTree

    g = torch.Generator().manual_seed(0)
    template = {k: torch.randn(s, generator=g) for k, s in shapes(size).items()}
    nbytes = sum(t.numel() * 4 for t in template.values())
    src = torch.cat([t.reshape(-1) for t in template.values()])
    dst = torch.empty_like(src)
    memcpy = nbytes / best_of(3, dst.copy_, src)  # one contiguous copy of the update's bytes
    del src, dst
    names = list(template)
    into = [torch.empty_like(template[k]) for k in names]
    # the same bytes in the update's own tensors (one copy each, as the fold adds them)
    memcpy_tensors = nbytes / best_of(3, torch._foreach_copy_, into, [template[k] for k in names])
    del into
    base_mb = vmhwm_mb()

    def reply(i: int) -> dict:
        return {k: t * (1.0 + 1e-3 * i) for k, t in template.items()}  # a fresh tensor per reply

    seconds, held = 0.0, []
    sink = Running(MEAN) if mode == "stream" else SumTree(workers) if mode == "tree" else None
    for i in range(clients):
        delta, weight = reply(i), float(1 + i % 3)
        if sink is None:
            held.append(Update(i + 1, delta, weight))
            continue
        t0 = time.perf_counter()
        sink.add(delta, weight)
        seconds += time.perf_counter() - t0
        del delta
    t0 = time.perf_counter()
    out = fedavg(held, None) if sink is None else sink.result()
    seconds += time.perf_counter() - t0
    if isinstance(sink, SumTree):
        sink.close()
    assert out.keys() == template.keys()
    return {"mode": mode, "size": size, "clients": clients, "update_mb": nbytes / 2**20, "peak_rss_mb": vmhwm_mb(),
            "baseline_mb": base_mb, "seconds": seconds, "throughput_gbs": clients * nbytes / seconds / 1e9,
            "memcpy_gbs": memcpy / 1e9, "vs_memcpy": clients * nbytes / seconds / memcpy,
            "memcpy_tensors_gbs": memcpy_tensors / 1e9, "vs_memcpy_tensors": clients * nbytes / seconds / memcpy_tensors}


def best_of(n: int, fn, *args) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def fits(mode: str, size: str, clients: int, budget_gb: float) -> bool:
    update_gb = sum(math.prod(s) for s in shapes(size).values()) * 4 / 1e9
    return mode != "list" or (clients + 2) * update_gb <= budget_gb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--sizes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--modes", nargs="+", default=["list", "stream", "tree"], choices=["list", "stream", "tree"])
    ap.add_argument("--workers", type=int, default=2, help="tree workers (server.aggregators)")
    ap.add_argument("--memory-gb", type=float, default=16.0, help="what the list mode may hold")
    ap.add_argument("--out", default=str(ROOT / "bench" / "aggregation.json"))
    ap.add_argument("--one", nargs=3, metavar=("MODE", "SIZE", "CLIENTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(child(args.one[0], args.one[1], int(args.one[2]), args.workers)))
        return
    rows = []
    print(f"{'size':6}{'mode':8}{'clients':>8}{'update MB':>10}{'peak RSS MB':>13}{'agg s':>9}{'GB/s':>8}"
          f"{'x memcpy':>10}{'x copy per tensor':>19}")
    for size in args.sizes:
        for mode in args.modes:
            for n in args.clients:
                if not fits(mode, size, n, args.memory_gb):
                    print(f"{size:6}{mode:8}{n:>8}   (the list would not fit in {args.memory_gb:g} GB: skipped)")
                    continue
                proc = subprocess.run([sys.executable, __file__, "--one", mode, size, str(n),
                                       "--workers", str(args.workers)], capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    raise SystemExit(f"{size} {mode} {n}: failed\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"{size:6}{mode:8}{n:>8}{r['update_mb']:>10.1f}{r['peak_rss_mb']:>13.0f}{r['seconds']:>9.3f}"
                      f"{r['throughput_gbs']:>8.2f}{r['vs_memcpy']:>10.2f}{r['vs_memcpy_tensors']:>19.2f}", flush=True)
    goals = {}
    for size in args.sizes:
        by = {r["clients"]: r for r in rows if r["size"] == size and r["mode"] == "stream"}
        if 4 in by and 64 in by:
            goals[f"stream peak RSS 64/4 clients ({size})"] = by[64]["peak_rss_mb"] / by[4]["peak_rss_mb"]
        streamed = [r["vs_memcpy"] for r in rows if r["size"] == size and r["mode"] == "stream"]
        if streamed:
            goals[f"stream throughput / memcpy, lowest ({size})"] = min(streamed)
        tree = [r["vs_memcpy"] for r in rows if r["size"] == size and r["mode"] == "tree"]
        if tree:
            goals[f"tree throughput / memcpy, lowest ({size})"] = min(tree)
    for k, v in goals.items():
        print(f"{k}: {v:.3f}")
    Path(args.out).write_text(json.dumps({"rows": rows, "goals": goals, "workers": args.workers,
                                          "targets": {"stream peak RSS 64/4": "<= 1.10", "x memcpy": ">= 0.5"}},
                                         indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
