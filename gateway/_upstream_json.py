"""JSON an upstream sent (an HTTP body, a PostgreSQL json column), read so that what the
gateway answers with it is still JSON (RFC 8259): ``NaN`` and ``Infinity`` are refused,
and so is a number a double cannot hold (``1e400``), which would be re-encoded as
``Infinity``. Either raises ``ValueError``.

``check_size`` holds rows made from such JSON (SQL results) to ``max_response_body``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from ._errors import UpstreamResultRefused


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


def check_size(rows: Iterable[Any], limit: int, name: str, *, counted: int = 0) -> int:
    """Bytes of ``rows`` as JSON, plus ``counted`` from rows before them; past ``limit``
    (``max_response_body``) an ``UpstreamResultRefused`` (502), as an HTTP upstream's body
    past it is: the cap holds for what the gateway answers, whatever the source."""
    size = counted
    for row in rows:
        size += len(json.dumps(row, separators=(",", ":"))) + 1
        if size > limit:
            raise UpstreamResultRefused(f"{name}: the result is larger than {limit} bytes "
                                     "as JSON (max_response_body)", max_bytes=limit)
    return size
