"""HTTPS upstreams failing: each failure told for what it is, never a cut body taken for whole."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import ssl
import sys
import time
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from tests.gateway_harness import run_gateway, trace_of
from tests.hostile.rawclient import connect, request_bytes
from tests.tls import server_context

ROOT = Path(__file__).resolve().parents[2]


def policy(url: str, tls: str, *, deadline: str = "5s", connect_timeout: str = "2s",
           retries: str = "{attempts: 1}") -> str:
    return f"""
version: 1
upstreams:
  secure:
    url: "{url}"
    tls: {{{tls}}}
    pool: {{connect_timeout: {connect_timeout}}}
    call: {{retries: {retries}}}
routes:
  - path: /api/{{rest*}}
    deadline: {deadline}
    proxy: {{upstream: secure, path: "/{{rest}}"}}
"""


async def serve(nursery: trio.Nursery, handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def _bad_gateway(handle, tls: str, **settings: str) -> tuple[dict, str]:  # type: ignore[no-untyped-def]
    """The 502 body a request gets from an HTTPS upstream served by ``handle`` (``tls``:
    the upstream's TLS settings, or a bare path for its ``ca_file``), and the text of its
    trace. The body names the upstream by its name in the policy, never by its address:
    that, and OpenSSL's words, are the trace's."""
    if ":" not in tls:
        tls = f"ca_file: {tls}"
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, handle)
        with trio.fail_after(20):
            async with run_gateway(policy(f"https://127.0.0.1:{port}", tls,
                                          **settings)) as gw, gw.client() as client:
                response = await client.get("/api/users/1")
                assert response.status_code == 502, response.text
                trace = str((await trace_of(gw, response.headers["x-request-id"])).to_json())
        nursery.cancel_scope.cancel()
    body = response.json()
    told = str({key: value for key, value in body.items() if key != "request_id"})
    for internal in ("127.0.0.1", str(port), "SSL", "_ssl.c", "Error"):
        assert internal not in told, (internal, body)
    return body, trace


async def read_head(stream: trio.abc.Stream) -> bytes | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    return buffer


# -- 1. truncation without close_notify ---------------------------------------------


async def test_a_close_delimited_body_cut_without_close_notify_is_not_relayed_as_complete(
        ca, ca_file):
    """A TLS upstream answers with a body delimited by the connection's close (no
    Content-Length, no chunking) and then dies mid-body: its TCP connection ends without
    TLS close_notify. Over TLS that is the one way to tell a truncated body from a
    complete one (RFC 9112 §9.8: an incomplete close does not complete such a response),
    yet the gateway relays the fragment as a complete 200 (a final zero-size chunk), so
    the client caches or parses a cut document as whole. With close_notify the same
    bytes are rightly complete."""
    context = server_context(ca, "127.0.0.1")

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        head = await read_head(stream)
        assert head is not None
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                              b"connection: close\r\n\r\n" + b'{"items": [1, 2, ')
        if b"/clean" in head.split(b"\r\n", 1)[0]:
            await stream.aclose()  # close_notify: the body is complete
        else:
            tcp.socket.close()  # the upstream crashed: FIN without close_notify

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, handle)
        with trio.fail_after(20):
            async with run_gateway(policy(f"https://127.0.0.1:{port}",
                                          f"ca_file: {ca_file}")) as gw:
                async with connect(gw.port) as conn:
                    await conn.send(request_bytes("GET", "/api/clean"))
                    clean = await conn.read_response()
                    assert clean is not None and clean.status == 200 and clean.complete
                async with connect(gw.port) as conn:
                    await conn.send(request_bytes("GET", "/api/cut"))
                    cut = await conn.read_response()
                assert cut is not None
                assert not (cut.status == 200 and cut.complete), (
                    f"a body truncated by the upstream was relayed as complete: "
                    f"{cut.status} {cut.body!r} (framing {cut.framing})")
        nursery.cancel_scope.cancel()


# -- 2. TLS failures after the handshake lose their reason ----------------------------


def _stdlib_tls_server(context: ssl.SSLContext, fd: int, answer: bytes | None) -> None:
    """A blocking stdlib TLS server on one accepted socket: unlike trio's, it sends the
    TLS alert of a failed handshake, as nginx, Go or Envoy do."""
    raw = socket.socket(fileno=fd)
    spare = raw.dup()  # wrap_socket takes raw's descriptor over
    raw.settimeout(5)
    tls = None
    try:
        tls = context.wrap_socket(raw, server_side=True)
        tls.recv(65536)
        if answer is not None:
            tls.sendall(answer)
    except (ssl.SSLError, OSError):
        pass
    finally:
        # Drain what the gateway sent so that the close is a FIN, not an RST.
        try:
            spare.settimeout(0.3)
            while spare.recv(65536):
                pass
        except OSError:
            pass
        spare.close()
        (tls or raw).close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["TLS 1.2", "TLS 1.3"])
@pytest.mark.parametrize("presented", [None, "another CA's"])
async def test_a_refused_client_certificate_is_named_alike_under_tls_1_2_and_1_3(
        ca, ca_file, tmp_path: Path, version: ssl.TLSVersion, presented: str | None):
    """An mTLS upstream refuses the gateway's missing (or untrusted) client certificate
    with a TLS alert. Under TLS 1.2 the alert ends the handshake: 502 upstream_connect.
    Under TLS 1.3 it arrives after the client's handshake has completed, on the first
    read: the same refusal was a 502 upstream_reset, "connection to upstream 'secure'
    broke: BrokenResourceError()", and was retried as a reset. Both now say that the
    upstream refused the client certificate, with the alert, as a connect failure that
    is not retried (every handshake ends the same way)."""
    context = server_context(ca, "127.0.0.1")
    trustme.CA().configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = context.maximum_version = version
    tls = f"ca_file: {ca_file}"
    if presented is not None:
        issued = trustme.CA().issue_cert("gateway.internal")
        cert, key = tmp_path / "client.pem", tmp_path / "client.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        tls += f", cert_file: {cert}, key_file: {key}"
    handshakes = 0

    async def handle(tcp: trio.SocketStream) -> None:
        nonlocal handshakes
        handshakes += 1
        fd = tcp.socket.detach()
        await trio.to_thread.run_sync(_stdlib_tls_server, context, fd, None,
                                      abandon_on_cancel=True)

    body, trace = await _bad_gateway(
        handle, tls, retries="{attempts: 3, on: [connect, reset], backoff: 1ms..2ms}")
    alert = ("unknown ca" if presented is not None
             else "certificate required" if version == ssl.TLSVersion.TLSv1_3
             else "handshake failure")  # TLS 1.2 has no alert of its own for it
    assert body["cause"] == "upstream_connect", body
    assert "client certificate" in body["error"] and alert not in body["error"], body
    assert "client certificate" in trace and f"TLS alert '{alert}'" in trace, trace
    assert handshakes == 1


async def test_a_corrupt_tls_record_from_an_upstream_names_the_tls_error(ca, ca_file):
    """An upstream (or a middlebox) sends a TLS record that does not decrypt. The 502
    says "connection to upstream 'secure' broke: BrokenResourceError()", with no trace
    of the SSL reason (bad record MAC / decryption failed) that OpenSSL gave."""
    context = server_context(ca, "127.0.0.1")

    async def handle(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        await read_head(stream)
        await tcp.send_all(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # garbage app record
        await trio.sleep(1)
        tcp.socket.close()

    body, trace = await _bad_gateway(handle, ca_file)
    assert body["error"] == "TLS connection to upstream 'secure' broke", body
    assert "BrokenResourceError()" not in trace and "SSLError" in trace, trace


# -- 3. a certificate that does not verify is told as such, and not retried -----------


def _expired_certificate(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    now = datetime.now(UTC)
    ca.issue_cert("127.0.0.1", not_before=now - timedelta(days=30),
                  not_after=now - timedelta(days=1)).configure_cert(context)
    return context


@pytest.mark.parametrize(("certificate", "why"), [
    (lambda ca: server_context(trustme.CA(), "127.0.0.1"), "unable to get local issuer"),
    (lambda ca: server_context(ca, "other.test"), "not valid for '127.0.0.1'"),
    (_expired_certificate, "certificate has expired"),
], ids=["untrusted", "another name", "expired"])
async def test_a_certificate_that_does_not_verify_is_named_and_not_retried(
        ca, ca_file, certificate, why):
    """An upstream whose certificate the gateway cannot verify (issued by another CA,
    for another name, expired) fails the same way on every handshake with the same
    address: each retry of ``on: [connect]`` made one more handshake, spent the retry
    budget and delayed the 502, which said only "TLS handshake failed" in OpenSSL's
    words. The 502 says the certificate was not verified, after one handshake; why (in
    words that name the upstream's host or address) is the trace's."""
    context = certificate(ca)
    handshakes = 0

    async def handle(tcp: trio.SocketStream) -> None:
        nonlocal handshakes
        handshakes += 1
        with suppress(trio.BrokenResourceError):
            await trio.SSLStream(tcp, context, server_side=True).do_handshake()

    body, trace = await _bad_gateway(
        handle, ca_file, retries="{attempts: 3, on: [connect], backoff: 1ms..2ms}")
    assert body["cause"] == "upstream_connect", body
    assert body["error"] == "the certificate of upstream 'secure' was not verified", body
    assert "was not verified" in trace and why in trace, trace
    assert "secure#2" not in trace, trace
    assert handshakes == 1


# -- 4. a stalled handshake is reported as a TCP connect timeout ----------------------


async def test_a_stalled_tls_handshake_is_reported_as_a_handshake_timeout(ca_file):
    """An upstream accepts TCP and never answers the ClientHello (a TLS port behind a
    wedged process, a plain-HTTP port listed as https). The 502 says "connect to
    upstream 'secure' timed out", the message of an unreachable host: the operator
    checks the network and firewall while the TCP connection was in fact open."""

    async def handle(tcp: trio.SocketStream) -> None:
        await trio.sleep_forever()

    body, trace = await _bad_gateway(handle, ca_file, connect_timeout="200ms")
    assert body["cause"] == "upstream_connect"
    assert "handshake" in body["error"].lower(), body
    assert "handshake" in trace and "at 127.0.0.1:" in trace, trace


async def test_a_failed_handshake_names_the_upstream_s_address_in_its_trace_only(ca_file):
    """A plain-HTTP port listed as https: the 502 said "TLS handshake with upstream
    'secure' failed: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:...)".
    The client learns that the handshake with 'secure' failed; which address it was
    and OpenSSL's reason are in the trace, for the operator."""

    async def handle(tcp: trio.SocketStream) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await tcp.receive_some(65536)
            await tcp.send_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    body, trace = await _bad_gateway(handle, ca_file)
    assert body["cause"] == "upstream_connect", body
    assert body["error"] == "TLS handshake with upstream 'secure' failed", body
    assert "at 127.0.0.1:" in trace and "SSL" in trace, trace


# -- 5. an encrypted key_file prompts on the terminal ---------------------------------


def test_an_encrypted_key_file_is_refused_without_prompting_for_a_pass_phrase(tmp_path):
    """``key_file`` holding a pass-phrase-protected key (common for client keys): the
    policy loader calls ``load_cert_chain`` without a password callback, so OpenSSL's
    default one asks "Enter PEM pass phrase:" on the terminal. ``check`` (and ``serve``
    at start, and a reload) started from a terminal hangs there; without a terminal it
    prints the prompt twice on stderr and then reports only "Invalid argument"."""
    issued = trustme.CA().issue_cert("gateway.internal")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    private = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    path = tmp_path / "p.yaml"
    path.write_text(policy("https://127.0.0.1:8443", f"cert_file: {cert}, key_file: {key}"))

    pid, fd = pty.fork()
    if pid == 0:  # the child: `python -m gateway check p.yaml` on a terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "gateway", "check", str(path)])
    output = b""
    status = None
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    data = b""
                output += data
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
                break
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode(errors="replace")
    assert status is not None, f"`check` still waits on the terminal after 8 s: {text!r}"
    assert "pass phrase" not in text.lower(), text
    assert "encrypted" in text.lower(), text
