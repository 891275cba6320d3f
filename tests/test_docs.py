"""The documentation builds and cannot drift: the MkDocs site builds with --strict (a broken link,
a missing page or anchor fails), its configuration reference lists every key of the typed config,
bench/README.md is what bench/readme.py makes of the committed JSON, and README.md stays one
screen."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

from fedllm.config import options

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly_and_its_reference_lists_every_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    page = html.unescape((tmp_path / "site" / "reference" / "config" / "index.html").read_text())
    listed = set(re.findall(r"<code>([a-z]+\.[a-z0-9-]+)</code>", page))
    assert set(options()) <= listed, sorted(set(options()) - listed)
    for key, f in options().items():  # each key's row holds its check
        check = f.metadata.get("check", "")
        if check:
            row = page[page.index(f"<code>{key}</code>"):].split("</tr>", 1)[0]
            assert check in row, (key, check)
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"methods/zo/index.html", "extending/method/index.html", "secure-aggregation/index.html"} <= pages


def test_bench_readme_is_generated_from_the_committed_json():
    out = subprocess.run([sys.executable, "bench/readme.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_the_readme_is_one_screen_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    assert not re.search(r"\b\d+ (tests|passed)\b|\bin \d+(\.\d+)? ?(s|min)\b", text)  # no counts or timings
