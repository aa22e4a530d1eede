"""Raw job values checked against the type hints of the fields they fill, before any dataclass is built.

A job file is YAML (or JSON), so a value can be of any type: `decoder_rows: "24"` is a string, `seeds: 5` is not a
list. `check(where, value, hint)` returns the value, or raises Mismatch naming what the field expects and what it got.

PyYAML reads YAML 1.1, where a float needs a dot: `learning_rate: 1e-3` arrives as the string "1e-3". Where a field
expects a number (and not a string), such a string is read as the float it spells (as YAML 1.2 and JSON would); no
other conversion is made.
"""

from __future__ import annotations

import collections.abc
import enum
import math
import re
import types
import typing
from typing import Any, Union

SEQUENCES = (list, tuple, collections.abc.Sequence)
MAPPINGS = (dict, collections.abc.Mapping)
FLOAT_TEXT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?\Z")  # YAML 1.2 / JSON float syntax


class Mismatch(ValueError):
    """The value does not fit the field: the message is `<where>: expected ...; got ...`."""


def check(where: str, value: Any, hint: Any) -> Any:
    """`value` as the field will hold it (YAML 1.1 float strings read as floats), or Mismatch naming the problem."""
    ok, converted = _fit(value, hint, convert=False)
    if not ok:
        ok, converted = _fit(value, hint, convert=True)
    if not ok:
        raise Mismatch(f"{where}: expected {describe(hint)}; got {shown(value)}{advice(value, hint)}")
    return converted


def _arms(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def _fit(value: Any, hint: Any, convert: bool) -> tuple[bool, Any]:
    """(fits, value as held); `convert` allows reading a float string as a float."""
    arms = _arms(hint)
    if len(arms) > 1:
        for arm in arms:
            ok, converted = _fit(value, arm, convert)
            if ok:
                return True, converted
        return False, value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, (str, typing.TypeVar)) or hint is object:
        return True, value
    if hint is None or hint is type(None):
        return value is None, value
    if origin is typing.Literal:
        return any(value is a or (type(value) is type(a) and value == a) for a in args), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return math.isfinite(value), value
        if convert and isinstance(value, str) and FLOAT_TEXT.match(value.strip()):
            number = float(value)
            return math.isfinite(number), number
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or any(type(value) is type(m.value) and value == m.value for m in hint), value
    if origin in SEQUENCES or hint in SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False, value
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return True, value  # a fixed-length tuple: no job field is one; the dataclass checks it
        items = [_fit(v, args[0] if args else Any, convert) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin in MAPPINGS or hint in MAPPINGS:
        if not isinstance(value, dict):
            return False, value
        if len(args) != 2:
            return True, value
        items = {k: _fit(v, args[1], convert) for k, v in value.items()}
        keys_ok = all(_fit(k, args[0], False)[0] for k in value)
        return keys_ok and all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value  # a hint this checker does not know: the dataclass checks the value itself


def describe(hint: Any) -> str:
    """What a field of type `hint` accepts, in the words of a job file."""
    arms = _arms(hint)
    if len(arms) > 1:
        named = [describe(a) for a in arms if a is not type(None)]
        text = " or ".join(dict.fromkeys(named))
        return text + " or null" if type(None) in arms else text
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is None or hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {bool: "true or false", int: "an integer", float: "a number (e.g. 1e-3 or 0.001)", str: "a string"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    if origin in SEQUENCES or hint in SEQUENCES:
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural[args[0]]}" if args and args[0] in plural else "a list"
    if origin in MAPPINGS or hint in MAPPINGS:
        return "a mapping (key: value)"
    return getattr(hint, "__name__", str(hint))


def shown(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    return f"{value!r} ({kinds.get(type(value), type(value).__name__)})"


def advice(value: Any, hint: Any) -> str:
    """How to write the value instead (or just the full stop)."""
    arms = _arms(hint)
    if isinstance(value, float) and not math.isfinite(value):
        return ": NaN and infinity are not allowed."
    wants_list = any(typing.get_origin(a) in SEQUENCES or a in SEQUENCES for a in arms)
    if isinstance(value, str) and (FLOAT_TEXT.match(value.strip()) or value.strip().lstrip("+-").isdigit()):
        if any(a in (int, float) for a in arms):
            return ": write numbers without quotes."
    if isinstance(value, str) and value.strip().lower() in ("true", "false") and bool in arms:
        return ": write true or false without quotes."
    if wants_list and not isinstance(value, (list, tuple, dict)) and value is not None:
        return f": write a list, e.g. [{value}]."
    return "."
