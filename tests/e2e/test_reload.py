"""Hot reload under steady load: good versions go live, bad ones are rejected, and no
request fails meanwhile (in one worker, and across two Hypercorn workers)."""

import hashlib
import os
import signal
from pathlib import Path

import httpx
import trio

from tests.gateway_harness import run_gateway
from tests.process_harness import serve_process
from tests.upstream import start_upstream

GOOD = """
version: 1
upstreams:
  users: {{url: "{url}", limit: {{concurrency: {concurrency}, queue: 1000, queue_timeout: 2s}}}}
routes:
  - path: /api/users/{{id}}
    deadline: {deadline}ms
    proxy: {{upstream: users, path: "/users/{{id}}"}}
"""
BAD = """
version: 1
upstreams:
  users: {{url: "{url}", limt: {{concurrency: 3}}}}
routes:
  - path: /api/users/{{id}}
    deadline: "{deadline} ms"
    proxy: {{upstream: users, path: "/users/{{id}}"}}
"""


def version_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def steady_load(url: str, failures: list[str], counter: list[int],
                      stop: trio.Event) -> None:
    """A few clients looping on one route until ``stop``; every non-200 is a failure."""
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def loop(index: int) -> None:
            while not stop.is_set():
                response = await client.get(f"/api/users/{index}")
                counter[0] += 1
                if response.status_code != 200 or response.json()["id"] != str(index):
                    failures.append(f"{response.status_code} {response.text[:80]}")

        async with trio.open_nursery() as nursery:
            for index in range(4):
                nursery.start_soon(loop, index)


async def test_twenty_rewrites_under_load_in_one_worker(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        first = GOOD.format(url=upstream.url, concurrency=50, deadline=1000)
        async with run_gateway(first, policy_path=path, watch_policy=True) as gw, \
                gw.admin() as admin:
            failures: list[str] = []
            counter = [0]
            stop = trio.Event()
            nursery.start_soon(steady_load, gw.url, failures, counter, stop)
            limiter = gw.gateway.runtime.snapshot.upstreams["users"].limiter
            for round_ in range(20):
                if round_ % 2 == 0:
                    text = GOOD.format(url=upstream.url, concurrency=40 + round_,
                                       deadline=900 + round_)
                    write_atomically(path, text)
                    with trio.fail_after(5):
                        while (await admin.get("/policy")).json()["version"] != \
                                version_of(text):
                            await trio.sleep(0.01)
                    # Unchanged upstream: the same limiter, resized in place.
                    state = gw.gateway.runtime.snapshot.upstreams["users"]
                    assert state.limiter is limiter
                    assert limiter.statistics().concurrency == 40 + round_
                else:
                    active = (await admin.get("/policy")).json()["version"]
                    write_atomically(path, BAD.format(url=upstream.url, deadline=round_))
                    with trio.fail_after(5):
                        while not (await admin.get("/policy")).json()["last_reload_error"]:
                            await trio.sleep(0.01)
                    state = (await admin.get("/policy")).json()
                    assert state["version"] == active
                    assert "unknown key 'limt'" in state["last_reload_error"]
                    assert f"{path}:7:" in state["last_reload_error"]
            stop.set()
            assert failures == []
            assert counter[0] > 40
            assert gw.gateway.runtime.reloads == 10
        nursery.cancel_scope.cancel()


async def test_rewrites_and_sighup_with_two_workers(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        path.write_text(GOOD.format(url=upstream.url, concurrency=50, deadline=1000))
        with serve_process(path, workers=2, env={"GATEWAY_POLICY_POLL_S": "0.05"}) as served:
            failures: list[str] = []
            counter = [0]
            stop = trio.Event()
            nursery.start_soon(steady_load, served.url, failures, counter, stop)

            async def versions_seen(expect_error: bool) -> dict[int, dict]:
                """Poll the admin bind on fresh connections until both workers answered."""
                seen: dict[int, dict] = {}
                with trio.fail_after(10):
                    while len(seen) < 2:
                        async with httpx.AsyncClient(timeout=5) as admin:
                            state = (await admin.get(served.admin_url + "/policy")).json()
                        if bool(state["last_reload_error"]) == expect_error:
                            seen[state["worker_pid"]] = state
                return seen

            for round_ in range(20):
                if round_ % 2 == 0:
                    text = GOOD.format(url=upstream.url, concurrency=40 + round_,
                                       deadline=900 + round_)
                    write_atomically(path, text)
                    seen = {}
                    try:
                        with trio.fail_after(10):
                            while True:
                                seen = await versions_seen(expect_error=False)
                                if all(s["version"] == version_of(text)
                                       for s in seen.values()):
                                    break
                    except trio.TooSlowError:
                        raise AssertionError(f"round {round_}: {version_of(text)} not active "
                                             f"in both workers: {seen}") from None
                else:
                    write_atomically(path, BAD.format(url=upstream.url, deadline=round_))
                    seen = await versions_seen(expect_error=True)
                    assert all("limt" in s["last_reload_error"] for s in seen.values())
            # SIGHUP to the master reloads inside the workers; it never restarts them.
            workers_before = sorted(served.worker_pids())
            served.signal_master(signal.SIGHUP)
            await trio.sleep(0.3)
            assert sorted(served.worker_pids()) == workers_before
            stop.set()
            assert failures == []
            assert served.process.poll() is None
        nursery.cancel_scope.cancel()


async def test_removed_upstream_drains_then_its_pool_closes(tmp_path: Path):
    two = """
version: 1
upstreams:
  users: {{url: "{url}"}}
  legacy: {{url: "{url}"}}
routes:
  - path: /api/users/{{id}}
    proxy: {{upstream: users, path: "/users/{{id}}"}}
  - path: /legacy/{{rest*}}
    deadline: 10s
    proxy: {{upstream: legacy, path: "/{{rest}}"}}
"""
    one = """
version: 1
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/users/{{id}}
    proxy: {{upstream: users, path: "/users/{{id}}"}}
"""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        async with run_gateway(two.format(url=upstream.url), policy_path=path,
                               watch_policy=True) as gw, gw.client() as client:
            runtime = gw.gateway.runtime
            users = runtime.snapshot.upstreams["users"]
            legacy = runtime.snapshot.upstreams["legacy"]
            result = {}

            async def in_flight() -> None:
                result["response"] = await client.get("/legacy/slow?ms=600")

            async with trio.open_nursery() as clients:
                clients.start_soon(in_flight)
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
                write_atomically(path, one.format(url=upstream.url))
                with trio.fail_after(5):
                    while "legacy" in runtime.snapshot.upstreams:
                        await trio.sleep(0.01)
                # New requests no longer reach the removed route; the old one finishes.
                assert (await client.get("/legacy/users/1")).status_code == 404
                assert legacy.pool._closed is False
            assert result["response"].status_code == 200
            with trio.fail_after(5):  # closed once the old snapshot drained
                while not legacy.pool._closed:
                    await trio.sleep(0.01)
            assert runtime.snapshot.upstreams["users"] is users
            assert users.pool._closed is False
            assert (await client.get("/api/users/3")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_a_reload_changes_every_upstream_alike_and_a_reverted_file_clears_its_error(
        tmp_path: Path):
    """The upstream header limit is a server setting: a reload must rebuild every pool
    with it, not only the pools whose own settings changed. A file made bad and then put
    back is the active policy again, and the error it caused is no longer reported."""
    text = GOOD + "server: {{limits: {{max_upstream_header_bytes: {limit}}}}}\n"
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        first = text.format(url=upstream.url, concurrency=10, deadline=2000, limit="64KiB")
        async with run_gateway(first, policy_path=path) as gw, gw.client() as client:
            gateway, runtime = gw.gateway, gw.gateway.runtime
            write_atomically(path, text.format(url=upstream.url, concurrency=10,
                                               deadline=2000, limit="1KiB"))
            assert await gateway.reload()
            pool = runtime.snapshot.upstreams["users"].pool
            assert pool is not None and pool.limits.max_response_header_bytes == 1024
            assert (await client.get("/api/users/1")).status_code == 200

            write_atomically(path, BAD.format(url=upstream.url, deadline=2000))
            assert not await gateway.reload()
            assert runtime.last_reload_error is not None
            write_atomically(path, text.format(url=upstream.url, concurrency=10,
                                               deadline=2000, limit="1KiB"))
            assert await gateway.reload()
            assert runtime.last_reload_error is None
        nursery.cancel_scope.cancel()
