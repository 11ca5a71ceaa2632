"""``gateway check``, ``gateway check --explain ROUTE`` and ``gateway schema``.

``check`` loads each file the way the server does and prints every issue as
``file:line:col: path: message``, then one summary line per file; it exits 1 when any
file has an error (warnings alone pass). ``--explain`` prints what a route resolves
to, each value with where it came from, so an operator can read what a request meets.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import SchemaSerializer

from ._errors import GatewayError
from ._policy import (
    IDEMPOTENT_METHODS,
    FanoutCall,
    Policy,
    ProxyAction,
    Quorum,
    RetryPolicy,
    Route,
    UpstreamPolicy,
    resolve_call_settings,
    sql_reads_only,
    upstream_retry_policy,
    upstream_slots,
)
from ._policy_loader import LoadedPolicy, PolicyError, load_policy_file
from ._routing import compile_route, normalize_path
from ._units import format_duration

__all__ = ["SCHEMA_ID", "explain_route", "find_route", "policy_json_schema", "run_check"]

SCHEMA_ID = "urn:trio-gateway:policy:1"


def run_check(files: Sequence[str], *, explain: str | None = None,
              out: TextIO = sys.stdout) -> int:
    """Check each file; 0 when all load (warnings allowed), 1 when any has an error."""
    status = 0
    for file in files:
        try:
            loaded = load_policy_file(file)
        except PolicyError as exc:
            for issue in exc.issues:
                print(issue, file=out)
            errors = sum(1 for issue in exc.issues if issue.severity == "error")
            print(f"{file}: invalid ({_count(errors, 'error')})", file=out)
            status = 1
            continue
        for issue in loaded.warnings:
            print(issue, file=out)
        warned = f", {_count(len(loaded.warnings), 'warning')}" if loaded.warnings else ""
        policy = loaded.policy
        print(f"{file}: ok{warned} (version {loaded.version}, "
              f"{_count(len(policy.routes), 'route')}, "
              f"{_count(len(policy.upstreams), 'upstream')})", file=out)
        if explain is not None:
            try:
                print(explain_route(loaded, explain), file=out, end="")
            except LookupError as exc:
                print(f"{file}: {exc.args[0]}", file=out)
                status = 1
    return status


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --------------------------------------------------------------------------- explain


def find_route(policy: Policy, route_path: str) -> tuple[int, Route]:
    """The route whose template is ``route_path``, else the first the gateway's own
    matching picks for it as a request path (whatever the method)."""
    for index, route in enumerate(policy.routes):
        if route.path == route_path:
            return index, route
    try:
        segments = normalize_path(route_path.partition("?")[0].encode())
    except GatewayError:
        segments = None
    if segments is not None:
        for index, route in enumerate(policy.routes):
            if compile_route(index, route).match(segments) is not None:
                return index, route
    known = ", ".join(route.path for route in policy.routes)
    raise LookupError(f"no route matches {route_path!r} (routes: {known})")


def explain_route(loaded: LoadedPolicy, route_path: str) -> str:
    """What a route resolves to, in YAML-ish text; each value says where it came from.

    Raises :class:`LookupError` when no route has that template or matches that path.
    """
    policy = loaded.policy
    index, route = find_route(policy, route_path)
    lines: list[str] = [f"route: {route.path}  # routes[{index}] of {loaded.file}"]
    if route.methods is not None:
        lines.append(f"methods: [{', '.join(route.methods)}]  # from the route")
    else:
        kind = "proxy" if route.proxy is not None else "fanout and sql"
        lines.append(f"methods: [{', '.join(route.allowed_methods)}]  "
                     f"# default for {kind} routes")
    if route.deadline is not None:
        deadline, origin = route.deadline, "from the route"
    elif "deadline" in policy.defaults.model_fields_set:
        deadline, origin = policy.defaults.deadline, "from defaults.deadline"
    else:
        deadline, origin = policy.defaults.deadline, "built-in default"
    lines.append(f"deadline: {format_duration(deadline)}  # {origin}; a client may shorten "
                 f"it with {policy.server.deadline_header}")
    max_body = route.max_body if route.max_body is not None else policy.server.limits.max_body
    lines.append(f"max_body: {_size(max_body)}  # "
                 + ("from the route" if route.max_body is not None
                    else "from server.limits.max_body"))

    calls: list[tuple[str, ProxyAction | FanoutCall]] = []
    if route.proxy is not None:
        lines.append("proxy:")
        calls.append(("", route.proxy))
    elif route.sql is not None:
        lines.append("sql:")
        calls.append(("", route.sql))
    elif route.fanout is not None:
        mode = route.fanout.mode
        mode_text = f"{{quorum: {mode.quorum}}}" if isinstance(mode, Quorum) else mode
        lines.append("fanout:")
        lines.append(f"  mode: {mode_text}")
        lines.append(f"  on_failure: {route.fanout.on_failure}")
        lines.append("  calls:")
        calls.extend(route.fanout.calls.items())
    for name, call in calls:
        indent = "      " if name else "  "
        if name:
            lines.append(f"    {name}:")
        lines.extend(indent + line for line in _explain_call(policy, call, route.methods))
    return "\n".join(lines) + "\n"


def _explain_call(policy: Policy, call: ProxyAction | FanoutCall,
                  route_methods: tuple[str, ...] | None = None) -> list[str]:
    upstream = policy.upstreams[call.upstream]
    target = upstream.url if upstream.url is not None else "postgres"
    lines = [f"upstream: {call.upstream}  # {target}"]
    if isinstance(call, FanoutCall) and call.query is not None:
        lines.append(f"query: {call.query}")
        if call.args:
            lines.append(f"args: [{', '.join(call.args)}]")
    else:
        method = call.method if isinstance(call, FanoutCall) else "(the request's)"
        lines.append(f"path: {call.path}")
        lines.append(f"method: {method}")
    resolved = resolve_call_settings(policy, call)
    origin = _origins(policy, call, upstream)
    if resolved.timeout is None:
        lines.append("timeout: none  # bounded by the deadline only")
    else:
        lines.append(f"timeout: {format_duration(resolved.timeout)}  # {origin('timeout')}")
    # A call that may write runs as a POST: never hedged, retried only when nothing was
    # sent (a connect failure), unless its retries opt in with non_idempotent.
    # A proxy call takes the request's method: it writes when the route takes only
    # methods that may write, and is hedged for some methods only when it takes both.
    writing_methods = (sorted(set(route_methods) - IDEMPOTENT_METHODS)
                       if route_methods is not None else ["PATCH", "POST"])
    if isinstance(call, FanoutCall):
        writes = (not sql_reads_only(call.query) if call.query is not None
                  else call.method not in IDEMPOTENT_METHODS)
    else:
        writes = route_methods is not None and not set(route_methods) & IDEMPOTENT_METHODS
    only_some = isinstance(call, ProxyAction) and not writes and bool(writing_methods)
    retry_lines = _explain_retries(resolved.retries, origin("retries"),
                                   upstream_retry_policy(policy, upstream), call.upstream,
                                   upstream.call is not None
                                   and upstream.call.retries is not None)
    if writes and resolved.retries is not None and resolved.retries.attempts > 1 \
            and not resolved.retries.non_idempotent:
        retry_lines.append("  # may write: retried only after a connect failure")
    elif only_some and resolved.retries is not None and resolved.retries.attempts > 1 \
            and not resolved.retries.non_idempotent:
        retry_lines.append(f"  # a {' or '.join(writing_methods)} may write: retried only "
                           "after a connect failure")
    lines.extend(retry_lines)
    if writes and resolved.hedge_after is not None:
        what = "the statement" if isinstance(call, FanoutCall) and call.query else "the call"
        lines.append(f"hedge: off  # {what} may write, and a write is never hedged")
    elif resolved.hedge_after is None:
        lines.append("hedge: off")
    else:
        lines.append(f"hedge: after {format_duration(resolved.hedge_after)}, "
                     f"at most {resolved.max_hedges} extra  # {origin('hedge_after')}"
                     + (f"; never for a {' or '.join(writing_methods)}" if only_some else ""))
    limit = upstream.limit
    adaptive = ("" if limit.adaptive is None else
                f", adaptive: {{min_concurrency: {limit.adaptive.min_concurrency}, "
                f"tolerance: {_percent(limit.adaptive.tolerance)}}}")
    lines.append(f"limit: {{concurrency: {limit.concurrency}, queue: {limit.queue}, "
                 f"queue_timeout: {format_duration(limit.queue_timeout)}{adaptive}}}  "
                 f"# upstreams.{call.upstream}.limit"
                 + (f"; {upstream_slots(upstream)} slots, as many as the pool's connections"
                    if upstream_slots(upstream) < limit.concurrency else "")
                 + ("; concurrency is the most, the slots follow the latency"
                    if limit.adaptive is not None else ""))
    circuit = upstream.circuit
    if circuit is None:
        lines.append("circuit: off")
    else:
        after = (f", or {circuit.consecutive_failures} in a row"
                 if circuit.consecutive_failures is not None else "")
        lines.append(f"circuit: {{opens at {_percent(circuit.failure_ratio)} failures over "
                     f"{format_duration(circuit.window)} (min {circuit.min_requests}){after}; "
                     f"open for {format_duration(circuit.open_for)}, "
                     f"{circuit.half_open_probes} probes}}")
    if upstream.postgres is not None:
        pool = upstream.postgres.pool
        lines.append(f"pool: {{min: {pool.min}, max: {pool.max}}}  "
                     f"# DSN from ${upstream.postgres.dsn_env}")
    else:
        http_pool = upstream.pool
        lines.append(f"pool: {{max_connections: {http_pool.max_connections}, "
                     f"idle_timeout: {format_duration(http_pool.idle_timeout)}, "
                     f"connect_timeout: {format_duration(http_pool.connect_timeout)}}}")
    return lines


def _explain_retries(retries: RetryPolicy | None, origin: str, shared: RetryPolicy,
                     upstream_name: str, upstream_own: bool) -> list[str]:
    """The call's retries; the budget shown is the one they draw on, which is the
    upstream's, shared by all its calls (a call's own ``budget`` is not used)."""
    if retries is None or retries.attempts == 1:
        return [f"retries: off  # {origin}"]
    on = ", ".join(str(item) for item in retries.on)
    per_try = (f", per_try_timeout: {format_duration(retries.per_try_timeout)}"
               if retries.per_try_timeout is not None else "")
    low, high = retries.backoff
    budget_origin = (f"upstreams.{upstream_name}.call.retries" if upstream_own
                     else "defaults.call.retries, or the built-in default")
    return [f"retries: {{attempts: {retries.attempts}, on: [{on}], "
            f"backoff: {format_duration(low)}..{format_duration(high)}{per_try}}}  "
            f"# {origin}; budget: {_percent(shared.budget)} of first tries, at least "
            f"{shared.min_per_second:g}/s, shared by every call to {upstream_name} "
            f"(from {budget_origin})"]


def _size(value: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % factor == 0:
            return f"{value // factor}{unit}"
    return f"{value}B"


def _percent(value: float) -> str:
    return f"{value * 100:g}%"


def _origins(policy: Policy, call: ProxyAction | FanoutCall, upstream: UpstreamPolicy) -> Any:
    """A function naming where a resolved call setting came from."""

    def origin(name: str) -> str:
        if getattr(call, name, None) is not None:
            return "from the call"
        if upstream.call is not None and getattr(upstream.call, name) is not None:
            return f"from upstreams.{call.upstream}.call"
        defaults = policy.defaults
        if "call" in defaults.model_fields_set and name in defaults.call.model_fields_set:
            return "from defaults.call"
        return "built-in default"

    return origin


# --------------------------------------------------------------------------- schema


class _DefaultsAsWritten(GenerateJsonSchema):
    """Defaults in the form a policy file writes them (``"50ms"``, ``"20%"``), through
    each field's own serializer: an editor completing ``0.05`` from the schema wrote a
    value the loader refuses."""

    def default_schema(self, schema: Any) -> JsonSchemaValue:
        json_schema = super().default_schema(schema)
        if "default" in json_schema:
            json_schema["default"] = SchemaSerializer(schema["schema"]).to_python(
                schema["default"], mode="json")
        return json_schema


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema of the policy file, for editors (yaml-language-server)."""
    schema = Policy.model_json_schema(schema_generator=_DefaultsAsWritten)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "trio-gateway policy file (version 1)",
        **{key: value for key, value in schema.items() if key != "title"},
    }

