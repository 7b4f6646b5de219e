"""Pydantic's validation errors in the project's words: where (``defects[0].size_um``), what is wrong, what was given.

The typed models of the training settings (``training.config``), the station recipe (``inspection_station.recipe``)
and the manifest row (``datasets.manifest_row``) check types with pydantic; these helpers turn its errors into
the one-line problems each of them reports (a setting, a recipe key, a manifest field), never pydantic's own
multi-line text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

_PHRASES = {
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number", "float_parsing": "must be a number", "finite_number": "must be a finite number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "string_type": "must be text", "string_too_short": "must not be empty",
    "list_type": "must be a list", "tuple_type": "must be a list", "missing": "is missing (required)",
    "dict_type": "must be a mapping of key: value", "model_type": "must be a mapping of key: value",
    "model_attributes_type": "must be a mapping of key: value", "dataclass_type": "must be a mapping of key: value",
}


def where(loc: tuple[int | str, ...]) -> str:
    """``("defects", 0, "size_um")`` -> ``defects[0].size_um``; a dict key's own error (``[key]``) names the dict."""
    if loc and loc[-1] == "[key]":  # the key of a mapping is wrong: the mapping is the place
        loc = loc[:-2]
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def phrase(err: ErrorDetails) -> str:
    """What is wrong, in plain words: ``must be a whole number``, ``must be positive``, ``must be one of ...``."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _PHRASES:
        return _PHRASES[kind]
    if kind == "greater_than":
        return "must be positive" if ctx.get("gt") == 0 else f"must be > {ctx.get('gt')}"
    if kind in ("greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        return f"must be {op} {next(iter(ctx.values()), '?')}"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])  # a validator's own message, without pydantic's "Value error, "
    msg = err["msg"]
    return msg[:1].lower() + msg[1:]


def shown(v: Any, limit: int = 60) -> str:
    """A given value, shortened to one short line (a huge list or number stays readable)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def sentence(err: ErrorDetails) -> str:
    """One problem as a clause: ``batch_size must be a whole number, got 2.5``. A validator's message about
    the whole object (no place) stands alone; a missing value has nothing to show."""
    place, what = where(err["loc"]), phrase(err)
    if not place:
        return what
    text = f"{place} {what}" if what.startswith(("must ", "is ")) else f"{place}: {what}"
    return text if err["type"] == "missing" else f"{text}, got {shown(err.get('input'))}"


def one_line(e: ValidationError, limit: int = 3, say: Callable[[ErrorDetails], str] = sentence) -> str:
    """Every problem (up to ``limit``, then a count) on one line, separated by semicolons."""
    errs = e.errors(include_url=False)
    more = len(errs) - limit
    return "; ".join(say(err) for err in errs[:limit]) + (f" (and {more} more)" if more > 0 else "")
