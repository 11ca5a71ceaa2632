"""Paths: dot segments, encoded dots and slashes, empty segments, NUL, invalid UTF-8 and
server-specific separators are normalised (RFC 3986 §5.2.4) before routing or refused
with 400; a request never reaches a route the policy did not name, and a value never
changes the shape of the upstream path."""

import pytest

from tests.hostile import stage
from tests.hostile.rawclient import exchange, request_bytes

FORWARDED = {
    "/api/up/a/../b": "/b",
    "/api/up/./b/.": "/b/",
    "/api/up/a/%2e%2e/b": "/b",
    "/api/up/a/.%2E/b": "/b",
    "//api//up//b": "/b",
    # A {rest*} tail keeps its slashes as sent: an encoded one stays inside its
    # segment, and never hides a dot segment (those are refused, below).
    "/api/up/a%2Fb": "/a%2Fb",
    "/api/item/a%2Fb": "/items/a%2Fb",
    "/api/item/a%2F..%2F..%2Fadmin": "/items/a%2F..%2F..%2Fadmin",
    "/api/item/%252e%252e": "/items/%252e%252e",
    "/api/item/a%3Fx%3D1%23f": "/items/a%3Fx%3D1%23f",
    "/api/item/caf%C3%A9": "/items/caf%C3%A9",
    # Absolute form (RFC 9112 3.2.2) is routed by its path, whatever its authority: the
    # upstream is the policy's, never the one the target names.
    "http://evil.example/api/up/x": "/x",
}

NOT_FORWARDED = {
    # (status, cause)
    "/api/up/%2e%2e/%2e%2e/admin": (404, "no_route"),
    "/api/item/%2e%2e": (404, "no_route"),
    "/api/up/../../../etc/passwd": (400, "bad_request"),
    "/%2e%2e/api/up/x": (400, "bad_request"),
    "/api/up/a%2f..%2fb": (400, "bad_request"),
    "/api/up/%00": (400, "bad_request"),
    "/api/item/a%00b": (400, "bad_request"),
    "/api/up/%ff": (400, "bad_request"),
    "/api/up/%c0%ae%c0%ae/x": (400, "bad_request"),  # overlong UTF-8 for ".."
    "/api/up/a%0d%0aX-Injected:%201": (400, "bad_request"),
    "/api/up/a%7f": (400, "bad_request"),
    "api/up/x": (400, "bad_request"),
    "http://evil.example/../api/up/x": (400, "bad_request"),
    "*": (400, "bad_request"),
}


def segments_of(target: str) -> list[str]:
    path = target.partition("?")[0]
    return path.split("/")[1:]


def assert_clean_upstream_target(target: str) -> None:
    for segment in segments_of(target):
        # Some servers (Tomcat, Jetty) drop ";params" before resolving dot segments.
        bare = segment.split(";", 1)[0]
        assert bare not in (".", ".."), f"dot segment reaches the upstream: {target!r}"
        assert "\\" not in segment, f"backslash reaches the upstream: {target!r}"
        assert all(0x20 < ord(ch) < 0x7F for ch in segment), target


@pytest.mark.parametrize("path", sorted(FORWARDED))
async def test_paths_are_normalised_before_routing(path):
    async with stage() as s:
        response, _ = await exchange(s.port, request_bytes("GET", path))
        assert response is not None and response.status == 200, response
        (seen,) = s.upstream.requests
        assert seen.target == FORWARDED[path]
        assert_clean_upstream_target(seen.target)
        await s.assert_serves()


@pytest.mark.parametrize("path", sorted(NOT_FORWARDED))
async def test_paths_outside_the_policy_are_refused(path):
    status, cause = NOT_FORWARDED[path]
    async with stage() as s:
        response, _ = await exchange(s.port, request_bytes("GET", path))
        await s.settle()
        assert s.upstream.requests == [], "the request reached the upstream"
        assert response is not None and response.status == status, response
        assert f'"cause":"{cause}"'.encode() in response.body
        await s.assert_serves()


@pytest.mark.parametrize("path", ["/api/up/..;/admin", "/api/up/a/..;/..;/admin",
                                  "/api/up/.;x/admin", "/api/up/a\\..\\..\\admin",
                                  "/api/up/a%5C..%5Cadmin"])
async def test_server_specific_separators_never_climb_upstream(path):
    async with stage() as s:
        response, _ = await exchange(s.port, request_bytes("GET", path))
        assert response is not None
        if response.status == 200:
            (seen,) = s.upstream.requests
            assert_clean_upstream_target(seen.target)
        else:
            assert response.status in (400, 404), response
            assert s.upstream.requests == []
        await s.assert_serves()


async def test_query_string_never_changes_the_upstream_path():
    async with stage() as s:
        target = "/api/item/7?x=/../../admin&y=%2e%2e"
        response, _ = await exchange(s.port, request_bytes("GET", target))
        assert response is not None and response.status == 200
        (seen,) = s.upstream.requests
        assert seen.path == "/items/7"
        assert seen.query == {"x": "/../../admin", "y": ".."}


async def test_an_absolute_form_target_is_routed_by_its_path():
    # RFC 9112 3.2.2: a server must accept absolute-form targets (a proxy may send them).
    async with stage() as s:
        for target in (b"http://gateway.test/api/up/ok", b"HTTP://gateway.test:80/api/up/ok"):
            response, _ = await exchange(
                s.port, b"GET " + target + b"?x=1 HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
            assert response is not None and response.status == 200, response
            assert s.upstream.requests[-1].target == "/ok?x=1"
        response, _ = await exchange(
            s.port, b"GET http://gateway.test HTTP/1.1\r\nHost: gateway.test\r\n\r\n")
        assert response is not None and response.status == 404, response
        await s.assert_serves()
