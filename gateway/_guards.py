"""Checks on a request head before anything is routed or forwarded.

``check_request_head`` runs first on every public request, so it is one pass over the
headers with no allocation beyond a counter or two. It enforces the limits of
``server.limits`` and refuses framing that two HTTP parsers could read differently:
a request the gateway would forward must mean the same thing to every hop.

What the HTTP server in front (Hypercorn's h11) already refuses, with 400 unless noted,
before the app sees the request: CR, LF or NUL in a header value; a header name with
non-token characters; whitespace before the colon; Content-Length values that differ
or are not plain digits (``+5``, ``-1``); a Transfer-Encoding other than ``chunked``
(501); bad chunk sizes. It *accepts* (and this module rejects): Content-Length together
with Transfer-Encoding (RFC 9112 §6.1 lets a server read it as chunked, but the
Content-Length would be forwarded beside a body of another size), Transfer-Encoding in
an HTTP/1.0 request (§6.1: "MUST treat the message as if the framing is faulty"), and
control characters other than HTAB in values (h11 lets ``\\x01`` and DEL through).
h11 also folds obs-fold lines into one value and accepts bare-LF line endings, which
RFC 9112 §5.2 and §2.2 allow; the gateway re-frames whatever it forwards, so those
cannot reach an upstream as ambiguous bytes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from ._errors import (
    NO_TUNNELS,
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    UriTooLong,
)
from ._hypercorn_fixes import H2_NO_BODY_EXTENSION
from ._policy import ALL_METHODS, LimitsPolicy
from ._routing import absolute_authority

__all__ = ["HEADER_LINE_OVERHEAD", "BodyFraming", "check_request_head"]

#: Bytes a header line adds to its name and value on the wire (": " and CRLF).
HEADER_LINE_OVERHEAD = 4

# RFC 9110 §5.6.2 token characters.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB (CR, LF and NUL among them), RFC 9110 §5.5.
_BAD_VALUE_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: A Host value (RFC 3986 3.2.2): an IP literal in brackets, or a reg-name (IPv4
#: included), then an optional port.
_HOST_RE = re.compile(
    rb"(\[[0-9A-Za-z:.%\-_~!$&'()*+,;=]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")
#: A request method: a token (RFC 9110 9.1), and short: the longest registered is 17.
_METHOD_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
MAX_METHOD_LENGTH = 32
#: No control character, space or DEL in a request target (RFC 9112 3.2; h2 lets them
#: through in ``:path``), and no fragment: one search finds either.
_TARGET_BAD_RE = re.compile(rb"[\x00-\x20\x7f#]")


#: Methods whose HTTP/2 requests are read for a body even without a Content-Length.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyFraming(NamedTuple):
    """How a request head that passed announces its body (RFC 9112 §6.3)."""

    #: A Content-Length other than 0, or Transfer-Encoding: there is a body to relay.
    announced: bool
    #: The Content-Length, when the head declares one.
    length: int | None


def check_request_head(scope: Mapping[str, Any], limits: LimitsPolicy) -> BodyFraming:
    """Raise a ``BadRequest`` (400, 414 or 431) when the request head must not pass, or
    ``MethodNotAllowed`` (405) for a CONNECT; else say how it frames its body (read in
    the same pass over the headers).

    Limits: more than ``max_header_count`` headers or more than ``max_header_bytes`` of
    them (name + value + 4 per line) → 431; a request target longer than
    ``max_uri_bytes`` → 414. Framing: more than one Content-Length, Content-Length
    with Transfer-Encoding, or Transfer-Encoding in HTTP/1.0 → 400. Header syntax: a
    name that is not a token, a value holding a control character → 400.
    """
    method: str = scope["method"]
    if len(method) > MAX_METHOD_LENGTH or _METHOD_RE.fullmatch(method) is None:
        # h11 checks HTTP/1.1's; HTTP/2's :method reaches here as the client wrote it.
        raise BadRequest("the request method is not a token of at most "
                         f"{MAX_METHOD_LENGTH} characters")
    if method == "CONNECT":
        # A tunnel (RFC 9110 9.3.6), its target an authority: refused as over HTTP/2,
        # not taken for a request whose path is malformed.
        raise MethodNotAllowed(NO_TUNNELS, allow=", ".join(ALL_METHODS))
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    query: bytes = scope.get("query_string", b"")
    bad = _TARGET_BAD_RE.search(raw_path) or _TARGET_BAD_RE.search(query)
    if bad is not None:
        if bad[0] == b"#":
            raise BadRequest("a request target has no fragment ('#')")  # RFC 9112 3.2
        raise BadRequest("the request target holds a control character")
    if raw_path[:1] != b"/" and raw_path[:8].lower().startswith((b"http://", b"https://")):
        # An absolute-form target's authority stands for Host (RFC 9112 3.2.2), and is
        # passed on as X-Forwarded-Host: the same check, no userinfo (RFC 9110 4.2.4),
        # and a host (4.2.1).
        authority = absolute_authority(raw_path)
        if (b"@" in authority or authority[:1] in (b"", b":")
                or _HOST_RE.fullmatch(authority) is None):
            raise BadRequest("the request target's authority is not a host[:port]")
    uri_bytes = len(raw_path) + (len(query) + 1 if query else 0)
    if uri_bytes > limits.max_uri_bytes:
        raise UriTooLong(f"the request target ({uri_bytes} bytes) is longer than "
                         f"{limits.max_uri_bytes} bytes")
    headers = scope["headers"]
    if len(headers) > limits.max_header_count:
        raise HeadersTooLarge(f"the request has {len(headers)} headers, more than "
                              f"{limits.max_header_count}")
    max_bytes = limits.max_header_bytes
    total = 0
    content_lengths = 0
    content_length = b""
    transfer_encoding = False
    token = _TOKEN_RE.fullmatch
    bad_value = _BAD_VALUE_RE.search
    for name, value in headers:
        total += len(name) + len(value) + HEADER_LINE_OVERHEAD
        if token(name) is None:
            raise BadRequest("a request header name is not a valid token")
        if bad_value(value) is not None:
            raise BadRequest(f"request header {_printable(name)} holds a control character")
        if name == b"host" and _HOST_RE.fullmatch(value) is None:
            # RFC 9112 3.2: 400. Passed on as X-Forwarded-Host, an upstream would build
            # its links from it (evil.example/login?next=...).
            raise BadRequest("the Host header is not a host[:port]")
        if name == b"content-length":
            content_lengths += 1
            content_length = value
        elif name == b"transfer-encoding":
            transfer_encoding = True
    if total > max_bytes:
        raise HeadersTooLarge(f"the request headers ({total} bytes) are larger than "
                              f"{max_bytes} bytes")
    if content_lengths > 1:
        raise BadRequest("the request has more than one Content-Length")
    if transfer_encoding:
        if content_lengths:
            raise BadRequest("the request has both Content-Length and Transfer-Encoding")
        if scope.get("http_version") == "1.0":
            raise BadRequest("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        return BodyFraming(True, None)
    if not content_lengths:
        if scope.get("http_version") in ("1.0", "1.1"):
            return BodyFraming(False, None)
        # HTTP/2 frames a body by DATA frames that no header announces: there is one
        # unless the HEADERS frame ended the stream (a DELETE or OPTIONS may carry one
        # too). Where the server does not say, a method that carries a body is taken
        # to have one (an empty one is relayed as empty).
        no_body = scope.get("extensions", {}).get(H2_NO_BODY_EXTENSION)
        if no_body is not None:
            return BodyFraming(not no_body, None)
        return BodyFraming(scope.get("method") in _BODY_METHODS, None)
    length = int(content_length) if content_length.isdigit() else None
    return BodyFraming(content_length.strip() != b"0", length)


def _printable(name: bytes) -> str:
    return repr(name.decode("latin-1")[:64])
