"""The systems under test and the upstreams they proxy to.

Every proxy serves ``GET /api/{path}`` -> upstream ``/{path}`` on its own loopback port;
``direct`` is the upstream itself (paths without ``/api``).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench._services import PYTHON, Service, nginx_service, render_nginx
from bench.s4_upstream import BODY

UPSTREAM_PORT = 18081


@dataclass(frozen=True)
class System:
    """A system under test: how to start it and where to send load."""

    name: str
    label: str
    port: int
    prefix: str  # "/api" for the proxies, "" for direct
    honours_deadline_header: bool

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}{path}"

    def service(self) -> Service | None:
        """The process to start, or None when the system is the upstream itself."""
        python = str(PYTHON)
        if self.name.startswith("gateway-"):
            workers = self.name.removeprefix("gateway-")
            argv = [
                python,
                "-m",
                "gateway",
                "serve",
                "--policy",
                "bench/gateway.yaml",
                "--config",
                f"bench/hypercorn-{workers}.toml",
            ]
        elif self.name == "fastapi":
            argv = [python, "-m", "bench.peers.fastapi_proxy", "--port", str(self.port)]
        elif self.name == "aiohttp":
            argv = [python, "-m", "bench.peers.aiohttp_proxy", "--port", str(self.port)]
        elif self.name == "nginx-proxy":
            prefix, conf = render_nginx(
                "proxy.conf",
                "nginx-proxy",
                PORT=str(self.port),
                UPSTREAM=f"127.0.0.1:{UPSTREAM_PORT}",
            )
            return nginx_service(self.name, prefix, conf, self.port, "/api/fast")
        else:
            return None
        return Service(self.name, argv, self.port, f"{self.prefix}/fast")


SYSTEMS: tuple[System, ...] = (
    System("gateway-1", "gateway (1 worker)", 18090, "/api", True),
    System("gateway-2", "gateway (2 workers)", 18091, "/api", True),
    System("fastapi", "FastAPI + uvicorn + httpx", 18092, "/api", True),
    System("aiohttp", "aiohttp server + ClientSession", 18093, "/api", True),
    System("nginx-proxy", "nginx proxy_pass (keepalive)", 18094, "/api", False),
    System("direct", "direct to upstream", UPSTREAM_PORT, "", False),
)


def nginx_upstream() -> Service:
    """The nginx + echo upstream of S1-S3 on UPSTREAM_PORT."""
    body = BODY.decode().rstrip("\n").replace("'", "\\'") + "\\n"
    prefix, conf = render_nginx("upstream.conf", "upstream", PORT=str(UPSTREAM_PORT), BODY=body)
    return nginx_service("upstream", prefix, conf, UPSTREAM_PORT, "/fast")


def s4_upstream() -> Service:
    """The trio upstream of S4 (it records when a caller leaves) on UPSTREAM_PORT."""
    argv = [str(PYTHON), "-m", "bench.s4_upstream", "--port", str(UPSTREAM_PORT)]
    return Service("s4-upstream", argv, UPSTREAM_PORT, "/fast", start_timeout_s=10.0)
