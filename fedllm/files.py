"""The one checked path for reading the JSON and JSONL files fedllm wrote (a run's config.json,
metrics.jsonl, ledger/*.json, trackers.json, a checkpoint's header): a damaged or foreign file is
a `FileFormatError` of one line naming the file (and line, and field), never a traceback.

    rows = read_jsonl(path)                      # [(line number, value)], each line parsed
    config = read_json(path, {"*": SCALAR})      # the value, checked against a spec

A spec says what a value must be, in plain Python values:

    int, float, str, bool, None   that type (float takes an int; neither takes a bool; integers
                                  within +-2**256, so sums and float() stay finite)
    FINITE                        a number that is not NaN or infinite (what int() takes)
    object                        anything
    (spec, spec, ...)             any one of them
    [spec]                        a list whose items match spec
    {"*": spec}                   an object whose values all match spec
    {"key": spec, ...}            an object with these keys (`Maybe(spec)`: may be absent); other
                                  keys are allowed (a newer version's, a plug-in's)
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from fedllm.errors import FedLLMError

log = logging.getLogger(__name__)

MAX_BYTES = 256 << 20  # more than any file fedllm writes into a run directory
MAX_DEPTH = 64  # a checkpoint's header nests deepest (each dict tagged, a state_dict in a state_dict): ~20
MAX_INT = 2 ** 256  # wei amounts reach 2**256; nothing fedllm writes goes beyond
SCALAR = (str, float, bool, None)


FINITE = "finite"  # a spec: a number int() takes


class FileFormatError(FedLLMError):
    """A file fedllm reads is damaged, or was written by something else."""


class Maybe(NamedTuple):
    """In an object spec: the key may be absent; when present its value matches `spec`."""

    spec: Any


def read_text(path: Path, limit: int = MAX_BYTES) -> str:
    """`path` as UTF-8 text, refusing a file over `limit` bytes.

    Raises:
        FileFormatError: naming the file when it is missing, unreadable, too large or not UTF-8.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise FileFormatError(f"{path}: {size} bytes, more than the {limit} a fedllm file holds")
        data = path.read_bytes()
    except OSError as err:
        raise FileFormatError(f"{path}: cannot read it: {err.strerror or type(err).__name__}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{path}: not UTF-8 text (byte {err.start})") from None


_NESTING = re.compile(r'"(?:[^"\\]|\\.)*"|[\[{\n]|[\]}]')


def nesting_line(text: str, depth: int = MAX_DEPTH) -> int:
    """The line (from 1) on which `text`'s JSON brackets first nest deeper than `depth`, strings
    skipped; 0 when they never do. Run before json.loads on text from outside: the parser recurses
    in C, and with the recursion limit raised (py-evm and py_ecc set 100000 on import) a deep enough
    text overflows the C stack (a segmentation fault) before any RecursionError."""
    if text.count("[") + text.count("{") <= depth:  # cannot nest deeper: the common case, no scan
        return 0
    line, level = 1, 0
    for m in _NESTING.finditer(text):
        token = m.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            level += 1
            if level > depth:
                return line
        elif token in "]}":
            level -= 1
        else:
            line += token.count("\n")
    return 0


def parse_json(text: str, where: str) -> Any:
    """One JSON value from `text` (NaN and Infinity are taken: json.dumps writes them).

    Raises:
        FileFormatError: naming `where` for invalid JSON or nesting deeper than MAX_DEPTH.
    """
    if nesting_line(text):
        raise FileFormatError(f"{where}: nested more than {MAX_DEPTH} deep; not a file fedllm wrote")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        place = f"line {err.lineno} column {err.colno}" if "\n" in text.strip() else f"column {err.colno}"
        raise FileFormatError(f"{where}: not valid JSON ({err.msg} at {place})") from None
    except RecursionError:  # nesting past the interpreter's limit
        raise FileFormatError(f"{where}: nested more than {MAX_DEPTH} deep; not a file fedllm wrote") from None
    except ValueError as err:  # an integer of over 4300 digits
        raise FileFormatError(f"{where}: not valid JSON (ValueError: {str(err)[:100]})") from None
    _check_depth(value, where)
    return value


def _check_depth(value: Any, where: str) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FileFormatError(f"{where}: nested more than {MAX_DEPTH} deep; not a file fedllm wrote")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def read_json(path: Path, spec: Any = object, limit: int = MAX_BYTES) -> Any:
    """The JSON value of the file `path`, checked against `spec`.

    Raises:
        FileFormatError: naming the file (and line, or field) when it is unreadable, not JSON, or
            not what `spec` says.
    """
    value = parse_json(read_text(path, limit), str(path))
    check(value, spec, str(path))
    return value


def read_jsonl(path: Path, spec: Any = object, cut_last: bool = False,
               limit: int = MAX_BYTES) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON Lines file (`parse_jsonl`).

    Raises:
        FileFormatError: naming the file (and line and field) when it is unreadable or a line is bad.
    """
    return parse_jsonl(read_text(path, limit), str(path), spec, cut_last)


def parse_jsonl(text: str, where: str, spec: Any = object, cut_last: bool = False) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of JSON Lines `text`, each checked against `spec`.
    `cut_last`: a last line without its newline that does not parse (what a crash in the middle
    of writing leaves) is skipped with a warning instead of refused.

    Raises:
        FileFormatError: `where:line: ...` for the first line that is not JSON or not `spec`.
    """
    lines = text.split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = parse_json(line, f"{where}:{n}")
            check(value, spec, f"{where}:{n}")
        except FileFormatError:
            if cut_last and n == len(lines):  # the text did not end in a newline: a cut-off write
                log.warning("%s:%d: skipped a cut-off last line (a crash while writing it)", where, n)
                break
            raise
        out.append((n, value))
    return out


def check(value: Any, spec: Any, where: str, field: str = "") -> None:
    """`value` matches `spec` (see the module's docstring).

    Raises:
        FileFormatError: `where: field F is X, not Y` (or `is missing`), one line.
    """
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            _fail(value, spec, where, field)
        if set(spec) == {"*"}:
            for key, item in value.items():
                check(item, spec["*"], where, _join(field, key))
            return
        for key, sub in spec.items():
            if key in value:
                check(value[key], sub.spec if isinstance(sub, Maybe) else sub, where, _join(field, key))
            elif not isinstance(sub, Maybe):
                raise FileFormatError(f"{where}: field {_join(field, key)!r} is missing")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            _fail(value, spec, where, field)
        for i, item in enumerate(value):
            check(item, spec[0], where, f"{field}[{i}]")
    elif isinstance(spec, tuple):
        if any(_matches(value, s) for s in spec):
            return
        for s in spec:  # no alternative fits: the first of the right kind names what inside it is wrong
            if _kind_matches(value, s):
                check(value, s, where, field)
        _fail(value, spec, where, field)
    elif not _scalar_matches(value, spec):
        _fail(value, spec, where, field)


def _matches(value: Any, spec: Any) -> bool:
    try:
        check(value, spec, "")
    except FileFormatError:
        return False
    return True


def _kind_matches(value: Any, spec: Any) -> bool:
    if isinstance(spec, dict):
        return isinstance(value, dict)
    if isinstance(spec, list):
        return isinstance(value, list)
    return _scalar_matches(value, spec)


def _scalar_matches(value: Any, spec: Any) -> bool:
    if spec is object:
        return True
    if spec is None:
        return value is None
    if spec is bool:
        return isinstance(value, bool)
    if spec in (int, float, FINITE):
        if isinstance(value, bool):
            return False
        if isinstance(value, int):
            return -MAX_INT <= value <= MAX_INT
        return isinstance(value, float) and (spec is float or spec is FINITE and math.isfinite(value))
    return isinstance(value, spec)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else str(key)


_NAMES = {int: "an integer", float: "a number", FINITE: "a finite number", str: "a string", bool: "true or false", None: "null",
          list: "a list", dict: "an object", object: "anything"}


def describe(spec: Any) -> str:
    """A spec in words: 'a number or null', 'a list', 'an object'."""
    if isinstance(spec, tuple):
        return " or ".join(describe(s) for s in spec)
    if isinstance(spec, (dict, list)):
        return "an object" if isinstance(spec, dict) else "a list"
    return _NAMES.get(spec, getattr(spec, "__name__", str(spec)))


def _what(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int) and abs(value) > MAX_INT:
        return "an integer out of range"
    if isinstance(value, (int, float, str)):
        return f"{type(value).__name__} {json.dumps(value)[:40]}"
    return "a list" if isinstance(value, list) else "an object"


def _fail(value: Any, spec: Any, where: str, field: str) -> None:
    what = f"field {field!r}" if field else "the value"
    raise FileFormatError(f"{where}: {what} is {_what(value)}, not {describe(spec)}")
