"""HTTP/2 (cleartext, prior knowledge): a client that resets its stream cancels the
upstream work just as a closed HTTP/1.1 connection does, and the connection's other
streams go on."""

import contextlib
import functools
import itertools

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hypercorn.config
import hypercorn.protocol.h2
import priority
import pytest
import trio
from hyperframe.frame import DataFrame, PriorityFrame

from tests.gateway_harness import RunningGateway, run_gateway, traces_with
from tests.h2client import H2Client
from tests.metrics import metric_total
from tests.upstream import Responder, SeenRequest, Upstream, proxy_policy, start_upstream


async def test_http2_stream_reset_cancels_the_upstream():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            assert await client.response_status(await client.get("/api/users/5")) == 200

            stalled = await client.get("/api/stall")
            await upstream.wait_for(lambda: upstream.in_flight >= 1)
            reset_at = trio.current_time()
            await client.reset(stalled)
            await upstream.wait_cancelled()
            assert upstream.cancelled[0].at - reset_at < 0.1
            trace = (await traces_with(gw, route="/api/{rest*}", status=499))[0]
            assert trace.cause == "client_disconnect"
            # The connection and its other streams keep working.
            assert await client.response_status(await client.get("/api/users/6")) == 200
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_data_on_an_answered_stream_is_dropped_and_the_connection_serves_on():
    """A client may go on sending a body the gateway already refused (413 on its
    Content-Length); those DATA frames must not end the worker."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = proxy_policy(upstream.url).replace("    deadline: 10s\n",
                                                    "    deadline: 10s\n    max_body: 1KiB\n")
        async with run_gateway(policy) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            refused = client.conn.get_next_available_stream_id()
            client.conn.send_headers(refused, [(":method", "POST"), (":path", "/api/ok"),
                                               (":scheme", "http"), (":authority", "gw"),
                                               ("content-length", "100000")])
            await client.flush()
            with trio.fail_after(5):
                assert await client.response_status(refused) == 413
            # Written as raw frames: DATA already in flight when the answer (and the
            # stream's reset) came, which the client's h2 would no longer send itself.
            for _ in range(2):
                await client.stream.send_all(DataFrame(refused, data=b"x" * 1000).serialize())
            with trio.fail_after(5):
                assert await client.response_status(await client.get("/api/ok")) == 200
        nursery.cancel_scope.cancel()


async def test_an_http2_body_without_content_length_reaches_the_upstream():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            stream_id = client.conn.get_next_available_stream_id()
            client.conn.send_headers(stream_id, [(":method", "POST"), (":path", "/api/ok"),
                                                 (":scheme", "http"), (":authority", "gw")])
            client.conn.send_data(stream_id, b"hello world", end_stream=True)
            await client.flush()
            with trio.fail_after(5):
                assert await client.response_status(stream_id) == 200
            assert upstream.requests[-1].body == b"hello world"
        nursery.cancel_scope.cancel()



async def test_any_method_s_http2_body_reaches_the_upstream_and_none_is_invented():
    """HTTP/2 announces a body by leaving the stream open after HEADERS, not by a header:
    a DELETE's or OPTIONS's body without Content-Length was dropped (only POST, PUT and
    PATCH were read for one), and the upstream got the request without it."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            for method, body in [("DELETE", b'{"ids": [1, 2]}'), ("OPTIONS", b"x"),
                                 ("POST", None)]:
                stream_id = client.conn.get_next_available_stream_id()
                client.conn.send_headers(
                    stream_id, [(":method", method), (":path", "/api/ok"),
                                (":scheme", "http"), (":authority", "gw")],
                    end_stream=body is None)
                if body is not None:
                    client.conn.send_data(stream_id, body, end_stream=True)
                await client.flush()
                with trio.fail_after(5):
                    assert await client.response_status(stream_id) == 200
                seen = upstream.requests[-1]
                assert (seen.method, seen.body) == (method, body or b""), seen
                if body is None:  # ended with its HEADERS: no body, and none is framed
                    assert seen.header_values("transfer-encoding") == [], seen.headers
        nursery.cancel_scope.cancel()


TWO_UPSTREAMS = """
version: 1
upstreams:
  one: {{url: "{url}", limit: {{concurrency: 1, queue: 10, queue_timeout: 20s}}}}
  other: {{url: "{url}"}}
routes:
  - path: /one/{{rest*}}
    deadline: 30s
    proxy: {{upstream: one, path: "/{{rest}}"}}
  - path: /other/{{rest*}}
    proxy: {{upstream: other, path: "/{{rest}}"}}
"""


async def _send_body(client: H2Client, stream_id: int, size: int, *, end: bool) -> int:
    """Send up to ``size`` bytes as flow control allows; return what was sent (stops
    when the window stays shut for 0.5 s)."""
    sent = 0
    while sent < size:
        window = min(client.conn.local_flow_control_window(stream_id), 16384, size - sent)
        if window > 0:
            client.conn.send_data(stream_id, b"x" * window)
            sent += window
            await client.flush()
            continue
        with trio.move_on_after(0.5) as waited:
            data = await client.stream.receive_some(65536)
            client.events.extend(client.conn.receive_data(data))
            await client.flush()
        if waited.cancelled_caught:
            return sent
    if end:
        client.conn.end_stream(stream_id)
        await client.flush()
    return sent


async def _upload_waiting_for_a_slot(client: H2Client, upstream: Upstream) -> tuple[int, int]:
    """A stalled GET that takes upstream one's only slot, then a POST whose body waits
    for it; their stream ids."""
    holder = await client.get("/one/stall")
    await upstream.wait_for(lambda: upstream.in_flight >= 1)
    upload = client.conn.get_next_available_stream_id()
    client.conn.send_headers(upload, [(":method", "POST"), (":path", "/one/ok"),
                                      (":scheme", "http"), (":authority", "gw")])
    await client.flush()
    return holder, upload


async def test_a_stream_whose_body_waits_does_not_stop_the_other_streams():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(TWO_UPSTREAMS.format(url=upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            holder, upload = await _upload_waiting_for_a_slot(client, upstream)
            # The upload waits for a slot: the client can send only a bounded amount
            # ahead (flow control), and then the window stays shut.
            ahead = await _send_body(client, upload, 4 * 1024 * 1024, end=False)
            assert ahead < 1024 * 1024
            # Another stream of the same connection is answered meanwhile.
            with trio.fail_after(5):
                assert await client.response_status(await client.get("/other/users/1")) == 200
            # Once the slot is free the upload goes on, and reaches the upstream whole.
            await client.reset(holder)
            with trio.fail_after(10):
                rest = await _send_body(client, upload, 2 * 1024 * 1024 - ahead, end=True)
                assert ahead + rest == 2 * 1024 * 1024
                assert await client.response_status(upload) == 200
                assert upstream.requests[-1].body_size == 2 * 1024 * 1024
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_resetting_a_stream_whose_body_waits_cancels_it_at_once():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(TWO_UPSTREAMS.format(url=upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            _, upload = await _upload_waiting_for_a_slot(client, upstream)
            await _send_body(client, upload, 4 * 1024 * 1024, end=False)
            await client.reset(upload)
            with trio.fail_after(2):  # not at the 20 s queue timeout
                (trace,) = await traces_with(gw, timeout_s=2, route="/one/{rest*}",
                                             status=499)
            assert trace.cause == "client_disconnect"
            assert await client.response_status(await client.get("/other/users/1")) == 200
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_closed_connection_releases_a_stream_whose_answer_waits_to_be_sent():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            # A window of 0: the answer waits in the gateway's buffer for the stream.
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "t"),
                                  (":path", "/api/users/1")], end_stream=True)
            await stream.send_all(conn.data_to_send())
            with trio.fail_after(5):
                answered = False
                while not answered:
                    for event in conn.receive_data(await stream.receive_some(65536)):
                        answered |= isinstance(event, h2.events.ResponseReceived)
                    await stream.send_all(conn.data_to_send())
            await stream.aclose()
            closed = trio.current_time()
            with trio.fail_after(5):  # not at the route's 10 s deadline
                while gw.gateway.runtime.gate.in_flight > 0:
                    await trio.sleep(0.01)
            assert trio.current_time() - closed < 1
        nursery.cancel_scope.cancel()


async def test_a_body_of_tiny_frames_costs_no_window_update_per_frame():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            await client.round_trip()
            upload = client.conn.get_next_available_stream_id()
            client.conn.send_headers(upload, [(":method", "POST"), (":path", "/api/ok"),
                                              (":scheme", "http"), (":authority", "gw")])
            for _ in range(5000):
                client.conn.send_data(upload, b"x")
            await client.flush()
            await client.round_trip()
            client.conn.end_stream(upload)
            await client.flush()
            with trio.fail_after(5):
                assert await client.response_status(upload) == 200
            assert upstream.requests[-1].body_size == 5000
            updates = [e for e in client.events if isinstance(e, h2.events.WindowUpdated)]
            assert len(updates) <= 2  # credit goes back by half windows, not per frame
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_upload_answered_before_its_body_is_read_is_told_to_stop_sending():
    """A client that sends its whole window before the 413 would otherwise wait forever
    for a window that nobody will reopen."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = proxy_policy(upstream.url).replace("    deadline: 10s\n",
                                                    "    deadline: 10s\n    max_body: 1KiB\n")
        async with run_gateway(policy) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            refused = client.conn.get_next_available_stream_id()
            client.conn.send_headers(refused, [(":method", "POST"), (":path", "/api/ok"),
                                               (":scheme", "http"), (":authority", "gw"),
                                               ("content-length", "300000")])
            while window := min(client.conn.local_flow_control_window(refused), 16384):
                client.conn.send_data(refused, b"x" * window)
            await client.flush()
            with trio.fail_after(5):
                reset = await client.until(lambda e: isinstance(e, h2.events.StreamReset)
                                           and e.stream_id == refused)
            assert reset.error_code == h2.errors.ErrorCodes.NO_ERROR
            # The whole answer came first.
            ended = [i for i, e in enumerate(client.events)
                     if isinstance(e, h2.events.StreamEnded) and e.stream_id == refused]
            assert ended and ended[0] < client.events.index(reset)
            assert await client.response_status(refused) == 413
            with trio.fail_after(5):
                assert await client.response_status(await client.get("/api/ok")) == 200
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_upload_shed_while_its_body_waits_is_told_to_stop_sending():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = TWO_UPSTREAMS.replace("queue_timeout: 20s", "queue_timeout: 1s")
        async with run_gateway(policy.format(url=upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            _, upload = await _upload_waiting_for_a_slot(client, upstream)
            while window := min(client.conn.local_flow_control_window(upload), 16384):
                client.conn.send_data(upload, b"x" * window)
            await client.flush()
            with trio.fail_after(5):  # shed at the 1 s queue timeout
                assert await client.response_status(upload) == 503
                reset = await client.until(lambda e: isinstance(e, h2.events.StreamReset)
                                           and e.stream_id == upload)
            assert reset.error_code == h2.errors.ErrorCodes.NO_ERROR
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_answer_cut_mid_body_resets_its_stream_and_the_connection_serves_on():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            cut = await client.get("/api/reset-mid-body")
            with trio.fail_after(5):
                assert await client.response_status(cut) == 200
                reset = await client.until(lambda e: isinstance(e, h2.events.StreamReset)
                                           and e.stream_id == cut)
            assert reset.error_code == h2.errors.ErrorCodes.INTERNAL_ERROR
            assert not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == cut
                           for e in client.events)  # never passed off as complete
            with trio.fail_after(5):
                assert await client.response_status(await client.get("/api/ok")) == 200
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_answer_without_a_body_ends_on_its_headers_frame():
    """An answer that has no body (to a HEAD, a 204, a 304) ended with an empty DATA
    frame carrying END_STREAM after its HEADERS. RFC 9113 allows it, but Envoy and
    nghttp2 end such an answer on its HEADERS frame, and a strict client takes DATA
    after a HEAD's or a 304's content-length as a protocol error. An answer with a
    body still ends as before."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            for port, method, path, status in (
                    (gw.port, "HEAD", "/api/ok", 200),
                    (gw.port, "GET", "/api/status/204", 204),
                    (gw.port, "GET", "/api/status/304", 304),
                    (gw.port, "HEAD", "/nowhere", 404),  # the gateway's own answer
                    (gw.admin_port, "HEAD", "/healthz", 200),
                    (gw.port, "GET", "/api/ok", 200)):
                client = H2Client(await trio.open_tcp_stream("127.0.0.1", port))
                await client.start()
                stream_id = await client.request(method, path)
                with trio.fail_after(5):
                    answered, body = await client.response(stream_id)
                    await client.round_trip()
                assert answered == status and bool(body) == (method == "GET"
                                                            and status == 200), path
                head = next(e for e in client.events
                            if isinstance(e, h2.events.ResponseReceived))
                data = [e for e in client.events if isinstance(e, h2.events.DataReceived)]
                if method == "GET" and status == 200:
                    assert head.stream_ended is None and data, path
                else:
                    assert head.stream_ended is not None, (method, path, "no END_STREAM "
                                                           "on HEADERS", data)
                    assert data == [], (method, path)
                assert not any(isinstance(e, h2.events.StreamReset) for e in client.events)
                with trio.fail_after(5):  # the connection serves on
                    assert await client.response_status(await client.get("/healthz"
                                                        if port == gw.admin_port
                                                        else "/api/ok")) == 200
                await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def _worker_serves_another_client(gw: RunningGateway) -> None:
    with trio.fail_after(5):
        other = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
        await other.start()
        assert await other.response_status(await other.get("/api/ok")) == 200
    await other.stream.aclose()


async def test_a_goaway_right_after_an_upload_does_not_end_the_worker():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            upload = client.conn.get_next_available_stream_id()
            client.conn.send_headers(upload, [(":method", "POST"), (":path", "/api/ok"),
                                              (":scheme", "http"), (":authority", "gw")])
            # Half a window of body, then GOAWAY, in one write: the gateway's
            # connection credit falls due after the connection has closed.
            client.conn.send_data(upload, b"x" * 16384)
            client.conn.send_data(upload, b"x" * 16383)
            client.conn.close_connection()
            await client.flush()
            await _worker_serves_another_client(gw)
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_upload_on_the_request_that_ends_the_connection_does_not_end_the_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Hypercorn closes a connection at keep_alive_max_requests (1,000 by default).
    monkeypatch.setattr(hypercorn.config.Config, "keep_alive_max_requests", 1)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            with trio.fail_after(5):
                assert await client.response_status(await client.get("/api/ok")) == 200
            upload = client.conn.get_next_available_stream_id()
            client.conn.send_headers(upload, [(":method", "POST"), (":path", "/api/ok"),
                                              (":scheme", "http"), (":authority", "gw"),
                                              ("content-length", "40000")])
            client.conn.send_data(upload, b"x" * 16384)
            client.conn.send_data(upload, b"x" * 16384)
            await client.flush()
            await _worker_serves_another_client(gw)
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_streams_the_client_resets_leave_nothing_behind_and_the_worker_serves_on():
    # Each reset upload used to leave its send buffer and priority node behind; with
    # 999 of them the connection's priority tree was full, and request 1,000 raised
    # TooManyStreamsError out of the worker, ending every connection on it.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        # With no limit on early resets, which would close this connection first.
        async with run_gateway(_with_reset_limit(proxy_policy(upstream.url), 0)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            for _ in range(999):
                upload = client.conn.get_next_available_stream_id()
                client.conn.send_headers(upload, [(":method", "POST"), (":path", "/api/ok"),
                                                  (":scheme", "http"), (":authority", "gw")])
                client.conn.send_data(upload, b"x")
                await client.flush()
                await client.round_trip()  # the app waits for the rest of the body
                await client.reset(upload)
                await client.round_trip()
            with trio.fail_after(5):
                assert await client.response_status(await client.get("/api/ok")) == 200
            await _worker_serves_another_client(gw)
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_full_priority_tree_refuses_the_new_stream_not_the_worker(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(priority, "PriorityTree",
                        functools.partial(priority.PriorityTree, maximum_streams=3))
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            stalled = [await client.get("/api/stall") for _ in range(3)]
            with trio.fail_after(5):
                refused = await client.until(lambda e: isinstance(e, h2.events.StreamReset))
            assert refused.stream_id == stalled[-1]
            assert refused.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
            await _worker_serves_another_client(gw)
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


def _priority(stream_id: int, depends_on: int = 0) -> bytes:
    frame = PriorityFrame(stream_id)
    frame.depends_on, frame.stream_weight = depends_on, 15
    return frame.serialize()


def _chain(first: int, length: int) -> tuple[bytes, list[int]]:
    """PRIORITY frames making each of ``length`` idle streams depend on the one before."""
    ids = [first + 2 * index for index in range(length)]
    return _priority(ids[0]) + b"".join(
        _priority(child, parent) for parent, child in itertools.pairwise(ids)), ids


@pytest.mark.parametrize("attack", ["idle-flood", "re-parent-a-long-chain", "deep-chain"])
async def test_priority_frames_cannot_end_the_worker(attack: str) -> None:
    # Each ended the worker: 1,001 idle streams filled the priority tree
    # (TooManyStreamsError); re-parenting under a 150-long chain raised PriorityLoop;
    # a stream opened under a 990-long chain made the send task recurse too deep.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            await client.round_trip()
            if attack == "idle-flood":
                frames = b"".join(_priority(1001 + 2 * index) for index in range(1001))
                next_stream = 3
            elif attack == "re-parent-a-long-chain":
                frames, ids = _chain(3, 150)
                frames += _priority(1001, ids[-1]) * 2
                next_stream = 1003
            else:
                frames, ids = _chain(3, 990)
                next_stream = ids[-1] + 2
                frames += _priority(next_stream, ids[-1])
            await client.stream.send_all(frames)
            await client.round_trip()
            client.conn.highest_outbound_stream_id = next_stream - 2
            with trio.fail_after(5):
                stream_id = await client.get("/api/ok")
                assert stream_id == next_stream
                assert await client.response_status(stream_id) == 200
            await _worker_serves_another_client(gw)
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_unforeseen_error_of_one_connection_ends_that_connection_only(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A stand-in for a protocol library's error nobody has found yet: Hypercorn let
    # anything but OSError out of a connection's task, which ended the worker.
    async def fails(self: object, event: object) -> None:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(hypercorn.protocol.h2.H2Protocol, "_priority_updated", fails)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            assert await client.response_status(await client.get("/api/ok")) == 200
            await client.stream.send_all(_priority(1))
            with trio.fail_after(5):  # this connection closes (what it had queued first)
                with contextlib.suppress(trio.BrokenResourceError):
                    while await client.stream.receive_some(65536):
                        pass
            await _worker_serves_another_client(gw)
        nursery.cancel_scope.cancel()
    assert any("unexpected error" in record.getMessage() and record.exc_info
               for record in caplog.records)


def _with_reset_limit(policy: str, limit: int) -> str:
    return policy + f"server: {{limits: {{h2_premature_resets: {limit}}}}}\n"


async def test_a_client_resetting_every_stream_it_opens_is_cut_off_at_the_limit():
    # Rapid reset: each open-and-reset pair costs the client two small frames and the
    # gateway a request started and cancelled. Hypercorn allowed 1,000 a connection.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(_with_reset_limit(proxy_policy(upstream.url), 50)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            with contextlib.suppress(trio.BrokenResourceError):
                for _ in range(20):  # 1,000 pairs, far more than one read of the gateway
                    for _ in range(50):
                        stream_id = client.conn.get_next_available_stream_id()
                        client.conn.send_headers(
                            stream_id, [(":method", "GET"), (":path", "/api/stall"),
                                        (":scheme", "http"), (":authority", "gw")],
                            end_stream=True)
                        client.conn.reset_stream(stream_id)
                    await client.flush()
            with trio.fail_after(5):
                goaway = await client.until(
                    lambda e: isinstance(e, h2.events.ConnectionTerminated))
            assert goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            assert goaway.last_stream_id == 99  # the 50th stream: none after it was acted on
            assert len(upstream.requests) <= 50
            await _worker_serves_another_client(gw)
            async with gw.admin() as admin:
                metrics = (await admin.get("/metrics")).text
            assert metric_total(metrics, "gateway_client_connections_closed_total",
                                reason="h2_premature_resets") == 1
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_client_that_cancels_some_of_its_streams_is_served_on():
    # A browser or gRPC client cancels streams it no longer needs: a third of them here,
    # at once, over three times the limit, and every other stream is answered.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(_with_reset_limit(proxy_policy(upstream.url), 50)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            with trio.fail_after(10):
                for _ in range(150):
                    answered = [await client.get("/api/ok") for _ in range(2)]
                    await client.reset(await client.get("/api/stall"))
                    for stream_id in answered:
                        assert await client.response_status(stream_id) == 200
            assert not any(isinstance(e, h2.events.ConnectionTerminated)
                           for e in client.events)
            await client.stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_http2_answer_to_a_stream_with_a_shut_window_is_not_buffered_unbounded():
    # The client never opens its stream window: what the gateway reads from the upstream
    # for that stream must stay bounded (flow control back to the upstream), as it is
    # over HTTP/1.1 and as "memory stays flat whatever the size" promises.
    sent = [0]
    chunk = b"x" * 65536

    async def endless(request: SeenRequest, respond: Responder) -> None:
        await respond.start(200, [("content-type", "application/octet-stream")])
        while True:
            await respond.send(chunk)
            sent[0] += len(chunk)

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=endless)
        policy = f"""
version: 1
upstreams:
  up: {{url: "{upstream.url}"}}
routes:
  - path: /api/{{rest*}}
    deadline: 30s
    proxy: {{upstream: up, path: "/{{rest}}"}}
"""
        async with run_gateway(policy) as gw:
            stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "t"),
                                  (":path", "/api/big")], end_stream=True)
            await stream.send_all(conn.data_to_send())

            async def keep_reading() -> None:
                # The connection stays healthy (SETTINGS, PINGs answered); only the
                # stream's window stays shut.
                while data := await stream.receive_some(65536):
                    conn.receive_data(data)
                    out = conn.data_to_send()
                    if out:
                        await stream.send_all(out)

            async with trio.open_nursery() as inner:
                inner.start_soon(keep_reading)
                # The upstream's sending comes to rest once the buffers between it and
                # the shut window are full; before, the gateway read on for ever.
                with trio.fail_after(10):
                    before = -1
                    while sent[0] != before:
                        before = sent[0]
                        await trio.sleep(0.2)
                inner.cancel_scope.cancel()
            await stream.aclose()
            assert sent[0] < 64 * 1024 * 1024, f"{sent[0] / 2**20:.0f} MiB read from the upstream"
        nursery.cancel_scope.cancel()


async def _drain_started(probe: H2Client) -> None:
    """An idle HTTP/2 connection is sent GOAWAY once the worker is terminating."""
    with trio.fail_after(5):
        await probe.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))


async def test_a_stream_refused_at_the_drain_gives_back_its_body_credit():
    """A stream refused at the drain (REFUSED_STREAM) whose first DATA came in the same
    read as its HEADERS: those bytes used the connection's flow-control window, and the
    refused stream's events are dropped before the credit is given back (before the
    change, its DataReceived reached the 'no such stream' path that acknowledges it).
    The in-flight upload on the same connection then cannot send the rest of its body."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), graceful_timeout=8) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            probe = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await probe.start()
            await probe.round_trip()
            upload = client.conn.get_next_available_stream_id()
            client.conn.send_headers(upload, [(":method", "POST"), (":path", "/api/ok"),
                                              (":scheme", "http"), (":authority", "gw")])
            client.conn.send_data(upload, b"x" * 1000)
            await client.flush()
            with trio.fail_after(5):
                await upstream.wait_requests(1)
            gw.shutdown.set()
            await _drain_started(probe)
            late = client.conn.get_next_available_stream_id()
            client.conn.send_headers(late, [(":method", "POST"), (":path", "/api/ok"),
                                            (":scheme", "http"), (":authority", "gw")])
            for _ in range(3):  # HEADERS and 48 KiB of DATA in one write
                client.conn.send_data(late, b"y" * 16384)
            await client.flush()
            with trio.fail_after(5):
                event = await client.until(
                    lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == late)
            assert event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
            with trio.fail_after(6):
                sent = await _send_body(client, upload, 100_000, end=True)
                assert sent == 100_000, f"the upload stalled after {sent} bytes"
                status, _ = await client.response(upload)
            assert status == 200
        nursery.cancel_scope.cancel()
