"""Hot reload under steady load: good versions go live, bad ones are rejected, and no
request fails meanwhile (in one worker, and across two Hypercorn workers)."""

import hashlib
import os
import signal
import socket
from pathlib import Path

import httpx
import trio

from tests.gateway_harness import run_gateway
from tests.metrics import metric_total
from tests.process_harness import serve_process
from tests.test_policy_loader import MINIMAL
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


async def test_a_reload_that_moves_the_admin_bind_says_it_needs_a_restart(
        tmp_path: Path, caplog):
    """The admin listener is bound once at start: a reload that changes
    ``server.admin_bind`` was reported applied while the admin endpoints stayed where
    they were. It still applies the rest, and says (log, /policy) what needs a restart."""
    text = GOOD + "server: {{admin_bind: \"{bind}\"}}\n"
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        first = text.format(url=upstream.url, concurrency=10, deadline=2000,
                            bind="127.0.0.1:19931")
        async with run_gateway(first, policy_path=path) as gw, gw.admin() as admin:
            assert (await admin.get("/policy")).json()["needs_restart"] == []
            write_atomically(path, text.format(url=upstream.url, concurrency=10,
                                               deadline=2000, bind="127.0.0.1:19932"))
            assert await gw.gateway.reload()
            state = (await admin.get("/policy")).json()
            assert state["needs_restart"] == ["server.admin_bind"], state
            assert any("takes effect at the next start" in r.getMessage()
                       for r in caplog.records)
        nursery.cancel_scope.cancel()


async def test_a_policy_path_that_cannot_be_read_for_good_is_rejected_once(
        tmp_path: Path, caplog):
    """A file that could not be read for want of descriptors is read again a second
    later; one that cannot be read at all (a directory put in its place, a file the
    gateway may not read) was read again every second too, an error logged each time.
    It is rejected once, until the path changes again."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        text = GOOD.format(url=upstream.url, concurrency=10, deadline=2000)
        async with run_gateway(text, policy_path=path, watch_policy=True,
                               poll_interval_s=0.02) as gw:
            path.unlink()
            path.mkdir()
            with trio.fail_after(5):
                while gw.gateway.runtime.last_reload_error is None:
                    await trio.sleep(0.02)
            await trio.sleep(2.5)  # past two retries, were it retried
            rejected = [r for r in caplog.records
                        if "policy reload rejected" in r.getMessage()]
            assert len(rejected) == 1, [r.getMessage() for r in rejected]
            # The directory changes: it is read again, and fails the same way, which
            # was logged again; said once is enough.
            reloads = [0]
            reload = gw.gateway.reload

            async def counted() -> bool:
                done = await reload()
                reloads[0] += 1
                return done

            gw.gateway.reload = counted  # type: ignore[method-assign]
            (path / "other.yaml").write_text("")
            with trio.fail_after(5):
                while reloads[0] == 0:
                    await trio.sleep(0.02)
            rejected = [r for r in caplog.records
                        if "policy reload rejected" in r.getMessage()]
            assert len(rejected) == 1, [r.getMessage() for r in rejected]
            async with gw.client() as client:  # the active policy serves on
                assert (await client.get("/api/users/1")).status_code == 200
        nursery.cancel_scope.cancel()


LIMITED = """
version: 1
upstreams:
  users:
    url: "{url}"
    pool: {{idle_timeout: {idle}}}
    limit: {{concurrency: 2, queue: 0}}
    circuit: {{consecutive_failures: 1, open_for: 60s, min_requests: 1}}
routes:
  - path: /api/{{rest*}}
    deadline: 10s
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def test_a_pool_only_change_keeps_the_limit_and_the_open_circuit(tmp_path: Path):
    # A new pool setting needs new connections, but the server is the same: its
    # concurrency limit must hold across the drain, and an open circuit stay open.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        async with run_gateway(LIMITED.format(url=upstream.url, idle="30s"),
                               policy_path=path) as gw, gw.client() as client:
            async with trio.open_nursery() as clients:
                for _ in range(2):
                    clients.start_soon(client.get, "/api/slow?ms=3000")
                with trio.fail_after(5):
                    await upstream.wait_for(lambda: upstream.in_flight >= 2)
                assert (await client.get("/api/ok")).status_code == 503
                write_atomically(path, LIMITED.format(url=upstream.url, idle="31s"))
                assert await gw.gateway.reload()
                third = await client.get("/api/ok")
                assert third.status_code == 503 and third.json()["cause"] == "shed"
                clients.cancel_scope.cancel()
            assert upstream.max_in_flight == 2

            assert (await client.get("/api/status/500")).status_code == 500
            assert (await client.get("/api/ok")).json()["cause"] == "circuit_open"
            write_atomically(path, LIMITED.format(url=upstream.url, idle="32s"))
            assert await gw.gateway.reload()
            still = await client.get("/api/ok")
            assert still.status_code == 503 and still.json()["cause"] == "circuit_open"
        nursery.cancel_scope.cancel()


async def test_an_unforeseen_error_in_a_reload_is_reported_and_the_watcher_goes_on(
        tmp_path: Path, monkeypatch):
    # An error no check foresaw, at the last step of a reload: it used to end the file
    # watcher, so that no later fix of the file was ever loaded.
    from gateway._runtime import Runtime

    activate = Runtime.activate
    failures = [RuntimeError("unforeseen")]

    def fails_once(self: Runtime, new):  # type: ignore[no-untyped-def]
        if failures:
            raise failures.pop()
        return activate(self, new)

    monkeypatch.setattr(Runtime, "activate", fails_once)
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        first = GOOD.format(url=upstream.url, concurrency=10, deadline=2000)
        async with run_gateway(first, policy_path=path, watch_policy=True) as gw, \
                gw.client() as client:
            runtime = gw.gateway.runtime
            write_atomically(path, GOOD.format(url=upstream.url, concurrency=11,
                                               deadline=2000))
            with trio.fail_after(5):
                while runtime.last_reload_error is None:
                    await trio.sleep(0.01)
            assert "unforeseen" in runtime.last_reload_error
            assert runtime.snapshot.loaded.version == version_of(first)
            assert (await client.get("/api/users/1")).status_code == 200
            fixed = GOOD.format(url=upstream.url, concurrency=12, deadline=2000)
            write_atomically(path, fixed)
            with trio.fail_after(5):
                while runtime.snapshot.loaded.version != version_of(fixed):
                    await trio.sleep(0.01)
            assert runtime.last_reload_error is None
        nursery.cancel_scope.cancel()


async def test_requests_of_a_replaced_policy_keep_their_pool_for_their_deadline(
        tmp_path: Path, monkeypatch):
    import gateway._app
    from gateway._policy_loader import load_policy_text

    # The old pool is closed only after the longest deadline of the old policy...
    long = load_policy_text(LIMITED.format(url="http://127.0.0.1:9", idle="30s")
                            .replace("deadline: 10s", "deadline: 90s"), "p.yaml").policy
    assert gateway._app.retire_grace(long) >= 91
    # ...and a request still running when it closes anyway gets a JSON 502, not a crash.
    monkeypatch.setattr(gateway._app, "retire_grace", lambda policy: 0.1)
    retried = LIMITED.replace("deadline: 10s", "deadline: 20s").replace(
        "    circuit: {{consecutive_failures: 1, open_for: 60s, min_requests: 1}}\n", "").replace(
        'path: "/{{rest}}"}}',
        'path: "/{{rest}}", retries: {{attempts: 2, on: [timeout], per_try_timeout: 1s}}}}')
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        async with run_gateway(retried.format(url=upstream.url, idle="30s"),
                               policy_path=path) as gw, gw.client() as client:
            old_pool = gw.gateway.runtime.snapshot.upstreams["users"].pool
            answers: list[httpx.Response] = []

            async def stalled() -> None:
                answers.append(await client.get("/api/stall"))

            async with trio.open_nursery() as clients:
                clients.start_soon(stalled)
                with trio.fail_after(5):
                    await upstream.wait_for(lambda: upstream.in_flight >= 1)
                write_atomically(path, retried.format(url=upstream.url, idle="31s"))
                assert await gw.gateway.reload()
                with trio.fail_after(5):
                    while not old_pool.closed:
                        await trio.sleep(0.01)
            (answer,) = answers
            assert answer.status_code == 502, answer.text
            assert answer.json()["cause"] == "upstream_connect"
        nursery.cancel_scope.cancel()




def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


async def test_circuit_state_gauge_follows_a_reload_that_removes_the_breaker(
        tmp_path: Path) -> None:
    # gateway_circuit_state is set only on a transition. A reload that drops the
    # upstream's circuit (the breaker is gone, calls flow) leaves the gauge at 2
    # ("open") for the life of the worker: an alert on it fires for ever. Once there is
    # no breaker the series should go (or read closed).
    name = "review_breaker_dropped"
    dead = f"http://127.0.0.1:{_closed_port()}"
    with_circuit = f"""
version: 1
upstreams:
  {name}:
    url: "{dead}"
    pool: {{connect_timeout: 200ms}}
    circuit: {{consecutive_failures: 1, open_for: 60s}}
routes:
  - path: /x
    proxy: {{upstream: {name}, path: /x}}
"""
    without = with_circuit.replace("    circuit: {consecutive_failures: 1, open_for: 60s}\n",
                                   "")
    path = tmp_path / "policy.yaml"
    with trio.fail_after(20):
        async with run_gateway(with_circuit, policy_path=path) as gw, \
                gw.client() as client, gw.admin() as admin:
            assert (await client.get("/x")).status_code == 502
            assert (await client.get("/x")).status_code == 503  # the circuit is open
            text = (await admin.get("/metrics")).text
            assert metric_total(text, "gateway_circuit_state", upstream=name) == 2
            path.write_text(without)
            assert await gw.gateway.reload()
            assert gw.gateway.runtime.snapshot.upstreams[name].breaker is None
            assert (await client.get("/x")).status_code == 502  # no breaker: tried again
            text = (await admin.get("/metrics")).text
            assert metric_total(text, "gateway_circuit_state", upstream=name) == 0, (
                "the gauge still says the circuit is open")


async def test_gauges_of_an_upstream_removed_by_a_reload_leave_the_scrape(
        tmp_path: Path) -> None:
    # refresh() copies figures only for the upstreams of the active snapshot, so a
    # removed upstream keeps its last figures for ever: /metrics still reports idle
    # connections in a pool that was closed (and its in-flight/queued gauges).
    name = "review_removed_upstream"
    two = """
version: 1
upstreams:
  users: {{url: "{url}"}}
  {name}: {{url: "{url}"}}
routes:
  - path: /api/users/{{id}}
    proxy: {{upstream: users, path: "/users/{{id}}"}}
  - path: /legacy/{{rest*}}
    proxy: {{upstream: {name}, path: "/{{rest}}"}}
"""
    one = """
version: 1
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/users/{{id}}
    proxy: {{upstream: users, path: "/users/{{id}}"}}
"""
    path = tmp_path / "policy.yaml"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            upstream = await start_upstream(nursery)
            async with run_gateway(two.format(url=upstream.url, name=name),
                                   policy_path=path) as gw, \
                    gw.client() as client, gw.admin() as admin:
                assert (await client.get("/legacy/ok")).status_code == 200
                runtime = gw.gateway.runtime
                legacy = runtime.snapshot.upstreams[name]
                text = (await admin.get("/metrics")).text
                assert metric_total(text, "gateway_upstream_connections", upstream=name,
                                    state="idle") == 1
                path.write_text(one.format(url=upstream.url))
                assert await gw.gateway.reload()
                while not legacy.pool._closed:  # retired once the old snapshot drained
                    await trio.sleep(0.01)
                text = (await admin.get("/metrics")).text
                # Gauges only: counters (attempts sent) keep what happened.
                stale = [line for line in text.splitlines()
                         if f'upstream="{name}"' in line and not line.startswith("#")
                         and not line.split("{")[0].endswith(("_total", "_created"))
                         and not line.endswith(" 0.0")]
                assert stale == [], stale
            nursery.cancel_scope.cancel()


def _version(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _swap_symlink(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` atomically (``ln -sfn``, or Kubernetes' ConfigMap
    update of its ``..data`` link)."""
    temporary = link.with_name(link.name + ".new")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


async def test_a_policy_file_that_is_a_symlink_is_reloaded_when_repointed(
        tmp_path: Path) -> None:
    # `serve` hands the workers GATEWAY_POLICY = Path(policy).resolve(): the symlink's
    # target at start-up. A release (ln -sfn, a ConfigMap update) repoints the link;
    # the gateway keeps watching, and reloading on SIGHUP, the old target, so the new
    # policy never goes live. The file the operator named is the one to follow.
    first, second = (MINIMAL.replace("/api/users/{id}", f"/api/v{n}/users/{{id}}")
                     for n in (1, 2))
    releases = tmp_path / "releases"
    releases.mkdir()
    (releases / "one.yaml").write_text(first)
    (releases / "two.yaml").write_text(second)
    link = tmp_path / "policy.yaml"
    link.symlink_to(releases / "one.yaml")
    with serve_process(link, workers=1, env={"GATEWAY_POLICY_POLL_S": "0.05"}) as served:
        async with httpx.AsyncClient(base_url=served.admin_url, timeout=5) as admin:
            assert (await admin.get("/policy")).json()["version"] == _version(first)
            _swap_symlink(link, releases / "two.yaml")
            served.signal_master(signal.SIGHUP)
            state: dict[str, object] = {}
            try:
                with trio.fail_after(5):
                    while (state := (await admin.get("/policy")).json())["version"] \
                            != _version(second):
                        await trio.sleep(0.05)
            except trio.TooSlowError:
                raise AssertionError(
                    f"the repointed policy never went live; the gateway serves "
                    f"{state.get('file')} ({state.get('version')})") from None


def _https_policy(count: int, header_limit: str) -> str:
    upstreams = "".join(f'  tls_{i}: {{url: "https://127.0.0.1:{1000 + i}"}}\n'
                        for i in range(count))
    return (f"version: 1\nserver:\n  limits: {{max_upstream_header_bytes: {header_limit}}}\n"
            f"upstreams:\n{upstreams}routes:\n"
            "  - path: /x\n    proxy: {upstream: tls_0, path: /x}\n")


async def test_a_reload_does_not_stall_the_event_loop_while_it_rebuilds_tls_pools(
        tmp_path: Path):
    """A reload that rebuilds the pools of HTTPS upstreams (here: one that changes
    server.limits.max_upstream_header_bytes, which the docs say rebuilds every HTTP
    pool) builds each TLS context (the system CA bundle read and parsed, ~30 ms) on the
    event loop, one after the other: with 40 HTTPS upstreams every request of the
    worker waits about a second. The file is already read in a thread; the contexts
    should be built there too."""
    path = tmp_path / "policy.yaml"
    async with run_gateway(_https_policy(40, "64KiB"), policy_path=path) as gw:
        path.write_text(_https_policy(40, "128KiB"))
        worst = 0.0
        done = trio.Event()

        async def watch_lag() -> None:
            nonlocal worst
            while not done.is_set():
                before = trio.current_time()
                await trio.sleep(0.005)
                worst = max(worst, trio.current_time() - before - 0.005)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_lag)
            await trio.sleep(0.05)
            assert await gw.gateway.reload()
            done.set()
        assert gw.gateway.runtime.last_reload_error is None
        assert worst < 0.25, f"the event loop stalled {worst * 1000:.0f} ms during the reload"


async def test_a_policy_file_that_stays_unreadable_is_logged_once_per_error(
        tmp_path: Path, monkeypatch, caplog) -> None:
    # The watcher reads the file again every second while it could not be read for
    # want of descriptors, and logged the same error each time: an hour of it is 3,600
    # lines. A read failure is logged once until it changes (and once when the file
    # can be read again); the active policy serves throughout. So is a path that can
    # no longer be looked at (removed, or its directory closed to the gateway), which
    # was not logged at all: nothing said the policy file was no longer watched.
    # (The watcher reads in a thread, which the autojump clock would not wait for: the
    # test polls fast instead, and counts reads and log lines.)
    import errno
    import logging

    import gateway._app
    from gateway._app import Gateway
    from gateway._policy_loader import PolicyIssue, PolicyReadError, load_policy_text

    caplog.set_level(logging.INFO, logger="gateway")
    monkeypatch.setattr(gateway._app, "UNREAD_RETRY_S", 0.001)
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL)
    gw = Gateway(load_policy_text(MINIMAL, str(path)), poll_interval_s=0.001)
    failing: list[OSError] = []
    reads = [0]

    def load(file):  # type: ignore[no-untyped-def]
        reads[0] += 1
        if failing:
            error = failing[0]
            raise PolicyReadError([PolicyIssue(str(file), 0, 0, "", "cannot read the policy "
                                               f"file: {error.strerror}")],
                                  transient=error.errno in (errno.EMFILE, errno.ENFILE))
        return load_policy_text(path.read_bytes(), str(file))

    monkeypatch.setattr(gateway._app, "load_policy_file", load)

    def logged(words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if words in r.getMessage()]

    async def served(route: str) -> None:
        while gw.runtime.snapshot.policy.routes[0].path != route:
            await trio.sleep(0.001)

    async def polls(count: int) -> None:
        stats = [0]
        stat = gw._policy_file_stat

        async def counted():  # type: ignore[no-untyped-def]
            stats[0] += 1
            return await stat()

        monkeypatch.setattr(gw, "_policy_file_stat", counted)
        while stats[0] < count:
            await trio.sleep(0.001)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw._watch_policy_file)
            await polls(2)  # the first poll read the file as it is
            failing.append(OSError(errno.EMFILE, "Too many open files"))
            path.write_text(MINIMAL.replace("/api/users/{id}", "/api/v2/users/{id}"))
            while reads[0] < 30:  # read again and again ...
                await trio.sleep(0.001)
            assert len(logged("Too many open files")) == 1, logged("rejected")  # ... once
            failing[0] = OSError(errno.ENFILE, "Too many open files in system")
            reads[0] = 0
            while reads[0] < 30:
                await trio.sleep(0.001)
            assert len(logged("Too many open files in system")) == 1, logged("rejected")
            failing.clear()  # readable again: the new file goes live, and it is said
            await served("/api/v2/users/{id}")
            assert len(logged("can be read again")) == 1, logged("again")

            path.unlink()  # gone: said once, not every poll
            await polls(30)
            assert len(logged("cannot look at the policy file")) == 1, logged("policy file")
            path.write_text(MINIMAL.replace("/api/users/{id}", "/api/v3/users/{id}"))
            await served("/api/v3/users/{id}")
            assert len(logged("can be seen again")) == 1, logged("again")
            nursery.cancel_scope.cancel()


async def test_a_policy_file_made_readable_by_chmod_is_read_again(
        tmp_path: Path, monkeypatch, caplog) -> None:
    # A new policy file the gateway's user may not read (written by root with a 0600
    # umask, `install -m 600`) is logged once; the operator fixes it with `chmod 644`.
    # chmod changes the file's ctime only: the watch, looking at mtime, size and inode,
    # never read the file again, and the old policy served on until the next content
    # change or SIGHUP, silently. (Run as root here: the EACCES is simulated at the
    # open from the file's real mode; the chmod and the stat are real.)
    import errno
    import logging

    import gateway._app
    from gateway._app import Gateway
    from gateway._policy_loader import (
        PolicyIssue,
        PolicyReadError,
        load_policy_file,
        load_policy_text,
    )

    caplog.set_level(logging.INFO, logger="gateway")
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL)
    gw = Gateway(load_policy_text(MINIMAL, str(path)), poll_interval_s=0.005)

    reads = [0]

    def load(file):  # type: ignore[no-untyped-def]
        reads[0] += 1
        if os.stat(file).st_mode & 0o044 == 0:  # not the owner, and not for others
            raise PolicyReadError([PolicyIssue(str(file), 0, 0, "", "cannot read the policy "
                                               f"file: {os.strerror(errno.EACCES)}")],
                                  transient=False)
        return load_policy_file(file)

    monkeypatch.setattr(gateway._app, "load_policy_file", load)

    def logged(words: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if words in r.getMessage()]

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw._watch_policy_file)
            await trio.sleep(0.05)
            staged = tmp_path / "policy.yaml.new"  # replaced whole, as editors do
            staged.write_text(MINIMAL.replace("/api/users/{id}", "/api/v2/users/{id}"))
            staged.chmod(0o600)
            staged.replace(path)
            while not logged("Permission denied"):
                await trio.sleep(0.005)
            path.chmod(0o644)
            with trio.move_on_after(2):
                while gw.runtime.snapshot.policy.routes[0].path != "/api/v2/users/{id}":
                    await trio.sleep(0.005)
            assert gw.runtime.snapshot.policy.routes[0].path == "/api/v2/users/{id}", (
                logged("policy"))
            assert len(logged("can be read again")) == 1, logged("policy")
            # An unchanged file is still not read again at every poll.
            reads[0] = 0
            stats = [0]
            stat = gw._policy_file_stat

            async def counted():  # type: ignore[no-untyped-def]
                stats[0] += 1
                return await stat()

            monkeypatch.setattr(gw, "_policy_file_stat", counted)
            while stats[0] < 30:
                await trio.sleep(0.005)
            assert reads[0] == 0, reads
            nursery.cancel_scope.cancel()
