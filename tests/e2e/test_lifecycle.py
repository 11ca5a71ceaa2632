"""The real `python -m gateway serve` process: which bind answers what, a reload asked
for during start-up, and workers whose master was killed."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.process_harness import ROOT, free_port, serve_process, stop_process
from tests.upstream import proxy_policy, start_upstream


async def _workers(served, count: int, gone: set[int], timeout_s: float = 30) -> list[int]:
    with trio.fail_after(timeout_s):
        while True:
            pids = served.worker_pids()
            if len(pids) == count and not gone & set(pids):
                return pids
            await trio.sleep(0.05)


def _launch(policy: Path, *args: str) -> subprocess.Popen[str]:
    config = policy.parent / "hypercorn.toml"
    config.write_text('worker_class = "trio"\ngraceful_timeout = 5\n')
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--config",
         str(config), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)


async def _get(url: str, deadline_s: float = 20) -> httpx.Response:
    """GET, retrying while the server is not up yet."""
    with trio.fail_after(deadline_s):
        while True:
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return await client.get(url)
            except httpx.TransportError:
                await trio.sleep(0.1)


async def test_admin_endpoints_never_answer_on_the_public_bind_with_the_same_port(
        tmp_path: Path):
    """README: the admin endpoints 'listen only on the admin bind ... never on the
    public one'. A common layout is the public bind on one address and the admin bind
    on loopback. When the two share a port number (public 127.0.0.1:P, admin
    127.0.0.2:P here; 10.0.0.5:8080 and 127.0.0.1:8080 in production), every public
    request is served by the admin app: /metrics, /traces and /policy are public, and
    the proxied API answers 404."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        port = free_port()
        process = _launch(policy, "--bind", f"127.0.0.1:{port}",
                          "--admin-bind", f"127.0.0.2:{port}", "--workers", "1")
        try:
            admin = await _get(f"http://127.0.0.2:{port}/healthz")
            assert admin.status_code == 200
            public_metrics = await _get(f"http://127.0.0.1:{port}/metrics")
            public_api = await _get(f"http://127.0.0.1:{port}/api/users/1")
            assert public_metrics.status_code == 404, (
                f"/metrics on the PUBLIC bind answered {public_metrics.status_code}: "
                f"{public_metrics.text[:200]!r}")
            assert public_api.status_code == 200, (public_api.status_code, public_api.text)
        finally:
            await trio.to_thread.run_sync(stop_process, process)
        nursery.cancel_scope.cancel()


async def test_workers_do_not_outlive_a_master_that_was_killed(tmp_path: Path):
    # A master killed without running its handlers (the OOM killer, kill -9) left its
    # workers serving for ever, holding the ports and deaf to SIGTERM.
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        with serve_process(policy, workers=2) as served:
            workers = await _workers(served, 2, set())
            os.kill(served.process.pid, signal.SIGKILL)
            await trio.to_thread.run_sync(served.process.wait)
            try:
                with trio.fail_after(10):
                    while any(running(pid) for pid in workers):
                        await trio.sleep(0.05)
            finally:
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        nursery.cancel_scope.cancel()


async def test_a_reload_asked_for_during_start_up_does_not_kill_a_single_process_gateway(
        tmp_path: Path):
    """README: 'SIGHUP is ignored until the app's reload task listens for it, so a
    reload asked for during start-up cannot kill a worker' and 'This holds with
    workers = 0 too'. With workers = 0 nothing handles SIGHUP between the announcement
    ('gateway: serving ...') and the app's reload task: its default action ends the
    gateway, as a deploy script that reloads right after starting finds out."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        process = _launch(policy, "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0",
                          "--workers", "0")
        try:
            url = None
            assert process.stdout is not None
            while url is None:
                line = await trio.to_thread.run_sync(process.stdout.readline)
                assert line, "the gateway exited during start-up"
                if line.startswith("gateway: serving "):
                    url = line.split()[-1]
            process.send_signal(signal.SIGHUP)  # the gateway has announced itself
            status = None
            with trio.fail_after(15):
                while status is None and process.poll() is None:
                    try:
                        async with httpx.AsyncClient(timeout=2) as client:
                            status = (await client.get(url + "/api/users/1")).status_code
                    except httpx.TransportError:
                        await trio.sleep(0.05)
            assert process.poll() is None, (
                f"the gateway died of a SIGHUP sent after it announced itself "
                f"(exit {process.poll()})")
            assert status == 200
        finally:
            await trio.to_thread.run_sync(stop_process, process)
        nursery.cancel_scope.cancel()


async def test_a_worker_replaced_while_the_policy_file_is_bad_serves_the_active_policy(
        tmp_path: Path):
    # The file on disk went bad (the workers rejected it and serve on), then a worker
    # died: each replacement died reading the bad file, and after five in a row the
    # master stopped the whole gateway.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        with serve_process(policy, workers=2, env={"GATEWAY_POLICY_POLL_S": "0.1"}) as served:
            workers = await _workers(served, 2, set())
            policy.write_text("version: 1\nroutes: [oops\n")
            with trio.fail_after(10):  # both workers have seen it and rejected it
                while sum("policy reload rejected" in line for line in served.output) < 2:
                    await trio.sleep(0.05)
            os.kill(workers[0], signal.SIGKILL)
            replaced = await _workers(served, 2, {workers[0]})
            new = (set(replaced) - set(workers)).pop()
            with trio.fail_after(10):
                while not any(f" {new} " in line and "starts on the policy the others serve"
                              in line for line in served.output):
                    assert served.process.poll() is None, "the master stopped the gateway"
                    await trio.sleep(0.05)
            async with httpx.AsyncClient(timeout=5) as client:
                for _ in range(20):
                    assert (await client.get(served.url + "/api/users/1")).status_code == 200
            assert served.process.poll() is None
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("role", ["public", "admin"])
async def test_a_busy_port_is_named_in_the_start_up_error(tmp_path: Path, role: str):
    # "cannot serve: Address already in use" did not say which of the binds it was.
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        binds = {"public": busy, "admin": "127.0.0.1:0"}
        if role == "admin":
            binds = {"public": "127.0.0.1:0", "admin": busy}
        process = _launch(policy, "--bind", binds["public"], "--admin-bind", binds["admin"],
                          "--workers", "0")
        output, _ = await trio.to_thread.run_sync(process.communicate)
    assert process.returncode == 1
    assert f"Address already in use (bind {busy} ({role}))" in output, output


async def test_an_admin_bind_on_a_unix_socket_is_refused_up_front(tmp_path: Path):
    # It was announced as "http:///:t", then every worker crash-looped.
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    process = _launch(policy, "--bind", "127.0.0.1:0", "--admin-bind",
                      f"unix:{tmp_path}/admin.sock", "--workers", "1")
    output, _ = await trio.to_thread.run_sync(process.communicate)
    assert process.returncode == 1
    assert "the admin endpoints need a host:port bind" in output, output
    assert "gateway: serving" not in output


async def test_serve_on_ipv6_binds_announces_urls_that_answer(tmp_path: Path):
    # `serve --bind [::1]:0` announced "http://::1:PORT", a URL no client can use.
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        process = _launch(policy, "--bind", "[::1]:0", "--admin-bind", "[::1]:0",
                          "--workers", "0")
        try:
            urls: dict[str, str] = {}
            assert process.stdout is not None
            while len(urls) < 2:
                line = await trio.to_thread.run_sync(process.stdout.readline)
                assert line, "the gateway exited during start-up"
                if line.startswith(("gateway: serving ", "gateway: admin ")):
                    urls[line.split()[1]] = line.split()[-1]
            assert urls["serving"].startswith("http://[::1]:"), urls
            assert urls["admin"].startswith("http://[::1]:"), urls
            assert (await _get(urls["admin"] + "/healthz")).status_code == 200
            assert (await _get(urls["serving"] + "/api/users/1")).status_code == 200
        finally:
            await trio.to_thread.run_sync(stop_process, process)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("bad", "why"), [
    ("127.0.0.1:99999", "port 99999 is not a port number (0..65535)"),
    # Hypercorn drops every bracket and splits at the last colon: it bound ::1 port 0,
    # port 1 of ::, and port 1 of :: again.
    ("[::1:0", "no ']' closes the IPv6 address"),
    ("::1", "an IPv6 address goes in brackets"),
    ("[::1]", "no ':port' after the IPv6 address in brackets"),
    ("[localhost]:8080", "'localhost' in brackets is no IPv6 address"),
])
@pytest.mark.parametrize("role", ["public", "admin", "toml"])
async def test_a_bind_whose_port_is_no_port_is_refused_in_one_line(
        tmp_path: Path, role: str, bad: str, why: str):
    # --bind 127.0.0.1:99999 (or the admin's, or hypercorn.toml's) was an OverflowError
    # traceback from deep in Hypercorn, naming no bind.
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    public = bad if role == "toml" else "127.0.0.1:0"
    config.write_text(f'worker_class = "trio"\nbind = ["{public}"]\n')
    args = {"public": ["--bind", bad], "admin": ["--admin-bind", bad], "toml": []}[role]
    if role != "admin":
        args += ["--admin-bind", "127.0.0.1:0"]
    result = await trio.to_thread.run_sync(lambda: subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--config",
         str(config), *args, "--workers", "0"], cwd=ROOT, capture_output=True, text=True,
        timeout=60))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.stderr.startswith(f"bind {bad!r}: {why}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
