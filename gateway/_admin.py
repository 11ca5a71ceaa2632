"""The admin endpoints (Quart-Trio), served only on the admin bind.

Health, readiness, Prometheus metrics, cancellation traces and the active policy.
Quart-Trio also owns the app's lifespan: its app nursery is where pools, the policy
watcher and the PostgreSQL bridge live for the life of the worker.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
from typing import TYPE_CHECKING, Any

from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ._drain import DRAIN
from ._headers import request_id_from
from ._metrics import render_metrics
from ._trace import TRACE_CAUSES
from ._trace_context import is_trace_id
from ._trace_peers import dumps, gather

if TYPE_CHECKING:
    from ._app import Gateway
    from ._policy import LimitsPolicy

log = logging.getLogger("gateway.admin")


#: Answered without the admin token: liveness and readiness, for probes.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def apply_admin_limits(app: QuartTrio, limits: LimitsPolicy) -> None:
    """Quart's own silent limits would cut admin streams and bodies: they follow the
    policy, set again before an admin request whenever a reload changed them."""
    app.config["RESPONSE_TIMEOUT"] = limits.response_timeout
    app.config["BODY_TIMEOUT"] = limits.body_timeout
    app.config["MAX_CONTENT_LENGTH"] = limits.max_body


#: The cause an admin error's status stands for, as the public listener names it.
_HTTP_CAUSES = {404: "no_route", 405: "method_not_allowed", 408: "bad_request",
                413: "bad_request", 500: "internal"}


def create_admin_app(gateway: Gateway) -> QuartTrio:
    app = QuartTrio("gateway.admin")
    # An OPTIONS got Quart's own empty text/html 200; it is a 405 with Allow, as on
    # the public listener (no admin endpoint serves OPTIONS).
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    apply_admin_limits(app, gateway.runtime.snapshot.policy.server.limits)

    def request_id_header() -> str:
        return gateway.runtime.snapshot.policy.server.request_id_header

    def admin_request_id() -> str:
        """This admin request's id: the client's when sane, else a new one (kept for
        the request, so that its body and its header say the same)."""
        rid: str | None = g.get("request_id")
        if rid is None:
            header = request_id_header().encode()
            rid = g.request_id = request_id_from(request.scope["headers"], header)
        return rid

    def error(status: int, message: str, cause: str, **extra: Any) -> Response:
        """An admin error in the public listener's shape (``_request.error_payload``)."""
        body = {"error": message, "cause": cause, "request_id": admin_request_id(), **extra}
        return Response(json.dumps(body, separators=(",", ":")), status=status,
                        content_type="application/json")

    def authorized() -> bool:
        """True when no token is configured, or the request carries it."""
        env = gateway.runtime.snapshot.policy.server.admin_token_env
        if env is None:
            return True
        # A secret mounted from a file often ends in a newline, which no header carries.
        token = os.environ.get(env, "").strip()
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return bool(token) and scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode())

    @app.before_request
    async def require_token() -> Response | None:
        # Probes (a load balancer's, the orchestrator's) reach health and readiness
        # without the token; readiness names its checks only to those who have it.
        if request.path in PROBE_PATHS or authorized():
            return None
        response = error(401, "a valid bearer token is required", "unauthorized")
        response.headers["www-authenticate"] = "Bearer"
        return response

    @app.after_request
    async def add_request_id(response: Response) -> Response:
        # Every admin answer names its request id, as every public one does.
        response.headers[request_id_header()] = admin_request_id()
        return response

    @app.before_serving
    async def start() -> None:
        await gateway.start(app.nursery)

    @app.after_serving
    async def stop() -> None:
        await gateway.stop()

    # During a drain the admin listener stays open until the public connections have
    # ended. Readiness fails (503): a load balancer or a Kubernetes readiness probe
    # takes the instance out, as Envoy's /ready's 503 DRAINING has it do, instead of
    # meeting a refused connection it cannot tell from a crash. Liveness holds (200,
    # saying "draining"): the process is alive and finishing its work, and a failed
    # liveness probe would have it killed in the middle of the drain.
    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "draining" if DRAIN.draining else "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        ready, detail = await gateway.readiness()
        body: dict[str, Any] = {"ready": ready and not DRAIN.draining}
        if DRAIN.draining:
            body["draining"] = True
        if authorized():
            body["checks"] = detail
        return body, 200 if body["ready"] else 503

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(gateway.runtime),
                        content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/policy")
    async def policy() -> Any:
        runtime = gateway.runtime
        loaded = runtime.snapshot.loaded
        return {
            "worker_pid": os.getpid(),
            "file": loaded.file,
            "version": loaded.version,
            "loaded_at": loaded.loaded_at,
            "reloads": runtime.reloads,
            "last_reload_error": runtime.last_reload_error,
            "warnings": [str(w) for w in loaded.warnings],
            "needs_restart": runtime.needs_restart(),
            "policy": loaded.policy.model_dump(mode="json"),
        }

    @app.get("/traces")
    async def traces() -> Any:
        args = request.args
        try:
            status = int(args["status"]) if "status" in args else None
            min_ms = float(args["min_ms"]) if "min_ms" in args else None
            limit = min(int(args.get("limit", 50)), 1000)
        except ValueError:
            return error(400, "status, min_ms and limit must be numbers", "bad_request")
        if limit < 1:
            return error(400, "limit must be at least 1", "bad_request")
        if min_ms is not None and not math.isfinite(min_ms):
            return error(400, "min_ms must be a finite number", "bad_request")
        # A filter that could never match is refused, naming what it takes (as `gateway
        # traces` refuses it): an empty list would read as "no such trace".
        cause, route = args.get("cause"), args.get("route")
        if cause is not None and cause not in TRACE_CAUSES:
            return error(400, "cause must be one of " + ", ".join(TRACE_CAUSES),
                         "bad_request", causes=list(TRACE_CAUSES))
        if status is not None and not 100 <= status <= 599:
            return error(400, "status must be an HTTP status, 100 to 599", "bad_request")
        if route is not None and not route.startswith("/"):
            return error(400, "route must be a route's path template, which starts with "
                         "'/' (e.g. /api/users/{id})", "bad_request")
        trace_id = args.get("trace_id")
        if trace_id is not None and not is_trace_id(trace_id):
            return error(400, "trace_id must be a W3C trace-id: 32 lower-case hex digits, "
                         "not all zero", "bad_request")
        query = {"route": route, "cause": cause, "status": status, "min_ms": min_ms,
                 "trace_id": trace_id, "limit": limit}
        found = await gather(gateway.runtime.traces, {"query": query})
        body = {"traces": found.traces[:limit], "unreachable_workers": found.unreachable,
                "worker_pid": os.getpid()}
        return Response(await dumps(body), content_type="application/json")

    @app.get("/traces/<request_id>")
    async def trace(request_id: str) -> Any:
        found = await gather(gateway.runtime.traces, {"get": request_id})
        if not found.traces:
            message = f"no trace for request {request_id!r}"
            if found.unreachable:
                message += f" (workers {found.unreachable} did not answer)"
            return error(404, message, "not_found", unreachable_workers=found.unreachable)
        return found.traces[0]

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        # Quart's own answers (no such endpoint, a method not served, a body past
        # its limits) were text/html; the shape is the public listener's.
        status = exc.code or 500
        if status == 404:
            message = "no such admin endpoint"
        elif status == 405:
            message = f"{request.method} is not allowed here"
        else:
            message = exc.description or exc.name
        cause = _HTTP_CAUSES.get(status, "bad_request" if status < 500 else "error")
        response = error(status, message, cause)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(500)
    async def internal_error(exc: Exception) -> Response:
        original = getattr(exc, "original_exception", None) or exc
        log.error("admin %s %s failed", request.method, request.path,
                  exc_info=(type(original), original, original.__traceback__))
        return error(500, "the admin endpoint failed; the gateway logged why", "internal")

    return app
