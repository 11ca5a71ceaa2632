"""Values PostgreSQL returns, as an SQL route answers them (real PostgreSQL)."""


from tests.gateway_harness import run_gateway, trace_of

POLICY = """
version: 1
upstreams:
  db:
    postgres: {dsn_env: GATEWAY_TEST_DSN, pool: {min: 1, max: 2}}
    call: {retries: {attempts: 3, on: [connect, reset], backoff: 1ms..2ms, budget: 100%}}
routes:
  - path: /valid-to
    sql: {upstream: db, query: "SELECT '9999-12-31'::date AS valid_to", one: true}
  - path: /far
    sql: {upstream: db, query: "SELECT '10000-01-01'::timestamp AS at", one: true}
  - path: /bc
    sql: {upstream: db, query: "SELECT '0044-03-15 BC'::date AS at", one: true}
  - path: /ratio
    sql: {upstream: db, query: "SELECT 0.1::real AS r, 1.1::real AS s", one: true}
  - path: /year
    sql:
      upstream: db
      query: >-
        SELECT '1 year'::interval AS span,
        extract(epoch FROM '1 year'::interval)::float8 AS pg
      one: true
"""


async def test_a_date_of_9999_12_31_is_answered_as_that_date_not_infinity(database):
    """'9999-12-31' is the usual "valid until further notice" sentinel; the client is
    told "infinity", a value PostgreSQL also has and that means something else (and
    that ``'infinity'::date`` is answered with too, so the two cannot be told apart)."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        response = await client.get("/valid-to")
        assert response.status_code == 200
        assert response.json() == {"valid_to": "9999-12-31"}


async def test_a_timestamp_past_year_9999_is_a_query_error_not_a_retried_reset(database):
    """PostgreSQL holds timestamps up to year 294276. One past 9999 is answered 502
    ``upstream_error`` naming an ``OverflowError``, and it is treated as a connection
    reset: retried (``on: [reset]``) and so run three times, where a BC date (the same
    kind of value Python cannot hold) is a single ``upstream_query``, as README says of
    a result the answer cannot carry."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        bc = await client.get("/bc")
        assert (bc.status_code, bc.json()["cause"]) == (502, "upstream_query")
        far = await client.get("/far")
        attempts = [s for s in (await trace_of(gw, far.headers["x-request-id"])).root.walk()
                    if s.kind == "attempt"]
        assert len(attempts) == 1, [a.name for a in attempts]
        assert (far.status_code, far.json()["cause"]) == (502, "upstream_query"), far.text


async def test_a_real_column_keeps_the_digits_postgresql_prints(database):
    """``SELECT 0.1::real`` prints 0.1 in psql (and in PostgREST); the gateway answers
    0.10000000149011612: the float4 is widened to a double digit by digit."""
    async with run_gateway(POLICY) as gw, gw.client() as client:
        response = await client.get("/ratio")
        assert response.json() == {"r": 0.1, "s": 1.1}, response.text
