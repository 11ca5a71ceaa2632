"""Policy snapshots: a prepared policy changes nothing that serves until it is activated."""

from gateway._policy_loader import load_policy_text
from gateway._runtime import Runtime

POLICY = """
version: 1
upstreams:
  kept: {{url: "http://127.0.0.1:9", limit: {{concurrency: {kept}}}}}
  {extra}
routes:
  - path: /api/{{rest*}}
    proxy: {{upstream: kept, path: "/{{rest}}"}}
"""


def policy(kept: int, extra: str = "") -> str:
    return POLICY.format(kept=kept, extra=extra)


async def test_a_prepared_policy_changes_kept_upstreams_only_when_activated():
    runtime = Runtime(load_policy_text(policy(2), "<a>"))
    kept = runtime.snapshot.upstreams["kept"]
    new = runtime.prepare(load_policy_text(policy(5), "<b>"))
    assert new.upstreams["kept"] is kept
    assert kept.limiter.statistics().concurrency == 2
    assert kept.policy.limit.concurrency == 2
    runtime.activate(new)
    assert kept.limiter.statistics().concurrency == 5
    assert kept.users == 2  # the old snapshot, until retired, and the new one


async def test_a_discarded_policy_closes_only_what_it_built():
    runtime = Runtime(load_policy_text(policy(2), "<a>"))
    kept = runtime.snapshot.upstreams["kept"]
    new = runtime.prepare(load_policy_text(
        policy(5, 'fresh: {url: "http://127.0.0.1:9"}'), "<b>"))
    fresh = new.upstreams["fresh"]
    await runtime.discard(new)
    assert fresh.pool is not None and fresh.pool.closed
    assert kept.pool is not None and not kept.pool.closed
    assert kept.limiter.statistics().concurrency == 2
    assert kept.users == 1
