"""Policy snapshots: a prepared policy changes nothing that serves until it is activated."""

import os
from pathlib import Path

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


TLS_POLICY = """
version: 1
upstreams:
  users: {{url: "https://127.0.0.1:9", tls: {{ca_file: "{ca_file}"}}}}
routes:
  - path: /api/{{rest*}}
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


def test_a_ca_file_rewritten_in_place_with_its_mtime_kept_is_seen(ca_file):
    # cp -p or rsync -t onto the file: same inode, mtime and (a certificate of the same
    # key type) size; its ctime tells.
    runtime = Runtime(load_policy_text(TLS_POLICY.format(ca_file=ca_file), "<a>"))
    assert not runtime.files_changed()
    built = os.stat(ca_file)
    content = Path(ca_file).read_bytes()
    while os.stat(ca_file).st_ctime_ns == built.st_ctime_ns:  # until the clock ticks
        with open(ca_file, "r+b") as stream:
            stream.write(content)
        os.utime(ca_file, ns=(built.st_atime_ns, built.st_mtime_ns))
    now = os.stat(ca_file)
    assert (now.st_ino, now.st_mtime_ns, now.st_size) == (
        built.st_ino, built.st_mtime_ns, built.st_size)
    assert runtime.files_changed()


def test_a_ca_file_whose_mode_or_owner_changed_is_seen(ca_file):
    # A file made readable to the gateway by chmod or chown is looked at again, as the
    # policy file is (whose watch takes the same identity).
    runtime = Runtime(load_policy_text(TLS_POLICY.format(ca_file=ca_file), "<a>"))
    built = os.stat(ca_file)
    os.chmod(ca_file, built.st_mode ^ 0o004)
    assert runtime.files_changed()
