"""``needs_restart`` at /policy after a worker was replaced.

The admin listener is bound once, by the master, at start. A worker started later (to
replace one that died) takes the policy file's *current* ``server.admin_bind`` as "the
bind at start", so once the operator has edited the bind, the replacement says
``needs_restart: []`` while the admin endpoints are still on the old bind: the operator
is told no restart is needed when one is."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import trio

from tests.process_harness import free_port, serve_process
from tests.upstream import start_upstream

POLICY = """
version: 1
server: {{admin_bind: "127.0.0.1:{port}"}}
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def _policy_state(admin_url: str) -> dict:
    async with httpx.AsyncClient(timeout=5) as admin:
        return (await admin.get(admin_url + "/policy")).json()


async def test_a_replaced_worker_still_says_the_moved_admin_bind_needs_a_restart(
        tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        first_port = free_port()
        path.write_text(POLICY.format(port=first_port, url=upstream.url))
        with serve_process(path, workers=1, admin_bind=None) as served:
            assert served.admin_url.endswith(f":{first_port}")
            before = await _policy_state(served.admin_url)
            assert before["needs_restart"] == []
            other_port = first_port + 1 if first_port < 65000 else first_port - 1
            path.write_text(POLICY.format(port=other_port, url=upstream.url))
            deadline = time.monotonic() + 10
            while True:
                state = await _policy_state(served.admin_url)
                if state["version"] != before["version"] or time.monotonic() > deadline:
                    break
                await trio.sleep(0.2)
            assert state["needs_restart"] == ["server.admin_bind"], state

            # The worker dies (OOM killer); the master starts another.
            old_pid = state["worker_pid"]
            os.kill(old_pid, signal.SIGKILL)
            with trio.fail_after(20):
                while True:
                    try:
                        state = await _policy_state(served.admin_url)
                        if state["worker_pid"] != old_pid:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.1)
            # The admin endpoints are still where the master bound them at start.
            assert served.admin_url.endswith(f":{first_port}")
            assert state["needs_restart"] == ["server.admin_bind"], (
                f"admin endpoints answer on {served.admin_url}, the policy asks for "
                f"127.0.0.1:{other_port}, yet the replaced worker says {state}")
        nursery.cancel_scope.cancel()
