"""Header rules for the proxy leg: hop-by-hop removal, forwarding chain, request ids."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 §7.6.1 connection-specific fields, plus the de-facto ones proxies drop.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                        b"forwarded"})
#: Headers an upstream may read as the client's address or as the scheme, host, port or
#: prefix it was reached by: from a peer that is not a trusted proxy they are dropped
#: (besides every ``X-Forwarded-*``), never passed on as the client wrote them.
_CLIENT_CLAIMS = frozenset({b"x-real-ip", b"x-client-ip", b"true-client-ip",
                            b"x-cluster-client-ip", b"x-original-forwarded-for"})
#: Response headers the worker sets itself (as nginx does, the upstream's are not
#: relayed): a second ``Date`` or ``Server`` would contradict the first.
_SERVER_OWNED = frozenset({b"date", b"server"})
#: Framing a response without a body must not carry (Transfer-Encoding is hop-by-hop).
_BODILESS_FRAMING = frozenset({b"content-length"})
_REQUEST_ID_RE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def _claims_client(name: bytes) -> bool:
    return name.startswith(b"x-forwarded-") or name in _CLIENT_CLAIMS


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def strip_hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers and every header the ``Connection`` header names."""
    named = _connection_tokens(headers)
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def is_trusted(peer: str | None, trusted: Sequence[IPv4Network | IPv6Network]) -> bool:
    if not peer or not trusted:
        return False
    try:
        address = ip_address(peer)
    except ValueError:
        return False
    # A dual-stack listener ([::]) reports IPv4 peers as ::ffff:a.b.c.d: they are
    # matched against IPv4 networks too, as nginx's set_real_ip_from does.
    mapped = getattr(address, "ipv4_mapped", None)
    return any(address in network or (mapped is not None and mapped in network)
               for network in trusted)


def request_id_from(headers: Iterable[tuple[bytes, bytes]], header: bytes) -> str:
    """The client's request id when it is sane (short, plain characters), else a new one.

    A new id is 96 random bits from the worker's own generator (seeded from the OS in
    each spawned worker): an id names a request, it guards nothing, so it need not cost
    the system call ``secrets`` makes on every request."""
    for name, value in headers:
        if name == header and _REQUEST_ID_RE.fullmatch(value):
            return value.decode("ascii")
    return f"{random.getrandbits(96):024x}"


@functools.lru_cache(maxsize=64)
def _owned(request_id_header: bytes, drop: frozenset[bytes]) -> frozenset[bytes]:
    """Client headers the gateway writes itself (per policy, not per request)."""
    return _FORWARDED | {request_id_header} | drop


def upstream_request_headers(
    headers: Sequence[tuple[bytes, bytes]],
    *,
    peer: str | None,
    scheme: str,
    trusted: Sequence[IPv4Network | IPv6Network],
    request_id: str,
    request_id_header: bytes,
    drop: frozenset[bytes] = frozenset(),
    target_authority: bytes | None = None,
) -> Headers:
    """Headers to send upstream: hop-by-hop gone, forwarding chain appended.

    An incoming ``X-Forwarded-*`` chain (and ``Forwarded``, ``X-Real-IP`` and its kin)
    is kept only from a trusted proxy; from anyone else it is dropped and the chain
    starts at the peer. ``Host`` is passed through as ``X-Forwarded-Host`` and the
    upstream gets its own host (set by the pool); for an absolute-form request target
    its authority stands instead of ``Host`` (RFC 9112, 3.2.2).
    """
    trusted_peer = is_trusted(peer, trusted)
    out: Headers = []
    forwarded_for = b""
    forwarded_proto = b""
    forwarded_host = b""
    host = b""
    owned = _owned(request_id_header, drop)
    for name, value in strip_hop_by_hop(headers):
        # CGI/WSGI upstreams read X_Forwarded_For as X-Forwarded-For: no spoofing that way.
        dashed = name.replace(b"_", b"-") if b"_" in name else name
        if dashed is not name and dashed in owned:
            continue
        if not trusted_peer and dashed not in _FORWARDED and _claims_client(dashed):
            continue
        if name in _FORWARDED:
            if trusted_peer:
                if name == b"x-forwarded-for":
                    forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
                elif name == b"x-forwarded-proto" and not forwarded_proto:
                    forwarded_proto = value
                elif name == b"x-forwarded-host" and not forwarded_host:
                    forwarded_host = value
                elif name == b"forwarded":
                    out.append((name, value))  # passed on as the trusted proxy wrote it
            continue
        if name == b"host":
            host = value
            continue
        if name == b"expect":  # met by the gateway itself, which sends the body at once
            continue
        if name == request_id_header or name in drop:
            continue
        out.append((name, value))
    peer_bytes = (peer or "unknown").encode("ascii", "replace")
    out.append((b"x-forwarded-for",
                forwarded_for + b", " + peer_bytes if forwarded_for else peer_bytes))
    out.append((b"x-forwarded-proto", forwarded_proto or scheme.encode("ascii")))
    if target_authority:
        host = target_authority
    if forwarded_host or host:
        out.append((b"x-forwarded-host", forwarded_host or host))
    out.append((request_id_header, request_id.encode("ascii")))
    return out


def downstream_response_headers(headers: Sequence[tuple[bytes, bytes]],
                                request_id_header: bytes, request_id: str,
                                status: int = 200) -> Headers:
    """Upstream response headers as the client gets them, with the request id.

    A 204 (or 1xx) has no body whatever its head says, and RFC 9110 (8.6) forbids its
    Content-Length: relayed, an HTTP/2 client refuses the stream (a length with no DATA)
    and an HTTP/1.1 one in front may wait for bytes that never come. A 304 may carry
    the length of the representation it stands for, but the server ends its HTTP/2
    stream with an empty DATA frame, which h2-based clients (httpx) then count as a
    short body; it is dropped there too, as nginx does."""
    owned = (_SERVER_OWNED | _BODILESS_FRAMING if status in (204, 304) or status < 200
             else _SERVER_OWNED)
    out = [(n, v) for n, v in strip_hop_by_hop(headers)
           if n != request_id_header and n not in owned]
    out.append((request_id_header, request_id.encode("ascii")))
    return out

