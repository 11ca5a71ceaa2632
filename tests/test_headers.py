"""Who counts as a trusted proxy, whichever way the listener reports the peer."""

from ipaddress import ip_network

import pytest

from gateway._headers import is_trusted

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
