"""One grammar for every plug-in chain, and server.plugins: the user's modules imported first.

    stages = parse_stages("trimmed-mean(fraction=0.2) > fedadam(lr=0.01)", "server.strategy")
    stages[0]                  # Stage(name='trimmed-mean', args=(), kwargs={'fraction': 0.2}, ...)
    parse_stages("my_pkg.codecs:sign(scale=2) > zstd", "compression.up")
    import_plugins("my_pkg.codecs, my_pkg.rules")     # what server.plugins names

A chain is stages joined by `>` (codecs also take `->`); a stage is a registered name
(`fedavg`, `trimmed-mean`, `topk`) or a user's `module:object`, optionally followed by
arguments in parentheses: positional ones first, then `name=value`. A value is a literal only:
an int (`4`, `-3`), a float (`0.01`, `1e-3`), a bool (`true`, `false`, `True`, `False`), a
quoted string (`'tensor'`, `"a b"`) or a bare word (`tensor`, `cuda:0` is not: quote it).
Nothing is evaluated; anything else is a one-line ConfigError naming the config key and the
stage.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from fedllm.errors import ConfigError

Value = int | float | bool | str
_STAGE = re.compile(r"\s*(?P<name>[A-Za-z_][\w.\-]*(?::[A-Za-z_]\w*)?)\s*(?:\((?P<args>.*)\))?\s*", re.DOTALL)
_KEYWORD = re.compile(r"\s*(?P<key>[A-Za-z_]\w*)\s*=(?!=)(?P<value>.*)", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][\w.\-/]*")
_BOOLS = {"true": True, "false": False, "True": True, "False": False}


@dataclass(frozen=True)
class Stage:
    """One stage of a chain: the name it is looked up by, its arguments, and its text (for errors)."""

    name: str
    args: tuple[Value, ...] = ()
    kwargs: dict[str, Value] = field(default_factory=dict)
    text: str = ""

    def spelled(self, **extra: Value) -> str:
        """The stage written in the grammar, with `extra` keyword arguments added (a suggestion's text)."""
        parts = [_spell(a) for a in self.args] + [f"{k}={_spell(v)}" for k, v in {**self.kwargs, **extra}.items()]
        return f"{self.name}({', '.join(parts)})" if parts else self.name


def _spell(value: Value) -> str:
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)


def _fail(key: str, kind: str, text: str, why: str) -> ConfigError:
    where = f"{kind} stage {text.strip()!r}" if kind else f"stage {text.strip()!r}"
    return ConfigError(f"{key}: {where}: {why}" if key else f"{where}: {why}")


def _split(text: str, seps: str, key: str, kind: str, whole: str) -> list[str]:
    """`text` cut at the characters of `seps` outside quotes and parentheses (`->` counts as `>`)."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                raise _fail(key, kind, whole, "unbalanced ')'")
        elif depth == 0 and c in seps:
            end = i - 1 if c == ">" and i > start and text[i - 1] == "-" else i
            parts.append(text[start:end])
            start = i + 1
        i += 1
    if quote or depth:
        raise _fail(key, kind, whole, "unclosed quote" if quote else "unclosed '('")
    return parts + [text[start:]]


def parse_value(text: str, key: str = "", kind: str = "", stage: str = "") -> Value:
    """A literal argument: int, float, bool, a quoted string or a bare word (never evaluated).

    Raises:
        ConfigError: naming `key` and `stage` for anything else.
    """
    t = text.strip()
    if not t:
        raise _fail(key, kind, stage, "an argument has no value")
    if t in _BOOLS:
        return _BOOLS[t]
    if _NUMBER.fullmatch(t):
        return float(t) if any(c in t for c in ".eE") else int(t)
    if t[0] in "'\"":
        try:
            value = ast.literal_eval(t)
        except (SyntaxError, ValueError):
            value = None
        if isinstance(value, str):
            return value
        raise _fail(key, kind, stage, f"{t!r} is not a quoted string")
    if _WORD.fullmatch(t):
        return t
    raise _fail(key, kind, stage, f"{t!r} is not a literal (a number, true/false, a word or a quoted string)")


def parse_stage(text: str, key: str = "", kind: str = "") -> Stage:
    """One stage, `name` or `name(args)`.

    Raises:
        ConfigError: naming `key` and the stage for a malformed name or argument.
    """
    m = _STAGE.fullmatch(text)
    if not m:
        raise _fail(key, kind, text, "expected name or name(arguments), or module:object(arguments)")
    args: list[Value] = []
    kwargs: dict[str, Value] = {}
    body = m.group("args")
    if body is not None and body.strip():
        for piece in _split(body, ",", key, kind, text):
            kw = _KEYWORD.fullmatch(piece)
            if kw:
                if kw.group("key") in kwargs:
                    raise _fail(key, kind, text, f"argument {kw.group('key')!r} given twice")
                kwargs[kw.group("key")] = parse_value(kw.group("value"), key, kind, text)
            elif kwargs:
                raise _fail(key, kind, text, "a positional argument after a keyword one")
            else:
                args.append(parse_value(piece, key, kind, text))
    return Stage(m.group("name"), tuple(args), kwargs, text.strip())


def parse_stages(spec: str, key: str = "", kind: str = "") -> list[Stage]:
    """A chain `stage > stage > ...`; an empty or blank `spec` is no stages.

    Raises:
        ConfigError: naming `key` and the stage that is empty or malformed.
    """
    if not spec.strip():
        return []
    parts = _split(spec, ">", key, kind, spec)
    if any(not p.strip() for p in parts):
        raise ConfigError(f"{key + ': ' if key else ''}{spec!r} has an empty stage")
    return [parse_stage(p, key, kind) for p in parts]


def check_arguments(fn: Callable[..., Any], leading: int, stage: Stage, key: str, kind: str = "") -> None:
    """That `fn`, after its `leading` positional parameters (a rule's updates and cfg), takes the
    stage's arguments.

    Raises:
        ConfigError: naming the stage, the argument it does not take and those it takes.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: it raises when called
    try:
        sig.bind(*([None] * leading), *stage.args, **stage.kwargs)
    except TypeError as err:
        takes = [p.name for p in list(sig.parameters.values())[leading:]
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        unknown = [k for k in stage.kwargs if k not in sig.parameters]
        what = f"unknown argument {unknown[0]!r}" if unknown else str(err)
        raise _fail(key, kind, stage.text or stage.name,
                    f"{what}; {stage.name} takes {', '.join(takes) if takes else 'no arguments'}") from None


def plugin_names(spec: str) -> list[str]:
    """server.plugins as a list of module names."""
    return [m.strip() for m in spec.split(",") if m.strip()]


def import_plugins(spec: str, key: str = "server.plugins") -> list[str]:
    """Import each comma-separated module of `spec` (what it registers at import joins the
    registries: codecs, rules, optimizers, metrics, trackers, attacks). Idempotent: Python keeps
    imported modules.

    Raises:
        ConfigError: naming `key` and the module, in one line, when one does not import.
    """
    names = plugin_names(spec)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # a user's module may fail in any way at import
            raise ConfigError(f"{key}: cannot import {name!r}: {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")) from err
    return names
