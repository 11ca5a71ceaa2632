"""JSON an upstream sent (an HTTP body, a PostgreSQL json column), read so that what the
gateway answers with it is still JSON (RFC 8259): ``NaN`` and ``Infinity`` are refused,
and so is a number a double cannot hold (``1e400``), which would be re-encoded as
``Infinity``. Either raises ``ValueError``."""

from __future__ import annotations

import json
import math
from typing import Any


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is beyond the range of a double")
    return value


def loads(text: str | bytes) -> Any:
    """``json.loads`` for an upstream's JSON."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
