import math

import pytest
import trio

from gateway._deadlines import (
    call_deadline,
    effective_deadline,
    parse_deadline_header,
    propagated_budget_ms,
)
from gateway._errors import BadRequest

H = b"x-request-timeout-ms"


def test_header_parsing():
    assert parse_deadline_header([], H) is None
    assert parse_deadline_header([(H, b"250")], H) == 0.25
    assert parse_deadline_header([(H, b"250"), (H, b"250")], H) == 0.25
    assert parse_deadline_header([(H, b"000000000250")], H) == 0.25  # zeros are no size
    with pytest.raises(BadRequest):
        parse_deadline_header([(H, b"9" * 5000)], H)  # past int()'s digit limit: a 400
    for bad in (b"-1", b"abc", b"1.5", b"", b"99999999999"):
        with pytest.raises(BadRequest):
            parse_deadline_header([(H, bad)], H)
    with pytest.raises(BadRequest):
        parse_deadline_header([(H, b"100"), (H, b"200")], H)
    # Repeated lines a proxy joined into one (RFC 9110 5.3) read as the lines did.
    assert parse_deadline_header([(H, b"100, 100")], H) == 0.1
    assert parse_deadline_header([(H, b"100,100"), (H, b"100")], H) == 0.1
    # Empty list elements are ignored (RFC 9110 5.6.1).
    assert parse_deadline_header([(H, b"100,")], H) == 0.1
    assert parse_deadline_header([(H, b", 100")], H) == 0.1
    with pytest.raises(BadRequest):
        parse_deadline_header([(H, b"100, 200")], H)
    with pytest.raises(BadRequest):
        parse_deadline_header([(H, b" , ")], H)


def test_client_may_shorten_never_extend():
    assert effective_deadline(10.0, 2.0, None).at == 12.0
    shorter = effective_deadline(10.0, 2.0, 0.5)
    assert (shorter.at, shorter.source) == (10.5, "header")
    longer = effective_deadline(10.0, 2.0, 30.0)
    assert (longer.at, longer.source) == (12.0, "policy")


def test_call_deadline_never_outlives_the_request():
    assert call_deadline(10.0, 12.0, None) == 12.0
    assert call_deadline(10.0, 12.0, 0.3) == 10.3
    assert call_deadline(10.0, 12.0, 5.0) == 12.0


def test_propagated_budget_subtracts_the_margin_and_floors():
    assert propagated_budget_ms(10.0, 10.3, 0.005) == 295
    assert propagated_budget_ms(10.0, 10.001, 0.005) == 0
    assert propagated_budget_ms(10.0, math.inf, 0.005) > 0


async def test_budget_shrinks_with_virtual_time(autojump_clock):
    start = trio.current_time()
    deadline = effective_deadline(start, 1.0, 0.4)
    await trio.sleep(0.1)
    assert propagated_budget_ms(trio.current_time(), deadline.at, 0.005) == 295
    assert deadline.remaining(trio.current_time()) == pytest.approx(0.3)
