"""MkDocs hook: the configuration reference, generated from the typed config at build time.

    .venv/bin/python -m mkdocs build --strict        # `make docs`; mkdocs.yml names this file in `hooks`

`on_files` adds the page reference/config.md to the build, made from `fedllm.config.options()`:
one table per section (the part of the key before the dot) with each key's default, check (the
numeric range in the field's metadata, such as "> 0" or "[0, 1)") and help line. The page is
never written into docs/, so it cannot drift from the code or be committed stale.
`reference_keys()` gives the keys the page lists, for a test.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

PAGE = "reference/config.md"
log = logging.getLogger("mkdocs.hooks.fedllm")


class Key(NamedTuple):
    key: str
    default: Any
    check: str
    help: str


def config_keys() -> list[Key]:
    """Every config key with its default, check and help, in the config's key order."""
    from fedllm.config import options

    return [Key(key, f.default, str(f.metadata.get("check", "")), str(f.metadata["help"]))
            for key, f in options().items()]


def reference_keys() -> list[str]:
    """The keys reference/config.md lists: every key of the typed config."""
    return [k.key for k in config_keys()]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f"`'{value}'`" if value == "" or value != value.strip() else f"`{value}`"
    return f"`{value!r}`"


def reference_page() -> str:
    """The Markdown of reference/config.md."""
    sections: dict[str, list[Key]] = {}
    for k in config_keys():
        sections.setdefault(k.key.partition(".")[0], []).append(k)
    out = [
        "# Configuration reference",
        "",
        "Every key of the typed config, its default, the values a number may take and its help line, generated",
        "from `fedllm.config` when the site is built (`.venv/bin/fedllm config` prints the same keys). Give a key",
        "with `--set section.key=value` to `fedllm simulate`, in `--run-config` to `flwr run`, or in",
        "`[tool.flwr.app.config]` of `pyproject.toml`; dashes and underscores in names are interchangeable, and an",
        "unknown or mistyped key is an error that names it. A number is refused when it is NaN, infinite or",
        "outside its check.",
        "",
        "Sections: " + ", ".join(f"[{name}](#{name})" for name in sections) + ".",
        "",
    ]
    for name, keys in sections.items():
        out += [f"## {name}", "", "| key | default | check | help |", "| --- | --- | --- | --- |"]
        out += [f"| `{k.key}` | {_default(k.default)} | {_cell(k.check) or '-'} | {_cell(k.help)} |" for k in keys]
        out.append("")
    return "\n".join(out)


def on_files(files: Any, config: Any) -> Any:
    """Add the generated reference/config.md to the build."""
    from mkdocs.structure.files import File

    old = files.get_file_from_path(PAGE)
    if old is not None:  # a stale copy in docs/ would hide the generated page
        log.warning("docs/%s exists: it is generated at build time, remove it", PAGE)
        files.remove(old)
    files.append(File.generated(config, PAGE, content=reference_page()))
    return files
