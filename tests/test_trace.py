"""Cause attribution read from Trio's record, under virtual time."""

import pytest
import trio

from gateway._errors import UpstreamTimeout
from gateway._trace import Trace, TraceBuffer, traced_scope
from gateway._trace_context import TraceContext, is_trace_id, parse_traceparent


def spans(trace: Trace) -> dict[str, object]:
    assert trace.root is not None
    return {s.label: s for s in trace.root.walk()}


async def test_call_deadline_is_told_from_request_deadline(autojump_clock):
    trace = Trace("r1", "GET", "/x", "/x")
    now = trio.current_time()
    with pytest.raises(UpstreamTimeout) as info:
        with traced_scope(trace, None, "request", "/x", deadline=now + 1.0) as request:
            with traced_scope(trace, request, "call", "orders", deadline=now + 0.3) as call:
                with traced_scope(trace, call, "attempt", "orders#1"):
                    await trio.sleep(5)
    assert info.value.detail["scope"] == "call orders"
    found = spans(trace)
    attempt = found["attempt orders#1"]
    assert (attempt.outcome, attempt.cause, attempt.fired_scope) == \
        ("cancelled", "deadline", "call orders")
    assert found["call orders"].cause == "deadline"
    assert found["call orders"].budget_ms == pytest.approx(300)
    assert trio.current_time() - now == pytest.approx(0.3)


async def test_request_deadline_names_the_request_scope(autojump_clock):
    trace = Trace("r2", "GET", "/x", "/x")
    now = trio.current_time()
    with pytest.raises(UpstreamTimeout):
        with traced_scope(trace, None, "request", "/x", deadline=now + 0.2) as request:
            with traced_scope(trace, request, "call", "users", deadline=now + 0.2):
                await trio.sleep(5)
    call = spans(trace)["call users"]
    assert (call.cause, call.fired_scope) == ("deadline", "request")


async def test_explicit_cancel_carries_its_cause(autojump_clock):
    trace = Trace("r3", "GET", "/x", "/x")
    with traced_scope(trace, None, "request", "/x") as request:
        async with trio.open_nursery() as nursery:

            async def work() -> None:
                with traced_scope(trace, request, "call", "users"):
                    await trio.sleep(5)

            nursery.start_soon(work)
            await trio.sleep(0.2)
            request.cancel("client_disconnect")
    assert request.cancel_cause == "client_disconnect"
    found = spans(trace)
    assert (found["call users"].cause, found["call users"].fired_scope) == \
        ("client_disconnect", "request")
    assert found["request"].outcome == "cancelled"


async def test_deadline_outside_every_span_is_shutdown(autojump_clock):
    trace = Trace("r4", "GET", "/x", "/x")
    with trio.move_on_after(0.5):  # Hypercorn's graceful deadline on its server nursery
        with traced_scope(trace, None, "request", "/x"):
            await trio.sleep(5)
    assert (trace.root.cause, trace.root.fired_scope) == ("shutdown", "server")


async def test_buffer_is_bounded_and_filterable():
    buffer = TraceBuffer(3)
    for i in range(5):
        trace = Trace(f"r{i}", "GET", "/x", "/a" if i % 2 else "/b")
        trace.status = 200 + i
        buffer.add(trace)
    assert len(buffer) == 3
    assert buffer.get("r0") is None and buffer.get("r4") is not None
    assert [t.request_id for t in buffer.query(route="/b")] == ["r4", "r2"]
    assert [t.request_id for t in buffer.query(status=203)] == ["r3"]


async def test_turning_tracing_off_forgets_the_traces_kept():
    buffer = TraceBuffer(3)
    buffer.add(Trace("r0", "GET", "/x", "/a"))
    buffer.resize(0)  # a reload to tracing: false (or trace_buffer: 0)
    buffer.add(Trace("r1", "GET", "/x", "/a"))
    assert len(buffer) == 0 and buffer.get("r0") is None
    buffer.resize(2)
    for i in range(2, 5):
        buffer.add(Trace(f"r{i}", "GET", "/x", "/a"))
    assert [t.request_id for t in buffer.query()] == ["r4", "r3"]


async def test_a_kept_trace_without_spans_keeps_its_duration(autojump_clock):
    # A request refused before any span (shed at the door, no route) has no root span
    # whose end fixes its duration: read later, it went on growing.
    traces = TraceBuffer(10)
    trace = Trace("r-1", "GET", "/nowhere", None)
    trace.status = 404
    await trio.sleep(0.002)
    traces.add(trace)
    await trio.sleep(60)
    assert traces.query(min_ms=1000) == []
    assert trace.to_json()["duration_ms"] == pytest.approx(2.0)


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


@pytest.mark.parametrize(("value", "parsed"), [
    (f"00-{TRACE_ID}-{SPAN_ID}-01", (TRACE_ID, SPAN_ID, "01")),
    (f"00-{TRACE_ID}-{SPAN_ID}-00", (TRACE_ID, SPAN_ID, "00")),
    # A later version is read as version 00 where it can be (W3C), fields after it too.
    (f"01-{TRACE_ID}-{SPAN_ID}-01", (TRACE_ID, SPAN_ID, "01")),
    (f"cc-{TRACE_ID}-{SPAN_ID}-01-what-comes-later", (TRACE_ID, SPAN_ID, "01")),
    (f"ff-{TRACE_ID}-{SPAN_ID}-01", None),
    (f"00-{TRACE_ID}-{SPAN_ID}-01-", None),
    (f"cc-{TRACE_ID}-{SPAN_ID}-01x", None),
    (f"00-{TRACE_ID.upper()}-{SPAN_ID}-01", None),
    (f"0A-{TRACE_ID}-{SPAN_ID}-01", None),
    (f"00-{TRACE_ID}-{SPAN_ID}-0F", None),
    (f"00-{'0' * 32}-{SPAN_ID}-01", None),
    (f"00-{TRACE_ID}-{'0' * 16}-01", None),
    (f"00-{TRACE_ID}-{SPAN_ID}-1", None),
    (f"00-{TRACE_ID[:-1]}-{SPAN_ID}0-01", None),
    (f"00-{TRACE_ID}--{SPAN_ID[1:]}-01", None),
    (f" 00-{TRACE_ID}-{SPAN_ID}-01"[:55], None),
    ("", None),
])
def test_traceparent_is_read_by_the_w3c_rules(value: str, parsed: object) -> None:
    assert parse_traceparent(value.encode()) == parsed
    assert is_trace_id(TRACE_ID) and not is_trace_id(TRACE_ID.upper())
    assert not is_trace_id("0" * 32) and not is_trace_id(TRACE_ID[:-1])


async def test_each_attempt_has_a_span_id_of_its_own() -> None:
    context = TraceContext.from_headers([(b"traceparent", f"00-{TRACE_ID}-{SPAN_ID}-01".encode()),
                                         (b"tracestate", b"a=1"), (b"tracestate", b"b=2")])
    assert (context.trace_id, context.parent_id, context.flags) == (TRACE_ID, SPAN_ID, "01")
    trace = Trace("r", "GET", "/x", "/x")
    with traced_scope(trace, None, "request", "/x") as request:
        with traced_scope(trace, request, "attempt", "u#1") as first:
            sent = context.headers(first)
            assert context.headers(first) == sent  # its connection opened again
        with traced_scope(trace, request, "attempt", "u#2") as second:
            again = context.headers(second)
    parent = sent[0][1].decode()
    assert parent.startswith(f"00-{TRACE_ID}-") and parent.endswith("-01")
    assert parent.split("-")[2] == first.span.attrs["span_id"] != SPAN_ID
    assert again[0][1].decode().split("-")[2] == second.span.attrs["span_id"] != parent
    assert sent[1:] == again[1:] == [(b"tracestate", b"a=1"), (b"tracestate", b"b=2")]
