"""Run directory, metrics log (JSONL, one line per round), and the printed summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedllm.config import Config


def make_run_dir(cfg: Config) -> Path:
    """A new run directory under server.run-dir; refuses to overwrite an existing run."""
    name = cfg.server.run_name or time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.server.run_dir).expanduser() / name
    if (path / "metrics.jsonl").exists():
        from fedllm.errors import ConfigError

        raise ConfigError(f"server.run-name: {path} holds a run already; pick another name")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_flat(), indent=2, sort_keys=True) + "\n")
    return path


class MetricsLog:
    """Appends one JSON object per line and flushes, so a crash loses at most one round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Before/after figures of a run from its metrics rows."""
    evaluated = [r for r in rows if "eval-loss" in r] or [{}]
    first, last = evaluated[0], evaluated[-1]
    trained = [r for r in rows if r["round"] > 0]
    return {
        "rounds": len(trained),
        "eval-loss-before": first.get("eval-loss"),
        "eval-loss-after": last.get("eval-loss"),
        "exact-match-before": first.get("exact-match"),
        "exact-match-after": last.get("exact-match"),
        "bytes-up-total": sum(sum(r.get("bytes-up", {}).values()) for r in trained),
        "bytes-down-total": sum(sum(r.get("bytes-down", {}).values()) for r in trained),
        "seconds": sum(r.get("round-seconds", 0.0) for r in trained),
    }


def format_summary(s: dict[str, Any]) -> str:
    def num(v: Any, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    return "\n".join([
        f"rounds             {s['rounds']}",
        f"eval loss          {num(s['eval-loss-before'], 4)} -> {num(s['eval-loss-after'], 4)}",
        f"exact match        {num(s['exact-match-before'], 3)} -> {num(s['exact-match-after'], 3)}",
        f"bytes up / down    {human_bytes(s['bytes-up-total'])} / {human_bytes(s['bytes-down-total'])}",
        f"training time      {s['seconds']:.1f} s",
    ])


def human_bytes(n: float) -> str:
    """1234 -> '1.2 KB'; decimal units, as network figures are."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"
