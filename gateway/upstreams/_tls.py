"""TLS to an ``https://`` upstream: one client context per upstream, built when the
policy is loaded (the files it names are read then, never per request).

The server's certificate is always verified, against the system's trusted CAs or the
policy's ``ca_file``, and its name checked against ``server_name`` (the URL's host by
default, also sent as SNI; the ``Host`` header stays the URL's, as Envoy keeps the
route's under a configured SNI). Any certificate in ``ca_file`` is a trust anchor, an
intermediate CA included: the chain need not reach a self-signed root (OpenSSL's partial
chains, as curl does and Python 3.13 by default). ``cert_file`` and ``key_file`` present
a client certificate to upstreams that ask for one (mutual TLS).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

__all__ = ["UpstreamTls", "client_context"]


@dataclass(frozen=True)
class UpstreamTls:
    """How to reach one upstream over TLS."""

    context: ssl.SSLContext
    server_name: str
    client_certificate: bool = False
    """The context presents a client certificate (``cert_file``): what an upstream's
    refusal of the handshake is told as."""


def client_context(*, ca_file: str | None = None, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2 and later, HTTP/1.1 by ALPN).

    Raises ``ValueError`` naming the file that cannot be used.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # An operator pinning the intermediate CA that issued the upstream's certificate
    # (not the root above it) means that CA: without this flag OpenSSL goes on looking
    # for the root and refuses "unable to get issuer certificate".
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"ca_file {ca_file!r}: {_reason(error)}") from None
    if cert_file is not None:
        try:
            context.load_cert_chain(cert_file, key_file, password=_no_pass_phrase)
        except (OSError, ssl.SSLError, _EncryptedKey) as error:
            raise ValueError(f"cert_file {cert_file!r} / key_file {key_file!r}: "
                             f"{_reason(error)}") from None
    return context


class _EncryptedKey(Exception):
    """The key file is encrypted: OpenSSL would ask for its pass phrase on the terminal
    (``check``, start-up and reloads waited for ever)."""


def _no_pass_phrase() -> str:
    raise _EncryptedKey("the key is encrypted; give an unencrypted key (encrypted keys "
                        "are not supported)")


def _reason(error: OSError | ssl.SSLError | _EncryptedKey) -> str:
    if isinstance(error, _EncryptedKey):
        return str(error)
    if isinstance(error, ssl.SSLError):
        return f"not usable PEM ({error.reason or error})"
    return error.strerror or str(error)
