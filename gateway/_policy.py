"""The policy file's models: what operators may write, with every default stated here.

The models are frozen: a request keeps the snapshot it started with while a reload
swaps in a new one. Validation of single fields lives beside the field; checks that
span the file (a route naming an upstream that exists, path parameters that agree)
live in :func:`cross_check`, which returns problems with the path of the offending
field so the loader can point at the line.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ._binds import BIND_EXAMPLE, split_bind
from ._units import (
    Duration,
    DurationRange,
    DurationSpan,
    Percent,
    PositiveDuration,
    PositiveShare,
    Share,
    above,
    digits_at_least,
    duration_at_most,
)
from .upstreams._tls import client_context

PolicyPath = tuple[str | int, ...]

#: Methods a proxy route accepts when it names none.
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SIZE_RE = re.compile(r"^(?P<value>\d+)(?P<unit>B|KiB|MiB|GiB|KB|MB|GB)?$", re.ASCII)
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


#: Largest size a policy may write (8 EiB less one: beyond, a slip of the keyboard).
MAX_SIZE = 2**63 - 1


def format_size(size: int) -> str:
    """A size as a policy would write it: in the largest binary unit that divides it."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def is_size_with_unit(value: Any) -> bool:
    """Whether ``value`` is a size written with its unit (``"2GiB"``, not ``2048``)."""
    if not isinstance(value, str):
        return False
    match = _SIZE_RE.match(value.strip())
    return match is not None and match["unit"] is not None


def parse_size(value: Any) -> int:
    """``"16MiB"`` → 16777216; plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        if value > MAX_SIZE:
            raise ValueError(f"{str(value)[:24]}… is too large (at most {MAX_SIZE} bytes)")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value.strip())
        if match:
            if len(match["value"].lstrip("0")) > 19:
                raise ValueError(f"{value[:24]!r}… is too large (at most {MAX_SIZE} bytes)")
            size = int(match["value"]) * _SIZE_UNITS[match["unit"]]
            if size > MAX_SIZE:
                raise ValueError(f"{value!r} is too large (at most {MAX_SIZE} bytes)")
            return size
    raise ValueError(f"{value!r} is not a size (e.g. 64KiB, 16MiB, 1000)")


def size_json_schema(minimum: int, maximum: int = MAX_SIZE) -> dict[str, Any]:
    """The JSON Schema of a size of at least ``minimum`` bytes (and at most
    ``maximum``), as a number or as text with its unit: a field's ``ge`` and ``le`` are
    lost under ``WithJsonSchema``, so an editor would show a size the loader refuses as
    fine."""
    units_by_count: dict[int, list[str]] = {}
    for unit, factor in _SIZE_UNITS.items():
        units_by_count.setdefault(-(-minimum // factor), []).append(unit or "")
    texts = []
    for count, units in units_by_count.items():
        named = "|".join(unit for unit in units if unit)
        suffix = f"({named})" + ("?" if "" in units else "")
        texts.append(digits_at_least(count) + suffix)
    too_large = above({unit or "": maximum // factor for unit, factor in _SIZE_UNITS.items()})
    return {"anyOf": [{"type": "integer", "minimum": minimum, "maximum": maximum},
                      {"type": "string", "pattern": "^(" + "|".join(texts) + ")$",
                       "not": {"pattern": too_large}, "examples": ["64KiB", "16MiB"]}]}


ByteSize = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(size_json_schema(0))]
#: A size of at least one byte (0 would refuse everything).
PositiveByteSize = Annotated[ByteSize, Field(ge=1), WithJsonSchema(size_json_schema(1))]


def template_params(template: str) -> list[str]:
    """Names of the ``{param}`` placeholders of a path template, in order."""
    return [name for name, _ in _PARAM_RE.findall(template)]


class _Model(BaseModel):
    """Base of every policy model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads ``yes``/``true`` as a boolean, and pydantic would take it as 1: a
        typo that silently sets a limit to one. A boolean is only a boolean."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if "bool" not in str(annotation):
                raise ValueError(f"expected a number or text, got {str(value).lower()}")
        return value


# --------------------------------------------------------------------------- server


#: The smallest ``max_header_bytes`` (Envoy's floor too): below it a Host header and
#: the few headers every client sends (User-Agent, Accept) no longer fit, and the
#: gateway answers every request 431.
MIN_HEADER_BYTES = 1024
#: A request header size: at least ``MIN_HEADER_BYTES``, for the loader and the schema.
HeaderBytes = Annotated[ByteSize, Field(ge=MIN_HEADER_BYTES),
                        WithJsonSchema(size_json_schema(MIN_HEADER_BYTES))]


#: The most a policy may set for the unread rest of a request body read and dropped
#: (``discard_body``, ``lingering_bytes``): the bytes are dropped, not held, but each
#: is a connection kept busy reading them.
MAX_DISCARD_BYTES = 1024**3
#: A size of at most ``MAX_DISCARD_BYTES``, for the loader and the schema.
DiscardBytes = Annotated[ByteSize, Field(le=MAX_DISCARD_BYTES),
                         WithJsonSchema(size_json_schema(0, MAX_DISCARD_BYTES))]
#: The longest ``lingering_time``: a connection reading a body nobody wants for longer
#: holds a descriptor for nothing.
MAX_LINGERING_S = 60.0
if TYPE_CHECKING:
    LingeringDuration = float
else:
    #: A duration above 0 and at most ``MAX_LINGERING_S``, for the loader and the schema.
    LingeringDuration = duration_at_most(MAX_LINGERING_S)


class LimitsPolicy(_Model):
    """Limits on what a client may send; each answers with its own status."""

    max_header_count: int = Field(100, ge=1, description="More headers → 431.")
    max_header_bytes: HeaderBytes = Field(
        16 * 1024, description="Total request header size → 431; at "
        "least 1KiB, so that a Host and the headers every client sends fit.")
    max_uri_bytes: int = Field(8192, ge=64, description="Longer request target → 414.")
    max_body: ByteSize = Field(16 * 1024**2, description="Default body cap per route → 413.")
    h2_premature_resets: int = Field(
        100, ge=0, description="HTTP/2: streams a client may reset within 1 s of opening "
        "them before its connection is sent GOAWAY (ENHANCE_YOUR_CALM) and closed, once "
        "they are also half of the streams it opened (rapid reset); 0: no limit.")
    discard_body: DiscardBytes = Field(
        64 * 1024, description="HTTP/1.1: the most of a request body left unread by an "
        "answer given before it was read (a 404, a 503 shed, a 413, an upstream refusing "
        "an upload) that is read and dropped to keep the connection, a Content-Length "
        "telling it; a larger rest, or a chunked one, is answered Connection: close. At "
        "most lingering_bytes; 0: every such answer closes.")
    lingering_bytes: DiscardBytes = Field(
        1024**2, description="HTTP/1.1: the most read and dropped of a body left unread "
        "by an early answer before the connection is closed (a lingering close: a "
        "client still sending reads its answer instead of a reset); at most 1GiB.")
    lingering_time: LingeringDuration = Field(
        2.0, description="HTTP/1.1: the longest the rest of a body left unread by an early "
        "answer is read for after the answer, whether the connection is kept or closes; "
        "past it the connection is closed. Above 0, at most 1m.")
    max_upstream_header_bytes: PositiveByteSize = Field(
        64 * 1024, description="An upstream answering larger headers → 502; so are its "
        "informational (1xx) heads before an answer, taken together.")
    body_timeout: PositiveDuration = Field(
        60.0, description="The whole request body must arrive within this of the "
        "request's start, whatever its pace (408); also bounded by the route's deadline.")
    response_timeout: PositiveDuration = Field(
        3600.0, description="Longest an admin response may stream before it is cut "
        "(public routes are bounded by their deadline).")


class ServerPolicy(_Model):
    """Per-worker server settings."""

    deadline_header: str = Field(
        "x-request-timeout-ms",
        description="Header a client uses to shorten its deadline (milliseconds); "
        "also sent upstream with the remaining budget.")
    deadline_margin: Duration = Field(
        0.005, description="Subtracted from the remaining budget sent upstream.")
    min_call_budget: Duration = Field(
        0.002, description="A call whose budget, after deadline_margin, is below this is "
        "not sent (504); checked again once the call has an upstream slot.")
    max_inflight: int = Field(4000, ge=1, description="Requests per worker before 503 at the door.")
    shed_retry_after: Duration = Field(1.0, description="Retry-After of a 503 from shedding.")
    max_loop_lag: PositiveDuration | None = Field(
        None, description="Shed new requests (503) while the worker's event loop runs "
        "later than this (CPU overload); unset: never.")
    accept_batch: int = Field(
        1, ge=1, le=4096,
        description="Connections a worker takes from the listen backlog per wake-up. 1: one "
        "per scheduler pass, so a saturated worker takes new connections in slowly and the "
        "backlog holds the excess (which keeps goodput under overload); more: bursts are "
        "taken in at once, but a saturated worker then admits more than it can finish.")
    send_timeout: PositiveDuration = Field(
        30.0, description="Longest a client may take no 64 KiB piece of its answer "
        "(nor the rest of it); past it the connection (over HTTP/2, the stream) is dropped "
        "and the request's work cancelled. Also bounds how long such a client holds up a "
        "graceful shutdown.")
    request_id_header: str = Field("x-request-id", description="Kept when sane, else generated.")
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = Field(
        (), description="Peers whose X-Forwarded-* chain is trusted (CIDR).")
    admin_bind: str = Field(
        "127.0.0.1:9901",
        description="host:port of the admin endpoints; GATEWAY_ADMIN_BIND overrides it.")
    admin_token_env: str | None = Field(
        None, description="Environment variable holding a bearer token the admin bind requires.")
    tracing: bool = Field(True, description="Record a cancellation trace per request.")
    trace_context: Literal["w3c", "off"] = Field(
        "w3c", description="w3c: with tracing on, a request joins the trace of a valid "
        "incoming traceparent (or starts one) and each HTTP try upstream is sent a "
        "traceparent naming its own span; off: traceparent and tracestate pass through "
        "untouched.")
    trace_buffer: int = Field(1000, ge=0, le=1_000_000,
                              description="Traces kept per worker (ring buffer).")
    slow_request: Duration = Field(1.0, description="A request slower than this is logged.")
    log_sample: Share = Field(0.0, description="Share of ordinary requests also logged "
                                "(0% to 100%).")
    limits: LimitsPolicy = LimitsPolicy()

    @field_validator("trace_context", mode="before")
    @classmethod
    def _off_as_written(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare ``off`` as the boolean false (and ``on`` as true).
        if value is True:
            raise ValueError("expected w3c or off, got true")
        return "off" if value is False else value

    @field_validator("log_sample")
    @classmethod
    def _a_share_of_requests(cls, value: float) -> float:
        if value > 1:
            raise ValueError(f"{value * 100:g}% is above 100%: it is a share of requests "
                             "(0% to 100%)")
        return value

    @field_validator("deadline_header", "request_id_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid header name")
        return value.lower()

    @model_validator(mode="after")
    def _distinct_headers(self) -> ServerPolicy:
        if self.deadline_header == self.request_id_header:
            raise ValueError(f"deadline_header and request_id_header are both "
                             f"{self.deadline_header!r}: one header cannot carry both")
        return self

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, list):
            for item in value:
                if not isinstance(item, str):  # ip_network(167772160) is 10.0.0.0/32
                    raise ValueError(f"{item!r} is not a CIDR network written as text")
            return tuple(ip_network(item, strict=False) for item in value)
        return value

    @field_validator("admin_bind")
    @classmethod
    def _bind(cls, value: str) -> str:
        try:
            host, port = split_bind(value)
        except ValueError as error:
            raise ValueError(f"{value!r} is not host:port: {error}") from None
        if not host or port is None:
            raise ValueError(f"{value!r} is not host:port ({BIND_EXAMPLE})")
        if port == 0:
            # An ephemeral port no probe or scraper could be told of (the command line's
            # --admin-bind may take one: a test, a demo, which print it).
            raise ValueError(f"{value!r}: port 0 picks a port no probe could find; name "
                             f"one ({BIND_EXAMPLE})")
        return value


# --------------------------------------------------------------------------- calls


RetryCondition = Literal["connect", "reset", "timeout"] | Annotated[int, Field(ge=500, le=599)]


class RetryPolicy(_Model):
    """Retries of one call; bounded by attempts, the request deadline and the budget."""

    attempts: int = Field(1, ge=1, le=10, description="Tries in all, the first included.")
    on: tuple[RetryCondition, ...] = Field(
        ("connect", "reset", 502, 503, 504),
        description="What may be retried: connect, reset, timeout, or 5xx statuses.")
    per_try_timeout: PositiveDuration | None = Field(
        None, description="Bound of each try until its answer starts; a body then streams "
        "within the call's deadline. A request body streamed from the client (never "
        "replayed) is sent first: the bound starts once it is sent whole.")
    backoff: DurationRange = Field(
        DurationSpan(0.02, 0.2), description="Exponential backoff with full jitter.")
    budget: Percent = Field(0.2, description="Retries on top of first tries, per upstream.")
    min_per_second: float = Field(10.0, ge=0, description="Retries always allowed per second.")
    non_idempotent: bool = Field(False, description="Also retry POST and PATCH.")


class CallSettings(_Model):
    """Settings every call resolves: defaults → upstream → route → call."""

    timeout: PositiveDuration | None = Field(
        None, description="Bound of the whole call, retries included.")
    retries: RetryPolicy | None = None
    hedge_after: PositiveDuration | None = Field(
        None, description="Start another try if none answered.")
    max_hedges: int = Field(1, ge=1, le=5, description="Extra concurrent tries at most.")


class DefaultsPolicy(_Model):
    deadline: PositiveDuration = Field(
        2.0, description="Request deadline when a route sets none.")
    call: CallSettings = CallSettings()


# --------------------------------------------------------------------------- upstreams


class AdaptiveLimitPolicy(_Model):
    """The upstream's slots follow its latency; ``concurrency`` is the most."""

    min_concurrency: int = Field(
        4, ge=1, description="Fewest slots; also the slots while the upstream's minimum "
        "latency is measured (at start, then every 60 s).")
    tolerance: Percent = Field(
        0.25, description="How far above the upstream's minimum latency calls may run "
        "before its slots fall.")


class LimitPolicy(_Model):
    """Concurrency limit with a bounded queue; a full queue or a long wait is shed (503)."""

    concurrency: int = Field(100, ge=1, description="Calls in flight to the upstream at most.")
    queue: int = Field(200, ge=0, description="Calls waiting for a slot at most.")
    queue_timeout: Duration = Field(0.05, description="Longest wait for a slot.")
    adaptive: AdaptiveLimitPolicy | None = Field(
        None, description="Let the calls in flight follow the upstream's latency, up to "
        "concurrency (Envoy's gradient controller).")


class PoolPolicy(_Model):
    max_connections: int = Field(100, ge=1, description="Open connections at most.")
    idle_timeout: PositiveDuration = Field(30.0, description="Idle connections older are closed.")
    connect_timeout: PositiveDuration = Field(1.0, description="Bound of opening a connection.")


class CircuitPolicy(_Model):
    """Closed → open on failures, open for ``open_for``, then half-open with probes."""

    failure_ratio: PositiveShare = Field(0.5, description="Failures over the window that open it.")
    window: PositiveDuration = Field(10.0, description="Sliding window of outcomes.")
    min_requests: int = Field(20, ge=1, description="Outcomes needed before the ratio counts.")
    consecutive_failures: int | None = Field(None, ge=1, description="Open after N in a row.")
    open_for: PositiveDuration = Field(5.0, description="Time refused before probing.")
    half_open_probes: int = Field(3, ge=1, description="Probe calls allowed when half-open.")

    @field_validator("failure_ratio")
    @classmethod
    def _a_share(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"{value * 100:g}% must be above 0% and at most 100%")
        return value


class PostgresPoolPolicy(_Model):
    min: int = Field(2, ge=0)
    max: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _order(self) -> PostgresPoolPolicy:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self


class PostgresPolicy(_Model):
    dsn_env: str = Field(description="Environment variable holding the DSN (never inline).")
    pool: PostgresPoolPolicy = PostgresPoolPolicy()
    statement_cache_size: int = Field(100, ge=0)
    client_check_interval: Duration = Field(
        1.0, ge=0, description="How often a backend running a query checks that the "
        "gateway's end is still there, and stops the query if not (PostgreSQL 14+; 0 off).")


class TlsPolicy(_Model):
    """TLS to an ``https://`` upstream; the server's certificate is always verified."""

    ca_file: str | None = Field(None, description="PEM file of the CAs to trust instead of "
                                "the system's (an absolute path); an intermediate CA alone "
                                "is enough.")
    server_name: str | None = Field(None, description="Name sent as SNI and checked in the "
                                    "server's certificate; the URL's host by default. The "
                                    "Host header stays the URL's.")
    cert_file: str | None = Field(None, description="PEM client certificate (chain) for "
                                  "upstreams that ask for one (mutual TLS).")
    key_file: str | None = Field(None, description="PEM private key of cert_file, unless "
                                 "cert_file holds it.")

    @model_validator(mode="after")
    def _usable(self) -> TlsPolicy:
        for field in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, field)
            if path is not None and not os.path.isabs(path):
                raise ValueError(f"{field} {path!r}: give an absolute path")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        if self.server_name is not None and not re.fullmatch(r"[A-Za-z0-9._-]+",
                                                              self.server_name):
            raise ValueError(f"server_name {self.server_name!r} is not an ASCII host name")
        # Built (its files read) here, so that a policy that passes ``check`` also starts.
        client_context(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)
        return self


class UpstreamPolicy(_Model):
    """An HTTP upstream (``url``) or a PostgreSQL one (``postgres``)."""

    url: str | None = Field(None, description="http://host:port[/prefix] or https://…")
    tls: TlsPolicy | None = None
    postgres: PostgresPolicy | None = None
    pool: PoolPolicy = PoolPolicy()
    limit: LimitPolicy = LimitPolicy()
    circuit: CircuitPolicy | None = None
    call: CallSettings | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not re.fullmatch(r"https?://[^/\s:@?#]+(:\d{1,5})?(/[^\s?#]*)?", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL with "
                             "host[:port][/prefix]")
        prefix = urlsplit(value).path
        if unsendable := _unsendable(prefix):
            raise ValueError(f"{value!r}: the path prefix holds {unsendable!r}, which a "
                             "request target cannot carry; percent-encode it")
        # What the upstream pool will parse, checked here so a policy that passes
        # ``check`` also starts (and reloads).
        parts = urlsplit(value)
        if not parts.hostname or not re.fullmatch(r"[A-Za-z0-9._-]+", parts.hostname):
            raise ValueError(f"{value!r}: the host must be an ASCII name or an IPv4 address")
        try:
            port = parts.port
        except ValueError as error:
            raise ValueError(f"{value!r} is not a usable upstream URL: {error}") from None
        if port == 0:
            raise ValueError(f"{value!r}: port 0 cannot be connected to")
        return value.rstrip("/")

    @field_validator("tls")
    @classmethod
    def _tls_for_https(cls, value: TlsPolicy | None, info: ValidationInfo) -> TlsPolicy | None:
        url = info.data.get("url")
        if value is not None and not (url or "").startswith("https://"):
            raise ValueError("'tls' is for an https:// url")
        return value

    @model_validator(mode="after")
    def _kind(self) -> UpstreamPolicy:
        if (self.url is None) == (self.postgres is None):
            raise ValueError("give exactly one of 'url' or 'postgres'")
        return self

    @property
    def kind(self) -> Literal["http", "postgres"]:
        return "http" if self.url is not None else "postgres"


# --------------------------------------------------------------------------- routes


class ProxyAction(_Model):
    """Stream the request to one upstream and its answer back."""

    upstream: str
    path: str = Field(description="Upstream path template; {params} come from the route.")
    timeout: PositiveDuration | None = None
    retries: RetryPolicy | None = None
    hedge_after: PositiveDuration | None = None
    max_hedges: int | None = Field(None, ge=1, le=5)


ArgSource = Annotated[str, Field(pattern=r"^(path|query|body)\.[A-Za-z_][A-Za-z0-9_]*"
                                  r"(:(int|text|uuid|bool))?$")]


class FanoutCall(_Model):
    """One named call of a fan-out: HTTP (``path``) or SQL (``query``)."""

    upstream: str
    path: str | None = Field(None, description="Upstream path (and query) template.")
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    query: str | None = Field(None, description="SQL with $1..$n bound parameters.")
    args: tuple[ArgSource, ...] = Field(
        (), description="Where $n comes from: path.NAME, query.NAME, body.NAME[:type].")
    one: bool = Field(False, description="SQL: answer the one row (404 when none, 502 when "
                      "several) instead of rows.")
    timeout: PositiveDuration | None = None
    retries: RetryPolicy | None = None
    hedge_after: PositiveDuration | None = None
    max_hedges: int | None = Field(None, ge=1, le=5)

    @model_validator(mode="after")
    def _kind(self) -> FanoutCall:
        if (self.path is None) == (self.query is None):
            raise ValueError("give exactly one of 'path' (HTTP) or 'query' (SQL)")
        if self.query is None and self.args:
            raise ValueError("'args' belong to SQL calls ('query')")
        return self


_SQL_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.S)
_SQL_READS = re.compile(r"^\s*\(*\s*(select|values|table|with|show)\b", re.I)
_SQL_WRITES = re.compile(
    r"\b(insert|update|delete|merge|copy|call|do|lock|create|alter|drop|truncate|grant|"
    r"revoke|refresh|vacuum|nextval|setval|for\s+(no\s+key\s+)?update|for\s+(key\s+)?share)"
    r"\b", re.I)


#: A statement that returns rows although it may write: a ``RETURNING`` clause, or a
#: read (``SELECT`` or ``WITH``) that calls or locks something.
_SQL_RETURNS_ROWS = re.compile(r"\breturning\b|^\s*\(*\s*(select|with|values|table)\b",
                               re.IGNORECASE)


@functools.lru_cache(maxsize=1024)
def sql_reads_only(query: str) -> bool:
    """Whether a statement only reads, as far as its text tells: it starts as a read and
    names no writing or locking keyword. Only such calls are retried after a timeout
    and hedged; a statement that may write runs once (like a POST). A read that calls a
    function with side effects cannot be told from its text: the read-only session it
    runs in refuses the write (``StatementWrites``)."""
    text = _SQL_COMMENT.sub(" ", query)
    return bool(_SQL_READS.match(text)) and not _SQL_WRITES.search(text)


class Quorum(_Model):
    quorum: int = Field(ge=1)


class FanoutAction(_Model):
    """Named calls run concurrently in one nursery."""

    mode: Literal["all", "first"] | Quorum = Field(
        "all", description="all | first | {quorum: N}")
    on_failure: Literal["fail_fast", "partial"] = "fail_fast"
    calls: dict[str, FanoutCall] = Field(min_length=1)

    @model_validator(mode="after")
    def _quorum(self) -> FanoutAction:
        if isinstance(self.mode, Quorum) and self.mode.quorum > len(self.calls):
            raise ValueError(
                f"quorum {self.mode.quorum} is above the number of calls ({len(self.calls)})")
        if self.on_failure == "partial" and "errors" in self.calls:
            raise ValueError("a call named 'errors' would be hidden by the 'errors' map of "
                             "on_failure: partial; rename it")
        return self


class SqlAction(FanoutCall):
    """A route answered by one SQL call."""

    @model_validator(mode="after")
    def _sql_only(self) -> SqlAction:
        if self.query is None:
            raise ValueError("an sql route runs a 'query'; an HTTP call ('path') is a "
                             "proxy route, or a fanout call")
        return self


class Route(_Model):
    path: str = Field(description="Path template, e.g. /api/users/{id} or /static/{rest*}.")
    methods: tuple[str, ...] | None = Field(
        None, description="Default: all for proxy routes, GET and HEAD for the others.")
    deadline: PositiveDuration | None = Field(
        None, description="Request deadline (a client may shorten).")
    max_body: ByteSize | None = Field(None, description="Body cap (413); default server.limits.")
    max_response_body: ByteSize | None = Field(None, description="Upstream body cap (502).")
    proxy: ProxyAction | None = None
    fanout: FanoutAction | None = None
    sql: SqlAction | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} must start with '/'")
        names = template_params(value)
        if len(names) != len(set(names)):
            raise ValueError(f"{value!r} repeats a parameter")
        stripped = _PARAM_RE.sub("", value)
        if "{" in stripped or "}" in stripped:
            raise ValueError(f"{value!r} has a malformed {{param}}")
        for match in _PARAM_RE.finditer(value):
            start, end = match.span()
            if value[start - 1] != "/" or (end < len(value) and value[end] != "/"):
                raise ValueError(f"{value!r}: {match[0]} must be a whole path segment")
        tails = [m for m in _PARAM_RE.finditer(value) if m.group(2)]
        if tails and (len(tails) > 1 or tails[0].end() != len(value)):
            raise ValueError(f"{value!r}: a {{name*}} parameter may only end the path")
        # Request paths are normalised before routing ("//" collapsed, dot segments
        # resolved): a route with such a segment would never be matched.
        segments = value[1:].split("/")
        if "" in segments[:-1]:
            raise ValueError(f"{value!r} has an empty segment ('//'), which no request "
                             "path keeps")
        if any(unquote(segment) in (".", "..") for segment in segments):
            raise ValueError(f"{value!r} has a '.' or '..' segment, which requests resolve "
                             "before routing")
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("no method: the route could never answer (omit 'methods' "
                             "for the default)")
        upper = tuple(m.upper() for m in value)
        for method in upper:
            if method not in (*ALL_METHODS, "TRACE"):
                raise ValueError(f"{method!r} is not an HTTP method")
        return upper

    @model_validator(mode="after")
    def _one_action(self) -> Route:
        actions = [a for a in (self.proxy, self.fanout, self.sql) if a is not None]
        if len(actions) != 1:
            raise ValueError("give exactly one of 'proxy', 'fanout' or 'sql'")
        return self

    @property
    def allowed_methods(self) -> tuple[str, ...]:
        if self.methods is not None:
            return self.methods
        return ALL_METHODS if self.proxy is not None else ("GET", "HEAD")


class Policy(_Model):
    """The whole policy file."""

    version: Literal[1] = Field(description="Format version; 1 is the only one.")
    server: ServerPolicy = ServerPolicy()
    defaults: DefaultsPolicy = DefaultsPolicy()
    upstreams: dict[str, UpstreamPolicy] = Field(default_factory=dict)
    routes: tuple[Route, ...] = Field(min_length=1)


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Problem:
    """A finding about a policy: where (the field's path), what, and how serious."""

    path: PolicyPath
    message: str
    severity: Literal["error", "warning"] = "error"


def _calls(route: Route) -> Iterator[tuple[PolicyPath, FanoutCall | ProxyAction]]:
    if route.proxy is not None:
        yield ("proxy",), route.proxy
    if route.sql is not None:
        yield ("sql",), route.sql
    if route.fanout is not None:
        for name, call in route.fanout.calls.items():
            yield ("fanout", "calls", name), call


def cross_check(policy: Policy) -> list[Problem]:
    """Checks that span the file: references, parameters, deadlines against timeouts."""
    problems: list[Problem] = []
    for index, route in enumerate(policy.routes):
        base: PolicyPath = ("routes", index)
        route_params = set(template_params(route.path))
        deadline = route.deadline or policy.defaults.deadline
        for call_path, call in _calls(route):
            where = base + call_path
            upstream = policy.upstreams.get(call.upstream)
            if upstream is None:
                known = ", ".join(sorted(policy.upstreams)) or "none defined"
                problems.append(Problem((*where, "upstream"),
                                        f"unknown upstream {call.upstream!r} (known: {known})"))
                continue
            is_sql = isinstance(call, FanoutCall) and call.query is not None
            if is_sql and upstream.kind != "postgres":
                problems.append(Problem((*where, "upstream"),
                                        f"SQL call names {call.upstream!r}, "
                                        "which is not a postgres upstream"))
            if not is_sql and upstream.kind != "http":
                problems.append(Problem((*where, "upstream"),
                                        f"HTTP call names {call.upstream!r}, "
                                        "which is a postgres upstream (use 'query')"))
            if call.path is not None:
                problems.extend(_template_problems((*where, "path"), call.path, route))
            if isinstance(call, FanoutCall):
                for arg_index, arg in enumerate(call.args):
                    source, _, rest = arg.partition(".")
                    name = rest.partition(":")[0]
                    if source == "path" and name not in route_params:
                        problems.append(Problem(
                            (*where, "args", arg_index),
                            f"path.{name} is not a parameter of the route path {route.path!r}"))
                if call.query is not None and call.hedge_after is not None \
                        and not sql_reads_only(call.query):
                    problems.append(Problem(
                        (*where, "hedge_after"),
                        "ignored: the statement may write, and only statements that only "
                        "read are hedged (a write would run twice)", severity="warning"))
                if (call.query is not None and call.one and not sql_reads_only(call.query)
                        and not _SQL_RETURNS_ROWS.search(_SQL_COMMENT.sub(" ", call.query))):
                    problems.append(Problem(
                        (*where, "one"),
                        "the statement writes and returns no row (no RETURNING): with "
                        "one: true a call that changes rows is rolled back and answered "
                        "502, one that changes none 404",
                        severity="warning"))
                if call.query is not None:
                    used = {int(n) for n in re.findall(r"\$(\d+)", call.query)}
                    if used and max(used) > len(call.args):
                        problems.append(Problem(
                            (*where, "args"),
                            f"the query uses ${max(used)} but only {len(call.args)} "
                            "args are given"))
            problems.extend(_budget_problems(policy, where, call))
            if call.timeout is not None and call.timeout > deadline:
                problems.append(Problem(
                    (*where, "timeout"),
                    f"timeout {call.timeout:g}s exceeds the route deadline {deadline:g}s "
                    "and will never fire", severity="warning"))
    problems.extend(_inherited_timeouts_never_firing(policy))
    problems.extend(_shadowed_routes(policy))
    problems.extend(_unread_body_problems(policy))
    for name, upstream in policy.upstreams.items():
        if ("concurrency" in upstream.limit.model_fields_set
                and upstream_slots(upstream) < upstream.limit.concurrency):
            bound = ("postgres.pool.max" if upstream.postgres is not None
                     else "pool.max_connections")
            problems.append(Problem(
                ("upstreams", name, "limit", "concurrency"),
                f"{upstream.limit.concurrency} calls at once, but {bound} lets "
                f"{upstream_slots(upstream)}: the slots are {upstream_slots(upstream)} "
                "(raise the pool, or lower concurrency)", severity="warning"))
        if upstream.postgres is not None and "://" in upstream.postgres.dsn_env:
            problems.append(Problem(("upstreams", name, "postgres", "dsn_env"),
                                    "put the DSN in an environment variable and name the "
                                    "variable here; secrets never go inline"))
    return problems


def routes_binding_path_values(policy: Policy) -> frozenset[str]:
    """Routes (by path template) that bind a path parameter as a SQL argument: the value
    is data (an invite token, say), and SQL argument values never enter a trace."""
    found: set[str] = set()
    for route in policy.routes:
        for _, call in _calls(route):
            if isinstance(call, FanoutCall) and call.query is not None and any(
                    arg.startswith("path.") for arg in call.args):
                found.add(route.path)
    return frozenset(found)


def upstream_slots(upstream: UpstreamPolicy) -> int:
    """Calls in flight to an upstream at most: ``limit.concurrency``, but never more than
    its pool's connections can carry at once. A call beyond them would wait in the pool,
    unbounded and never shed, instead of in the limit's queue."""
    connections = (upstream.postgres.pool.max if upstream.postgres is not None
                   else upstream.pool.max_connections)
    return min(upstream.limit.concurrency, connections)


def upstream_sockets(policy: Policy) -> int:
    """The most sockets the policy's upstream pools may hold open at once."""
    return sum(upstream.postgres.pool.max if upstream.postgres is not None
               else upstream.pool.max_connections for upstream in policy.upstreams.values())


#: The PostgreSQL session's ``statement_timeout`` at least (the server's backstop for a
#: statement whose gateway can no longer cancel it), and its margin over a deadline.
MIN_STATEMENT_TIMEOUT_S = 30.0
STATEMENT_TIMEOUT_MARGIN_S = 5.0


def statement_timeout(policy: Policy, upstream_name: str) -> float:
    """The session ``statement_timeout`` of a PostgreSQL upstream: past the longest
    deadline of the routes that call it, so that the backstop never cuts a statement the
    policy allows to run (a 45 s report route was cut at 30 s)."""
    longest = 0.0
    for route in policy.routes:
        if any(call.upstream == upstream_name for _, call in _calls(route)):
            longest = max(longest, route.deadline or policy.defaults.deadline)
    return max(MIN_STATEMENT_TIMEOUT_S, longest + STATEMENT_TIMEOUT_MARGIN_S)


def upstream_retry_policy(policy: Policy, upstream: UpstreamPolicy) -> RetryPolicy:
    """The retry budget of an upstream comes from its own call settings, else the defaults:
    it is shared by every call to the upstream."""
    if upstream.call is not None and upstream.call.retries is not None:
        return upstream.call.retries
    return policy.defaults.call.retries or RetryPolicy()


def _inherited_timeouts_never_firing(policy: Policy) -> list[Problem]:
    """A ``defaults.call`` or upstream ``call`` timeout longer than the deadline of every
    route whose calls take it: the deadline always fires first, so the timeout never
    does, and the operator meant something by it. One that some route's longer deadline
    leaves room for is a cap for that route, and the shorter deadlines of the others
    simply come first (no warning: that is what a default is for)."""
    # The timeout's path → its value and the (deadline, route index) of its users.
    users: dict[PolicyPath, tuple[float, list[tuple[float, int]]]] = {}
    for index, route in enumerate(policy.routes):
        deadline = route.deadline or policy.defaults.deadline
        for _, call in _calls(route):
            upstream = policy.upstreams.get(call.upstream)
            if call.timeout is not None or upstream is None:
                continue  # its own timeout is checked against the deadline per call
            if upstream.call is not None and upstream.call.timeout is not None:
                where: PolicyPath = ("upstreams", call.upstream, "call", "timeout")
                timeout = upstream.call.timeout
            elif policy.defaults.call.timeout is not None:
                where, timeout = ("defaults", "call", "timeout"), policy.defaults.call.timeout
            else:
                continue
            users.setdefault(where, (timeout, []))[1].append((deadline, index))
    problems: list[Problem] = []
    for where, (timeout, deadlines) in users.items():
        longest, index = max(deadlines, key=lambda item: (item[0], -item[1]))
        if timeout > longest:
            named = f"routes[{index}] {policy.routes[index].path!r}"
            whose = (f"{longest:g}s of {named}, the one route that takes it,"
                     if len(deadlines) == 1 else
                     f"of every route that takes it (the longest: {longest:g}s of {named})")
            problems.append(Problem(where, f"timeout {timeout:g}s exceeds the deadline "
                                    f"{whose} and will never fire", severity="warning"))
    return problems


def _unread_body_problems(policy: Policy) -> list[Problem]:
    """``discard_body`` above ``lingering_bytes``: an answer would promise to keep a
    connection whose rest is cut (and the connection reset) at ``lingering_bytes``."""
    limits = policy.server.limits
    if limits.discard_body <= limits.lingering_bytes:
        return []
    field = ("discard_body" if "discard_body" in limits.model_fields_set
             else "lingering_bytes")
    return [Problem(("server", "limits", field),
                    f"discard_body ({limits.discard_body} bytes) is above lingering_bytes "
                    f"({limits.lingering_bytes} bytes): a connection kept for a rest that "
                    "large would be closed before its rest was read; lower discard_body "
                    "or raise lingering_bytes")]


def _budget_problems(policy: Policy, where: PolicyPath,
                     call: FanoutCall | ProxyAction) -> list[Problem]:
    """A route or call that sets its own retry budget: it would be silently ignored."""
    if call.retries is None:
        return []
    upstream = policy.upstreams[call.upstream]
    budget = upstream_retry_policy(policy, upstream)
    source = (f"upstreams.{call.upstream}.call.retries"
              if upstream.call is not None and upstream.call.retries is not None
              else "defaults.call.retries")
    shown = {"budget": f"{budget.budget:.0%}", "min_per_second": f"{budget.min_per_second:g}"}
    return [Problem((*where, "retries", field),
                    f"ignored: the retry budget is the upstream's, shared by every call to "
                    f"it; this call's retries draw on {field} {shown[field]} of {source}",
                    severity="warning")
            for field in ("budget", "min_per_second")
            if field in call.retries.model_fields_set
            and getattr(call.retries, field) != getattr(budget, field)]


#: What a request target may carry literally (RFC 3986 pchar, '/', '?' and '%XX').
_TARGET_CHARS = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")


def _unsendable(text: str) -> str | None:
    """The first character of ``text`` an HTTP/1.1 request target cannot carry."""
    match = _TARGET_CHARS.match(text)
    end = match.end() if match else 0
    return None if end == len(text) else text[end]


def _template_problems(where: PolicyPath, template: str, route: Route) -> list[Problem]:
    """An upstream path template: well formed, naming only the route's parameters, and
    ``{name*}`` (slashes kept) only for the route's own ``{name*}``."""
    problems: list[Problem] = []
    path = template.partition("?")[0]
    if not path.startswith("/"):
        problems.append(Problem(where, f"{template!r} must start with '/'"))
    stripped = _PARAM_RE.sub("", template)
    if "{" in stripped or "}" in stripped:
        problems.append(Problem(where, f"{template!r} has a malformed {{param}}"))
    elif unsendable := _unsendable(stripped):
        problems.append(Problem(where, f"{template!r} holds {unsendable!r}, which a request "
                                "target cannot carry; percent-encode it"))
    route_tails = {name for name, star in _PARAM_RE.findall(route.path) if star}
    route_params = set(template_params(route.path))
    for name, star in _PARAM_RE.findall(template):
        if name not in route_params:
            problems.append(Problem(
                where, f"{{{name}}} is not a parameter of the route path {route.path!r}"))
        elif star and name not in route_tails:
            problems.append(Problem(
                where, f"{{{name}*}} keeps slashes, but the route's {{{name}}} is one segment "
                "(an encoded %2F in it would become a real '/')"))
    return problems


class _Shapes:
    """The route templates seen so far, as a tree of their segments: literals (decoded,
    as routing compares them), ``{param}`` and ``{name*}``. Looking up the routes that
    match every path a template matches walks one branch per kind of segment, not every
    earlier route (a file of 7,000 routes was compared pair by pair, for seconds)."""

    __slots__ = ("ends", "literals", "param", "tails")

    def __init__(self) -> None:
        self.literals: dict[str, _Shapes] = {}
        self.param: _Shapes | None = None
        #: Methods → the first route whose template ends here (one per method set).
        self.ends: dict[frozenset[str], int] = {}
        #: Methods → the first route whose ``{name*}`` stands here.
        self.tails: dict[frozenset[str], int] = {}

    def add(self, parts: list[tuple[str, str]], methods: frozenset[str], index: int) -> None:
        node = self
        for kind, text in parts:
            if kind == "tail":
                node.tails.setdefault(methods, index)
                return
            if kind == "param":
                node.param = node.param or _Shapes()
                node = node.param
            else:
                node = node.literals.setdefault(text, _Shapes())
        node.ends.setdefault(methods, index)

    def first_covering(self, parts: list[tuple[str, str]],
                       methods: frozenset[str]) -> int | None:
        """The first route that matches every path ``parts`` does, for all ``methods``."""
        found: int | None = None

        def earliest(table: dict[frozenset[str], int]) -> None:
            nonlocal found
            for taken, index in table.items():
                if methods <= taken and (found is None or index < found):
                    found = index

        pending: list[tuple[_Shapes, int]] = [(self, 0)]
        while pending:
            node, position = pending.pop()
            if position == len(parts):
                earliest(node.ends)
                continue
            earliest(node.tails)  # a tail takes whatever follows, "" after a final "/"
            kind, text = parts[position]
            if kind == "tail":
                continue  # only a tail matches every path a tail does
            if kind == "literal" and (child := node.literals.get(text)) is not None:
                pending.append((child, position + 1))
            if node.param is not None and not (kind == "literal" and text == ""):
                pending.append((node.param, position + 1))  # never an empty segment
        return found


def _shape(path: str) -> list[tuple[str, str]]:
    """A route template's segments: ("literal", decoded text), ("param", "") or
    ("tail", "")."""
    parts: list[tuple[str, str]] = []
    for piece in path[1:].split("/"):
        match = _PARAM_RE.fullmatch(piece)
        if match is None:
            parts.append(("literal", unquote(piece)))
        else:
            parts.append(("tail" if match[2] else "param", ""))
    return parts


def _shadowed_routes(policy: Policy) -> list[Problem]:
    """Routes an earlier route always answers first (same shape, literal for literal,
    every method taken): a warning, as the file still means something."""
    problems: list[Problem] = []
    shapes = _Shapes()
    for index, route in enumerate(policy.routes):
        parts = _shape(route.path)
        methods = frozenset(route.allowed_methods)
        if "GET" in methods:
            methods |= {"HEAD"}  # the router answers HEAD wherever GET is allowed
        earlier = shapes.first_covering(parts, methods)
        if earlier is not None:
            problems.append(Problem(
                ("routes", index, "path"),
                f"never reached: routes[{earlier}] ({policy.routes[earlier].path!r}) "
                "matches every request it would", severity="warning"))
        shapes.add(parts, methods, index)
    return problems


# --------------------------------------------------------------------------- resolution


def resolve_call_settings(
    policy: Policy, call: ProxyAction | FanoutCall
) -> CallSettings:
    """The call's settings, resolved defaults → upstream → call; most specific wins.

    A nested ``retries`` block replaces the less specific one whole: an operator reads
    one block to know what a call does.
    """
    layers: list[Any] = [policy.defaults.call]
    upstream = policy.upstreams.get(call.upstream)
    if upstream is not None and upstream.call is not None:
        layers.append(upstream.call)
    layers.append(call)
    resolved: dict[str, Any] = {}
    for field in CallSettings.model_fields:
        for layer in layers:
            value = getattr(layer, field, None)
            if value is not None:
                resolved[field] = value
    return CallSettings.model_construct(**{**CallSettings().__dict__, **resolved})
