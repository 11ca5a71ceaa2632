"""Running the gateway as operators do: start-up errors that must be one line and exit
1 (bad TOML, wrong types, TLS settings, a port another gateway holds, an admin bind
equal to a public one), stop signals at any moment, the PID file, and what clients are
told when the drain starts (HTTP/2 GOAWAY and refused streams, HTTP/1.1
``Connection: close``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import h2.errors
import h2.events
import httpx
import pytest
import trio

from tests.gateway_harness import run_gateway
from tests.h2client import H2Client
from tests.process_harness import ROOT, free_port, serve_process
from tests.upstream import proxy_policy, start_upstream


def _serve_command(policy: Path, config: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--config",
            str(config), "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0",
            "--workers", str(workers)]


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_during_start_up_of_a_single_process_gateway_exits_0(
        tmp_path: Path, signum: int):
    """README: SIGTERM or SIGINT drain and exit 0, 'This holds with workers = 0 too'.
    With two workers a SIGTERM right after the start is a clean stop (exit 0, see
    test_sigterm_just_after_start_leaves_no_process_behind); with workers = 0 the
    signal arrives while the app is imported and started and kills the process."""
    code, seen = await _stop_gateway(tmp_path, 1, signum=signum)
    assert code == 0, seen
    assert "Traceback" not in seen, seen


async def test_a_syntax_error_in_hypercorn_toml_is_reported_without_a_traceback(
        tmp_path: Path):
    """Start-up errors (a bad policy, an unknown key, a busy port) are one message and
    exit 1; a hypercorn.toml that is not TOML ends in a Python traceback."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\ngraceful_timeout = \n')
    result = await trio.run_process(_serve_command(policy, config, 1), cwd=str(ROOT),
                                    capture_stdout=True, capture_stderr=True, check=False)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err, err
    assert "hypercorn.toml" in err, err


async def test_a_wrongly_typed_hypercorn_setting_is_reported_without_a_traceback(
        tmp_path: Path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\nworkers = "two"\n')
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--config",
             str(config), "--bind", "127.0.0.1:0", "--admin-bind", "127.0.0.1:0"],
            cwd=str(ROOT), capture_stdout=True, capture_stderr=True, check=False)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err, err
    assert "workers" in err, err


async def test_the_pid_file_is_removed_when_the_gateway_stops(tmp_path: Path):
    """nginx and gunicorn remove their PID file at exit: a stale one names a process
    that is gone (or, later, another process), and `kill $(cat gateway.pid)` hits it."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        pid_file = tmp_path / "gateway.pid"
        config = tmp_path / "hypercorn.toml"
        config.write_text(f'worker_class = "trio"\ngraceful_timeout = 2\n'
                          f'pid_path = "{pid_file}"\n')
        with serve_process(policy, workers=2, config=config) as served:
            assert pid_file.read_text().strip() == str(served.process.pid)
            served.signal_master(signal.SIGTERM)
            code = await trio.to_thread.run_sync(served.process.wait, 20)
        assert code == 0
        assert not pid_file.exists(), "stale PID file left behind"
        nursery.cancel_scope.cancel()


async def _wait_refused(port: int) -> None:
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.01)


async def test_http2_idle_connection_gets_goaway_when_the_drain_starts():
    """RFC 9113 6.8: a server shutting down gracefully sends GOAWAY before it closes a
    connection (nginx and Envoy do on drain), so the client knows which streams were
    not processed and opens no new one there; the gateway closes idle HTTP/2
    connections at the drain without a GOAWAY."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url)) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            assert await client.response_status(await client.get("/api/users/1")) == 200
            gw.shutdown.set()
            with trio.fail_after(5):
                while True:
                    data = await client.stream.receive_some(65536)
                    if not data:
                        break
                    client.events.extend(client.conn.receive_data(data))
            assert any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events), \
                client.events
        nursery.cancel_scope.cancel()


async def test_http2_stream_opened_during_the_drain_is_refused_retryably():
    """A stream a client opens on a connection that is draining was never processed:
    RFC 9113 8.7 says so with REFUSED_STREAM (or a GOAWAY whose last stream id is below
    it), which clients retry elsewhere. The gateway resets it with NO_ERROR and sends
    no GOAWAY, so the client sees a failed request it cannot safely retry."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), graceful_timeout=5) as gw:
            client = H2Client(await trio.open_tcp_stream("127.0.0.1", gw.port))
            await client.start()
            slow = await client.get("/api/slow?ms=1500")
            await upstream.wait_requests(1)
            gw.shutdown.set()
            await _wait_refused(gw.port)  # the drain has begun
            late = await client.get("/api/users/2")
            # The late stream is answered (GOAWAY may name it as the last one the
            # server processes), or refused as never processed: REFUSED_STREAM, or a
            # GOAWAY naming an earlier stream as the last.
            with trio.fail_after(5):
                event = await client.until(
                    lambda e: (isinstance(e, h2.events.StreamReset) and e.stream_id == late)
                    or (isinstance(e, h2.events.ResponseReceived) and e.stream_id == late)
                    or (isinstance(e, h2.events.ConnectionTerminated)
                        and e.last_stream_id is not None and e.last_stream_id < late))
            refused = (isinstance(event, h2.events.StreamReset)
                       and event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM)
            told = isinstance(event, h2.events.ConnectionTerminated)
            answered = isinstance(event, h2.events.ResponseReceived)
            assert refused or told or answered, (event, client.events)
            with trio.fail_after(5):
                assert (await client.response(slow))[0] == 200
                # Once its last stream is answered, the connection is told (GOAWAY).
                while data := await client.stream.receive_some(65536):
                    client.events.extend(client.conn.receive_data(data))
            goaway = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaway and goaway[0].error_code == 0, client.events
        nursery.cancel_scope.cancel()


async def test_tls_settings_in_hypercorn_toml_are_refused_at_start_up(tmp_path: Path):
    """With certfile/keyfile Hypercorn made every bind a secure socket, the admin bind
    the gateway appends included, which then went unrecognised: /healthz there was
    answered by the public router (404). TLS is the reverse proxy's; the settings are
    refused with a message."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\ncertfile = "/etc/cert.pem"\n'
                      'keyfile = "/etc/key.pem"\n')
    with trio.fail_after(30):
        result = await trio.run_process(_serve_command(policy, config, 0), cwd=str(ROOT),
                                        capture_stdout=True, capture_stderr=True,
                                        check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "certfile: TLS is not served by the gateway" in err, err


async def test_max_requests_without_workers_is_refused_at_start_up(tmp_path: Path):
    """Hypercorn ends a worker after ``max_requests`` for the master to replace; with
    ``workers = 0`` there is none, and the gateway stopped serving (exit 0) after that
    many requests. It is refused at start-up instead."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\nmax_requests = 100\n')
    with trio.fail_after(30):
        result = await trio.run_process(_serve_command(policy, config, 0), cwd=str(ROOT),
                                        capture_stdout=True, capture_stderr=True,
                                        check=False)
    err = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in err, err
    assert "max_requests: needs workers >= 1" in err, err


@pytest.mark.parametrize(("toml", "workers"), [("", -1), ("workers = -1\n", 1)])
async def test_a_negative_worker_count_is_refused_at_start_up(tmp_path: Path, toml, workers):
    """``--workers -1`` (or ``workers = -1``) printed "-1 worker(s)" and served in one
    process, as 0 does."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\n' + toml)
    command = _serve_command(policy, config, workers)
    if toml:
        del command[command.index("--workers"):command.index("--workers") + 2]
    with trio.fail_after(30):
        result = await trio.run_process(command, cwd=str(ROOT), capture_stdout=True,
                                        capture_stderr=True, check=False)
    err = result.stderr.decode()
    assert result.returncode in (1, 2) and "Traceback" not in err, err
    assert "-1" in err and ("negative" in err or "range" in err), err


async def test_a_recycled_worker_is_replaced_while_it_drains(tmp_path: Path):
    """A worker past ``max_requests`` closes its listeners and drains. Its replacement
    used to start only once it had exited, so with one worker a new client waited in
    the listen backlog for as long as the old worker's slowest request ran. The
    replacement now starts when the drain begins and serves new clients meanwhile."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url).replace("deadline: 10s", "deadline: 60s"))
        config = tmp_path / "hypercorn.toml"
        config.write_text('worker_class = "trio"\ngraceful_timeout = 60\n'
                          'max_requests = 1\nmax_requests_jitter = 0\n')
        with serve_process(policy, workers=1, config=config) as served:
            # The start-up health check was the first worker's first request; this is
            # its second, which recycles it.
            first_worker = served.worker_pids()
            async with httpx.AsyncClient(timeout=30) as client:
                assert (await client.get(served.url + "/api/users/1")).status_code == 200
            with trio.fail_after(30):
                while set(served.worker_pids()) <= set(first_worker):
                    await trio.sleep(0.05)
            async with trio.open_nursery() as clients:

                async def slow() -> None:
                    async with httpx.AsyncClient(timeout=60) as slow_client:
                        await slow_client.get(served.url + "/api/slow?ms=50000")

                clients.start_soon(slow)  # the second worker's first request
                await upstream.wait_for(lambda: upstream.in_flight >= 1, timeout_s=30)
                async with httpx.AsyncClient(timeout=30) as client:  # its second: it drains
                    assert (await client.get(served.url + "/api/users/2")).status_code == 200
                async with httpx.AsyncClient(timeout=30) as client:
                    fresh = await client.get(served.url + "/api/users/3")
                assert fresh.status_code == 200
                # The gateway is not draining: the recycled worker's admin listener
                # closed with its public one, so no probe is told it is.
                for _ in range(4):
                    async with httpx.AsyncClient(timeout=30) as client:
                        health = await client.get(served.admin_url + "/healthz")
                    assert (health.status_code, health.json()) == (200, {"status": "ok"})
                # Served while the draining worker still has its slow request.
                assert upstream.in_flight == 1
                clients.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_a_second_gateway_on_the_port_of_a_running_one_is_a_busy_port_error(
        tmp_path: Path):
    """Start-up on a busy port is an error naming the bind (README; test_lifecycle's
    busy-port test). With workers > 1 Hypercorn sets SO_REUSEPORT on every bind, so a
    second gateway (an old policy, a deploy started twice) binds the port of a running
    one without error and the kernel splits the connections between the two."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        with serve_process(policy, workers=2) as first:
            port = first.url.rsplit(":", 1)[1]
            config = tmp_path / "second.toml"
            config.write_text('worker_class = "trio"\ngraceful_timeout = 1\n')
            command = _serve_command(policy, config, 2)
            command[command.index("--bind") + 1] = f"127.0.0.1:{port}"
            process = await trio.lowlevel.open_process(
                command, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True)
            assert process.stdout is not None
            seen = b""
            try:
                with trio.fail_after(20):
                    while chunk := await process.stdout.receive_some(4096):
                        seen += chunk
                        if b"Running on" in seen:  # the second one serves: no error
                            break
                    if not chunk:
                        await process.wait()
            finally:
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    await process.wait()
            assert process.returncode == 1, seen.decode()
            assert b"Address already in use" in seen, seen.decode()
        nursery.cancel_scope.cancel()


async def test_an_admin_bind_equal_to_the_public_bind_is_refused(tmp_path: Path):
    """With workers > 1 (SO_REUSEPORT) the same host:port for --bind and --admin-bind
    binds twice without error; every connection on it is then taken for an admin one
    (the admin endpoints answer on the public bind, the routes never do)."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\ngraceful_timeout = 1\n')
    port = free_port()
    command = _serve_command(policy, config, 2)
    command[command.index("--bind") + 1] = f"127.0.0.1:{port}"
    command[command.index("--admin-bind") + 1] = f"127.0.0.1:{port}"
    process = await trio.lowlevel.open_process(
        command, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    assert process.stdout is not None
    seen = b""
    try:
        with trio.fail_after(20):
            while chunk := await process.stdout.receive_some(4096):
                seen += chunk
                if b"Running on" in seen:
                    break
            if not chunk:
                await process.wait()
        if process.returncode is None:
            async with httpx.AsyncClient(timeout=5) as client:
                with trio.fail_after(20):
                    while True:
                        try:
                            response = await client.get(f"http://127.0.0.1:{port}/metrics")
                            break
                        except httpx.TransportError:
                            await trio.sleep(0.05)
            # The admin endpoints must never answer on the public bind (README).
            assert response.status_code != 200, seen.decode()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert process.returncode == 1, seen.decode()


async def test_an_answer_given_during_the_drain_says_connection_close():
    """During the drain an HTTP/1.1 keep-alive connection is closed right after its
    in-flight answer. Envoy (drain_close) and nginx mark that answer
    `Connection: close`, so the client does not send its next request on a connection
    about to close (a POST sent there fails with no way to tell whether it ran)."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        async with run_gateway(proxy_policy(upstream.url), graceful_timeout=5) as gw:
            async with gw.client() as client:
                assert (await client.get("/api/users/1")).status_code == 200
                responses = []

                async def slow() -> None:
                    responses.append(await client.get("/api/slow?ms=800"))

                async with trio.open_nursery() as inner:
                    inner.start_soon(slow)
                    await upstream.wait_requests(2)
                    gw.shutdown.set()
                    await _wait_refused(gw.port)
            assert responses[0].status_code == 200
            assert responses[0].headers.get("connection", "").lower() == "close", \
                responses[0].headers
        nursery.cancel_scope.cancel()


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler installed for ``signum`` (/proc, SigCgt)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


async def _stop_gateway(tmp_path: Path, signals: int, *, after_handler: bool = False,
                        signum: int = signal.SIGTERM) -> tuple[int, str]:
    """Start a ``workers = 0`` gateway; once it announces itself (and, with
    ``after_handler``, once it handles SIGTERM) send ``signals`` stop signals; its exit
    code and output."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    config = tmp_path / "hypercorn.toml"
    config.write_text('worker_class = "trio"\ngraceful_timeout = 5\n')
    process = await trio.lowlevel.open_process(
        _serve_command(policy, config, 0), cwd=str(ROOT), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    assert process.stdout is not None
    seen = b""
    try:
        with trio.fail_after(20):
            while b"gateway: admin" not in seen:
                seen += await process.stdout.receive_some(4096)
            if after_handler:
                while not _catches(process.pid, signum):
                    await trio.sleep(0.001)
            for number in range(signals):
                process.send_signal(signum)
                if number + 1 < signals:  # the next once this one is taken (signals of
                    # one kind sent together merge into one, in the kernel and Python)
                    while b"stop signal: draining" not in seen:
                        seen += await process.stdout.receive_some(4096)
            while chunk := await process.stdout.receive_some(4096):
                seen += chunk
            code = await process.wait()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
    return code, seen.decode(errors="replace")


async def test_a_stop_signal_right_after_the_announcement_with_workers_0_is_clean(tmp_path):
    """With workers = 0 the start-up stop handler is installed in serve_in_process, after
    serve() has printed the addresses and written the PID file: a SIGTERM sent once the
    gateway says it serves still kills it (exit -15). tests/e2e/test_operations.py's own
    test of the fix fails this way when the signal lands in that window (seen here under
    load); the PID file here is a FIFO so that the window stays open until it is read."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(proxy_policy("http://127.0.0.1:9"))
    pid_file = tmp_path / "gateway.pid"
    os.mkfifo(pid_file)
    config = tmp_path / "hypercorn.toml"
    config.write_text(f'worker_class = "trio"\ngraceful_timeout = 5\npid_path = "{pid_file}"\n')
    process = await trio.lowlevel.open_process(
        _serve_command(policy, config, 0), cwd=str(ROOT), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    assert process.stdout is not None
    seen = b""
    try:
        with trio.fail_after(20):
            while b"gateway: admin" not in seen:
                seen += await process.stdout.receive_some(4096)
            process.send_signal(signal.SIGTERM)  # announced: a stop must now be clean
            reader = os.open(pid_file, os.O_RDONLY | os.O_NONBLOCK)  # lets it go on
            try:
                while chunk := await process.stdout.receive_some(4096):
                    seen += chunk
                code = await process.wait()
            finally:
                os.close(reader)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, (code, seen.decode(errors="replace"))


async def test_a_second_stop_signal_during_start_up_with_workers_0_exits_at_once(tmp_path):
    """README: 'a second signal kills the workers at once (exit 1). This holds with
    workers = 0 too'. With workers = 0 both signals of an early double stop (a second
    Ctrl-C while the app still starts) are only recorded by the start-up handler: the
    process starts, then drains gracefully and exits 0, as for a single signal."""
    code, seen = await _stop_gateway(tmp_path, 2, after_handler=True)
    assert code == 1, (code, seen)
