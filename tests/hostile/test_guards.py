"""``check_request_head`` on its own: each rule, its status, and what passes."""

import pytest

from gateway._errors import BadRequest, HeadersTooLarge, UriTooLong
from gateway._guards import HEADER_LINE_OVERHEAD, BodyFraming, check_request_head
from gateway._policy import LimitsPolicy

LIMITS = LimitsPolicy(max_header_count=10, max_header_bytes=1024, max_uri_bytes=100)


def scope(headers=(), *, raw_path=b"/api/x", query=b"", version="1.1"):
    return {"type": "http", "http_version": version, "method": "GET", "path": "/api/x",
            "raw_path": raw_path, "query_string": query, "headers": list(headers)}


def test_an_ordinary_head_passes():
    check_request_head(scope([(b"host", b"a"), (b"user-agent", b"x/1.0\tbeta"),
                              (b"content-length", b"5"), (b"x-obs-text", b"caf\xe9")]),
                       LIMITS)
    check_request_head(scope([(b"transfer-encoding", b"chunked")]), LIMITS)


@pytest.mark.parametrize(("headers", "framing"), [
    ([(b"host", b"a")], BodyFraming(False, None)),
    ([(b"content-length", b"0")], BodyFraming(False, 0)),
    ([(b"content-length", b"5")], BodyFraming(True, 5)),
    ([(b"transfer-encoding", b"chunked")], BodyFraming(True, None)),
])
def test_a_passing_head_says_how_its_body_is_framed(headers, framing):
    assert check_request_head(scope(headers), LIMITS) == framing


def test_header_count_over_the_limit_is_431():
    check_request_head(scope([(b"x-n", b"1")] * 10), LIMITS)
    with pytest.raises(HeadersTooLarge) as caught:
        check_request_head(scope([(b"x-n", b"1")] * 11), LIMITS)
    assert caught.value.status == 431


def test_header_bytes_over_the_limit_is_431():
    name = b"x-big"
    exact = 1024 - len(name) - HEADER_LINE_OVERHEAD
    check_request_head(scope([(name, b"v" * exact)]), LIMITS)
    with pytest.raises(HeadersTooLarge):
        check_request_head(scope([(name, b"v" * (exact + 1))]), LIMITS)


def test_uri_over_the_limit_is_414():
    check_request_head(scope(raw_path=b"/" + b"a" * 99), LIMITS)
    with pytest.raises(UriTooLong) as caught:
        check_request_head(scope(raw_path=b"/" + b"a" * 100), LIMITS)
    assert caught.value.status == 414
    # The query string counts too ("?" included).
    with pytest.raises(UriTooLong):
        check_request_head(scope(raw_path=b"/a", query=b"q" * 98), LIMITS)


@pytest.mark.parametrize("value", [b"a\rb", b"a\nb", b"a\x00b", b"a\x01b", b"a\x1fb", b"a\x7f"])
def test_control_characters_in_values_are_400(value):
    with pytest.raises(BadRequest) as caught:
        check_request_head(scope([(b"x-a", value)]), LIMITS)
    assert type(caught.value) is BadRequest


@pytest.mark.parametrize("name", [b"x(a)", b"x a", b"", b"x:a", b"x\x00", b"caf\xe9"])
def test_header_names_must_be_tokens(name):
    with pytest.raises(BadRequest):
        check_request_head(scope([(name, b"1")]), LIMITS)


@pytest.mark.parametrize("headers", [
    [(b"content-length", b"5"), (b"content-length", b"5")],
    [(b"content-length", b"5"), (b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"chunked"), (b"content-length", b"0")],
])
def test_ambiguous_framing_is_400(headers):
    with pytest.raises(BadRequest) as caught:
        check_request_head(scope(headers), LIMITS)
    assert type(caught.value) is BadRequest


def test_transfer_encoding_in_http_1_0_is_400():
    check_request_head(scope([(b"content-length", b"5")], version="1.0"), LIMITS)
    with pytest.raises(BadRequest):
        check_request_head(scope([(b"transfer-encoding", b"chunked")], version="1.0"), LIMITS)
