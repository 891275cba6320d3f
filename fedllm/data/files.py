"""Local JSON/JSONL/CSV/Parquet files and hub datasets, mapped to the common example shape.

Every source becomes a list of {"instruction", "input", "response", "family"} dicts, where
"family" holds the configured label field (or "all" when the file has none). Preference data
(train.method=dpo) maps data.prompt-field to "instruction", data.chosen-field to "response" and
data.rejected-field to "rejected": a pair is an instruction example with a rejected answer, so
everything made for instruction data (partitioning, eval loss, exact match) reads it as is.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from fedllm.config import DataConfig
from fedllm.data.checks import screen
from fedllm.errors import DataError
from fedllm.files import nesting_line

NESTING = 100  # a data row is a flat object; a preference pair's messages nest a few levels

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
MAX_LINE = 16 << 20  # bytes of one JSONL line: an example is far shorter; this bounds what one line may hold
BOM = "\ufeff"  # a byte-order mark is not data


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Raw rows of a local file, by suffix. Only data is read: nothing in a file runs code.

    Raises:
        DataError: naming the file (and line, where one is known) of what cannot be read: text that is
            not UTF-8, JSON that does not parse or nests past the parser's depth, a CSV field over
            csv's limit, a JSONL line over MAX_LINE bytes, a Parquet file that does not open.
    """
    if not path.is_file():
        raise DataError(f"data.source: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"data.source: {path} has suffix {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix == ".jsonl":
            return read_jsonl(path)
        if suffix == ".json":
            rows = parse_json(read_text(path), path, 1)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of objects")
            return rows
        if suffix == ".csv":
            return read_csv(path)
        return read_parquet(path)
    except (ValueError, OSError, RecursionError) as err:
        raise DataError(f"{path}: cannot read {suffix[1:]} file: {one_line(err)}") from None


def read_jsonl(path: Path) -> list[Any]:
    """The values of a JSONL file's non-blank lines, each line read with a bound (MAX_LINE)."""
    rows = []
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(MAX_LINE + 1):
            n += 1
            if len(raw) > MAX_LINE:
                raise DataError(f"{path}:{n}: a line longer than {MAX_LINE >> 20} MiB; one example is far shorter")
            text = decode(raw, path, n)
            if text.strip():
                rows.append(parse_json(text.rstrip("\r\n"), path, n, "a JSON line"))
    return rows


def read_text(path: Path) -> str:
    return decode(path.read_bytes(), path, 1)


def decode(raw: bytes, path: Path, first_line: int) -> str:
    """UTF-8 text of `raw` (the bytes from line `first_line` on), its byte-order mark dropped."""
    try:
        return raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x})") from None


def parse_json(text: str, path: Path, first_line: int, what: str = "JSON") -> Any:
    """`text` (from line `first_line` of `path`) parsed as JSON, or a DataError naming file:line."""
    deep = nesting_line(text, NESTING)  # before the parser, whose recursion can crash the process
    try:
        if deep:
            raise RecursionError
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{path}:{first_line + max(deep, 1) - 1}: JSON nested too deeply "
                        "to parse; a data row is a flat object") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{first_line + err.lineno - 1}: not {what}: {err.msg}") from None
    except ValueError as err:  # e.g. an integer past Python's digit limit
        raise DataError(f"{path}:{first_line}: not {what}: {one_line(err)}") from None


def read_csv(path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        return list(reader)
    except csv.Error as err:  # e.g. a field over csv's size limit (131072 characters)
        raise DataError(f"{path}:{reader.line_num + 1}: cannot read CSV: {err}") from None


def read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:  # not all of pyarrow's errors are ValueError's or OSError's
        raise DataError(f"{path}: cannot read parquet file: {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
        label = row.get(cfg.label_field)
        ex["family"] = "all" if label is None else scalar_text(label, where, i, cfg.label_field)
        out.append(ex)
    if not out:
        raise DataError(f"{where}: no rows")
    return screen(out, where, preference)


def scalar_text(value: Any, where: str, row: int, column: str) -> str:
    """A field's value as text (a number as it prints: 42, 0.5); a structured value (a list or
    mapping, e.g. a nested Parquet column) is refused, naming the column, rather than turned into
    its Python repr, and so is text that is not Unicode (JSON's lone surrogate escapes)."""
    if isinstance(value, (dict, list, tuple, set, bytes, bytearray)):
        raise DataError(f"{where}: row {row}, column {column!r}: a {type(value).__name__}, not text; "
                        "flatten it or point the data.*-field keys at a text column")
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: row {row}, column {column!r}: not valid Unicode text (a lone surrogate)") from None
    return text


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
