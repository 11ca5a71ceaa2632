"""``https://`` upstreams: the certificate verified against the system's CAs or the
policy's ``ca_file``, its name checked (``server_name``), a client certificate for
upstreams that ask for one, and a failed handshake reported as a connect failure."""

import ssl
from pathlib import Path

import pytest
import trio
import trustme

from gateway._policy_loader import PolicyError, load_policy_text
from tests.gateway_harness import run_gateway, trace_of
from tests.upstream import start_upstream


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str,
                   client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


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


async def test_server_name_checks_the_certificate_for_another_name(ca, ca_file):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, tls=server_context(ca, "users.internal"))
        tls = f"ca_file: {ca_file}, server_name: users.internal"
        async with run_gateway(policy(upstream.url, tls)) as gw, gw.client() as client:
            assert (await client.get("/api/users/7")).json()["id"] == "7"
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
            # gateway reads the answer, and the server closes without one.
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
