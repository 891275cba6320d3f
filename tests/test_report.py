"""The run report: rendered from a small real run, then loaded in headless Chromium (Debian's
chromium, installed here with apt-get when missing), which must show every plot without errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import tiny_run_config
from fedllm.server.grid import LocalGrid
from fedllm.reporting.report import REPORT


def _install_chromium() -> str:
    """apt-get install chromium; returns why not when that fails."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "no apt-get, or not root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    return "" if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def chromium() -> str:
    why = ""
    if not any(shutil.which(n) for n in ("chromium", "chromium-browser")):
        why = _install_chromium()
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip(f"headless Chromium is missing and could not be installed: {why}")
    return path


def _load(chromium: str, page) -> dict[str, str]:
    """The page's body data attributes after load, as headless Chromium sees them (no network:
    a dead proxy)."""
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--proxy-server=127.0.0.1:9", "--virtual-time-budget=5000", "--dump-dom",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))


def _small_run(tiny_model_dir, tmp_path, name, **over):
    from fedllm.server.loop import run

    return run(LocalGrid(3), tiny_run_config(tiny_model_dir, tmp_path, **{"server.run-name": name, **over}))


def test_report_of_a_real_run_shows_every_plot_in_headless_chromium(tiny_model_dir, tmp_path, chromium):
    run_dir = _small_run(tiny_model_dir, tmp_path, "ledger", **{"ledger.enabled": True, "ledger.noise-z": 0.0})
    page = run_dir / REPORT  # written at the end of the run
    html = page.read_text()
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html)  # nothing to fetch: opens offline
    for title in ("eval loss per round", "exact match per round", "Rouge-L per round", "eval loss per family",
                  "exact match per family", "Rouge-L per family", "bytes up and down per round",
                  "cumulative bytes on the wire", "round time", "contribution score per client",
                  "rewards earned per client (cumulative)", "stake slashed per client (cumulative)",
                  "eval loss against bytes on the wire", "eval loss against client seconds"):
        assert f'alt="{title}"' in html
    assert "Final figures" in html and "lora.rank" in html  # the figures and the config
    seen = _load(chromium, page)
    assert seen.get("plots") == "14" and seen.get("plots-shown") == "14", seen
    assert "errors" not in seen, seen


def test_compare_overlays_runs_and_the_cli_names_a_bad_directory(tiny_model_dir, tmp_path, chromium):
    from fedllm.cli import main

    a = _small_run(tiny_model_dir, tmp_path, "lora")
    b = _small_run(tiny_model_dir, tmp_path, "int8", **{"compression.up": "int8"})
    out = tmp_path / "compare.html"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    html = out.read_text()
    assert "compression.up" in html and ">lora<" in html and ">int8<" in html  # the differing key, both runs
    assert 'alt="eval loss against bytes on the wire"' in html and 'alt="eval loss against client seconds"' in html
    from fedllm.reporting.runlog import read_metrics, summary

    spent = [summary(read_metrics(d))["client-seconds-total"] for d in (a, b)]
    assert all(s > 0 for s in spent)  # each client's reply says how long it worked
    seen = _load(chromium, out)
    assert seen.get("plots") == "8" and seen.get("plots-shown") == "8", seen
    assert main(["report", str(tmp_path / "missing")]) == 2
    (a / REPORT).unlink()
    assert main(["report", str(a)]) == 0 and (a / REPORT).exists()


def test_a_cut_off_last_metrics_line_is_skipped_and_a_bad_middle_line_named(tmp_path, caplog):
    from fedllm.errors import FedLLMError
    from fedllm.reporting.runlog import read_metrics

    good = '{"round": 0, "eval-loss": 2.0}\n{"round": 1, "eval-loss": 1.5}\n'
    (tmp_path / "metrics.jsonl").write_text(good + '{"round": 2, "eval-lo')  # a crash mid-write
    assert [r["round"] for r in read_metrics(tmp_path)] == [0, 1]
    assert "cut-off last line" in caplog.text
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n[1, 2]\n{"round": 1}\n')
    with pytest.raises(FedLLMError, match=r"metrics.jsonl:2: the value is a list, not an object"):
        read_metrics(tmp_path)


def test_cli_refuses_bad_simulation_sizes_and_keeps_earlier_results(tmp_path, capsys):
    import os
    import time

    from fedllm.cli import main
    from fedllm.preflight import written_since

    assert main(["simulate", "--cpus-per-client", "0", "--set", f"server.run-dir={tmp_path}"]) == 2
    assert "--cpus-per-client in (0," in capsys.readouterr().err
    assert main(["simulate", "--num-clients", "0", "--set", f"server.run-dir={tmp_path}"]) == 2
    summary = tmp_path / "summary.json"
    summary.write_text("{}")
    os.utime(summary, (time.time() - 60, time.time() - 60))
    assert not written_since(summary, time.time()) and written_since(summary, time.time() - 120)


def test_a_run_dir_that_cannot_be_written_is_refused_before_anything_starts(tmp_path):
    from fedllm.preflight import check_writable
    from fedllm.errors import FedLLMError

    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(FedLLMError, match="server.run-dir: .*a-file is not a writable folder"):
        check_writable(tmp_path / "a-file" / "runs" / "x")
    with pytest.raises(FedLLMError, match="MiB free"):
        check_writable(tmp_path / "runs", min_free=1 << 62)
    check_writable(tmp_path / "new" / "runs")
    assert not (tmp_path / "new").exists()  # nothing created by the check
