"""Route matching and upstream path building, without I/O.

Matching works on the raw request path, segment by segment: a segment is
percent-decoded only after the path was split on ``/``, so an encoded slash stays
inside one parameter and never changes which route matches. Dot segments are
resolved first (RFC 3986 §5.2.4, with ``%2e`` counted as a dot). When a value is
put into an upstream path it is percent-encoded again with nothing left safe, so a
parameter can never add a segment, a query or a fragment upstream.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, unquote_to_bytes

from ._errors import BadRequest, MethodNotAllowed, NotFound
from ._policy import Route

_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")
# Characters left as they are inside a substituted segment: unreserved plus a few
# sub-delims that no common server treats specially in a path ("&", "=", "+" are
# encoded because some frameworks give them meaning, ";" because Tomcat and Jetty read
# "..;" as "..").
_SEGMENT_SAFE = "-._~!$'()*,:@"
_SLASHES = re.compile(r"//+")


def origin_form(raw_path: bytes) -> bytes:
    """The path of a request target, also in absolute form (``http://host/path``), which
    RFC 9112 (3.2.2) says a server must accept, as a proxy in front may send it."""
    head = raw_path[:8].lower()
    if not (head.startswith(b"http://") or head.startswith(b"https://")):
        return raw_path
    authority_and_path = raw_path.partition(b"//")[2]
    slash = authority_and_path.find(b"/")
    return b"/" if slash < 0 else authority_and_path[slash:]


def absolute_authority(raw_path: bytes) -> bytes:
    """The authority of an absolute-form target (``http://host:port/path``): up to the
    first ``/``, ``?`` or ``#``."""
    return re.split(rb"[/?#]", raw_path.partition(b"//")[2], maxsplit=1)[0]


def target_authority(raw_path: bytes) -> bytes | None:
    """The host of an absolute-form request target (``http://host/path``), which a
    server must take instead of ``Host`` (RFC 9112, 3.2.2); None for origin form."""
    head = raw_path[:8].lower()
    if not (head.startswith(b"http://") or head.startswith(b"https://")):
        return None
    # Parsed as the guard checks it (gateway._guards), which refused any userinfo.
    return absolute_authority(raw_path) or None


def normalize_path(raw_path: bytes) -> list[str]:
    """Split a raw path into decoded segments with dot segments removed.

    Rejects what no route should ever see: NUL, control characters, invalid UTF-8,
    and ``..`` that would climb above the root.
    """
    if not raw_path.startswith(b"/"):
        raise BadRequest("the request path must start with '/'")
    segments: list[str] = []
    raw_segments = raw_path[1:].split(b"/")
    for index, raw in enumerate(raw_segments):
        try:
            decoded = unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the request path is not valid UTF-8") from None
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in decoded):
            raise BadRequest("the request path contains control characters")
        last = index == len(raw_segments) - 1
        if decoded == ".":
            if last:
                segments.append("")
            continue
        if decoded == "..":
            if not segments:
                raise BadRequest("the request path climbs above the root")
            segments.pop()
            if last:
                segments.append("")
            continue
        if decoded == "" and not last:
            # Collapse empty segments ("//"): no route template contains one.
            continue
        segments.append(decoded)
    return segments


def literal_segment(piece: str) -> str:
    """A route template's literal segment as the decoded request segment it matches."""
    return unquote_to_bytes(piece).decode("utf-8", "replace")


@dataclass(frozen=True)
class _Part:
    literal: str | None  # None for a parameter
    name: str = ""
    tail: bool = False


@dataclass(frozen=True)
class CompiledRoute:
    """A route with its template split into literal and parameter segments."""

    index: int
    route: Route
    parts: tuple[_Part, ...]
    methods: frozenset[str]
    tails: frozenset[str] = frozenset()

    def match(self, segments: Sequence[str]) -> dict[str, str] | None:
        params: dict[str, str] = {}
        parts = self.parts
        for position, part in enumerate(parts):
            if part.tail:
                rest = segments[position:]
                if not rest:  # "/api/up" for /api/up/{rest*}; "/api/up/" has rest ""
                    return None
                params[part.name] = "/".join(rest)
                return params
            if position >= len(segments):
                return None
            segment = segments[position]
            if part.literal is not None:
                if segment != part.literal:
                    return None
            elif segment == "":
                return None
            else:
                params[part.name] = segment
        return params if len(segments) == len(parts) else None


def compile_route(index: int, route: Route) -> CompiledRoute:
    parts: list[_Part] = []
    for piece in route.path[1:].split("/"):
        match = _PARAM_RE.fullmatch(piece)
        if match:
            parts.append(_Part(None, match[1], bool(match[2])))
        else:
            # Compared with decoded request segments: a route written as a target is
            # (/files/my%20docs matches "my docs", and my%2520docs does not).
            parts.append(_Part(literal_segment(piece)))
    methods = set(route.allowed_methods)
    if "GET" in methods:
        methods.add("HEAD")
    tails = frozenset(part.name for part in parts if part.tail)
    return CompiledRoute(index, route, tuple(parts), frozenset(methods), tails)


@dataclass(frozen=True)
class RouteMatch:
    compiled: CompiledRoute
    params: dict[str, str]
    #: The request path's decoded segments, from which a tail's own segments come.
    segments: Sequence[str] = ()

    @property
    def route(self) -> Route:
        return self.compiled.route

    @property
    def tails(self) -> frozenset[str]:
        return self.compiled.tails

    def target(self, template: str, query_string: bytes = b"") -> str:
        tail_segments: dict[str, Sequence[str]] = {}
        if self.compiled.tails and self.segments:
            # A tail is always the template's last part.
            (name,) = self.compiled.tails
            tail_segments[name] = self.segments[len(self.compiled.parts) - 1:]
        return build_target(template, self.params, query_string, self.tails, tail_segments)


class RouteTable:
    """Routes in policy order; the first whose template matches wins."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = [compile_route(i, r) for i, r in enumerate(routes)]

    def match(self, method: str, raw_path: bytes) -> RouteMatch:
        segments = normalize_path(raw_path)
        allowed: set[str] = set()
        first: CompiledRoute | None = None
        for compiled in self._routes:
            params = compiled.match(segments)
            if params is None:
                continue
            if method in compiled.methods:
                return RouteMatch(compiled, params, segments)
            allowed |= compiled.methods
            first = first or compiled
        if first is not None:
            # ``route``: the first template the path matched, so that a 405 is counted
            # (and its path kept private) as that route's.
            raise MethodNotAllowed(f"method {method} is not allowed here",
                                   allow=", ".join(sorted(allowed)), route=first.route.path)
        raise NotFound("no route matches this path")


def _encode_value(name: str, value: str, tail: bool,
                  segments: Sequence[str] | None = None) -> str:
    if tail:
        if segments is not None:
            # The request's own segments: an encoded slash inside one (a%2Fb, as in
            # GitLab's project paths) stays encoded, as the client sent it, and a
            # leading %2F cannot make "//" (a scheme-relative authority to some servers).
            pieces = list(segments)
        else:
            # Only a value to go by: empty pieces (from "//") are dropped, as a literal
            # "//" is in a request path. A trailing slash is kept.
            split = value.split("/")
            pieces = [p for p in split[:-1] if p] + split[-1:]
        # Nor inside an encoded slash (a%2F..%2Fb): an upstream that decodes it before
        # resolving dot segments would climb out of the template's prefix.
        if any(q in (".", "..") for p in pieces for q in p.split("/")):
            raise BadRequest(f"parameter {name!r} may not contain '.' or '..' segments")
        return "/".join(quote(p, safe=_SEGMENT_SAFE) for p in pieces)
    if value in (".", ".."):
        raise BadRequest(f"parameter {name!r} may not be '.' or '..'")
    return quote(value, safe=_SEGMENT_SAFE)


def build_target(template: str, params: dict[str, str], query_string: bytes = b"",
                 tails: frozenset[str] = frozenset(),
                 tail_segments: Mapping[str, Sequence[str]] | None = None) -> str:
    """Fill an upstream path template; the client's query string is appended, less the
    parameters the template's own query sets.

    A value lands percent-encoded in its own segment (or, for a template's query part,
    as an encoded query value), so it cannot change the shape of the upstream path. A
    route's ``{name*}`` parameter (named in ``tails``) keeps its slashes, one encoded
    segment each (the request's own, from ``tail_segments``, when given), and may not
    hold dot segments.
    """
    path_template, _, query_template = template.partition("?")
    emptied = False

    def fill(text: str, in_query: bool) -> str:
        def replace(match: re.Match[str]) -> str:
            nonlocal emptied
            value = params[match[1]]
            if in_query:
                return quote(value, safe="")
            name = match[1]
            encoded = _encode_value(name, value, bool(match[2]) or name in tails,
                                    tail_segments.get(name) if tail_segments else None)
            emptied = emptied or not encoded
            return encoded

        return _PARAM_RE.sub(replace, text)

    target = fill(path_template, in_query=False)
    if emptied:
        # An empty tail (the request named its route's bare prefix, /docs/) inside a
        # template (/site/{page}/index.html) leaves no empty segment: /site/index.html.
        target = _SLASHES.sub("/", target)
    client_query = query_string.decode("latin-1")
    if query_template and client_query:
        # The template's parameters are the policy's: a client's own ``user=2`` after
        # a templated ``user={id}`` would reach an upstream that reads the last value.
        # Some upstreams split on ";" too (Rack 2, Django before 3.2, Go before 1.17):
        # a ";" of the client's is sent encoded, so "page=1;user=2" cannot set it there.
        pinned = {_query_name(pair) for pair in query_template.split("&")}
        client_query = "&".join(pair.replace(";", "%3B") for pair in client_query.split("&")
                                if _query_name(pair) not in pinned)
    queries = [q for q in (fill(query_template, in_query=True), client_query) if q]
    if queries:
        target += "?" + "&".join(queries)
    return target


def _query_name(pair: str) -> str:
    """The decoded name of one ``name=value`` pair (``+`` is a space in a query)."""
    return unquote_plus(pair.partition("=")[0])
