"""``needs_restart`` compares the policy's ``server.admin_bind`` with the policy's own
value at start, not with the bind the admin listener really has. With the bind given by
``--admin-bind`` (or ``GATEWAY_ADMIN_BIND``), which override the policy, a reload that
edits ``server.admin_bind`` is reported as needing a restart (and logged as "the admin
endpoints stay on <the policy's old value>", where they never were), though a restart
with the same command line changes nothing."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import trio

from tests.process_harness import serve_process
from tests.upstream import start_upstream

POLICY = """
version: 1
server: {{admin_bind: "{bind}"}}
upstreams:
  users: {{url: "{url}"}}
routes:
  - path: /api/{{rest*}}
    proxy: {{upstream: users, path: "/{{rest}}"}}
"""


async def test_admin_bind_edit_needs_no_restart_when_the_command_line_sets_the_bind(
        tmp_path: Path):
    async with trio.open_nursery() as nursery:
        upstream = await start_upstream(nursery)
        path = tmp_path / "policy.yaml"
        path.write_text(POLICY.format(bind="127.0.0.1:19941", url=upstream.url))
        with serve_process(path) as served:  # --admin-bind 127.0.0.1:0
            admin = httpx.AsyncClient(base_url=served.admin_url, timeout=5)
            before = (await admin.get("/policy")).json()
            path.write_text(POLICY.format(bind="127.0.0.1:19942", url=upstream.url))
            deadline = time.monotonic() + 10
            while True:
                state = (await admin.get("/policy")).json()
                if state["version"] != before["version"] or time.monotonic() > deadline:
                    break
                await trio.sleep(0.2)
            assert state["version"] != before["version"], "not reloaded"
            await admin.aclose()
            logged = [line for line in served.output if "next start" in line]
            assert state["needs_restart"] == [], (
                f"admin endpoints are on {served.admin_url} (--admin-bind); /policy says "
                f"needs_restart {state['needs_restart']}; log: {logged}")
        nursery.cancel_scope.cancel()
