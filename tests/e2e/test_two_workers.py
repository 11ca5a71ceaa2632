"""The core claims with `workers = 2`: deadline, disconnect, shedding, and one metrics
scrape that sums both workers."""

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.gateway_harness import fire
from tests.metrics import metric_total
from tests.process_harness import ServedGateway, serve_process
from tests.upstream import start_upstream

POLICY = """
version: 1
upstreams:
  users: {{url: "{url}", limit: {{concurrency: 2, queue: 0, queue_timeout: 10ms}}}}
routes:
  - path: /api/{{rest*}}
    deadline: 300ms
    proxy: {{upstream: users, path: "/{{rest}}"}}
  - path: /long/{{rest*}}
    deadline: 10s
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def test_core_claims_hold_with_two_workers(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=upstream.url))
        with serve_process(policy, workers=2) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=10) as client:
                # Deadline: 504 at ~300 ms and the upstream sees the cancellation.
                started = trio.current_time()
                response = await client.get("/api/slow?ms=5000")
                assert response.status_code == 504
                await upstream.wait_cancelled(1)
                assert upstream.cancelled[0].at - (started + 0.3) < 0.2

                # Client disconnect: the upstream sees the cancellation promptly.
                host, port = served.url.removeprefix("http://").split(":")
                stream = await trio.open_tcp_stream(host, int(port))
                await stream.send_all(b"GET /long/stall HTTP/1.1\r\nhost: t\r\n\r\n")
                await upstream.wait_for(lambda: upstream.in_flight >= 1)
                closed_at = trio.current_time()
                await stream.aclose()
                await upstream.wait_cancelled(2)
                assert upstream.cancelled[1].at - closed_at < 0.2

                # Shedding: each worker holds 2 slots and no queue; the rest is 503.
                statuses = await fire(client, "/long/slow?ms=400", 12, 12)
                assert statuses.count(200) <= 4
                assert statuses.count(503) >= 8
                assert statuses.count(200) + statuses.count(503) == 12
                assert upstream.max_in_flight <= 4

                # Plain requests spread over fresh connections; one scrape sums both workers.
                for index in range(20):
                    async with httpx.AsyncClient(timeout=10) as fresh:
                        assert (await fresh.get(f"{served.url}/long/users/{index}")).status_code \
                            == 200
            pids = set()
            metrics = ""
            with trio.fail_after(10):
                while len(pids) < 2:
                    async with httpx.AsyncClient(timeout=5) as admin:
                        pids.add((await admin.get(served.admin_url + "/policy")).json()[
                            "worker_pid"])
                        metrics = (await admin.get(served.admin_url + "/metrics")).text
            answered = metric_total(metrics, "gateway_requests_total", route="/long/{rest*}",
                             status="200")
            assert answered == 20 + statuses.count(200)
            assert metric_total(metrics, "gateway_cancellations_total", cause="deadline") >= 1
            assert metric_total(metrics, "gateway_cancellations_total",
                         cause="client_disconnect") >= 1
        nursery.cancel_scope.cancel()


async def _both_workers_traces_found(served: ServedGateway) -> list[str]:
    """Requests until both workers have served some; every one's trace is found through
    the one admin port, by query and by id. Returns the request ids."""
    ids: list[str] = []
    pids: set[int] = set()
    async with httpx.AsyncClient(base_url=served.admin_url, timeout=10) as admin:
        # Fresh connections until both workers have served some (the kernel picks the
        # worker that accepts).
        while len(pids) < 2 and len(ids) < 200:
            for index in range(10):
                async with httpx.AsyncClient(timeout=10) as fresh:
                    response = await fresh.get(f"{served.url}/long/users/{index}")
                    ids.append(response.headers["x-request-id"])
            for _ in range(3):  # each scrape reaches either worker
                body = (await admin.get("/traces", params={"limit": 1000})).json()
                assert sorted(t["request_id"] for t in body["traces"]) == sorted(ids)
                assert body["unreachable_workers"] == []
                pids |= {t["worker_pid"] for t in body["traces"]}
        assert pids == set(served.worker_pids())
        for request_id in ids:
            found = await admin.get(f"/traces/{request_id}")
            assert found.status_code == 200
            assert found.json()["request_id"] == request_id
    return ids


async def _traces_query(served: ServedGateway) -> dict[str, Any]:
    # A fresh connection: a stopped worker accepts none.
    async with httpx.AsyncClient(timeout=10) as fresh:
        return (await fresh.get(served.admin_url + "/traces",  # type: ignore[no-any-return]
                                params={"limit": 1000})).json()


async def test_any_worker_finds_the_traces_of_every_worker(tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=upstream.url))
        with serve_process(policy, workers=2) as served:
            await _both_workers_traces_found(served)
            # A worker that cannot answer is named, and the others' traces still come.
            stopped, other = served.worker_pids()
            os.kill(stopped, signal.SIGSTOP)
            try:
                body = await _traces_query(served)
            finally:
                os.kill(stopped, signal.SIGCONT)
            assert body["unreachable_workers"] == [stopped]
            assert {t["worker_pid"] for t in body["traces"]} == {other}
            # So is one without a socket to answer on (it could not listen). Both sockets
            # go, so whichever worker the kernel hands the query to finds its sibling
            # unreachable, and still answers with its own traces.
            directory = _environ(other)["GATEWAY_PEER_DIR"]
            for pid in (stopped, other):
                await trio.Path(directory, f"worker-{pid}.sock").unlink()
            body = await _traces_query(served)
            answering = body["worker_pid"]
            assert body["unreachable_workers"] == [({stopped, other} - {answering}).pop()]
            assert {t["worker_pid"] for t in body["traces"]} == {answering}
        nursery.cancel_scope.cancel()


async def test_traces_of_every_worker_with_a_long_temporary_directory(tmp_path: Path):
    # Socket paths above 107 bytes cannot be bound; the run directory then goes to /tmp.
    long_tmp = tmp_path / ("t" * 90)
    long_tmp.mkdir()
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=upstream.url))
        with serve_process(policy, workers=2, env={"TMPDIR": str(long_tmp)}) as served:
            await _both_workers_traces_found(served)
        nursery.cancel_scope.cancel()


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)
