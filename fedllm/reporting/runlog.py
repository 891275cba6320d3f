"""A run's files: its directory, config.json, the metrics log (JSONL, one line per round), the
summary printed and saved at the end, and `fedllm ledger`'s view of the ledger records."""

from __future__ import annotations

import json
import math
import logging
import os
import time
from pathlib import Path
from typing import Any

from fedllm.config import Config
from fedllm.evaluation.metrics import METRICS
from fedllm.files import FINITE, FileFormatError, Maybe, check, parse_json, read_json, read_jsonl, read_text

CONFIG_BYTES = 16 << 20  # a flat config is a few KB

log = logging.getLogger(__name__)


def make_run_dir(cfg: Config) -> Path:
    """A new run directory under server.run-dir; refuses to overwrite an existing run."""
    name = cfg.server.run_name or time.strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.server.run_dir).expanduser() / name
    if (path / "metrics.jsonl").exists():
        from fedllm.errors import ConfigError

        raise ConfigError(f"server.run-name: {path} holds a run already; pick another name")
    path.mkdir(parents=True, exist_ok=True)
    write_config(path, cfg)
    return path


def write_config(run_dir: Path, cfg: Config) -> None:
    """RUN_DIR/config.json: the run's full flat config."""
    write_atomically(Path(run_dir) / "config.json", json.dumps(cfg.to_flat(), indent=2, sort_keys=True) + "\n")


def read_config(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/config.json as a flat dict ({} when the run has none).

    Raises:
        FileFormatError: naming the file when it is not a JSON object.
    """
    path = Path(run_dir) / "config.json"
    return parse_config(read_text(path, CONFIG_BYTES), str(path)) if path.exists() else {}


def parse_config(text: str, where: str) -> dict[str, Any]:
    """A config.json's text as a flat dict whose keys can be named in a one-line error.

    Raises:
        FileFormatError: naming `where` when it is not a JSON object of printable keys.
    """
    config = parse_json(text, where)
    check(config, {"*": object}, where)
    for key in config:
        if not (key.isprintable() and 0 < len(key) <= 200):
            raise FileFormatError(f"{where}: {key[:40]!r} is not a config key")
    return config


def load_run_plugins(config: dict[str, Any]) -> None:
    """Import the run's server.plugins (their metrics join the report), when this process can:
    a report of a run whose plug-ins are not installed here shows the built-in metrics only."""
    from fedllm.errors import ConfigError
    from fedllm.plugins import import_plugins

    try:
        import_plugins(str(config.get("server.plugins", "")))
    except ConfigError as err:
        log.warning("%s (the report shows the metrics registered without it)", err)


class MetricsLog:
    """Appends one JSON object per line and flushes, so a crash loses at most one round."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def reset(self, rows: list[dict[str, Any]]) -> None:
        """Replace the log with `rows` (a resumed run's, from its checkpoint), atomically."""
        self.rows = list(rows)
        write_atomically(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/metrics.jsonl's rows, each checked against `row_spec()`. A cut-off last line (what
    a crash mid-write leaves) is skipped with a warning; a bad line before it is an error.

    Raises:
        FileFormatError: naming the file (and line and field) of a missing file or a malformed row.
    """
    return [row for _, row in read_jsonl(Path(run_dir) / "metrics.jsonl", row_spec(), cut_last=True)]


def row_spec() -> dict[str, Any]:
    """What the readers of a metrics row (summary, report, compare, trackers) index in it, and its
    type (fedllm.files' spec); other keys pass unchecked. Registered metrics are read at call time,
    so a run's plug-in metrics count once its server.plugins are imported."""
    figure = (float, None)
    per_node = Maybe({"*": float})
    return {
        "round": int,
        **{key: Maybe(figure) for key in ("eval-loss", *METRICS.names(), *PREFERENCE)},
        "round-seconds": Maybe(float),
        "bytes-up": per_node, "bytes-down": per_node,
        "families": Maybe((None, {"*": {"*": figure}})),
        "lm-eval": Maybe((None, {"*": {"*": float}})),
        "ledger": Maybe({"scores": per_node, "rewards": per_node, "slashed": per_node}),
        "clients": Maybe({"*": {"partition-id": Maybe(FINITE)}}),  # a MetricRecord's 0.0
        "dropped": Maybe(list),
    }


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: the old file stays whole
    until the new one is complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a crash's leftover, or a planted link: never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)  # a link at `path` is replaced, its target left alone


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Before/after figures of a run from its metrics rows, with the communication they cost
    (FlowerTune ranks a run by its score at its total bytes)."""
    evaluated = [r for r in rows if "eval-loss" in r] or [{}]
    first, last = evaluated[0], evaluated[-1]
    trained = [r for r in rows if r["round"] > 0]
    up = sum(sum(r.get("bytes-up", {}).values()) for r in trained)
    down = sum(sum(r.get("bytes-down", {}).values()) for r in trained)
    tasks = [r for r in rows if r.get("lm-eval")]
    out = {
        "rounds": len(trained),
        "eval-loss-before": first.get("eval-loss"),
        "eval-loss-after": last.get("eval-loss"),
        **{f"{m.name}-{when}": row.get(m.name) for m in METRICS.entries()
           for when, row in (("before", first), ("after", last))},
        "bytes-up-total": up,
        "bytes-down-total": down,
        "bytes-total": up + down,
        "seconds": sum(r.get("round-seconds", 0.0) for r in trained),
        "client-seconds-total": sum(client_seconds(r) for r in trained),
    }
    for key in PREFERENCE:  # train.method=dpo: held-out rewards against the run's starting model
        if key in last:
            out[f"{key}-before"], out[f"{key}-after"] = first.get(key), last.get(key)
    held = [f for r in trained if (f := personal_figures(r))]
    if held:  # lora.personal: the clients' own held-out figures, at the last round they reported them
        out.update({f"{k}-after": v for k, v in held[-1].items()})
    if last.get("families"):
        out["families-after"] = {name: {k: f.get(k) for k in ("eval-loss", *METRICS.names())}
                                 for name, f in last["families"].items()}
    if tasks:
        from fedllm.evaluation.harness import headline

        out["lm-eval-before"] = headline(tasks[0]["lm-eval"])
        out["lm-eval-after"] = headline(tasks[-1]["lm-eval"])
    return out


PREFERENCE = ("reward-accuracy", "reward-margin", "preference-accuracy")


def personal_figures(row: dict[str, Any]) -> dict[str, float]:
    """lora.personal: the means over a round's clients that reported both held-out figures:
    personal-eval-loss (global + private adapter), global-eval-loss-clients (the global adapter
    alone, on the same clients' held-out shares) and personal-ratio (the mean of each client's
    personal / global); {} for a round without them."""
    pairs = []
    for m in row.get("clients", {}).values():
        p, g = (m.get("personal-eval-loss"), m.get("global-eval-loss")) if isinstance(m, dict) else (None, None)
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in (p, g)) and g > 0:
            pairs.append((float(p), float(g)))
    if not pairs:
        return {}
    n = len(pairs)
    return {"personal-eval-loss": sum(p for p, _ in pairs) / n,
            "global-eval-loss-clients": sum(g for _, g in pairs) / n, "personal-ratio": sum(p / g for p, g in pairs) / n}


def client_seconds(row: dict[str, Any]) -> float:
    """The seconds a round's accepted clients worked (sync, train, encode; their sum): the compute a
    federation spends, whatever runs in parallel."""
    values = [m.get("client-seconds") for m in row.get("clients", {}).values() if isinstance(m, dict)]
    return sum(float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v))


def preference_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, 'before -> after') of the preference figures a summary holds."""
    return [(key.replace("-", " "), f"{number_text(s[key + '-before'], 3)} -> {number_text(s[key + '-after'], 3)}")
            for key in PREFERENCE if f"{key}-after" in s]


def number_text(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def metric_lines(s: dict[str, Any], digits: int) -> list[tuple[str, str]]:
    """(label, 'before -> after') of every registered evaluation metric (fedllm.evaluation.metrics)."""
    return [(m.meta.get("label", m.name), f"{number_text(s.get(m.name + '-before'), digits)} -> "
             f"{number_text(s.get(m.name + '-after'), digits)}") for m in METRICS.entries()]


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rounds             {s['rounds']}",
        f"eval loss          {number_text(s['eval-loss-before'], 4)} -> {number_text(s['eval-loss-after'], 4)}",
        *(f"{label:18} {value}" for label, value in metric_lines(s, 3)),
    ]
    lines += [f"{label:18} {value}" for label, value in preference_lines(s)]
    if "personal-eval-loss-after" in s:
        lines.append(f"personal eval loss {s['personal-eval-loss-after']:.4f} (the global adapter alone "
                     f"{s['global-eval-loss-clients-after']:.4f}: {s['personal-ratio-after']:.3f} of it, per client)")
    for task, value in s.get("lm-eval-after", {}).items():
        lines.append(f"{task:18} {number_text(s['lm-eval-before'].get(task), 3)} -> {number_text(value, 3)}")
    lines += [
        f"bytes up / down    {human_bytes(s['bytes-up-total'])} / {human_bytes(s['bytes-down-total'])} "
        f"(total {human_bytes(s.get('bytes-total', s['bytes-up-total'] + s['bytes-down-total']))})",
        f"training time      {s['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """1234 -> '1.2 KB'; decimal units, as network figures are."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} GB"


_WEI = Maybe((int, None))
LEDGER_SPECS = {
    "chain.json": {"contract": str, "chain": str, "slashed-to": str},
    "accounts.json": {"pool": _WEI, "allocated": _WEI, "burned": _WEI, "accounts": {"*": {
        "partition": Maybe((int, str)), **{k: _WEI for k in ("stake", "slashed", "earned", "claimed", "pending")}}}},
    "round-*.json": {"round": int, "gas-record": int, "clients": [{
        "account": str, "score": float, "flags": [str], "cumulative": int, "partition": int, "slashed": int,
        "evidence": (str, None)}]},
}


def read_ledger(base: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(chain.json, accounts.json or an empty snapshot, the round-NNNN.json files in order) of a
    run's ledger folder, each checked against LEDGER_SPECS."""
    chain = read_json(base / "chain.json", LEDGER_SPECS["chain.json"])
    accounts_file = base / "accounts.json"
    snapshot = read_json(accounts_file, LEDGER_SPECS["accounts.json"]) if accounts_file.exists() else {"accounts": {}}
    rounds = [read_json(p, LEDGER_SPECS["round-*.json"]) for p in sorted(base.glob("round-*.json"))]
    return chain, snapshot, rounds


def ledger_view(run_dir: Path) -> str:
    """The ledger of a run as text: per client stake, scores per round, rewards earned, claimed
    and pending, and every penalty with its evidence (from RUN_DIR/ledger/).

    Raises:
        FileFormatError: naming the file (and field) when the run has no ledger or one of its
            files is damaged.
    """
    return ledger_text(*read_ledger(Path(run_dir) / "ledger"))


def ledger_text(chain: dict[str, Any], snapshot: dict[str, Any], rounds: list[dict[str, Any]]) -> str:
    """`ledger_view`'s text from the ledger's files, as `read_ledger` checked them."""
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
        lines.append(f"pool {eth(snapshot['pool'])} ETH, unclaimed {eth(snapshot.get('allocated'))} ETH, "
                     f"burned {eth(snapshot.get('burned'))} ETH")
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


# --- the HTML report: `fedllm report RUN_DIR`, `fedllm compare RUN_DIR...` -------------------
