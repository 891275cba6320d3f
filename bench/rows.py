"""What the row-by-row benchmarks share (diloco, adapters, dpo): rows kept in the JSON as each
finishes, so an interrupted bench continues where it stopped, and this process's memory figures.

    done = kept(opts.out, setup, opts.fresh)
    run_rows(wanted, done, lambda name: one_run(name, ...), opts.out, setup)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def kept(out: Path, setup: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """The rows `out` holds from an earlier run with the same setup (none with `fresh`)."""
    if fresh or not out.exists():
        return {}
    old = json.loads(out.read_text())
    return old.get("runs", {}) if old.get("setup") == setup else {}


def save(out: Path, setup: dict[str, Any], done: dict[str, Any], **extra: Any) -> None:
    out.write_text(json.dumps({"setup": setup, "runs": done, **extra}, indent=1) + "\n")


def run_rows(wanted: list[str], done: dict[str, Any], run_one: Callable[[str], dict[str, Any]], out: Path,
             setup: dict[str, Any]) -> None:
    """Run each wanted row not done yet, printing it and saving after each."""
    for name in wanted:
        if name in done:
            continue
        print(f"== {name}", flush=True)
        done[name] = run_one(name)
        print(json.dumps(done[name]), flush=True)
        save(out, setup, done)


def rss_mb(field: str = "VmRSS:") -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's peak
    into a child across fork and exec, so a child of a large process reads the parent's."""
    return rss_mb("VmHWM:")
