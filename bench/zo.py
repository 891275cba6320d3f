"""Zeroth-order (FedKSeed) figures: bytes on the wire, perturbation throughput, sync time.

    python bench/zo.py [--quick] [--out FILE]

(1) Bytes up and down per client per round at K=4096, tau=200, 8-bit scalars, for 1, 4 and 10
    clients, through the real codec and the zo method's server half (its round payload) (goal: up <= 0.7
    KB, down <= 4 KB; FedKSeed sends about 1.6 KB up and 16 KB down).
(2) Regenerating z for every weight of SmolLM2-135M: fedllm's counter-based generator (the same z on
    every device) against the generators it replaced, side by side: torch.randn per tensor (Gaussian)
    and numpy's SFC64 bytes (Rademacher). Goals: each >= 1.0x the one it replaced; Rademacher >= 5x
    torch.randn.
(3) Wall time of a sync for a client that missed 10 rounds, on SmolLM2-135M.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from fedllm.config import Config
from fedllm.model import load_base_model
from fedllm.methods.zo import engine as zo
from fedllm.methods.zo.server import ZOServer
from fedllm.protocol import Update
from strategies import fedavg

OUT = Path(__file__).with_suffix(".json")


def wire_bytes(k: int, tau: int, clients: int, bits: int, rounds: int = 11) -> dict:
    cfg = Config.from_flat({"train.method": "zo", "zo.num-seeds": k, "zo.bits": bits})
    server = ZOServer(cfg, fingerprint=0)  # aggregates only: no model needed
    gen = torch.Generator().manual_seed(0)
    ups, downs = [], []
    for r in range(1, rounds + 1):
        updates = []
        for c in range(clients):
            idx = torch.randint(k, (tau,), generator=gen).tolist()
            g = (torch.randn(tau, generator=gen) * 5).tolist()  # projected gradients: a few units
            up = zo.encode_upload(k, list(zip(idx, g)), bits, seed=r * 100 + c)
            ups.append(len(up))
            updates.append(Update(c, {"sums": zo.decode(up, k)}, 10.0, {}, len(up)))
        if r > 1:  # a client that took part last round gets that round's payload
            downs.append(len(zo.encode_down(server.state, server.downlink.history, server.state.version - 1)))
        server.apply(fedavg(updates, cfg), updates, r)  # the default rule's aggregate, quantized and applied
    stale = len(zo.encode_down(server.state, server.downlink.history, server.state.version - 10))
    return {"clients": clients, "up_bytes": statistics.mean(ups), "down_bytes": statistics.mean(downs),
            "down_bytes_missed_10": stale, "full_state_bytes": 1 + 8 + 8 * k,
            "fedkseed_up_bytes": tau * 8, "fedkseed_down_bytes": k * 4}


def throughput(params: list[torch.Tensor], repeats: int) -> dict:
    """Seconds to add z to every weight: fedllm's counter-based generator against the generators it
    replaced (torch.randn on the parameters' device for Gaussian z, numpy's SFC64 bytes expanded by a
    table for Rademacher z), side by side in one run, best of interleaved repeats."""
    n = sum(p.numel() for p in params)
    signs = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1

    def randn(seed: int) -> None:  # fedllm's Gaussian z before rng: torch's generator (device-dependent)
        gen = torch.Generator().manual_seed(seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen), alpha=1e-6)

    def sfc64(seed: int) -> None:  # fedllm's Rademacher z before rng
        gen = np.random.Generator(np.random.SFC64(seed))
        for p in params:
            packed = np.frombuffer(gen.bytes((p.numel() + 7) // 8), dtype=np.uint8)
            p.add_(torch.from_numpy(signs.take(packed, axis=0).reshape(-1)[:p.numel()]).view(p.shape), alpha=1e-6)

    def ours(dist: str):
        return lambda seed: zo.perturb_(params, seed, 1e-6, dist)

    runs = {"torch.randn (before)": randn, "fedllm gaussian": ours("gaussian"),
            "SFC64 signs (before)": sfc64, "fedllm rademacher": ours("rademacher")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():
        fn(0)  # warm-up
    for i in range(repeats):  # interleaved: drift on a shared machine hits every generator alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(i + 1)
            times[name].append(time.perf_counter() - t0)
    out = {name: {"seconds": min(t), "elements_per_s": n / min(t)} for name, t in times.items()}
    base = out["torch.randn (before)"]["seconds"]
    for v in out.values():
        v["speedup"] = base / v["seconds"]
    out["fedllm gaussian"]["vs_before"] = out["torch.randn (before)"]["seconds"] / out["fedllm gaussian"]["seconds"]
    out["fedllm rademacher"]["vs_before"] = (out["SFC64 signs (before)"]["seconds"]
                                             / out["fedllm rademacher"]["seconds"])
    return {"elements": n, "results": out}


def sync_time(missed: int, tau: int, k: int, dist: str) -> dict:
    cfg = Config.from_flat({"train.method": "zo", "zo.num-seeds": k, "zo.dist": dist})
    engine, _ = zo.engine_for(cfg)
    state, gen = zo.Accumulators(k), torch.Generator().manual_seed(1)
    for r in range(missed):
        idx = torch.randint(k, (tau,), generator=gen)
        state.apply(zo.encode(k, idx, torch.randn(tau, generator=gen).double(), 8, r, zo.SUMS))
    t0 = time.perf_counter()
    seeds = engine.sync(state)
    seconds = time.perf_counter() - t0
    return {"missed_rounds": missed, "tau": tau, "K": k, "dist": dist, "seeds_regenerated": seeds,
            "seconds": seconds, "seconds_per_seed": seconds / max(seeds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a shorter sync")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    wire = [wire_bytes(4096, 200, c, 8) for c in (1, 4, 10)]
    print("(1) bytes per client per round, K=4096, tau=200, 8-bit scalars")
    print(f"{'clients':>8}{'up':>8}{'down':>8}{'down, missed 10':>17}{'FedKSeed up/down':>18}")
    for w in wire:
        print(f"{w['clients']:>8}{w['up_bytes']:>8.0f}{w['down_bytes']:>8.0f}{w['down_bytes_missed_10']:>17}"
              f"{w['fedkseed_up_bytes']:>10}/{w['fedkseed_down_bytes']}")

    model, _ = load_base_model(Config().model, cached=False)
    params = [p for _, p in zo.trainable(model, "all")]
    thr = throughput(params, 2 if args.quick else 5)
    print(f"\n(2) regenerating z for all {thr['elements'] / 1e6:.1f} M weights of SmolLM2-135M")
    for name, v in thr["results"].items():
        before = f"{v['vs_before']:>7.2f}x its predecessor" if "vs_before" in v else ""
        print(f"{name:>22}{v['seconds'] * 1e3:>9.0f} ms{v['elements_per_s'] / 1e9:>7.2f} G/s{v['speedup']:>7.2f}x"
              f"{before}")
    del model, params

    tau = 20 if args.quick else 50
    sync = sync_time(10, tau, 4096, "rademacher")
    print(f"\n(3) sync after missing 10 rounds (tau={tau}, K=4096, one client a round): "
          f"{sync['seeds_regenerated']} seeds in {sync['seconds']:.1f} s ({sync['seconds_per_seed'] * 1e3:.0f} ms a seed)")
    Path(args.out).write_text(json.dumps({"wire": wire, "throughput": thr, "sync": sync}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
