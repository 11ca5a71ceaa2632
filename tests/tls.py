"""Certificates for tests of HTTPS upstreams (trustme): a server context issued by a
test CA; the ``ca`` and ``ca_file`` fixtures are in ``tests/conftest.py``."""

from __future__ import annotations

import ssl

import trustme


def server_context(ca: trustme.CA, *names: str,
                   client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    """A server context with a certificate for ``names``; with ``client_ca``, clients
    must present a certificate it issued (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
