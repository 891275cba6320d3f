"""Run directory, metrics log (JSONL, one line per round), and the printed summary."""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

from fedllm.config import Config
from fedllm.evaluation.metrics import METRICS

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
    """RUN_DIR/config.json as a flat dict ({} when the run has none)."""
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


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
    """RUN_DIR/metrics.jsonl's rows. A cut-off last line (what a crash mid-write leaves) is
    skipped with a warning; a bad line before it is an error.

    Raises:
        FileNotFoundError: when there is no metrics.jsonl.
        FedLLMError: naming the file and line of a malformed row that is not the last.
    """
    from fedllm.errors import FedLLMError

    path = Path(run_dir) / "metrics.jsonl"
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == len(lines) - 1:
                log.warning("%s:%d: skipped a cut-off last line (a crash while writing it)", path, n)
                break
            raise FedLLMError(f"{path}:{n}: not a metrics row: {err}") from None
        rows.append(row)
    return rows


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: the old file stays whole
    until the new one is complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


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
    }
    for key in PREFERENCE:  # train.method=dpo: held-out rewards against the run's starting model
        if key in last:
            out[f"{key}-before"], out[f"{key}-after"] = first.get(key), last.get(key)
    if last.get("families"):
        out["families-after"] = {name: {k: f.get(k) for k in ("eval-loss", *METRICS.names())}
                                 for name, f in last["families"].items()}
    if tasks:
        from fedllm.evaluation.harness import headline

        out["lm-eval-before"] = headline(tasks[0]["lm-eval"])
        out["lm-eval-after"] = headline(tasks[-1]["lm-eval"])
    return out


PREFERENCE = ("reward-accuracy", "reward-margin", "preference-accuracy")


def preference_lines(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, 'before -> after') of the preference figures a summary holds."""
    return [(key.replace("-", " "), f"{_num(s[key + '-before'], 3)} -> {_num(s[key + '-after'], 3)}")
            for key in PREFERENCE if f"{key}-after" in s]


def _num(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def metric_lines(s: dict[str, Any], digits: int) -> list[tuple[str, str]]:
    """(label, 'before -> after') of every registered evaluation metric (fedllm.evaluation.metrics)."""
    return [(m.meta.get("label", m.name), f"{_num(s.get(m.name + '-before'), digits)} -> "
             f"{_num(s.get(m.name + '-after'), digits)}") for m in METRICS.entries()]


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rounds             {s['rounds']}",
        f"eval loss          {_num(s['eval-loss-before'], 4)} -> {_num(s['eval-loss-after'], 4)}",
        *(f"{label:18} {value}" for label, value in metric_lines(s, 3)),
    ]
    lines += [f"{label:18} {value}" for label, value in preference_lines(s)]
    for task, value in s.get("lm-eval-after", {}).items():
        lines.append(f"{task:18} {_num(s['lm-eval-before'].get(task), 3)} -> {_num(value, 3)}")
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


# --- the HTML report: `fedllm report RUN_DIR`, `fedllm compare RUN_DIR...` -------------------

REPORT = "report.html"
# The page checks itself once loaded: every plot decoded, no script error (what the browser test reads).
_SELF_CHECK = """<script>
window.addEventListener("error", e => { document.body.dataset.errors = (document.body.dataset.errors || "") + e.message + ";"; });
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img.plot")];
  document.body.dataset.plots = imgs.length;
  document.body.dataset.plotsShown = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
});
</script>"""
_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
img.plot { width: 49%; min-width: 420px; } details { margin-top: 1em; }
</style>"""


def _series(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round series of a run's metrics rows (None where a round lacks the figure)."""
    trained = [r for r in rows if r["round"] > 0]
    up = [sum(r.get("bytes-up", {}).values()) for r in trained]
    down = [sum(r.get("bytes-down", {}).values()) for r in trained]
    return {
        "eval-rounds": [r["round"] for r in rows if "eval-loss" in r],
        "eval-loss": [r["eval-loss"] for r in rows if "eval-loss" in r],
        **{m.name: [r.get(m.name) for r in rows if "eval-loss" in r] for m in METRICS.entries()},
        **{key: [r.get(key) for r in rows if "eval-loss" in r] for key in PREFERENCE},
        "rounds": [r["round"] for r in trained],
        "bytes-up": up, "bytes-down": down,
        "bytes-up-cumulative": list(itertools.accumulate(up)),
        "bytes-down-cumulative": list(itertools.accumulate(down)),
        "round-seconds": [r.get("round-seconds", 0.0) for r in trained],
    }


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(ax: Any, title: str, ylabel: str, legend_size: int) -> None:
    """What every plot shares: title, integer rounds on x, grid, legend when lines are named."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=legend_size)


def _png(fig: Any) -> str:
    """A matplotlib figure as an <img> with its PNG inline (no file, no network)."""
    import base64
    import io

    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    title = fig.axes[0].get_title() if fig.axes else "plot"
    return (f'<img class="plot" alt="{_esc(title)}" '
            f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')


def _esc(text: Any) -> str:
    import html

    return html.escape(str(text))


def _run_plots(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The plots shared by report and compare, one line per run."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    series = {name: _series(rows) for name, rows in runs.items()}
    panels = [
        ("eval loss per round", "eval-rounds", ["eval-loss"], "eval loss (response tokens)"),
        *((f"{m.meta.get('label', m.name)} per round", "eval-rounds", [m.name], m.meta.get("axis", m.meta.get(
            "label", m.name))) for m in METRICS.entries()),
        ("bytes up and down per round", "rounds", ["bytes-up", "bytes-down"], "bytes (all clients)"),
        ("cumulative bytes on the wire", "rounds", ["bytes-up-cumulative", "bytes-down-cumulative"], "bytes"),
        ("round time", "rounds", ["round-seconds"], "seconds"),
    ]
    if any(y is not None for s in series.values() for y in s["reward-accuracy"]):
        panels.insert(3, ("held-out preference accuracy per round", "eval-rounds",
                          ["reward-accuracy", "preference-accuracy"], "share of pairs"))
    out = []
    for title, x_key, y_keys, ylabel in panels:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for name, s in series.items():
            for style, key in zip(("-", "--"), y_keys):  # down dashed: it often equals up (LoRA, no codec)
                ys = [float("nan") if y is None else y for y in s[key]]
                label = " ".join(filter(None, [name if len(series) > 1 else "", key if len(y_keys) > 1 else ""]))
                ax.plot(s[x_key], ys, style, marker="o", label=label or None)
        if "bytes" in y_keys[0]:
            values = [y for s in series.values() for key in y_keys for y in s[key] if y and y > 0]
            if values and max(values) > 20 * min(values):  # LoRA and ZO differ by orders of magnitude
                ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
        _finish(ax, title, ylabel, legend_size=8)
        out.append(_png(fig))
    return out


def _family_plots(rows: list[dict[str, Any]]) -> list[str]:
    """Eval loss and every registered metric per task family over the rounds (non-IID training shows
    here: a family held by one client moves with that client's weight in the aggregate), and the
    lm-eval tasks' headline figures."""
    plt = _pyplot()
    evaluated = [r for r in rows if r.get("families")]
    out = []
    if evaluated:
        names = sorted({f for r in evaluated for f in r["families"]})
        for key, label in (("eval-loss", "eval loss"), *((m.name, m.meta.get("label", m.name)) for m in METRICS.entries())):
            fig, ax = plt.subplots(figsize=(6, 3.4))
            for name in names:
                ys = [r["families"].get(name, {}).get(key) for r in evaluated]
                ax.plot([r["round"] for r in evaluated], [float("nan") if y is None else y for y in ys],
                        marker="o", label=name)
            _finish(ax, f"{label} per family", label, legend_size=7)
            out.append(_png(fig))
    tasks = [r for r in rows if r.get("lm-eval")]
    if tasks:
        from fedllm.evaluation.harness import headline

        fig, ax = plt.subplots(figsize=(6, 3.4))
        series: dict[str, list[float]] = {}
        for i, r in enumerate(tasks):
            for name, value in headline(r["lm-eval"]).items():
                series.setdefault(name, [float("nan")] * len(tasks))[i] = value
        for name, ys in sorted(series.items()):
            ax.plot([r["round"] for r in tasks], ys, marker="o", label=name)
        _finish(ax, "lm-eval tasks per round", "score", legend_size=7)
        out.append(_png(fig))
    return out


def _family_table(s: dict[str, Any]) -> str:
    fams = s.get("families-after") or {}
    if not fams:
        return ""
    metrics = METRICS.entries()
    head = ("<tr><th>family</th><th>eval loss</th>"
            + "".join(f"<th>{_esc(m.meta.get('label', m.name))}</th>" for m in metrics) + "</tr>")
    cells = "".join(f"<tr><td>{_esc(n)}</td><td>{_num(f.get('eval-loss'), 4)}</td>"
                    + "".join(f"<td>{_num(f.get(m.name), 3)}</td>" for m in metrics) + "</tr>" for n, f in fams.items())
    return "<h2>Per family, after the last round</h2><table>" + head + cells + "</table>"


def _ledger_plots(rows: list[dict[str, Any]]) -> list[str]:
    """Scores, cumulative rewards and penalties per client (by partition) over the rounds."""
    plt = _pyplot()
    ledger_rows = [r for r in rows if "ledger" in r]
    if not ledger_rows:
        return []
    out = []
    for title, key, scale, cumulative in (("contribution score per client", "scores", 1.0, False),
                                          ("rewards earned per client (cumulative)", "rewards", 1e-18, True),
                                          ("stake slashed per client (cumulative)", "slashed", 1e-18, True)):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        clients: dict[str, list[float]] = {}
        for i, r in enumerate(ledger_rows):
            for node, value in r["ledger"].get(key, {}).items():
                label = f"partition {int(r.get('clients', {}).get(node, {}).get('partition-id', -1))}" \
                    if node in r.get("clients", {}) else f"node {node}"
                clients.setdefault(label, [0.0] * len(ledger_rows))[i] = float(value) * scale
        for label, values in sorted(clients.items()):
            if cumulative:
                values = list(itertools.accumulate(values))
            ax.plot([r["round"] for r in ledger_rows], values, marker="o", label=label)
        _finish(ax, title, "ETH" if scale != 1.0 else "score", legend_size=7)
        out.append(_png(fig))
    return out


def _table(pairs: list[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs) + "</table>"


def _page(title: str, body: list[str]) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + _esc(title) + "</title>" + _STYLE
            + "</head><body><h1>" + _esc(title) + "</h1>" + "".join(body) + _SELF_CHECK + "</body></html>\n")


def render_report(run_dir: Path) -> Path:
    """RUN_DIR/report.html: one self-contained page (plots inline as PNG, no network) with the
    final figures, eval loss and exact match, bytes up/down per round and cumulative, round
    time, the ledger's scores, rewards and penalties per client when it was on, and the config.

    Raises:
        FileNotFoundError: when RUN_DIR has no metrics.jsonl.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    config = read_config(run_dir)
    load_run_plugins(config)
    s = summary(rows)
    figures = [("rounds", s["rounds"]),
               ("eval loss", f"{_num(s['eval-loss-before'], 4)} -> {_num(s['eval-loss-after'], 4)}"),
               *metric_lines(s, 4),
               *preference_lines(s),
               *((f"lm-eval {task}", f"{_num(s['lm-eval-before'].get(task), 4)} -> {_num(v, 4)}")
                 for task, v in s.get("lm-eval-after", {}).items()),
               ("bytes up / down", f"{human_bytes(s['bytes-up-total'])} / {human_bytes(s['bytes-down-total'])}"),
               ("communication total", human_bytes(s["bytes-total"])),
               ("training time", f"{s['seconds']:.1f} s"),
               ("dropped replies", sum(len(r.get("dropped", [])) for r in rows))]
    body = ["<h2>Final figures</h2>", _table(figures), _family_table(s), "<h2>Rounds</h2>",
            *_run_plots({run_dir.name: rows})]
    per_family = _family_plots(rows)
    if per_family:
        body += ["<h2>Per family and lm-eval tasks</h2>", *per_family]
    ledger = _ledger_plots(rows)
    if ledger:
        body += ["<h2>Ledger</h2>", *ledger]
    body += ["<details><summary>Config</summary>", _table(sorted(config.items())), "</details>"]
    path = run_dir / REPORT
    path.write_text(_page(f"fedllm run {run_dir.name}", body), encoding="utf-8")
    return path


def render_compare(run_dirs: list[Path], out: Path) -> Path:
    """One page overlaying the runs' plots, and a table of their final figures and the config
    keys where they differ."""
    runs = {Path(d).name: read_metrics(Path(d)) for d in run_dirs}
    configs = {Path(d).name: read_config(Path(d)) for d in run_dirs}
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k)) for c in configs.values()}) > 1
              and k not in ("server.run-name", "server.run-dir", "server.resume")]
    metrics = METRICS.entries()
    head = "<tr><th>run</th><th>eval loss</th>" + "".join(f"<th>{_esc(m.meta.get('label', m.name))}</th>" for m in metrics) \
           + "<th>bytes up</th><th>bytes down</th><th>bytes total</th><th>seconds</th>" \
           + "".join(f"<th>{_esc(k)}</th>" for k in differ) + "</tr>"
    lines = []
    for name, rows in runs.items():
        s = summary(rows)
        cells = [_num(s["eval-loss-after"], 4), *(_num(s.get(f"{m.name}-after"), 3) for m in metrics),
                 human_bytes(s["bytes-up-total"]), human_bytes(s["bytes-down-total"]), human_bytes(s["bytes-total"]),
                 f"{s['seconds']:.1f}"] + [configs[name].get(k) for k in differ]
        lines.append(f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    body = ["<h2>Final figures</h2><table>" + head + "".join(lines) + "</table>", "<h2>Rounds</h2>",
            *_run_plots(runs)]
    out = Path(out)
    out.write_text(_page("fedllm compare: " + ", ".join(runs), body), encoding="utf-8")
    return out
