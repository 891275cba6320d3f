"""Local JSON/JSONL/CSV/Parquet files and hub datasets, mapped to the common example shape.

Every source becomes a list of {"instruction", "input", "response", "family"} dicts, where
"family" holds the configured label field (or "all" when the file has none). Preference data
(train.method=dpo) maps data.prompt-field to "instruction", data.chosen-field to "response" and
data.rejected-field to "rejected": a pair is an instruction example with a rejected answer, so
everything made for instruction data (partitioning, eval loss, exact match) reads it as is.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable

from fedllm.config import DataConfig
from fedllm.errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Raw rows of a local file, by suffix."""
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not data
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except ValueError as err:
                            raise DataError(f"{path}:{n}: not a JSON line: {getattr(err, 'msg', err)}") from None
            return rows
        if suffix == ".json":
            with open(path, encoding="utf-8-sig") as f:
                rows = json.load(f)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            return rows
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot parse {suffix[1:]} file: {err}") from err
    raise DataError(f"data.source: {path} has suffix {suffix!r}; use one of {', '.join(SUFFIXES)}")


def to_examples(rows: Iterable[dict[str, Any]], cfg: DataConfig, where: str,
                preference: bool = False) -> list[dict[str, str]]:
    """Map rows to examples (with `preference`, pairs), naming the source and field of the first
    missing value."""
    fields = (("instruction", cfg.instruction_field, "instruction"), ("response", cfg.response_field, "response"))
    if preference:
        fields = (("instruction", cfg.prompt_field, "prompt"), ("response", cfg.chosen_field, "chosen"),
                  ("rejected", cfg.rejected_field, "rejected"))
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {i} is not an object")
        ex = {}
        for key, fname, setting in fields:
            if fname not in row or row[fname] is None:
                raise DataError(f"{where}: row {i} has no field {fname!r} (data.{setting}-field)")
            ex[key] = scalar_text(row[fname], where, i, fname)
        ex["input"] = scalar_text(row.get(cfg.input_field) or "", where, i, cfg.input_field) if cfg.input_field else ""
        ex["family"] = scalar_text(row.get(cfg.label_field, "all"), where, i, cfg.label_field)
        out.append(ex)
    if not out:
        raise DataError(f"{where}: no rows")
    return out


def scalar_text(value: Any, where: str, row: int, column: str) -> str:
    """A field's value as text; a structured value (a list or mapping, e.g. a nested Parquet
    column) is refused, naming the column, rather than turned into its Python repr."""
    if isinstance(value, (dict, list, tuple, set, bytes)):
        raise DataError(f"{where}: row {row}, column {column!r}: a {type(value).__name__}, not text; "
                        "flatten it or point the data.*-field keys at a text column")
    return str(value)


def load_source(source: str, cfg: DataConfig, preference: bool = False) -> list[dict[str, str]]:
    """Examples (with `preference`, pairs) of a local file or of `hub:NAME` (train split)."""
    if source.startswith("hub:"):
        name = source[4:]
        try:
            import datasets

            rows = datasets.load_dataset(name, split="train")
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"data.source: cannot load hub dataset {name!r}: {first}") from err
        return to_examples(rows, cfg, name, preference)
    path = Path(source).expanduser()
    return to_examples(read_rows(path), cfg, str(path), preference)
