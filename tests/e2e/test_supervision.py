"""The master keeps the gateway serving when a worker dies, stops when workers keep
dying, and every way of stopping it drains in-flight requests and exits 0."""

import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from gateway import _supervisor
from gateway._policy_loader import LAST_GOOD_ENV
from gateway._server import drain_timeout
from gateway._supervisor import Supervisor, describe_exit
from tests.metrics import metric_total
from tests.process_harness import ROOT, ServedGateway, serve_process
from tests.upstream import Upstream, proxy_policy, start_upstream


@asynccontextmanager
async def upstream_and_policy(tmp_path: Path, edit: tuple[str, str] = ("", "")
                              ) -> AsyncIterator[tuple[Upstream, Path]]:
    """A test upstream and the plain proxy policy in front of it (``edit`` replaces one
    text in it), in a file."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url).replace(*edit))
        yield upstream, policy
        nursery.cancel_scope.cancel()


async def _wait_for_workers(served: ServedGateway, count: int, gone: set[int]) -> list[int]:
    with trio.fail_after(30):
        while True:
            pids = served.worker_pids()
            if len(pids) == count and not gone & set(pids):
                return pids
            await trio.sleep(0.05)


def _metrics_dir(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    values = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")]
    return values[0].decode()


def _any_exists(paths: list[str]) -> bool:
    return any(Path(path).exists() for path in paths)


async def test_killed_workers_are_replaced_and_their_gauges_forgotten(tmp_path: Path):
    async with upstream_and_policy(tmp_path) as (upstream, policy):
        with serve_process(policy, workers=2) as served:
            first = await _wait_for_workers(served, 2, set())
            metrics_dir = _metrics_dir(first[0])
            results: list[int | str] = []

            async def stalled() -> None:
                async with httpx.AsyncClient(timeout=30) as fresh:
                    try:
                        results.append((await fresh.get(served.url + "/api/stall")).status_code)
                    except httpx.TransportError as error:
                        results.append(type(error).__name__)

            async with trio.open_nursery() as clients:
                for _ in range(6):
                    clients.start_soon(stalled)
                await upstream.wait_for(lambda: upstream.in_flight >= 6)
                async with httpx.AsyncClient(timeout=5) as admin:
                    with trio.fail_after(10):  # gauges are written once a second
                        while metric_total((await admin.get(served.admin_url + "/metrics")).text,
                                           "gateway_upstream_in_flight") < 6:
                            await trio.sleep(0.1)
                for pid in first:
                    os.kill(pid, signal.SIGKILL)
            # The clients of the killed workers saw their connections end.
            assert len(results) == 6 and 200 not in results

            second = await _wait_for_workers(served, 2, set(first))
            assert served.process.poll() is None
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                for index in range(10):
                    assert (await client.get(f"/api/users/{index}")).status_code == 200
            async with httpx.AsyncClient(timeout=5) as admin:
                metrics = (await admin.get(served.admin_url + "/metrics")).text
            # The dead workers' in-flight calls are not counted as still running.
            assert metric_total(metrics, "gateway_upstream_in_flight") == 0
            # A trace query asks only the living (once the new ones listen).
            async with httpx.AsyncClient(timeout=5) as admin:
                with trio.fail_after(10):
                    while (await admin.get(served.admin_url + "/traces")).json()[
                            "unreachable_workers"]:
                        await trio.sleep(0.05)
            output = "".join(served.output)
            for pid in first:
                assert f"worker {pid} ended with signal SIGKILL; starting another" in output

            served.signal_master(signal.SIGTERM)
            code = await trio.to_thread.run_sync(served.process.wait, 20)
            assert code == 0, output
            assert not _any_exists([*(f"/proc/{pid}" for pid in second), metrics_dir])


async def test_sigterm_with_no_worker_processes_drains_in_flight_requests(tmp_path: Path):
    async with upstream_and_policy(tmp_path) as (upstream, policy):
        with serve_process(policy, workers=0) as served:
            assert served.worker_pids() == []
            results: list[int] = []
            async with httpx.AsyncClient(base_url=served.url, timeout=20) as client:

                async def slow() -> None:
                    results.append((await client.get("/api/slow?ms=1500")).status_code)

                async with trio.open_nursery() as clients:
                    for _ in range(3):
                        clients.start_soon(slow)
                    await upstream.wait_requests(3)
                    served.signal_master(signal.SIGTERM)
            code = await trio.to_thread.run_sync(served.process.wait, 20)
        assert results == [200, 200, 200]
        assert upstream.cancelled == []
        assert code == 0, "".join(served.output)


def _exit_with_3(shutdown_event: object, retiring_event: object) -> None:
    sys.exit(3)


def test_a_worker_that_keeps_dying_stops_the_master(caplog: pytest.LogCaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(_supervisor, "RESTART_LIMIT", 3)
    with caplog.at_level(logging.ERROR, logger="gateway.server"):
        code = Supervisor(1, _exit_with_3, {}).run()
    assert code == 1
    assert "3 workers ended abnormally within 60 s: stopping the gateway (last: exit code 3)" \
        in caplog.text


def test_exits_are_described_by_code_or_signal():
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-9) == "signal SIGKILL"
    assert describe_exit(None) == "still running"


async def test_an_earlier_runs_metrics_are_not_added_to_this_runs(tmp_path: Path):
    metrics_dir = tmp_path / "metrics"
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    async with upstream_and_policy(tmp_path) as (_upstream, policy):
        totals = []
        for requests in (5, 2):
            with serve_process(policy, workers=2, env=env) as served:
                async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                    for index in range(requests):
                        assert (await client.get(f"/api/users/{index}")).status_code == 200
                async with httpx.AsyncClient(timeout=5) as admin:
                    metrics = (await admin.get(served.admin_url + "/metrics")).text
                totals.append(metric_total(metrics, "gateway_requests_total", status="200"))
        assert totals == [5, 2]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_reload_while_a_worker_starts_does_not_kill_it(tmp_path: Path):
    async with upstream_and_policy(tmp_path) as (_upstream, policy):
        with serve_process(policy, workers=2) as served:
            first = await _wait_for_workers(served, 2, set())
            os.kill(first[0], signal.SIGKILL)
            # SIGHUPs all through the replacement's start (it takes a few tenths of a
            # second); before the start blocked them, one killed the new worker.
            with trio.move_on_after(2):
                while True:
                    served.signal_master(signal.SIGHUP)
                    await trio.sleep(0.01)
            await _wait_for_workers(served, 2, {first[0]})
            output = "".join(served.output)
            assert "signal SIGHUP" not in output, output
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                assert (await client.get("/api/users/1")).status_code == 200


async def test_sigterm_just_after_start_leaves_no_process_behind(tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\ngraceful_timeout = 2\n')
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--config",
         str(config), "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0",
         "--workers", "2"], cwd=str(ROOT), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(20):
        while b"gateway: admin" not in seen:
            seen += await process.stdout.receive_some(4096)
        process.send_signal(signal.SIGTERM)  # while the workers are starting
        while await process.stdout.receive_some(4096):
            pass
        code = await process.wait()
        while not _group_gone(process.pid):
            await trio.sleep(0.05)
    assert code == 0


async def test_a_worker_that_does_not_drain_is_killed(tmp_path: Path):
    edit = ("version: 1\n", "version: 1\nserver: {send_timeout: 1s}\n")
    async with upstream_and_policy(tmp_path, edit) as (_upstream, policy):
        config = tmp_path / "hypercorn.toml"
        config.write_text('worker_class = "trio"\ngraceful_timeout = 1\n')
        with serve_process(policy, workers=2, config=config) as served:
            wedged = (await _wait_for_workers(served, 2, set()))[0]
            os.kill(wedged, signal.SIGSTOP)  # as a worker whose loop never returns
            served.signal_master(signal.SIGTERM)
            # graceful_timeout 1 s + send_timeout 1 s + 15 s for closing pools
            code = await trio.to_thread.run_sync(served.process.wait, 30)
            assert code == 1
            assert "still running 17 s after the stop: killing them" in "".join(served.output)
            assert _group_gone(served.process.pid) or not _any_exists([f"/proc/{wedged}"])


async def test_a_worker_that_cannot_be_started_stops_the_master(tmp_path: Path):
    async with upstream_and_policy(tmp_path) as (_upstream, policy):
        with serve_process(policy, workers=2) as served:
            first = await _wait_for_workers(served, 2, set())
            master = served.process.pid
            # No file descriptor left for the master: it cannot start a process.
            open_fds = len(list(await trio.Path(f"/proc/{master}/fd").iterdir()))
            resource.prlimit(master, resource.RLIMIT_NOFILE, (open_fds, open_fds))
            os.kill(first[0], signal.SIGKILL)
            code = await trio.to_thread.run_sync(served.process.wait, 30)
            assert code == 1
            output = "".join(served.output)
            assert "cannot start a worker" in output, output
            assert not _any_exists([f"/proc/{pid}" for pid in first])


async def test_no_worker_processes_pid_file_and_a_second_signal(tmp_path: Path):
    async with upstream_and_policy(tmp_path) as (upstream, policy):
        pid_file = tmp_path / "gateway.pid"
        config = tmp_path / "hypercorn.toml"
        config.write_text(f'worker_class = "trio"\ngraceful_timeout = 30\n'
                          f'pid_path = "{pid_file}"\n')
        with serve_process(policy, workers=0, config=config) as served:
            assert (await trio.Path(pid_file).read_text()).strip() == str(served.process.pid)
            async with httpx.AsyncClient(base_url=served.url, timeout=20) as client:

                async def stalled() -> None:
                    with contextlib.suppress(httpx.TransportError):  # the process ends
                        await client.get("/api/stall")

                async with trio.open_nursery() as clients:
                    clients.start_soon(stalled)
                    await upstream.wait_for(lambda: upstream.in_flight >= 1)
                    served.signal_master(signal.SIGTERM)  # drains: the stall would hold it
                    await trio.sleep(0.5)
                    assert served.process.poll() is None
                    served.signal_master(signal.SIGTERM)
                    code = await trio.to_thread.run_sync(served.process.wait, 10)
                    clients.cancel_scope.cancel()
            assert code == 1
            assert "second stop signal" in "".join(served.output)


def test_the_drain_bound_follows_the_policy_file_as_it_is_at_the_stop(tmp_path: Path):
    # Workers may have reloaded a policy with another send_timeout since the start.
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9").replace(
        "version: 1\n", "version: 1\nserver: {send_timeout: 5s}\n"))
    assert drain_timeout(str(policy), 10, 30) == 10 + 5 + 15
    policy.write_text("version: 1\nroutes: nonsense\n")  # unreadable: the start's value
    assert drain_timeout(str(policy), 10, 30) == 10 + 30 + 15


def test_a_bad_policy_file_at_the_stop_leaves_the_drain_bound_to_the_policy_served(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The workers serve the last good policy (its send_timeout) while the file on disk
    # is bad: the bound follows what they serve, not the start's value.
    good = tmp_path / "last-good.yaml"
    good.write_text(proxy_policy("http://127.0.0.1:9").replace(
        "version: 1\n", "version: 1\nserver: {send_timeout: 7s}\n"))
    monkeypatch.setenv(LAST_GOOD_ENV, str(good))
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nroutes: nonsense\n")
    assert drain_timeout(str(policy), 10, 30) == 10 + 7 + 15
