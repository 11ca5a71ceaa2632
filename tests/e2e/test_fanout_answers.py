"""What a fan-out route answers when upstreams answer oddly, against real servers."""

import json

import pytest
import trio

from gateway._policy_loader import PolicyError, load_policy_text
from tests.gateway_harness import run_gateway, trace_of
from tests.upstream import start_upstream

POLICY = """
version: 1
upstreams:
  up: {{url: "{url}"}}
routes:
  - path: /partial
    fanout:
      on_failure: partial
      calls:
        zeta: {{upstream: up, path: /zeta}}
        deep: {{upstream: up, path: /deep}}
        nan: {{upstream: up, path: /nan}}
        alpha: {{upstream: up, path: /alpha}}
"""


async def answer(request, respond) -> None:
    if request.path == "/zeta":
        await trio.sleep(0.05)  # answers last, listed first
        await respond.json({"z": 1})
    elif request.path == "/deep":
        await respond.respond(200, b"[" * 50_000, [(b"content-type", b"application/json")])
    elif request.path == "/nan":
        await respond.respond(200, b'{"x": NaN}', [(b"content-type", b"application/json")])
    else:
        await respond.json({"a": 1})


async def test_odd_json_fails_only_its_call_and_the_answer_keeps_the_policy_order():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=answer)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/partial")
            assert response.status_code == 200, response.text
            body = json.loads(response.text)  # strict: NaN would not parse
            assert list(body) == ["zeta", "alpha", "errors"]
            assert body["zeta"] == {"z": 1} and body["alpha"] == {"a": 1}
            assert set(body["errors"]) == {"deep", "nan"}
            for name in ("deep", "nan"):
                assert body["errors"][name]["status"] == 502
                assert "invalid JSON" in body["errors"][name]["error"]
            # The gateway keeps serving.
            assert (await client.get("/partial")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_a_deadline_header_of_thousands_of_digits_is_a_400():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=answer)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/partial", headers={"x-request-timeout-ms": "9" * 5000})
            assert response.status_code == 400
            assert "at most" in response.json()["error"]
            assert upstream.requests == []
        nursery.cancel_scope.cancel()


async def test_a_call_is_not_sent_when_the_margin_leaves_it_no_budget():
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=answer)
        async with run_gateway(POLICY.format(url=upstream.url)) as gw, gw.client() as client:
            # 6 ms left, minus the 5 ms margin: 1 ms, below the 2 ms floor.
            response = await client.get("/partial", headers={"x-request-timeout-ms": "6"})
            assert response.status_code in (502, 504), response.text
            assert upstream.requests == []  # no upstream was told it had 0-1 ms
        nursery.cancel_scope.cancel()


def test_a_call_named_errors_is_refused_with_partial():
    text = POLICY.format(url="http://127.0.0.1:1").replace("alpha:", "errors:")
    with pytest.raises(PolicyError) as refused:
        load_policy_text(text, "policy.yaml")
    assert "policy.yaml" in str(refused.value) and "'errors'" in str(refused.value)


OVERFLOW = """
version: 1
upstreams:
  u:
    url: "{url}"
routes:
  - path: /f
    fanout:
      on_failure: partial
      calls:
        a: {{upstream: u, path: /big}}
        b: {{upstream: u, path: /users/1}}
"""


def strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


async def test_a_number_that_overflows_does_not_make_the_answer_invalid_json():
    async def behaviour(request, respond):
        if request.path == "/big":
            await respond.respond(200, b'{"score": 1e400}',
                                  headers=[(b"content-type", b"application/json")])
        else:
            await respond.fallback()

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=behaviour)
        async with run_gateway(OVERFLOW.format(url=upstream.url)) as gw, gw.client() as client:
            r = await client.get("/f")
            answer = strict(r.text)  # the gateway's answer must be valid JSON (RFC 8259)
            assert "a" in answer["errors"] and answer["b"]["id"] == "1"
        nursery.cancel_scope.cancel()


MISSING = """
version: 1
upstreams:
  u: {{url: "{url}"}}
routes:
  - path: /f/{{code}}
    fanout:
      calls:
        a: {{upstream: u, path: "/status/{{code}}"}}
        b: {{upstream: u, path: /users/1}}
"""


@pytest.mark.parametrize(("code", "status"), [(404, 404), (403, 403), (500, 502), (503, 503),
                                             (302, 502), (304, 502)])
async def test_a_fail_fast_fan_out_answers_a_call_s_4xx_as_it_came(code, status):
    # A lookup of a record that does not exist is a 404 to the client, not a 502 "bad
    # gateway", which would page whoever watches the gateway's 5xx. A redirect is not
    # the call's data (its body, if any, is not what was asked for): the call failed.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(MISSING.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get(f"/f/{code}")
            assert response.status_code == status, response.text
            body = response.json()
            assert (body["cause"], body["call"]) == ("upstream_status", "a")
        nursery.cancel_scope.cancel()


PARTIAL = """
version: 1
upstreams:
  u: {{url: "{url}"}}
routes:
  - path: /f
    deadline: 400ms
    fanout:
      on_failure: partial
      calls:
        user: {{upstream: u, path: /users/7}}
        history: {{upstream: u, path: /stall}}
"""


async def test_a_partial_fan_out_answers_what_arrived_when_a_call_runs_past_the_deadline():
    # The stalled call has no timeout of its own: it used to run into the request's
    # deadline, and the client got a 504 and lost the answer that had arrived.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(PARTIAL.format(url=upstream.url)) as gw, gw.client() as client:
            response = await client.get("/f")
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["user"] == {"id": "7", "name": "user-7"}
            assert (body["errors"]["history"]["cause"], body["errors"]["history"]["status"]) \
                == ("deadline", 504)
            trace = await trace_of(gw, response.headers["x-request-id"])
            assert trace.duration_ms < 400
            history = next(s for s in trace.root.walk() if s.label == "call history")
            assert (history.outcome, history.cause, history.fired_scope) == \
                ("cancelled", "deadline", "stage fanout")
        nursery.cancel_scope.cancel()


FIRST = """
version: 1
upstreams:
  u: {{url: "{url}"}}
routes:
  - path: /first/{{i}}
    deadline: 2s
    fanout:
      mode: first
      calls:
        a: {{upstream: u, path: "/a/{{i}}"}}
        b: {{upstream: u, path: "/b/{{i}}"}}
  - path: /quorum/{{i}}
    deadline: 2s
    fanout:
      mode: {{quorum: 2}}
      calls:
        a: {{upstream: u, path: "/a/{{i}}"}}
        b: {{upstream: u, path: "/b/{{i}}"}}
        c: {{upstream: u, path: "/c/{{i}}"}}
"""


async def test_mode_first_answers_one_call_even_when_two_answers_arrive_together():
    # policies/README.md, "Fan-out responses": mode first answers {"<its name>": <json>}
    # and cancels the others (quorum_reached); quorum N answers "the first N successes".
    # When the answers arrive in the same scheduler batch, every call that finished is
    # merged: {"a": ..., "b": ...} for `first`, three keys for a quorum of 2, and no span
    # is cancelled with quorum_reached.
    arrived: dict[str, list] = {}

    async def together(request, respond):
        key = request.path.rsplit("/", 1)[1]
        seen = arrived.setdefault(key, [0, trio.Event()])
        seen[0] += 1
        if seen[0] == (3 if key.startswith("q") else 2):
            seen[1].set()
        await seen[1].wait()
        await respond.json({"path": request.path})

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery, behaviour=together)
        async with run_gateway(FIRST.format(url=upstream.url)) as gw, gw.client() as client:
            with trio.fail_after(20):
                first = await client.get("/first/1")
                quorum = await client.get("/quorum/q1")
            assert first.status_code == 200 and quorum.status_code == 200
            trace = await trace_of(gw, first.headers["x-request-id"])
            assert len(first.json()) == 1, (first.json(), [
                (s.label, s.outcome, s.cause) for s in trace.root.walk()])
            assert len(quorum.json()) == 2, quorum.json()
        nursery.cancel_scope.cancel()


RETRY_AFTER = """
version: 1
upstreams:
  u: {{url: "{url}"}}
routes:
  - path: /f
    deadline: 2s
    fanout:
      calls:
        a:
          upstream: u
          path: "/status/503?retry_after=7"
          retries: {{attempts: 1}}
        b: {{upstream: u, path: "/users/1"}}
"""


async def test_a_fan_out_503_passed_on_keeps_the_upstream_s_retry_after():
    # policies/README.md, Retries block: "otherwise the upstream's answer, its Retry-After
    # with it, is the client's"; README: a fan-out call's 503 is answered as 503 "for the
    # client's own retry logic" (_errors.py). The proxy route keeps Retry-After (see
    # tests/e2e/test_resilience.py); the fan-out answers the 503 without it.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(RETRY_AFTER.format(url=upstream.url)) as gw, gw.client() as client:
            with trio.fail_after(10):
                response = await client.get("/f")
            assert response.status_code == 503, response.text
            assert response.json()["call"] == "a"
            assert response.headers.get("retry-after") == "7", dict(response.headers)
        nursery.cancel_scope.cancel()


PARTIAL_BUDGET = """
version: 1
upstreams:
  u: {{url: "{url}"}}
routes:
  - path: /p
    deadline: 400ms
    fanout:
      on_failure: partial
      calls:
        h: {{upstream: u, path: "/headers"}}
"""


async def test_a_partial_fan_out_announces_the_budget_it_will_actually_wait():
    # A partial fan-out cuts its calls a tenth of the budget before the deadline (here
    # 400 ms - 40 ms = 360 ms), but each call still announces the whole request deadline
    # upstream (x-request-timeout-ms: 394): an upstream that uses its announced budget
    # answers after the gateway stopped waiting, and its work is always lost. The header
    # must carry the time the gateway will wait (as Envoy's
    # x-envoy-expected-rq-timeout-ms carries the timeout Envoy applies); the call's
    # deadline (and its queue wait and budget floor) should be the stage's.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(PARTIAL_BUDGET.format(url=upstream.url)) as gw, \
                gw.client() as client:
            with trio.fail_after(10):
                response = await client.get("/p")
            assert response.status_code == 200, response.text
            sent = dict((k.lower(), v) for k, v in response.json()["h"]["headers"])
            announced = int(sent["x-request-timeout-ms"])
            assert announced <= 360 - 5, f"announced {announced} ms; the gateway waits 360 ms"
        nursery.cancel_scope.cancel()
