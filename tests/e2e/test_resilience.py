"""Retries, budgets, hedges and the circuit breaker against real flaky upstreams."""

import random

import httpx
import pytest
import trio

from gateway._errors import UpstreamConnectError
from gateway.upstreams._http import HttpUpstreamPool
from tests.gateway_harness import fire, run_gateway, trace_of
from tests.process_harness import free_port
from tests.upstream import start_upstream

POLICY = """
version: 1
upstreams:
  flaky:
    url: "{url}"
    limit: {{concurrency: 200, queue: 400, queue_timeout: 1s}}
    call:
      retries: {{attempts: 5, on: [connect, reset, 503], backoff: 1ms..5ms, budget: 50%,
                 min_per_second: 1}}
  broken:
    url: "{url}"
    limit: {{concurrency: 200, queue: 400, queue_timeout: 1s}}
    call:
      retries: {{attempts: 3, on: [503], backoff: 1ms..5ms, budget: 20%, min_per_second: 1}}
    circuit: {{failure_ratio: 50%, window: 10s, min_requests: 20, open_for: 300ms,
              half_open_probes: 2}}
  tail:
    url: "{url}"
    call:
      hedge_after: 100ms
      max_hedges: 1
      retries: {{attempts: 1, budget: 100%, min_per_second: 100}}
routes:
  - path: /flaky
    deadline: 2s
    proxy: {{upstream: flaky, path: "/flaky?fail_ratio=0.3&seed=7"}}
  - path: /broken/{{rest*}}
    deadline: 2s
    proxy: {{upstream: broken, path: "/{{rest}}"}}
  - path: /tail/{{n}}
    deadline: 2s
    proxy: {{upstream: tail, path: "/tail"}}
  - path: /plain-tail/{{n}}
    deadline: 2s
    proxy: {{upstream: flaky, path: "/tail"}}
  - path: /mid-body
    deadline: 2s
    proxy: {{upstream: flaky, path: "/reset-mid-body"}}
  - path: /tail-stream
    deadline: 5s
    proxy: {{upstream: tail, path: "/stream"}}
"""


async def test_retries_hide_a_30_percent_failure_rate_within_the_budget():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            requests = 400
            statuses = await fire(client, "/flaky", requests, 20)
            success = statuses.count(200) / requests
            attempts = upstream.attempts("/flaky")
            assert success >= 0.99, statuses
            # Extra load on the upstream stays within the 50% budget (+ the 1/s floor).
            assert attempts <= requests * 1.5 + 10
            assert attempts > requests  # retries really happened
        nursery.cancel_scope.cancel()


async def test_a_dead_upstream_opens_the_breaker_within_budget_then_recovers():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            requests = 60
            statuses = await fire(client, "/broken/status/503", requests, 1)
            attempts = upstream.attempts("/status/503")
            # Retries stayed within 20% of first attempts plus the floor (1/s for 10 s).
            assert attempts <= requests * 1.2 + 10
            # Once open, the breaker answers at once with 503 + Retry-After.
            refused = await client.get("/broken/status/503")
            assert refused.status_code == 503
            assert refused.json()["cause"] == "circuit_open"
            assert int(refused.headers["retry-after"]) >= 1
            assert statuses.count(503) == requests, statuses
            trace = await trace_of(gw, refused.json()["request_id"])
            attempt = next(s for s in trace.root.walk() if s.kind == "attempt")
            assert attempt.cause == "circuit_open"
            before = upstream.attempts("/status/503")
            assert upstream.attempts("/status/503") == before
            # After open_for, half-open probes succeed against a healthy path: closed.
            await trio.sleep(0.35)
            assert (await client.get("/broken/users/1")).status_code == 200
            assert (await client.get("/broken/users/2")).status_code == 200
            breaker = gw.gateway.runtime.snapshot.upstreams["broken"].breaker
            with trio.fail_after(1):  # the last probe is counted just after its response
                while breaker.state.value != "closed":
                    await trio.sleep(0.01)
            assert (await client.get("/broken/users/3")).status_code == 200
        nursery.cancel_scope.cancel()


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(len(ordered) * 0.99) - 1]


async def test_hedging_cuts_the_tail_and_cancels_every_loser():
    rng = random.Random(11)

    async def slow_tail(request, respond) -> None:
        """5 % of answers take 400 ms, the rest 5 ms: p99 far above p50."""
        await trio.sleep(0.4 if rng.random() < 0.05 else 0.005)
        await respond.json({"ok": True})

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=slow_tail)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            plain: list[float] = []
            hedged: list[float] = []
            await fire(client, "/plain-tail/{i}", 200, 5, plain)
            upstream.reset_records()
            statuses = await fire(client, "/tail/{i}", 200, 5, hedged)
            assert statuses.count(200) == 200
            assert p99(plain) > 0.3
            assert p99(hedged) < p99(plain) / 2, (p99(hedged), p99(plain))
            hedges = upstream.attempts("/tail") - 200
            assert hedges > 0
            def losers() -> list:
                traces = gw.gateway.runtime.traces.query(route="/tail/{n}", limit=200)
                return [s for t in traces for s in t.root.walk() if s.cause == "hedge_lost"]

            with trio.fail_after(2):  # the last traces are filed just after their responses
                while len(losers()) < hedges:
                    await trio.sleep(0.01)
            assert len(losers()) == hedges
            # Every loser still waiting for its answer was seen cancelled upstream (its
            # connection closed); a loser whose answer had already arrived just lost.
            still_waiting = [s for s in losers() if "status" not in s.attrs]
            assert still_waiting
            with trio.fail_after(2):
                await upstream.wait_cancelled(len(still_waiting))
        nursery.cancel_scope.cancel()


async def test_an_answer_cut_mid_body_is_not_retried_and_ends_at_once():
    """Retries are on for resets, but once the status line went to the client nothing
    can replace the answer: the client sees it cut off, the upstream one request."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get("/mid-body")
            with trio.fail_after(2):  # the trace is filed just after the connection drops
                while not (traces := gw.gateway.runtime.traces.query(route="/mid-body")):
                    await trio.sleep(0.01)
            spans = list(traces[0].root.walk())
            attempts = [s for s in spans if s.kind == "attempt"]
            assert [a.outcome for a in attempts] == ["error"]
            assert not any(s.cause == "deadline" for s in spans)  # not held to the deadline
            assert upstream.attempts("/reset-mid-body") == 1
        nursery.cancel_scope.cancel()


async def test_no_hedge_is_sent_while_the_first_answer_streams():
    """hedge_after counts until an answer's head arrives, not until its body ends."""
    async def slow_body(request, respond) -> None:
        await respond.start(200, [(b"content-type", b"text/plain")], content_length=20)
        await respond.send(b"0123456789")
        await trio.sleep(0.6)  # the body outlasts hedge_after (100 ms) six times
        await respond.send(b"abcdefghij")
        await respond.end()

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=slow_body)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/tail-stream")
            assert response.status_code == 200
            assert response.content == b"0123456789abcdefghij"
            assert upstream.attempts("/stream") == 1
        nursery.cancel_scope.cancel()


UNRETRIED = """
version: 1
upstreams:
  plain:
    url: "{url}"
  nobudget:
    url: "{url}"
    call:
      retries: {{attempts: 3, on: [503], backoff: 1ms..1ms, budget: 0%, min_per_second: 0}}
  notime:
    url: "{url}"
    call:
      retries: {{attempts: 3, on: [503], backoff: 1ms..1ms, per_try_timeout: 1s}}
routes:
  - path: /plain
    proxy: {{upstream: plain, path: "/status/503?retry_after=7"}}
  - path: /nobudget
    proxy: {{upstream: nobudget, path: "/status/503?retry_after=7"}}
  - path: /notime
    deadline: 500ms
    proxy: {{upstream: notime, path: "/status/503?retry_after=7"}}
"""


async def test_a_503_not_retried_after_all_is_passed_on_with_its_retry_after():
    # A status in retries.on is discarded only for a retry that will be sent: when the
    # budget refuses it, the client gets the upstream's own 503, Retry-After included,
    # as it would with no retry policy (the gateway's JSON 503 carried none).
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(UNRETRIED.format(url=upstream.url)) as gw, gw.client() as client:
            plain = await client.get("/plain")
            assert plain.status_code == 503
            assert plain.headers.get("retry-after") == "7"
            refused = await client.get("/nobudget")
            assert upstream.attempts("/status/503") == 2  # the retry was not sent
            trace = await trace_of(gw, refused.headers["x-request-id"])
            assert any(s.cause == "retry_budget" for s in trace.root.walk())
            assert refused.status_code == 503
            assert refused.headers.get("retry-after") == "7", (refused.headers, refused.text)
        nursery.cancel_scope.cancel()


async def test_a_503_with_no_time_left_for_a_retry_is_passed_on_with_its_retry_after():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(UNRETRIED.format(url=upstream.url)) as gw, gw.client() as client:
            r = await client.get("/notime")  # 500 ms left < 1 s per-try: never retried
            assert upstream.attempts("/status/503") == 1
            assert r.status_code == 503
            assert r.headers.get("retry-after") == "7", (r.headers, r.text)
        nursery.cancel_scope.cancel()


QUEUED = """
version: 1
upstreams:
  u:
    url: "{url}"
    limit: {{concurrency: 1, queue: 10, queue_timeout: 5s}}
routes:
  - path: /hold
    deadline: 3s
    proxy: {{upstream: u, path: /stall}}
  - path: /quick
    deadline: 200ms
    proxy: {{upstream: u, path: /ok}}
"""


async def test_a_queued_call_that_cannot_get_a_slot_within_its_deadline_is_shed():
    # Queue wait counts against the deadline: 503 + Retry-After once the deadline leaves
    # no time to wait, not a 504 at the deadline (queue_timeout is 5 s here).
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(QUEUED.format(url=upstream.url)) as gw, gw.client() as client:
            async def hold():
                async with gw.client() as other:
                    await other.get("/hold")
            async with trio.open_nursery() as holder:
                holder.start_soon(hold)
                await upstream.wait_requests(1)  # the only slot is taken
                started = trio.current_time()
                r = await client.get("/quick")
                waited = trio.current_time() - started
                holder.cancel_scope.cancel()
            assert r.status_code == 503, (r.status_code, r.text, round(waited, 3))
            assert r.json()["cause"] == "shed"
            assert "retry-after" in r.headers
        nursery.cancel_scope.cancel()


BUDGET_POLICY = """
version: 1
upstreams:
  u:
    url: "{url}"
    call:
      retries: {{attempts: 3, on: [503], backoff: 1ms..2ms, budget: 10%, min_per_second: 0}}
    circuit: {{consecutive_failures: 2, min_requests: 1000, open_for: 300ms,
              half_open_probes: 1}}
routes:
  - path: /api/{{rest*}}
    deadline: 2s
    proxy: {{upstream: u, path: "/{{rest}}"}}
"""


async def test_calls_refused_by_an_open_circuit_earn_no_retry_budget():
    """Retries may add ``budget`` (10%) on top of the first tries *sent* upstream.

    What a user sees: while the circuit is open, every refused call (nothing sent) is
    still counted as a first try and earns 10% of a retry. After an outage the budget
    is inflated exactly when the upstream is recovering: here 60 refused calls buy 6
    retries for 4 first tries really sent, so a relapsing upstream is retried
    although the budget allows no retry yet.
    """
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(BUDGET_POLICY.format(url=upstream.url)) as gw, \
                gw.client() as client:
            # Two failures open the circuit (no retry: 10% of two tries is no retry).
            for _ in range(2):
                assert (await client.get("/api/status/503")).status_code == 503
            assert upstream.attempts("/status/503") == 2
            for _ in range(60):  # refused at once, nothing sent
                refused = await client.get("/api/status/503")
                assert refused.json()["cause"] == "circuit_open"
            assert upstream.attempts("/status/503") == 2
            await trio.sleep(0.35)  # half-open: one probe closes it again
            assert (await client.get("/api/users/1")).status_code == 200
            breaker = gw.gateway.runtime.snapshot.upstreams["u"].breaker
            assert breaker is not None and breaker.state.value == "closed"
            # The upstream relapses; one more call. First tries sent so far: 4, whose
            # 10% is 0.4 of a retry: no retry may be sent.
            upstream.reset_records()
            await client.get("/api/status/503")
            assert upstream.attempts("/status/503") == 1, upstream.requests
        nursery.cancel_scope.cancel()


BREAKER_POLICY = """
version: 1
upstreams:
  u:
    url: "{url}"
    call:
      retries: {{attempts: 2, on: [503], backoff: 1ms..2ms}}
    circuit: {{consecutive_failures: 1, open_for: 5s}}
routes:
  - path: /api/{{rest*}}
    deadline: 2s
    proxy: {{upstream: u, path: "/{{rest}}"}}
"""


async def test_an_answer_that_opens_the_circuit_is_passed_on_not_replaced_by_circuit_open():
    """A retryable 503 is discarded "only when a retry can follow"; here the retry cannot
    follow, because this very 503 opens the circuit.

    What a user sees: the upstream answered 503 with ``Retry-After: 120`` (and its own
    body), yet the client gets the gateway's ``circuit_open`` 503 with ``Retry-After:
    5``, for a request that did reach the upstream; the retry budget is charged for a
    retry that is never sent.
    """
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(BREAKER_POLICY.format(url=upstream.url)) as gw, \
                gw.client() as client:
            response = await client.get("/api/status/503?retry_after=120")
            assert upstream.attempts("/status/503") == 1
            assert response.status_code == 503
            assert response.headers.get("retry-after") == "120", (
                response.headers.get("retry-after"), response.text)
            assert response.json() == {"status": 503}
        nursery.cancel_scope.cancel()


NARROW_POOL = """
version: 1
upstreams:
  narrow:
    url: "{url}"
    pool: {{max_connections: 2}}
    limit: {{concurrency: 8, queue: 10, queue_timeout: 2s}}
    call:
      hedge_after: 100ms
      max_hedges: 2
      retries: {{attempts: 1, budget: 100%, min_per_second: 100}}
routes:
  - path: /narrow/{{n}}
    deadline: 3s
    proxy: {{upstream: narrow, path: "/work"}}
"""


async def test_a_hedge_never_waits_in_the_upstream_pool_for_a_connection():
    """A hedge is sent on a connection of its own at hedge_after, or not at all: the
    concurrency limit is never above the pool's connections (``concurrency: 8`` over
    ``max_connections: 2`` gives 2 slots), and a hedge takes a slot without waiting. A
    hedge parked in the pool's queue would answer no sooner than the try it hedges,
    while holding a slot and the retry budget."""
    async def slow(request, respond) -> None:
        await trio.sleep(0.5)
        await respond.json({"ok": True})

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=slow)
        async with run_gateway(NARROW_POOL.format(url=upstream.url)) as gw, \
                gw.client() as client:
            state = gw.gateway.runtime.snapshot.upstreams["narrow"]
            assert state.limiter.statistics().concurrency == 2
            pool = state.pool
            most_waiting = 0

            async def watch_pool() -> None:
                nonlocal most_waiting
                while True:
                    most_waiting = max(most_waiting, pool.statistics().waiting)
                    await trio.sleep(0.002)

            async with trio.open_nursery() as watcher:
                watcher.start_soon(watch_pool)
                # One request: its first hedge takes the second connection at once; the
                # second hedge finds no slot (both connections carry this call's tries).
                response = await client.get("/narrow/1")
                assert response.status_code == 200
                assert len(upstream.requests) == 2, upstream.requests
                first, hedge = upstream.requests
                assert hedge.started_at - first.started_at == pytest.approx(0.1, abs=0.05)
                trace = await trace_of(gw, response.headers["x-request-id"])
                spans = {s.label: s for s in trace.root.walk()}
                assert spans["call narrow"].attrs["hedge_not_sent"] == \
                    "the upstream's concurrency limit is reached"
                assert [s.name for s in spans.values() if s.kind == "attempt"] == \
                    ["narrow#1", "narrow#2"]

                # Two requests at once hold both connections: neither hedges.
                upstream.reset_records()
                answers: list[httpx.Response] = []

                async def get(path: str) -> None:
                    answers.append(await client.get(path))

                async with trio.open_nursery() as both:
                    both.start_soon(get, "/narrow/2")
                    both.start_soon(get, "/narrow/3")
                assert [r.status_code for r in answers] == [200, 200]
                assert len(upstream.requests) == 2
                for answer in answers:
                    trace = await trace_of(gw, answer.headers["x-request-id"])
                    call = next(s for s in trace.root.walk() if s.kind == "call")
                    assert call.attrs["hedge_not_sent"] == \
                        "the upstream's concurrency limit is reached"
                watcher.cancel_scope.cancel()
            assert most_waiting == 0
            assert state.limiter.statistics().in_flight == 0
        nursery.cancel_scope.cancel()


PER_TRY = """
version: 1
upstreams:
  u:
    url: "{url}"
    call:
      retries: {{attempts: 2, on: [timeout], backoff: 1ms..1ms, per_try_timeout: 200ms}}
routes:
  - path: /download
    deadline: 3s
    proxy: {{upstream: u, path: /slow-body}}
  - path: /late
    deadline: 3s
    proxy: {{upstream: u, path: /slow-head}}
"""


async def test_per_try_timeout_bounds_the_time_to_the_answer_not_its_download():
    """per_try_timeout is meant for an upstream slow to answer (as Envoy's): a body that
    streams longer than it, after a prompt head, is relayed whole within the route's
    deadline, not cut mid-download into a broken response."""
    async def behaviour(request, respond) -> None:
        if request.path == "/slow-head":
            await trio.sleep(1.0)
            await respond.json({"late": True})
            return
        await respond.start(200, [(b"content-type", b"text/plain")], content_length=30)
        for piece in (b"0123456789", b"abcdefghij", b"ABCDEFGHIJ"):
            await respond.send(piece)
            await trio.sleep(0.25)  # 750 ms of body, per-try 200 ms
        await respond.end()

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=behaviour)
        async with run_gateway(PER_TRY.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/download")
            assert response.status_code == 200
            assert response.content == b"0123456789abcdefghijABCDEFGHIJ"
            assert upstream.attempts("/slow-body") == 1
            trace = await trace_of(gw, response.headers["x-request-id"])
            assert [s.outcome for s in trace.root.walk() if s.kind == "attempt"] == ["ok"]

            # A head later than per_try_timeout is still a timed-out try, retried.
            late = await client.get("/late")
            assert late.status_code == 504
            assert late.json()["cause"] == "deadline"
            assert upstream.attempts("/slow-head") == 2
        nursery.cancel_scope.cancel()


UPLOAD = """
version: 1
defaults:
  call:
    retries: {{attempts: 3, per_try_timeout: 300ms}}
upstreams:
  files: {{url: "{url}"}}
routes:
  - path: /upload
    methods: [PUT]
    deadline: 10s
    proxy: {{upstream: files, path: /ok}}
  - path: /upload-late
    methods: [PUT]
    deadline: 10s
    proxy: {{upstream: files, path: /late}}
"""


async def test_per_try_timeout_starts_once_a_streamed_upload_is_sent_whole():
    """As Envoy's, the per-try timer starts once the request is complete: a 2 MiB PUT
    (too large to replay, so one try) that its client sends over about 1 s is not cut
    by a 300 ms per_try_timeout meant for quick calls; an upstream slow to answer once
    it has the body whole is still bounded by it."""
    chunk, chunks = 64 * 1024, 32  # past the 1 MiB a body is buffered to be replayed

    async def body():
        for _ in range(chunks):
            yield b"x" * chunk
            await trio.sleep(0.03)

    async def behaviour(request, respond) -> None:
        if request.path == "/late":
            await trio.sleep(1.0)  # the body read whole, then slow to answer
        await respond.json({"size": request.body_size})

    headers = {"content-length": str(chunk * chunks)}
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=behaviour)
        async with run_gateway(UPLOAD.format(url=upstream.url)) as gw, gw.client() as client:
            with trio.fail_after(15):
                response = await client.put("/upload", content=body(), headers=headers)
                assert response.status_code == 200, response.text
                assert response.json() == {"size": chunk * chunks}

                started = trio.current_time()
                late = await client.put("/upload-late", content=body(), headers=headers)
                took = trio.current_time() - started
            assert late.status_code == 504, late.text
            assert (late.json()["cause"], late.json()["scope"]) == ("deadline", "try")
            assert 1.0 <= took < 1.9  # the upload's ~1 s, then the try's 300 ms
        nursery.cancel_scope.cancel()


CONNECT_RETRY = """
version: 1
upstreams:
  late:
    url: "http://127.0.0.1:{port}"
    call: {{retries: {{attempts: 2, on: [connect], backoff: 1ms..5ms}}}}
routes:
  - path: /upload
    methods: [POST]
    deadline: 5s
    proxy: {{upstream: late, path: /ok}}
"""


async def test_a_streamed_upload_is_tried_again_after_a_connect_failure(monkeypatch):
    """A connect failure means nothing of the request left the gateway and none of its
    body was read from the client: a chunked upload (never buffered, so never replayed)
    goes whole to the next try, as Envoy retries a connect failure. It was a 502."""
    port = free_port()
    opened = HttpUpstreamPool._open
    chunks = [b"%06d" % n * 1000 for n in range(100)]  # 600 KB in 6 KB chunks
    async with trio.open_nursery() as nursery:
        listening = []

        async def refused_then_listening(pool: HttpUpstreamPool):
            try:
                return await opened(pool)
            except UpstreamConnectError:
                if not listening:  # the first connect was refused: the upstream comes up
                    listening.append(await start_upstream(nursery, port=port))
                raise

        monkeypatch.setattr(HttpUpstreamPool, "_open", refused_then_listening)

        async def body():
            for chunk in chunks:
                yield chunk

        async with run_gateway(CONNECT_RETRY.format(port=port)) as gw, gw.client() as client:
            with trio.fail_after(10):
                response = await client.post("/upload", content=body())
            assert response.status_code == 200, response.text
            (upstream,) = listening
            (seen,) = upstream.requests
            assert seen.header("transfer-encoding") == "chunked"
            assert seen.body == b"".join(chunks)
            trace = await trace_of(gw, response.headers["x-request-id"])
            attempts = [s for s in trace.root.walk() if s.kind == "attempt"]
            assert [a.outcome for a in attempts] == ["error", "ok"]
            assert "cannot connect" in (attempts[0].error or "")
        nursery.cancel_scope.cancel()


REFUSALS = """
version: 1
upstreams:
  one:
    url: "{url}"
    limit: {{concurrency: 1, queue: 0, queue_timeout: 1s}}
  tries:
    url: "{url}"
    call: {{retries: {{attempts: 1, per_try_timeout: 100ms}}}}
  calls:
    url: "{url}"
    call: {{timeout: 100ms}}
routes:
  - path: /hold
    deadline: 3s
    proxy: {{upstream: one, path: /stall}}
  - path: /shed
    deadline: 3s
    proxy: {{upstream: one, path: /ok}}
  - path: /try
    deadline: 3s
    proxy: {{upstream: tries, path: /stall}}
  - path: /call
    deadline: 3s
    proxy: {{upstream: calls, path: /stall}}
  - path: /request
    deadline: 100ms
    proxy: {{upstream: one, path: /stall}}
"""


async def test_refusal_bodies_give_the_cause_and_a_reason_not_the_gateways_span_names():
    """A 503 shed or a 504 tells the client what happened (cause, a short reason, and
    for a deadline whether the request's, a call's or a try's fired); the names of the
    gateway's cancel scopes and spans are for its trace, which keeps them."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(REFUSALS.format(url=upstream.url)) as gw, gw.client() as client:
            async def hold() -> None:
                async with gw.client() as other:
                    await other.get("/hold")

            async with trio.open_nursery() as holder:
                holder.start_soon(hold)
                await upstream.wait_requests(1)  # the only slot is taken
                shed = await client.get("/shed")
                holder.cancel_scope.cancel()
            tried = await client.get("/try")
            called = await client.get("/call")
            late = await client.get("/request")
            assert [r.status_code for r in (shed, tried, called, late)] == [503, 504, 504, 504]

            bodies = {r.json()["request_id"]: r.json() for r in (shed, tried, called, late)}
            for body in bodies.values():
                assert set(body) <= {"error", "cause", "request_id", "upstream", "scope"}, body
                for internal in ("attempt", "call ", "#1", "span", "stage"):
                    assert internal not in body["error"] and \
                        internal not in body.get("scope", ""), body
            assert shed.json()["cause"] == "shed" and "scope" not in shed.json()
            assert "queue full" in shed.json()["error"]
            assert [(r.json()["cause"], r.json()["scope"]) for r in (tried, called, late)] == \
                [("deadline", "try"), ("deadline", "call"), ("deadline", "request")]

            # The trace still names the scope that fired.
            fired = {}
            for request_id in bodies:
                trace = await trace_of(gw, request_id)
                fired[request_id] = {s.fired_scope for s in trace.root.walk() if s.cause}
            assert fired[tried.json()["request_id"]] == {"attempt tries#1"}
            assert fired[called.json()["request_id"]] == {"call calls"}
            assert fired[shed.json()["request_id"]] == {"call one"}
            assert fired[late.json()["request_id"]] == {"request"}
        nursery.cancel_scope.cancel()
