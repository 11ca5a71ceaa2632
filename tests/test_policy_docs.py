"""policies/README.md documents every field an operator can write.

Every model reachable from ``Policy`` is walked (through nested models, dicts, tuples
and unions); each field's dotted path from the root must appear in the README in
backticks, e.g. ```routes[].fanout.calls.<name>.timeout```. A model met a second time
(the ``retries`` block under a call, say) is documented once, at its first path; later
places only need their own path, which the README points back from.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gateway._policy import Policy

README = Path(__file__).resolve().parent.parent / "policies" / "README.md"


def _members(annotation: Any) -> list[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in {typing.Union, types.UnionType}:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _documented_as(model: type[BaseModel]) -> type[BaseModel]:
    """A subclass adding no fields (SqlAction of FanoutCall) is documented with its base."""
    for base in reversed(model.__mro__):
        if (isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel
                and set(base.model_fields) == set(model.model_fields) and base.model_fields):
            return base
    return model


def _walk(annotation: Any, prefix: str, seen: set[type]) -> Iterator[str]:
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            key = _documented_as(member)
            if key in seen:
                continue
            seen.add(key)
            for name, field in member.model_fields.items():
                path = f"{prefix}.{name}" if prefix else name
                yield path
                yield from _walk(field.annotation, path, seen)
        elif origin is dict:
            yield from _walk(typing.get_args(member)[1], f"{prefix}.<name>", seen)
        elif origin in {tuple, list}:
            yield from _walk(typing.get_args(member)[0], f"{prefix}[]", seen)


def field_paths() -> list[str]:
    return list(dict.fromkeys(_walk(Policy, "", set())))


def test_walk_reaches_nested_models() -> None:
    paths = field_paths()
    assert "version" in paths
    assert "server.limits.max_body" in paths
    assert "upstreams.<name>.postgres.pool.min" in paths
    assert "routes[].fanout.mode.quorum" in paths
    assert "routes[].fanout.calls.<name>.args" in paths
    assert "defaults.call.retries.backoff" in paths
    assert "routes[].sql" in paths  # same fields as a fan-out call: documented there
    assert len(paths) > 80


def test_every_field_is_documented() -> None:
    text = README.read_text()
    missing = [path for path in field_paths() if f"`{path}`" not in text]
    assert not missing, "policies/README.md does not document: " + ", ".join(missing)


def test_readme_documents_units_and_statuses() -> None:
    text = README.read_text()
    for needle in ("`250ms`", "`20%`", "`20ms..500ms`", "`64KiB`", "`16MiB`",
                   "504", "503", "502", "499", "413", "414", "431", "Retry-After",
                   '"errors"', "on_failure: partial", "fail_fast", "quorum"):
        assert needle in text, needle
