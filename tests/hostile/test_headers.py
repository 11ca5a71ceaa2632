"""Headers: a forwarding chain from an untrusted peer is dropped (the upstream's chain
starts at the real peer), the client's deadline header only ever shortens the deadline,
and ``Host`` plays no part in routing."""

import json
import socket
import time
from email.utils import parsedate_to_datetime
from wsgiref.handlers import format_date_time

import pytest

import tests.gateway_harness as harness
from gateway._hypercorn_fixes import http_date
from gateway._server import listen_socket
from tests.hostile import stage
from tests.hostile.rawclient import connect, exchange, request_bytes

SPOOFED = [("X-Forwarded-For", "6.6.6.6, 7.7.7.7"), ("X-Forwarded-Proto", "https"),
           ("X-Forwarded-Host", "evil.example"), ("Forwarded", "for=6.6.6.6;proto=https"),
           ("X-FORWARDED-FOR", "8.8.8.8")]


async def test_forwarding_chain_from_untrusted_peer_is_replaced():
    async with stage() as s:
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/headers", SPOOFED))
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        assert seen.header_values("x-forwarded-for") == ["127.0.0.1"]
        assert seen.header_values("x-forwarded-proto") == ["http"]
        assert seen.header_values("x-forwarded-host") == ["gateway.test"]
        assert seen.header_values("forwarded") == []
        await s.assert_serves()


async def test_forwarding_chain_from_trusted_peer_is_extended():
    async with stage(server="  trusted_proxies: [127.0.0.1/32]\n") as s:
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/headers", SPOOFED))
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        (chain,) = seen.header_values("x-forwarded-for")
        assert chain.endswith(", 127.0.0.1") and chain.startswith("6.6.6.6, 7.7.7.7")


CLAIMS = [("X-Forwarded-Port", "443"), ("X-Forwarded-Prefix", "/admin"),
          ("X-Forwarded-Ssl", "on"), ("X-Forwarded-Server", "evil"), ("X-Real-IP", "6.6.6.6"),
          ("X-Client-IP", "6.6.6.6"), ("True-Client-IP", "6.6.6.6"), ("X_Real_IP", "6.6.6.6")]


@pytest.mark.parametrize(("server", "kept"), [("", False),
                                              ("  trusted_proxies: [127.0.0.1/32]\n", True)])
async def test_client_address_and_forwarding_claims_pass_only_from_a_trusted_proxy(server, kept):
    # Upstream frameworks read X-Forwarded-Port/-Prefix/-Ssl and X-Real-IP (Werkzeug's
    # ProxyFix, Spring): from anyone but a trusted proxy they would be the client's word.
    async with stage(server=server) as s:
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/headers", CLAIMS))
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        for name, value in CLAIMS:
            assert seen.header_values(name.lower()) == ([value] if kept else []), name


async def test_a_response_carries_one_date_and_one_server_header():
    async def dated(request, respond) -> None:
        await respond.respond(200, b"ok", [(b"date", b"Mon, 01 Jan 2001 00:00:00 GMT"),
                                          (b"server", b"up/1")])

    async with stage() as s:
        s.upstream.behaviour = dated
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/x"))
        assert response is not None and response.status == 200
        assert len(response.header_values("date")) == 1
        assert len(response.header_values("server")) == 1


@pytest.mark.parametrize("name", ["X_Forwarded_For", "x_forwarded_proto", "X_Forwarded_Host",
                                  "X_Request_Timeout_Ms", "x_request_id"])
async def test_underscore_spellings_of_gateway_headers_are_not_forwarded(name):
    # CGI/WSGI servers map "X_Forwarded_For" and "X-Forwarded-For" to the same
    # HTTP_X_FORWARDED_FOR variable: forwarding the underscore form lets a client
    # spoof what the gateway just replaced (nginx drops such headers by default).
    async with stage() as s:
        response, _ = await exchange(s.port, request_bytes(
            "GET", "/api/up/headers", [(name, "999999")]))
        assert response is not None and response.status in (200, 400), response
        if response.status == 200:
            (seen,) = s.upstream.requests
            names = [key for key, _ in seen.headers]
            assert name.lower() not in names, seen.headers
        else:
            assert s.upstream.requests == []
        await s.assert_serves()


@pytest.mark.parametrize(("sent", "most"), [("100000", 2000), ("300", 300), ("0", 0)])
async def test_deadline_header_only_shortens(sent, most):
    async with stage() as s:  # the route's deadline is the default, 2 s
        response, _ = await exchange(s.port, request_bytes(
            "GET", "/api/up/headers", [("x-request-timeout-ms", sent)]))
        assert response is not None
        if most == 0:
            assert response.status == 504, response
            assert s.upstream.requests == []
            return
        assert response.status == 200
        (seen,) = s.upstream.requests
        (budget,) = seen.header_values("x-request-timeout-ms")
        assert 0 < int(budget) <= most


@pytest.mark.parametrize("values", [["100", "100000"], ["abc"], ["-1"], ["1e9"], [" 5 0"]])
async def test_malformed_deadline_header_is_400(values):
    async with stage() as s:
        response, _ = await exchange(s.port, request_bytes(
            "GET", "/api/up/headers", [("x-request-timeout-ms", v) for v in values]))
        assert response is not None and response.status == 400, response
        assert s.upstream.requests == []
        await s.assert_serves()


@pytest.mark.parametrize("host", ["admin.internal", "127.0.0.1:{admin_port}", "localhost",
                                  "evil.example:80", ""])
async def test_host_is_not_used_for_routing(host):
    async with stage() as s:
        host_value = host.format(admin_port=s.gw.admin_port)
        ok, _ = await exchange(s.port, request_bytes("GET", "/api/up/headers",
                                                     [("Host", host_value)]))
        assert ok is not None and ok.status == 200, ok
        assert s.upstream.requests[-1].target == "/headers"
        assert s.upstream.requests[-1].header("host") != host_value or not host_value
        admin, _ = await exchange(s.port, request_bytes("GET", "/healthz",
                                                        [("Host", host_value)]))
        assert admin is not None and admin.status == 404
        assert json.loads(admin.body)["cause"] == "no_route"


async def test_responses_carry_the_current_date():
    async with stage() as s:
        before = int(time.time())
        response, _ = await exchange(s.port, request_bytes("GET", "/api/up/headers"))
        after = time.time()
        assert response is not None and response.status == 200
        (date,) = response.header_values("date")
        assert before <= parsedate_to_datetime(date.decode()).timestamp() <= after


def test_the_date_is_formatted_anew_each_second():
    # The formatter keeps the last second's text: each call must give its own second's.
    # A fraction belongs to the second it is in, before 1970 too (wsgiref's rule).
    for timestamp in (1_000.0, 1_000.9, 1_001.0, 999.5, 1_700_000_000.25, 0.5, -0.5):
        assert http_date(timestamp) == format_date_time(timestamp)


async def test_a_trusted_proxy_s_forwarded_header_reaches_the_upstream():
    """From a trusted peer the RFC 7239 ``Forwarded`` header passes as written (it was
    dropped with the untrusted ones, so an upstream reading it lost ``proto=https``)."""
    async with stage(server="  trusted_proxies: [127.0.0.1/32]\n") as s:
        response, _ = await exchange(s.port, request_bytes(
            "GET", "/api/up/headers", [("Forwarded", "for=6.6.6.6;proto=https")]))
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        assert seen.header_values("forwarded") == ["for=6.6.6.6;proto=https"], seen.headers
    async with stage() as s:  # from anyone else it is dropped
        await exchange(s.port, request_bytes(
            "GET", "/api/up/headers", [("Forwarded", "for=6.6.6.6;proto=https")]))
        (seen,) = s.upstream.requests
        assert seen.header_values("forwarded") == [], seen.headers


def _dual_stack_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # Linux's default
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def test_a_trusted_ipv4_proxy_is_trusted_on_a_dual_stack_bind(monkeypatch):
    """On ``[::]`` IPv4 peers arrive as ``::ffff:a.b.c.d``; they were compared with the
    IPv4 networks of ``trusted_proxies`` as IPv6 addresses and never matched, so the
    balancer's chain was dropped."""
    sockets = iter([_dual_stack_socket()])
    monkeypatch.setattr(harness, "listen_socket", lambda: next(sockets, None) or listen_socket())
    async with stage(server="  trusted_proxies: [127.0.0.0/8]\n") as s:
        response, _ = await exchange(s.port, request_bytes(
            "GET", "/api/up/headers", [("X-Forwarded-For", "6.6.6.6"),
                                       ("X-Forwarded-Proto", "https")]))
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        (chain,) = seen.header_values("x-forwarded-for")
        assert chain.startswith("6.6.6.6, ::ffff:127.0.0.1"), seen.headers
        assert seen.header_values("x-forwarded-proto") == ["https"], seen.headers


async def test_an_absolute_form_target_names_the_forwarded_host():
    """RFC 9112 (3.2.2): with an absolute-form target the server ignores ``Host`` and
    takes the target's authority; the upstream was told the ignored ``Host``."""
    async with stage() as s:
        response, _ = await exchange(s.port, b"GET http://real.example/api/up/headers HTTP/1.1\r\n"
                                             b"Host: other.example\r\n\r\n")
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        assert seen.header_values("x-forwarded-host") == ["real.example"], seen.headers


async def test_the_expectation_is_met_by_the_gateway_not_passed_on():
    """The gateway answers ``Expect: 100-continue`` itself and sends the body along at
    once: an upstream told to expect it could answer 417 or wait for nothing."""
    async with stage() as s, connect(s.port) as conn:
        await conn.send(b"POST /api/up/upload HTTP/1.1\r\nHost: g\r\n"
                        b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        assert (await conn.read_head()).status == 100
        await conn.send(b"hi")
        response = await conn.read_response()
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        assert seen.header_values("expect") == [] and seen.body == b"hi", seen.headers
