"""Who counts as a trusted proxy, whichever way the listener reports the peer; which
request ids a client may choose."""

from ipaddress import ip_network

import pytest

from gateway._headers import is_trusted, request_id_from

TRUSTED = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]


@pytest.mark.parametrize(("peer", "trusted", "expected"), [
    ("10.1.2.3", TRUSTED, True),
    ("11.1.2.3", TRUSTED, False),
    ("fd00::1", TRUSTED, True),
    # A dual-stack listener ([::]) reports an IPv4 peer as IPv4-mapped IPv6.
    ("::ffff:10.1.2.3", TRUSTED, True),
    ("::ffff:11.1.2.3", TRUSTED, False),
    # ... which an IPv6 network written for it still matches.
    ("::ffff:11.1.2.3", [ip_network("::ffff:0:0/96")], True),
    ("not an address", TRUSTED, False),
    (None, TRUSTED, False),
    ("10.1.2.3", [], False),
])
def test_trusted_peers(peer, trusted, expected):
    assert is_trusted(peer, trusted) is expected


@pytest.mark.parametrize(("value", "kept"), [
    (b"order-42.retry:1", True),
    (b"a" * 128, True),
    (b"a" * 129, False),
    (b"", False),
    (b"abc def", False),
    # A trailing newline would be logged and forwarded as a line break of its own.
    (b"abc\n", False),
    (b"\nabc", False),
])
def test_a_client_request_id_is_kept_only_when_plain(value, kept):
    rid = request_id_from([(b"x-request-id", value)], b"x-request-id")
    assert (rid == value.decode()) is kept
    assert rid.isascii() and rid.isprintable() and 0 < len(rid) <= 128
