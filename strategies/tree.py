"""Hierarchical aggregation on one machine (LIFL's idea): W worker processes each fold a shard
of the round's updates (every W-th one) into a partial weighted sum held in shared memory;
the server reduces the W partials at the end.

    with SumTree(workers=4) as tree:               # server.aggregators=4
        for u in replies_as_they_arrive:
            tree.add(u.delta, u.num_examples)       # copies u into a free shared slot, returns
        delta = tree.result()                       # sum of the partials / total weight

The server's own work per update is one copy into a shared-memory slot (a few slots per
worker bound the memory: the server waits for a free slot when the workers fall behind);
the multiply-adds run in the workers, beside the server's receiving and decoding. Workers are
forked when the first update arrives (its tensors fix the layout) and end with the round.
The result equals the flat fold up to float32 rounding (the partial sums associate the terms
differently). Across machines the same tree puts regional aggregators in front of the
SuperLink (README, "Scale").
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import queue
from typing import Any

import torch

from fedllm.protocol import State

SLOTS_PER_WORKER = 2


def shared_zeros(rows: int, cols: int) -> torch.Tensor:
    """A (rows, cols) float32 tensor over an anonymous shared mapping: the kernel zero-fills its
    pages on first touch (no copy, unlike `share_memory_()`), and forked workers share it."""
    buf = mmap.mmap(-1, max(rows * cols * 4, 1))
    return torch.frombuffer(buf, dtype=torch.float32, count=rows * cols).view(rows, cols)


def _worker(index: int, todo: Any, free: Any, slots: torch.Tensor, partials: torch.Tensor) -> None:
    torch.set_num_threads(1)  # one core each; a forked child must not start the parent's thread pool
    while (item := todo.get()) is not None:
        slot, weight = item
        partials[index].add_(slots[slot], alpha=weight)  # (D,)
        free.put(slot)


class SumTree:
    """A weighted sum of updates computed by `workers` forked processes over shared memory."""

    def __init__(self, workers: int) -> None:
        if workers < 2:
            raise ValueError(f"a tree needs at least 2 workers, got {workers}")
        self.workers = workers
        self.count, self.weight = 0, 0.0
        self.layout: list[tuple[str, torch.Size, torch.dtype]] = []
        self.procs: list[Any] = []

    def _start(self, like: State) -> None:
        self.layout = [(k, like[k].shape, like[k].dtype) for k in sorted(like)]
        size = sum(shape.numel() for _, shape, _ in self.layout)
        ctx = mp.get_context("fork")  # the workers inherit the shared tensors and queues; no re-import
        n_slots = SLOTS_PER_WORKER * self.workers
        self.slots = shared_zeros(n_slots, size)  # (S, D)
        self.partials = shared_zeros(self.workers, size)  # (W, D)
        self.free = ctx.Queue()
        for s in range(n_slots):
            self.free.put(s)
        self.todo = [ctx.Queue() for _ in range(self.workers)]
        self.procs = [ctx.Process(target=_worker, args=(i, self.todo[i], self.free, self.slots, self.partials),
                                  daemon=True, name=f"fedllm-aggregator-{i}") for i in range(self.workers)]
        for p in self.procs:
            p.start()

    def _check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            if not p.is_alive():
                raise RuntimeError(f"aggregator worker {i} stopped (exit code {p.exitcode})")

    def add(self, delta: State, weight: float) -> None:
        """Hand `delta` (weighted by `weight`) to the next worker."""
        if not self.procs:
            self._start(delta)
        if sorted(delta) != [k for k, _, _ in self.layout]:
            raise ValueError("tree: an update's tensors differ from the first update's")
        while True:
            try:
                slot = self.free.get(timeout=1.0)
                break
            except queue.Empty:
                self._check_alive()
        offset = 0
        for k, shape, _ in self.layout:
            n = shape.numel()
            self.slots[slot, offset: offset + n].copy_(delta[k].reshape(-1))
            offset += n
        self.todo[self.count % self.workers].put((slot, float(weight)))
        self.count += 1
        self.weight += float(weight)

    def result(self) -> State:
        """The weighted mean of every update added; ends the workers."""
        if self.weight <= 0:
            raise ValueError("weights must sum to a positive number")
        for q in self.todo:
            q.put(None)
        for p in self.procs:
            p.join()
        for i, p in enumerate(self.procs):
            if p.exitcode != 0:
                raise RuntimeError(f"aggregator worker {i} failed (exit code {p.exitcode})")
        total = self.partials[0].clone()
        for partial in self.partials[1:]:
            total += partial
        total /= self.weight
        out, offset = {}, 0
        for k, shape, dtype in self.layout:
            n = shape.numel()
            out[k] = total[offset: offset + n].reshape(shape).clone()
            offset += n
        self.procs = []
        return out

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        self.procs = []

    def __enter__(self) -> "SumTree":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
