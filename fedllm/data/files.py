"""Local JSON/JSONL/CSV/Parquet files and hub datasets, mapped to the common example shape.

Every source becomes a list of {"instruction", "input", "response", "family"} dicts, where
"family" holds the configured label field (or "all" when the file has none).
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
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            return rows
        if suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: cannot parse {suffix[1:]} file: {err}") from err
    raise DataError(f"data.source: {path} has suffix {suffix!r}; use one of {', '.join(SUFFIXES)}")


def to_examples(rows: Iterable[dict[str, Any]], cfg: DataConfig, where: str) -> list[dict[str, str]]:
    """Map rows to examples, naming the source and field of the first missing value."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {i} is not an object")
        ex = {}
        for key, fname in (("instruction", cfg.instruction_field), ("response", cfg.response_field)):
            if fname not in row or row[fname] is None:
                raise DataError(f"{where}: row {i} has no field {fname!r} (data.{key}-field)")
            ex[key] = str(row[fname])
        ex["input"] = str(row.get(cfg.input_field) or "") if cfg.input_field else ""
        ex["family"] = str(row.get(cfg.label_field, "all"))
        out.append(ex)
    if not out:
        raise DataError(f"{where}: no rows")
    return out


def load_source(source: str, cfg: DataConfig) -> list[dict[str, str]]:
    """Examples of a local file or of `hub:NAME` (train split)."""
    if source.startswith("hub:"):
        name = source[4:]
        try:
            import datasets

            rows = datasets.load_dataset(name, split="train")
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DataError(f"data.source: cannot load hub dataset {name!r}: {first}") from err
        return to_examples(rows, cfg, name)
    path = Path(source).expanduser()
    return to_examples(read_rows(path), cfg, str(path))
