"""The HTML report of a run (RUN_DIR/report.html: plots, final figures, config; no network) and
`fedllm compare`'s page of several runs overlaid."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

from fedllm.evaluation.metrics import METRICS
from fedllm.reporting.runlog import (PREFERENCE, client_seconds, human_bytes, load_run_plugins, metric_lines,
                                     number_text, preference_lines, read_config, read_metrics, summary,
                                     write_atomically)

log = logging.getLogger(__name__)


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
    # what a round's evaluation had cost so far: bytes both ways and client seconds, summed over rounds
    spent, bytes_so_far, seconds_so_far = {}, 0, 0.0
    for r in rows:
        if r["round"] > 0:
            bytes_so_far += sum(r.get("bytes-up", {}).values()) + sum(r.get("bytes-down", {}).values())
            seconds_so_far += client_seconds(r)
        spent[r["round"]] = (bytes_so_far, seconds_so_far)
    evaluated = [r["round"] for r in rows if "eval-loss" in r]
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
        "eval-bytes": [spent[n][0] for n in evaluated],
        "eval-client-seconds": [spent[n][1] for n in evaluated],
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
    return out + _cost_plots(series)


def _cost_plots(series: dict[str, dict[str, Any]]) -> list[str]:
    """Eval loss against what it cost: bytes on the wire (log scale) and the clients' seconds, one
    line per run (a point per evaluation): the picture to choose a method from."""
    from matplotlib.ticker import FuncFormatter

    plt = _pyplot()
    out = []
    for title, x_key, xlabel in (("eval loss against bytes on the wire", "eval-bytes", "bytes up + down, all clients"),
                                 ("eval loss against client seconds", "eval-client-seconds",
                                  "seconds the clients worked, summed")):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for name, s in series.items():
            ax.plot(s[x_key], s["eval-loss"], "-", marker="o", label=name if len(series) > 1 else None)
        if x_key == "eval-bytes":
            ax.set_xscale("symlog", linthresh=1e3)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss (response tokens)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=8)
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
    cells = "".join(f"<tr><td>{_esc(n)}</td><td>{number_text(f.get('eval-loss'), 4)}</td>"
                    + "".join(f"<td>{number_text(f.get(m.name), 3)}</td>" for m in metrics) + "</tr>" for n, f in fams.items())
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


def render_report(run_dir: Path, plugins: bool = False) -> Path:
    """RUN_DIR/report.html: one self-contained page (plots inline as PNG, no network) with the
    final figures, eval loss and exact match, bytes up/down per round and cumulative, round
    time, the ledger's scores, rewards and penalties per client when it was on, and the config.

    Everything is read and checked before the page is written (atomically), so a damaged run
    leaves an earlier report.html as it was. The modules the run's config names in
    server.plugins are imported only when `plugins` is set (`fedllm report --plugins`): a run
    folder from elsewhere runs no code; their metrics show when they are registered already
    (the run's own process writes its report that way).

    Raises:
        FileFormatError: naming the file (and line and field) when RUN_DIR has no metrics.jsonl or
            one of its files is damaged.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if plugins:
        load_run_plugins(config)  # first: its metrics are checked in the rows too
    rows = read_metrics(run_dir)
    path = run_dir / REPORT
    write_atomically(path, report_page(run_dir.name, rows, config))
    return path


def report_page(name: str, rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """`render_report`'s page of a run's rows (as `read_metrics` checked them) and config."""
    s = summary(rows)
    figures = [("rounds", s["rounds"]),
               ("eval loss", f"{number_text(s['eval-loss-before'], 4)} -> {number_text(s['eval-loss-after'], 4)}"),
               *metric_lines(s, 4),
               *preference_lines(s),
               *((f"lm-eval {task}", f"{number_text(s['lm-eval-before'].get(task), 4)} -> {number_text(v, 4)}")
                 for task, v in s.get("lm-eval-after", {}).items()),
               ("bytes up / down", f"{human_bytes(s['bytes-up-total'])} / {human_bytes(s['bytes-down-total'])}"),
               ("communication total", human_bytes(s["bytes-total"])),
               ("training time", f"{s['seconds']:.1f} s"),
               ("dropped replies", sum(len(r.get("dropped", [])) for r in rows))]
    body = ["<h2>Final figures</h2>", _table(figures), _family_table(s), "<h2>Rounds</h2>",
            *_run_plots({name: rows})]
    per_family = _family_plots(rows)
    if per_family:
        body += ["<h2>Per family and lm-eval tasks</h2>", *per_family]
    ledger = _ledger_plots(rows)
    if ledger:
        body += ["<h2>Ledger</h2>", *ledger]
    body += ["<details><summary>Config</summary>", _table(sorted(config.items())), "</details>"]
    return _page(f"fedllm run {name}", body)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """A unique label per run: the shortest end of its path no other run's path ends with
    (runs/a/lora and runs/b/lora are a/lora and b/lora); a folder given twice is numbered."""
    paths = [Path(d).resolve() for d in run_dirs]
    labels = []
    for p in paths:
        others = [q for q in paths if q != p]
        k = 1
        while k < len(p.parts) and any(q.parts[-k:] == p.parts[-k:] for q in others):
            k += 1
        labels.append(Path(*p.parts[-k:]).as_posix())
    counts = {label: labels.count(label) for label in labels}
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(f"{label} #{seen[label]}" if counts[label] > 1 else label)
    return out


def check_out(out: Path, run_dirs: list[Path]) -> None:
    """`fedllm compare --out` may replace only a page it wrote before, never a run's own file.

    Raises:
        FedLLMError: naming --out.
    """
    from fedllm.errors import FedLLMError

    out = Path(out)
    inside = [d for d in run_dirs if Path(d).resolve() in out.resolve().parents]
    if inside:
        raise FedLLMError(f"--out: {out} is inside the run directory {inside[0]}; write the page elsewhere")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise FedLLMError(f"--out: {out} is a link or a folder; name a new file")
    if out.exists():
        with open(out, "rb") as f:
            head = f.read(4096)
        if b"<title>fedllm compare" not in head:
            raise FedLLMError(f"--out: {out} exists and is not a page fedllm compare wrote; name a new file")


def render_compare(run_dirs: list[Path], out: Path) -> Path:
    """One page overlaying the runs' plots, and a table of their final figures and the config
    keys where they differ. Each run is labelled by `run_labels`: none hides another.

    Raises:
        FedLLMError: for a damaged run (naming its file, line and field) or an `out` that is not
            fedllm's to replace (`check_out`); nothing is written then.
    """
    check_out(out, run_dirs)
    labels = run_labels(run_dirs)
    configs = {name: read_config(Path(d)) for name, d in zip(labels, run_dirs)}
    runs = {name: read_metrics(Path(d)) for name, d in zip(labels, run_dirs)}
    out = Path(out)
    write_atomically(out, compare_page(runs, configs))
    return out


def compare_page(runs: dict[str, list[dict[str, Any]]], configs: dict[str, dict[str, Any]]) -> str:
    """`render_compare`'s page of the runs' rows and configs, by label."""
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
        cells = [number_text(s["eval-loss-after"], 4), *(number_text(s.get(f"{m.name}-after"), 3) for m in metrics),
                 human_bytes(s["bytes-up-total"]), human_bytes(s["bytes-down-total"]), human_bytes(s["bytes-total"]),
                 f"{s['seconds']:.1f}"] + [configs[name].get(k) for k in differ]
        lines.append(f"<tr><td>{_esc(name)}</td>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    body = ["<h2>Final figures</h2><table>" + head + "".join(lines) + "</table>", "<h2>Rounds</h2>",
            *_run_plots(runs)]
    return _page("fedllm compare: " + ", ".join(runs), body)
