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

    def reset(self, rows: list[dict[str, Any]]) -> None:
        """Replace the log with `rows` (a resumed run's, from its checkpoint), atomically."""
        self.rows = list(rows)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows), encoding="utf-8")
        tmp.replace(self.path)

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


def ledger_view(run_dir: Path) -> str:
    """The ledger of a run as text: per client stake, scores per round, rewards earned, claimed
    and pending, and every penalty with its evidence (from RUN_DIR/ledger/).

    Raises:
        FileNotFoundError: when the run has no ledger.
    """
    base = Path(run_dir) / "ledger"
    chain = json.loads((base / "chain.json").read_text())
    accounts_file = base / "accounts.json"
    snapshot = json.loads(accounts_file.read_text()) if accounts_file.exists() else {"accounts": {}}
    rounds = [json.loads(p.read_text()) for p in sorted(base.glob("round-*.json"))]
    scores: dict[str, list[str]] = {}
    flags: dict[str, set[str]] = {}
    earned: dict[str, int] = {}
    partition: dict[str, Any] = {}
    for r in rounds:
        for c in r["clients"]:
            scores.setdefault(c["account"], []).append(f"{r['round']}:{c['score']:.3f}")
            flags.setdefault(c["account"], set()).update(c["flags"])
            earned[c["account"]] = c["cumulative"]
            partition[c["account"]] = c["partition"]

    def eth(wei: Any) -> str:
        return "-" if wei is None else f"{int(wei) / 1e18:.4f}"

    lines = [f"FedLedger {chain['contract']} on {chain['chain']} (slashed stake to {chain['slashed-to']})"]
    if "pool" in snapshot:
        lines.append(f"pool {eth(snapshot['pool'])} ETH, unclaimed {eth(snapshot['allocated'])} ETH, "
                     f"burned {eth(snapshot['burned'])} ETH")
    else:
        lines.append("(the run did not finish: stakes and claims below are as of the last round)")
    lines.append(f"{'account':44} {'part':>4} {'stake':>8} {'slashed':>8} {'earned':>8} {'claimed':>8} "
                 f"{'pending':>8}  flags  scores by round")
    for account in sorted(set(earned) | set(snapshot["accounts"]), key=lambda a: partition.get(a, -1)):
        acct = snapshot["accounts"].get(account, {})
        lines.append(f"{account:44} {partition.get(account, acct.get('partition', '-')):>4} "
                     f"{eth(acct.get('stake')):>8} {eth(acct.get('slashed')):>8} "
                     f"{eth(earned.get(account, acct.get('earned'))):>8} {eth(acct.get('claimed')):>8} "
                     f"{eth(acct.get('pending')):>8}  {','.join(sorted(flags.get(account, ()))) or '-'}  "
                     f"{' '.join(scores.get(account, []))}")
    penalties = [(r["round"], c) for r in rounds for c in r["clients"] if c["slashed"]]
    lines.append(f"penalties: {len(penalties)}")
    for rnd, c in penalties:
        lines.append(f"  round {rnd}: {c['account']} (partition {c['partition']}) {','.join(c['flags'])}: "
                     f"{eth(c['slashed'])} ETH, evidence 0x{c['evidence']} (ledger/evidence/{c['evidence']}.json)")
    gas = [r["gas-record"] for r in rounds]
    if gas:
        lines.append(f"gas per recorded round: {min(gas)}..{max(gas)} over {len(gas)} rounds")
    return "\n".join(lines)
