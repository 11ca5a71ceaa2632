"""``gateway traces``: cancellation traces rendered as trees with time bars (rich)."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
import trio
from rich.console import Console
from rich.text import Text
from rich.tree import Tree

_BAR_WIDTH = 30
_OUTCOME_STYLE = {"ok": "green", "error": "red", "cancelled": "bold yellow"}
#: Control characters (C0, DEL, C1): written by clients, they would reach the operator's
#: terminal as escape sequences (a cleared screen, a retitled window, forged lines).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _shown(value: Any) -> str:
    """A value from a trace as text with its control characters escaped (``\\x1b``)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", str(value))


def _bar(start: float, end: float | None, total: float) -> str:
    total = max(total, 0.001)
    left = int(_BAR_WIDTH * start / total)
    right = int(_BAR_WIDTH * (end if end is not None else total) / total)
    right = max(right, left + 1)
    return " " * left + "█" * (right - left) + " " * max(0, _BAR_WIDTH - right)


def _span_label(span: dict[str, Any], total: float) -> Text:
    outcome = span.get("outcome", "ok")
    name = span["kind"] if span["kind"] == "request" else _shown(f"{span['kind']} {span['name']}")
    end = span.get("end_ms")
    label = Text()
    label.append(f"{name:<28}", style="bold" if span["kind"] == "request" else "")
    label.append(f"|{_bar(span['start_ms'], end, total)}| ", style="dim")
    duration = "…" if end is None else f"{end - span['start_ms']:.1f}ms"
    label.append(f"{duration:>9} ")
    label.append(outcome, style=_OUTCOME_STYLE.get(outcome, ""))
    if span.get("cause"):
        label.append(f" cause={_shown(span['cause'])}", style="bold red")
        if span.get("scope"):
            label.append(f" scope={_shown(span['scope'])}", style="red")
    extras = []
    for key in ("upstream", "status", "budget_ms", "deadline_source", "cancelled_by", "error"):
        if key in span and span[key] is not None:
            extras.append(f"{key}={_shown(span[key])}")
    if extras:
        label.append("  " + " ".join(extras), style="dim")
    return label


def _add(tree: Tree, span: dict[str, Any], total: float) -> None:
    branch = tree.add(_span_label(span, total))
    for child in span.get("children", []):
        _add(branch, child, total)


def render_trace(trace: dict[str, Any]) -> Tree:
    """One trace as a rich tree: header line, then the span tree with time bars."""
    head = Text()
    head.append(_shown(f"{trace['method']} {trace['path']}"), style="bold")
    status = trace.get("status")
    head.append(f"  → {'no answer' if status is None else status}  "
                f"{trace.get('duration_ms', 0):.1f}ms")
    if trace.get("cause"):
        head.append(f"  cause={_shown(trace['cause'])}", style="bold red")
    head.append(f"  id={_shown(trace['request_id'])}", style="dim")
    if trace.get("trace_id"):
        head.append(f"  trace={_shown(trace['trace_id'])}", style="dim")
    tree = Tree(head)
    spans = trace.get("spans")
    if spans:
        _add(tree, spans, float(trace.get("duration_ms") or spans.get("end_ms") or 1.0))
    return tree


def render_traces_text(traces: list[dict[str, Any]], width: int = 140) -> str:
    """Plain-text rendering (no colour), for logs and tests."""
    buffer = io.StringIO()
    console = Console(width=width, color_system=None, force_terminal=False, file=buffer)
    for trace in traces:
        console.print(render_trace(trace))
    return buffer.getvalue()


#: Request ids ``--follow`` remembers as printed (the newest; older ones are forgotten).
SEEN_LIMIT = 10_000


class NoTraces(Exception):
    """The admin address answered something that is no list of traces."""


def follow_traces(admin: str, *, cause: str | None, route: str | None, status: int | None,
                  limit: int, follow: bool, poll_interval_s: float = 1.0,
                  token: str | None = None, trace_id: str | None = None,
                  min_ms: int | None = None) -> None:
    """Fetch traces from a worker's admin endpoint and print them (polling with --follow)."""
    trio.run(_follow, admin, cause, route, status, limit, follow, poll_interval_s, token,
             trace_id, min_ms)


async def _follow(admin: str, cause: str | None, route: str | None, status: int | None,
                  limit: int, follow: bool, poll_interval_s: float,
                  token: str | None = None, trace_id: str | None = None,
                  min_ms: int | None = None) -> None:
    console = Console()
    params: dict[str, Any] = {"limit": limit}
    # Filtered by the admin endpoint: --limit counts the traces that match.
    for key, value in (("cause", cause), ("route", route), ("status", status),
                       ("trace_id", trace_id), ("min_ms", min_ms)):
        if value is not None:
            params[key] = value
    headers = {"authorization": f"Bearer {token}"} if token else {}
    # Insertion-ordered: the oldest are dropped first. Keyed by the trace itself, not its
    # request id alone: ids come from clients and repeat (a retry keeping its id).
    seen: dict[tuple[str, object, object], None] = {}
    warned: list[int] = []
    async with httpx.AsyncClient(base_url=admin, timeout=5.0, headers=headers) as client:
        while True:
            response = await client.get("/traces", params=params)
            response.raise_for_status()
            try:
                body = response.json()
                traces = body["traces"]
                unreachable = body.get("unreachable_workers") or []
            except (ValueError, KeyError, TypeError, AttributeError):
                raise NoTraces(admin) from None  # another service at that address
            if unreachable and unreachable != warned:  # once per change, not every poll
                Console(stderr=True).print(f"warning: workers {unreachable} did not "
                                           "answer; their traces are missing")
            warned = unreachable
            fresh = [t for t in reversed(traces) if _identity(t) not in seen]
            for trace in fresh:
                seen[_identity(trace)] = None
                console.print(render_trace(trace))
            while len(seen) > SEEN_LIMIT:
                del seen[next(iter(seen))]
            if not follow:
                return
            await trio.sleep(poll_interval_s)


def _identity(trace: dict[str, Any]) -> tuple[str, object, object]:
    """One request's trace: its id, the worker that served it and when it started."""
    return trace["request_id"], trace.get("worker_pid"), trace.get("started_at")
