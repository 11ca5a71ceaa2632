"""`python -m gateway serve` as operators run it: a master and Hypercorn trio workers."""

import signal
import tomllib
from pathlib import Path

import httpx
import pytest
import trio

from gateway._server import HypercornConfigError, check_hypercorn_mapping, load_hypercorn_config
from tests.process_harness import ROOT, serve_process
from tests.upstream import proxy_policy, start_upstream


def test_project_hypercorn_toml_has_only_known_keys():
    path = ROOT / "hypercorn.toml"
    with path.open("rb") as handle:
        check_hypercorn_mapping(tomllib.load(handle), str(path))
    config = load_hypercorn_config(path)
    assert config.worker_class == "trio" and config.workers >= 1


def test_a_typo_in_hypercorn_toml_is_an_error(tmp_path: Path):
    path = tmp_path / "hypercorn.toml"
    path.write_text('keep_alive_timout = 5\nworker_class = "trio"\n')
    with pytest.raises(HypercornConfigError, match="did you mean 'keep_alive_timeout'"):
        load_hypercorn_config(path)


def test_raw_header_names_are_refused(tmp_path: Path):
    path = tmp_path / "hypercorn.toml"
    path.write_text('worker_class = "trio"\nh11_pass_raw_headers = true\n')
    with pytest.raises(HypercornConfigError, match="h11_pass_raw_headers"):
        load_hypercorn_config(path)


def test_read_timeout_is_refused(tmp_path: Path):
    # Hypercorn applies it while a client waits for its answer: a slower answer was cut.
    path = tmp_path / "hypercorn.toml"
    path.write_text('worker_class = "trio"\nread_timeout = 30\n')
    with pytest.raises(HypercornConfigError, match="read_timeout: not supported"):
        load_hypercorn_config(path)


@pytest.mark.parametrize("target", ["master", "group"])
async def test_sigterm_with_two_workers_drains_in_flight_requests(tmp_path: Path, target: str):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        with serve_process(policy, workers=2) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=20) as client:
                first = await client.get("/api/users/1")
                assert first.json().get("id") == "1", (first.status_code, first.text, served.output)
                results: list[int] = []

                async def slow() -> None:
                    results.append((await client.get("/api/slow?ms=1500")).status_code)

                async with trio.open_nursery() as clients:
                    for _ in range(4):
                        clients.start_soon(slow)
                    await upstream.wait_requests(5)
                    if target == "master":
                        served.signal_master(signal.SIGTERM)
                    else:
                        served.signal_group(signal.SIGTERM)
                code = await trio.to_thread.run_sync(served.process.wait, 20)
            assert results == [200, 200, 200, 200]
            assert upstream.cancelled == []
            assert code == 0, "".join(served.output)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("workers", [0, 2])
async def test_a_draining_gateway_refuses_new_connections_at_once(tmp_path: Path, workers: int):
    """A connection made during the drain waited in the listen backlog until the last
    process exited, and was reset then; a proxy in front waited for nothing. It is
    refused at once, so the proxy can try another instance, while in-flight requests
    finish."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        with serve_process(policy, workers=workers) as served:
            host, port = served.url.removeprefix("http://").rsplit(":", 1)
            async with httpx.AsyncClient(base_url=served.url, timeout=20) as client:
                assert (await client.get("/api/users/1")).status_code == 200
                results: list[int] = []

                async def slow() -> None:
                    results.append((await client.get("/api/slow?ms=3500")).status_code)

                async with trio.open_nursery() as clients:
                    clients.start_soon(slow)
                    await upstream.wait_requests(2)
                    served.signal_master(signal.SIGTERM)
                    # Well before the in-flight request ends, connecting is refused.
                    with trio.fail_after(2.5):
                        while True:
                            try:
                                stream = await trio.open_tcp_stream(host, int(port))
                            except OSError:
                                break
                            await stream.aclose()
                            await trio.sleep(0.05)
                    assert results == []
                code = await trio.to_thread.run_sync(served.process.wait, 20)
            assert results == [200]
            assert code == 0, "".join(served.output)
        nursery.cancel_scope.cancel()


async def _refused(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return True
    await stream.aclose()
    return False


@pytest.mark.parametrize("workers", [0, 2])
async def test_the_admin_listener_reports_the_drain_until_it_has_ended(tmp_path: Path,
                                                                      workers: int):
    """While in-flight requests drain, load balancers and probes still read the admin
    bind (as Envoy's admin says DRAINING): /readyz answers 503 'draining', the liveness
    probe's /healthz 200 'draining' (the process must not be killed mid-drain), /metrics
    answers; the admin listener closes once the public drain has ended. It
    closed with the public one, so a probe could not tell a drain from a dead process
    and the drain's last metrics were never scraped."""
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(proxy_policy(upstream.url))
        with serve_process(policy, workers=workers) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=20) as client:
                assert (await client.get("/api/users/1")).status_code == 200
                results: list[int] = []

                async def slow() -> None:
                    results.append((await client.get("/api/slow?ms=4000")).status_code)

                async with trio.open_nursery() as clients:
                    clients.start_soon(slow)
                    await upstream.wait_requests(2)
                    served.signal_master(signal.SIGTERM)
                    with trio.fail_after(2.5):
                        while not await _refused(served.url):
                            await trio.sleep(0.05)
                    # A new connection for each, as a probe makes.
                    async with httpx.AsyncClient(base_url=served.admin_url, timeout=5,
                                                 headers={"connection": "close"}) as admin:
                        health = await admin.get("/healthz")
                        ready = await admin.get("/readyz")
                        metrics = await admin.get("/metrics")
                    assert results == [], "the drain ended before the admin was read"
                    assert (health.status_code, health.json()) == (
                        200, {"status": "draining"}), health.text
                    assert ready.status_code == 503, ready.text
                    assert ready.json()["ready"] is False and ready.json()["draining"] is True
                    assert metrics.status_code == 200
                    assert "gateway_requests_total" in metrics.text
                code = await trio.to_thread.run_sync(served.process.wait, 20)
            assert results == [200]
            assert code == 0, "".join(served.output)
            assert await _refused(served.admin_url)
        nursery.cancel_scope.cancel()
