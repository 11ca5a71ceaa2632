"""What ``python -m gateway demo`` tells the user to try, and how it says it cannot."""

import functools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from gateway._demo import url_of
from gateway._demo_upstreams import serve_demo_upstreams
from gateway._server import listen_socket
from tests.gateway_harness import run_gateway
from tests.metrics import metric_total

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_announces_the_port_it_bound_not_the_one_asked_for() -> None:
    """``demo --bind 127.0.0.1:0`` printed ``http://127.0.0.1:0``, a URL nothing listens
    on; a wildcard bind printed a URL curl cannot use."""
    for bind, host in (("127.0.0.1:0", "127.0.0.1"), (":0", "127.0.0.1"),
                       ("0.0.0.0:0", "127.0.0.1"), ("[::1]:0", "[::1]"), ("[::]:0", "[::1]")):
        with listen_socket(bind) as sock:
            port = sock.getsockname()[1]
            assert port != 0
            assert url_of(sock) == f"http://{host}:{port}"


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    # A DSN of its own: the demo starts no PostgreSQL (and connects to none, here).
    env = {**os.environ, "GATEWAY_DEMO_DSN": "postgresql://nobody@127.0.0.1:1/none"}
    return subprocess.run([sys.executable, "-m", "gateway", "demo", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_demo_on_a_taken_port_says_which_bind_without_a_traceback() -> None:
    """`make demo` with 8080 taken dumped an ExceptionGroup traceback naming no address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bind = f"127.0.0.1:{taken.getsockname()[1]}"
        result = _demo("--bind", bind, "--admin-bind", "127.0.0.1:0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert f"cannot serve the gateway on {bind}" in result.stderr, result.stderr[-1500:]


def test_the_demo_with_a_bad_policy_prints_its_errors_without_a_traceback(
        tmp_path: Path) -> None:
    policy = tmp_path / "mine.yaml"
    policy.write_text("version: 1\nroutes:\n  - path: /x\n    proxy: {upstream: u, path: /,"
                      " timout: 1s}\n")
    result = _demo("--policy", str(policy), "--bind", "127.0.0.1:0",
                   "--admin-bind", "127.0.0.1:0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert f"{policy}:4:" in result.stderr and "unknown key 'timout'" in result.stderr
    result = _demo("--policy", str(tmp_path / "missing.yaml"), "--bind", "127.0.0.1:0")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-1500:]


def test_the_demo_with_a_bind_that_is_no_host_and_port_says_so_without_a_traceback() -> None:
    """`demo --bind foo` was a ValueError traceback, `--bind 127.0.0.1:99999` an
    OverflowError one."""
    for bind in ("foo", "127.0.0.1:99999", "127.0.0.1:http"):
        result = _demo("--bind", bind, "--admin-bind", "127.0.0.1:0")
        assert result.returncode == 1
        assert "Traceback" not in result.stderr, result.stderr[-1500:]
        assert f"cannot serve the gateway on {bind}: " in result.stderr, result.stderr[-1500:]


_DEMO_ON_EPHEMERAL_PORTS = """
import functools, signal, sys
import gateway._demo as demo
from gateway._cli import main
demo.serve_demo_upstreams = functools.partial(demo.serve_demo_upstreams, users_port=0,
                                              orders_port=0)
# As at a terminal, where Ctrl+C is not ignored as it is for a background job.
signal.signal(signal.SIGINT, signal.default_int_handler)
main(["demo", "--bind", sys.argv[1], "--admin-bind", "127.0.0.1:0"])
"""


def _start_demo(bind: str = "127.0.0.1:0") -> subprocess.Popen[str]:
    env = {**os.environ, "GATEWAY_DEMO_DSN": "postgresql://nobody@127.0.0.1:1/none"}
    return subprocess.Popen([sys.executable, "-c", _DEMO_ON_EPHEMERAL_PORTS, bind],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_ctrl_c_stops_the_demo_without_a_traceback() -> None:
    """The demo says "Ctrl+C stops everything."; it did, with a traceback of the
    KeyboardInterrupt in its nurseries' exception groups."""
    with _start_demo() as process:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("Ctrl+C stops everything."):
                break
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert "Traceback" not in stderr, stderr[-1500:]
    assert process.returncode == 0


def test_the_demo_serves_on_an_ipv6_bind_as_serve_does() -> None:
    """`demo --bind [::1]:0` was refused ("Name or service not known"): the demo bound
    IPv4 sockets only, with the brackets taken as part of the host name."""
    with _start_demo("[::1]:0") as process:
        try:
            assert process.stdout is not None
            lines = []
            for line in process.stdout:
                lines.append(line)
                if line.startswith("Ctrl+C stops everything."):
                    break
            gateway = next((line.split()[1] for line in lines
                            if line.startswith("gateway: ")), None)
            assert gateway is not None and gateway.startswith("http://[::1]:"), lines
            # The gateway answers there (its upstreams, on ports of their own here, are
            # not those of the demo policy: a route with no upstream call).
            answer = httpx.get(f"{gateway}/nowhere", timeout=10)
            assert answer.status_code == 404 and answer.json()["cause"] == "no_route"
        finally:
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr[-1500:]


def test_every_option_of_every_command_says_what_it_takes() -> None:
    """`demo --help` listed --policy, --bind and --admin-bind with no word on them, and
    `traces --help` its --admin and --limit."""
    import click

    from gateway._cli import main

    bare = [f"{name} {param.opts[0]}" for name, command in main.commands.items()
            for param in command.params
            if isinstance(param, click.Option) and not param.help]
    assert bare == []


async def test_the_demo_policy_retries_the_503s_of_its_orders_upstream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The orders service answers 503 one time in twenty "so retries have something to
    retry", but the demo policy retried nothing: its clients saw those 503s."""
    monkeypatch.setenv("GATEWAY_DEMO_DSN", "postgresql://nobody@127.0.0.1:1/none")
    policy = (ROOT / "policies" / "demo.yaml").read_text()
    async with trio.open_nursery() as nursery:
        # Every tenth GET fails (twice the demo's share), evenly: no luck involved.
        urls = dict(await nursery.start(functools.partial(
            serve_demo_upstreams, users_port=0, orders_port=0, orders_failure_ratio=0.1)))
        for name, port in (("users", 9001), ("orders", 9002)):
            policy = policy.replace(f"http://127.0.0.1:{port}", urls[name])
        async with run_gateway(policy) as gw, gw.client() as client, gw.admin() as admin:
            retries = metric_total((await admin.get("/metrics")).text,
                                   "gateway_upstream_attempts_total", upstream="orders",
                                   kind="retry")
            statuses = [(await client.get("/api/orders?user=7")).status_code
                        for _ in range(60)]
            summaries = [(await client.get("/api/users/7/summary")).json()
                         for _ in range(20)]
            retries = metric_total((await admin.get("/metrics")).text,
                                   "gateway_upstream_attempts_total", upstream="orders",
                                   kind="retry") - retries
        nursery.cancel_scope.cancel()
    assert statuses == [200] * 60
    assert all(s.get("orders", {}).get("user") == 7 for s in summaries), summaries
    # The upstream did fail, one GET in ten: each of its 503s was retried.
    assert retries >= 8


async def test_the_demo_ends_when_its_gateway_server_ends(monkeypatch) -> None:
    """Hypercorn's server ends quietly, swallowing the KeyboardInterrupt, when a Ctrl+C
    lands in one of its tasks rather than in the demo's main task: the demo's
    upstreams then served on and the demo never exited (one Ctrl+C in three or so)."""
    import gateway._demo as demo
    from gateway._policy_loader import load_policy_file

    async def server_that_ends(*_args: object, task_status: trio.TaskStatus[list[str]],
                               **_kwargs: object) -> None:
        task_status.started([])  # then ends, as after a swallowed KeyboardInterrupt

    monkeypatch.setattr(demo, "worker_serve", server_that_ends)
    monkeypatch.setattr(demo, "serve_demo_upstreams", functools.partial(
        serve_demo_upstreams, users_port=0, orders_port=0))
    loaded = load_policy_file(str(ROOT / "policies" / "demo.yaml"))
    public, admin = demo._listen("127.0.0.1:0", "gateway"), demo._listen("127.0.0.1:0", "admin")
    try:
        with trio.fail_after(10):
            await demo._serve_demo(loaded, public, admin)
    finally:
        public.close()
        admin.close()
