"""Typed policy values with units: durations, percentages and duration ranges.

Operators write ``250ms``, ``2s``, ``1m``, ``20%`` and ``20ms..500ms``; the models hold
seconds (float) and fractions (float) so that no unitless number reaches the code.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from fractions import Fraction
from typing import Annotated, Any, NamedTuple

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema

# ASCII digits only, as the JSON Schema's patterns say: Python's \d and float() would
# also take fullwidth or Arabic-Indic ones, which an editor flags.
_DURATION_RE = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)$", re.ASCII)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_PERCENT_RE = re.compile(r"^(?P<value>\d+(?:\.\d+)?)%$", re.ASCII)


def _shown(value: Any) -> str:
    """``value`` as the operator wrote it in YAML, near enough: no Python reprs
    (``datetime.date(2001, 12, 14)``) in a message meant for them."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


#: Longest duration a policy may write: longer is a slip of the keyboard (and digits
#: enough turn into infinity, which ``Retry-After`` or a deadline cannot carry).
MAX_DURATION_S = 365 * 24 * 3600.0


def parse_duration(value: Any) -> float:
    """``"250ms"`` → 0.25 seconds. Bare numbers are refused: a unit is always required."""
    if isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if match:
            seconds = float(match["value"]) * _UNIT_SECONDS[match["unit"]]
            if not seconds <= MAX_DURATION_S:
                raise ValueError(f"{_shown(value)} is too long (at most 365 days, 8760h)")
            return seconds
    raise ValueError(f"{_shown(value)} is not a duration (e.g. 250ms, 2s, 1m)")


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for explain output and schemas."""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    millis = seconds * 1000
    return f"{int(millis)}ms" if float(millis).is_integer() else f"{millis:g}ms"


def parse_percent(value: Any) -> float:
    """``"20%"`` → 0.2. Values above 100% are allowed (a retry budget may exceed 100%)."""
    if isinstance(value, str):
        match = _PERCENT_RE.match(value.strip())
        if match:
            fraction = float(match["value"]) / 100
            if not math.isfinite(fraction):
                raise ValueError(f"{_shown(value)} is too large")
            return fraction
    raise ValueError(f"{_shown(value)} is not a percentage (e.g. 20%)")


class DurationSpan(NamedTuple):
    """A closed range of durations, e.g. the backoff bounds ``20ms..500ms``."""

    low_s: float
    high_s: float


def parse_duration_range(value: Any) -> DurationSpan:
    """``"20ms..500ms"`` → DurationSpan(0.02, 0.5); the low end must not exceed the high."""
    if isinstance(value, str) and ".." in value:
        low_text, _, high_text = value.partition("..")
        try:
            low, high = parse_duration(low_text), parse_duration(high_text)
        except ValueError:
            pass
        else:
            if low > high:
                raise ValueError(f"{value!r}: the low end is above the high end")
            return DurationSpan(low, high)
    raise ValueError(f"{_shown(value)} is not a duration range (e.g. 20ms..500ms)")


def digits_at_least(count: int) -> str:
    """A regular expression of the decimal numbers (leading zeros allowed) that are at
    least ``count``: longer ones, ``count`` itself, and those of its length that are
    larger at their first differing digit."""
    if count <= 0:
        return r"\d+"
    digits = str(count)
    larger = [rf"[1-9]\d{{{len(digits)},}}", digits]
    for index, digit in enumerate(digits):
        if digit != "9":
            rest = len(digits) - index - 1
            larger.append(f"{digits[:index]}[{int(digit) + 1}-9]"
                          + {0: "", 1: r"\d"}.get(rest, rf"\d{{{rest}}}"))
    return "0*(" + "|".join(larger) + ")"


def above(limits: dict[str, int], *, fraction: bool = False) -> str:
    """A regular expression of the values above their unit's limit (``limits``: unit to
    the largest count the loader takes), for a schema's ``not``: what is too large."""
    def one(limit: int) -> str:
        if not fraction:
            return digits_at_least(limit + 1)
        return rf"{digits_at_least(limit + 1)}(\.\d+)?|0*{limit}\.\d*[1-9]\d*"
    return "^(" + "|".join(f"({one(limit)}){unit}" for unit, limit in limits.items()) + ")$"


#: The durations longer than a year, in each unit (``parse_duration`` refuses them).
_TOO_LONG = {"not": {"pattern": above(
    {unit: round(MAX_DURATION_S / seconds) for unit, seconds in _UNIT_SECONDS.items()},
    fraction=True)}}
_DURATION_SCHEMA = {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)$", **_TOO_LONG,
                    "examples": ["250ms", "2s"]}
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(_DURATION_SCHEMA),
]
_POSITIVE_DURATION_PATTERN = r"^(\d*[1-9]\d*(\.\d+)?|\d+\.\d*[1-9]\d*)(ms|s|m|h)$"
#: A duration that must be above 0 (a zero timeout fails every call at once). The bound
#: sits inside the type so that ``PositiveDuration | None`` keeps a valid JSON Schema,
#: whose pattern says it too (a digit other than 0): an editor flags ``0s`` as ``check``
#: does.
PositiveDuration = Annotated[
    Duration,
    Field(gt=0),
    WithJsonSchema({**_DURATION_SCHEMA, "pattern": _POSITIVE_DURATION_PATTERN}),
]


def _decimals_above(limit: Fraction) -> str:
    """A regular expression of the decimal numbers (``\\d+(\\.\\d+)?``) above
    ``limit``, a fraction whose expansion may not end (a minute is 0.01666…h): a
    larger integer part, or the same one and a fraction that is larger at its first
    differing digit."""
    whole, rest = divmod(limit, 1)
    # The digits of ``rest``: a prefix, then a cycle repeated forever ("0" if it ends).
    digits: list[str] = []
    seen: dict[Fraction, int] = {}
    while rest not in seen:
        seen[rest] = len(digits)
        digit, rest = divmod(rest * 10, 1)
        digits.append(str(digit))
    start = seen[rest]
    prefix, cycle = "".join(digits[:start]), "".join(digits[start:])
    larger = [f"{prefix[:index]}[{int(digit) + 1}-9]" for index, digit in enumerate(prefix)
              if digit != "9"]
    larger += [f"{prefix}({cycle})*{cycle[:index]}[{int(digit) + 1}-9]"
               for index, digit in enumerate(cycle) if digit != "9"]
    same = f"0*{whole}" if whole else "0+"
    return (rf"{digits_at_least(int(whole) + 1)}(\.\d+)?"
            rf"|{same}\.({'|'.join(larger)})\d*")


def duration_at_most(ceiling_s: float) -> Any:
    """The type of a duration above 0 and at most ``ceiling_s``, its JSON Schema saying
    both bounds in every unit (an editor flags what ``check`` refuses)."""
    ceiling = Fraction(repr(ceiling_s))

    def parse(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds > ceiling_s:
            raise ValueError(f"{_shown(value)} is too long (at most "
                             f"{format_duration(ceiling_s)})")
        return seconds

    too_long = "^(" + "|".join(
        f"({_decimals_above(ceiling / Fraction(repr(seconds)))}){unit}"
        for unit, seconds in _UNIT_SECONDS.items()) + ")$"
    return Annotated[
        float,
        BeforeValidator(parse),
        Field(gt=0),
        PlainSerializer(format_duration, return_type=str),
        WithJsonSchema({**_DURATION_SCHEMA, "pattern": _POSITIVE_DURATION_PATTERN,
                        "not": {"pattern": too_long}}),
    ]


_PERCENT_SCHEMA = {"type": "string", "pattern": r"^\d+(\.\d+)?%$", "examples": ["20%"]}
Percent = Annotated[
    float,
    BeforeValidator(parse_percent),
    PlainSerializer(lambda v: f"{v * 100:g}%", return_type=str),
    WithJsonSchema(_PERCENT_SCHEMA),
]
#: A percentage that is a share (0% to 100%), in the JSON Schema; the field's own
#: validator refuses more, with words for what the share is of.
Share = Annotated[
    Percent, WithJsonSchema({**_PERCENT_SCHEMA, "pattern": r"^0*(\d{1,2}(\.\d+)?|100(\.0+)?)%$"}),
]
#: A share above 0% (and at most 100%), in the JSON Schema; as for ``Share``.
PositiveShare = Annotated[
    Percent,
    WithJsonSchema({**_PERCENT_SCHEMA, "pattern": r"^(0*[1-9]\d?(\.\d+)?|0+\.\d*[1-9]\d*"
                    r"|0*100(\.0+)?)%$"}),
]
DurationRange = Annotated[
    DurationSpan,
    BeforeValidator(parse_duration_range),
    PlainSerializer(lambda v: f"{format_duration(v[0])}..{format_duration(v[1])}",
                    return_type=str),
    WithJsonSchema({"type": "string", "examples": ["20ms..500ms"]}),
]
