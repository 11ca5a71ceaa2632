"""``https://`` upstreams: the certificate verified against the system's CAs or the
policy's ``ca_file``, its name checked (``server_name``), a client certificate for
upstreams that ask for one, and a failed handshake reported as a connect failure."""

import os
import ssl
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from gateway._policy_loader import PolicyError, load_policy_text
from tests.gateway_harness import run_gateway, trace_of
from tests.tls import server_context
from tests.upstream import start_upstream


def policy(url: str, tls: str = "") -> str:
    tls_line = f"\n    tls: {{{tls}}}" if tls else ""
    return f"""
version: 1
upstreams:
  secure:
    url: "{url}"{tls_line}
    pool: {{connect_timeout: 2s}}
routes:
  - path: /api/{{rest*}}
    deadline: 5s
    proxy: {{upstream: secure, path: "/{{rest}}"}}
"""


async def test_an_https_upstream_is_verified_and_its_connections_reused(ca, ca_file):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, tls=server_context(ca, "127.0.0.1"))
        async with run_gateway(policy(upstream.url, f"ca_file: {ca_file}")) as gw, \
                gw.client() as client:
            for n in range(3):
                response = await client.get(f"/api/users/{n}")
                assert response.status_code == 200, response.text
                assert response.json()["id"] == str(n)
            # One TLS connection served all three: the idle check does not take the
            # session tickets a TLS 1.3 server sends for the peer having left.
            assert upstream.connections_opened == 1
            assert [r.target for r in upstream.requests] == [f"/users/{n}" for n in range(3)]
        nursery.cancel_scope.cancel()


async def test_a_certificate_that_is_not_trusted_or_not_for_the_host_is_a_502(ca, ca_file):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, tls=server_context(ca, "127.0.0.1"))
        other = await start_upstream(nursery, tls=server_context(ca, "other.test"))
        for url, tls in [(upstream.url, ""),  # the system's CAs do not know this one
                         (other.url, f"ca_file: {ca_file}")]:  # trusted, wrong name
            async with run_gateway(policy(url, tls)) as gw, gw.client() as client:
                response = await client.get("/api/users/1")
                assert response.status_code == 502, response.text
                assert response.json()["cause"] == "upstream_connect"
                trace = await trace_of(gw, response.headers["x-request-id"])
                assert "certificate" in str(trace.to_json()).lower()
        assert upstream.requests == [] and other.requests == []
        nursery.cancel_scope.cancel()


async def test_a_ca_file_holding_only_an_intermediate_ca_is_a_trust_anchor(tmp_path: Path):
    """An operator pins the intermediate CA that issued the upstream's certificate, not
    the root above it (curl and OpenSSL do with partial chains, as Python 3.13 does by
    default): OpenSSL kept looking for the root and refused "unable to get issuer
    certificate"."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    intermediate.issue_cert("127.0.0.1").configure_cert(context)  # leaf + intermediate
    pinned = tmp_path / "intermediate.pem"
    intermediate.cert_pem.write_to_path(str(pinned))
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, tls=context)
        async with run_gateway(policy(upstream.url, f"ca_file: {pinned}")) as gw, \
                gw.client() as client:
            response = await client.get("/api/users/1")
            assert response.status_code == 200, response.text
        nursery.cancel_scope.cancel()


async def test_server_name_checks_the_certificate_for_another_name(ca, ca_file):
    """``server_name`` is the SNI and the name checked in the certificate; the request's
    ``Host`` stays the URL's authority, as Envoy keeps the route's Host under a
    configured SNI (the client's own Host goes as ``X-Forwarded-Host``)."""
    context = server_context(ca, "users.internal")
    sni: list[str | None] = []

    def record_sni(_socket: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        sni.append(name)

    context.sni_callback = record_sni
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, tls=context)
        tls = f"ca_file: {ca_file}, server_name: users.internal"
        async with run_gateway(policy(upstream.url, tls)) as gw, gw.client() as client:
            response = await client.get("/api/users/7", headers={"host": "api.example"})
            assert response.json()["id"] == "7"
        assert sni == ["users.internal"]
        [seen] = upstream.requests
        assert seen.header("host") == f"127.0.0.1:{upstream.port}"
        assert seen.header("x-forwarded-host") == "api.example"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_client_certificate_is_presented_to_an_upstream_that_asks(
        ca, ca_file, tmp_path: Path, version: ssl.TLSVersion):
    client_ca = trustme.CA()
    issued = client_ca.issue_cert("gateway.internal")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    context = server_context(ca, "127.0.0.1", client_ca=client_ca)
    context.maximum_version = version
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, tls=context)
        async with run_gateway(policy(upstream.url, f"ca_file: {ca_file}")) as gw, \
                gw.client() as client:
            refused = await client.get("/api/users/1")
            assert refused.status_code == 502, refused.text
            # TLS 1.2 refuses in the handshake; TLS 1.3 only after it, when the
            # gateway reads the answer, and the server closes without one. This
            # upstream (trio's) sends no TLS alert, so nothing names the certificate; one
            # that does (nginx, Go, OpenSSL) is told alike under both versions
            # (test_tls_failures.py).
            expected = ("upstream_connect" if version == ssl.TLSVersion.TLSv1_2
                        else "upstream_reset")
            assert refused.json()["cause"] == expected, refused.text
        tls = f"ca_file: {ca_file}, cert_file: {cert}, key_file: {key}"
        async with run_gateway(policy(upstream.url, tls)) as gw, gw.client() as client:
            assert (await client.get("/api/users/1")).status_code == 200
        assert [r.target for r in upstream.requests] == ["/users/1"]
        assert len(upstream.tls_failures) == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("tls", "message"), [
    ("ca_file: /no/such/ca.pem", "ca_file '/no/such/ca.pem'"),
    ("ca_file: ca.pem", "give an absolute path"),
    ("key_file: /etc/hostname", "key_file needs cert_file"),
    ("ca_file: /etc/hostname", "not usable PEM"),
])
def test_a_tls_setting_that_cannot_work_is_a_policy_error_at_its_line(tls: str, message: str):
    with pytest.raises(PolicyError) as caught:
        load_policy_text(policy("https://127.0.0.1:8443", tls), "p.yaml")
    text = str(caught.value)
    assert message in text and "p.yaml:6" in text and "upstreams.secure.tls" in text, text


def test_tls_settings_for_a_plain_http_url_are_refused():
    with pytest.raises(PolicyError, match="'tls' is for an https:// url"):
        load_policy_text(policy("http://127.0.0.1:8080", "server_name: x"), "p.yaml")


async def test_a_reload_takes_new_tls_settings_and_files_rotated_in_place(ca, ca_file,
                                                                          tmp_path: Path):
    """A reload changing only ``tls`` kept the old pool (and its context), and a CA or
    certificate rewritten at the same path was never read again."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, tls=server_context(ca, "users.internal"))
        path = tmp_path / "policy.yaml"
        wrong = policy(upstream.url, f"ca_file: {ca_file}, server_name: wrong.internal")
        rotating = tmp_path / "rotating-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(rotating))  # not the upstream's CA
        right = policy(upstream.url, f"ca_file: {rotating}, server_name: users.internal")
        async with run_gateway(wrong, policy_path=path) as gw, gw.client() as client:
            refused = await client.get("/api/users/1")
            assert refused.status_code == 502 and refused.json()["cause"] == "upstream_connect"
            write_atomically(path, right)
            assert await gw.gateway.reload()
            assert gw.gateway.runtime.last_reload_error is None
            # The new settings are used: the name is right, the CA not yet.
            untrusted = await client.get("/api/users/1")
            assert untrusted.status_code == 502, untrusted.text
            assert "was not verified: unable to get local issuer certificate" in str(
                (await trace_of(gw, untrusted.headers["x-request-id"])).to_json())
            write_atomically(rotating, ca.cert_pem.bytes().decode())  # rotated in place
            assert await gw.gateway.reload()  # the same policy text: reloaded all the same
            assert (await client.get("/api/users/1")).status_code == 200
        nursery.cancel_scope.cancel()


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def _read_head(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


#: What a broken upstream sends after a complete response (a body on a HEAD answer, a
#: body longer than its Content-Length): it must never answer the next request.
STRAY = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\n\r\nstale"


async def test_bytes_after_a_response_never_answer_the_next_request_over_tls(ca, ca_file):
    # Over plain HTTP the pool reads up to 64 KiB at a time, so bytes after a complete
    # response are in h11's trailing_data, or the idle socket is readable: either way
    # the connection is not reused (tests/test_http_pool.py). Over TLS one read gives
    # one TLS record: bytes in the next record are left in the SSL object's buffer, the
    # raw socket is not readable, and the next request reads them as its answer.
    context = server_context(ca, "127.0.0.1")
    connections = 0

    async def handle(tcp: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        stream = trio.SSLStream(tcp, context, server_side=True)
        buffer = bytearray()
        try:
            while (head := await _read_head(stream, buffer)) is not None:
                target = head.split(b" ", 2)[1]
                if target == b"/one":
                    # A response that ends exactly at a TLS record's end (16 KiB),
                    # then stray bytes: two records, written in one TCP send.
                    prefix = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n"
                    length = 16384 - len(prefix % 10000)
                    response = (prefix % length) + b"x" * length
                    assert len(response) == 16384
                    await stream.send_all(response + STRAY)
                else:
                    body = b"fresh:" + target
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n"
                                          % len(body) + body)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        text = policy(f"https://127.0.0.1:{port}", f"ca_file: {ca_file}")
        with trio.fail_after(20):
            async with run_gateway(text) as gw, gw.client() as client:
                first = await client.get("/api/one")
                assert first.status_code == 200 and len(first.content) > 16000
                second = await client.get("/api/two")
                assert (second.status_code, second.text) == (200, "fresh:/two")
        nursery.cancel_scope.cancel()
