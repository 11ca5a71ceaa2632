"""Command line: ``python -m gateway serve | demo | check | schema | traces``."""

from __future__ import annotations

import contextlib
import json
import sys

import click

from ._trace import TRACE_CAUSES


@click.group()
def main() -> None:
    """A structured-concurrency API gateway on Trio."""


@main.command()
@click.option("--policy", "policy_file", default="policies/demo.yaml", show_default=True,
              help="Policy file (YAML).")
@click.option("--config", "config_path", default="hypercorn.toml", show_default=True,
              help="Hypercorn settings (bind, workers, graceful_timeout, ...).")
@click.option("--bind", "binds", multiple=True, help="Public bind host:port (repeatable); "
              "overrides hypercorn.toml.")
@click.option("--admin-bind", default=None,
              help="Admin bind host:port; default from the policy or GATEWAY_ADMIN_BIND.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Worker processes (overrides toml; 0: serve in this process).")
def serve(policy_file: str, config_path: str, binds: tuple[str, ...], admin_bind: str | None,
          workers: int | None) -> None:
    """Serve POLICY under Hypercorn's trio workers."""
    from ._policy_loader import PolicyError
    from ._server import HypercornConfigError
    from ._server import serve as run_serve

    try:
        code = run_serve(policy_file, config_path, admin_bind=admin_bind, workers=workers,
                         public_bind=list(binds) or None)
    except (PolicyError, HypercornConfigError) as error:
        click.echo(str(error), err=True)
        sys.exit(1)
    except OSError as error:  # a missing hypercorn.toml, a port already taken
        where = f" ({error.filename})" if error.filename else ""
        click.echo(f"cannot serve: {error.strerror or error}{where}", err=True)
        sys.exit(1)
    sys.exit(code)


@main.command()
@click.option("--policy", "policy_file", default="policies/demo.yaml", show_default=True,
              help="Policy file (YAML); its upstreams are the demo's users (127.0.0.1:9001) "
              "and orders (127.0.0.1:9002).")
@click.option("--bind", default="127.0.0.1:8080", show_default=True,
              help="Public bind host:port, [v6]:port for IPv6 (port 0: a free one).")
@click.option("--admin-bind", default=None,
              help="Admin bind host:port; default from the policy or GATEWAY_ADMIN_BIND.")
def demo(policy_file: str, bind: str, admin_bind: str | None) -> None:
    """Start the demo upstreams and the gateway (on 127.0.0.1:8080 by default)."""
    import trio

    from ._demo import DemoError, run_demo
    from ._logging import configure_logging
    from ._policy_loader import PolicyError

    configure_logging()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            trio.run(run_demo, policy_file, bind, admin_bind)
    except (DemoError, PolicyError) as error:
        click.echo(str(error), err=True)
        sys.exit(1)
    except BaseExceptionGroup as group:
        # Ctrl+C, met inside the nurseries, reaches here in their exception groups.
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:
            return
        # A demo upstream's fixed port taken, inside the nursery that serves them.
        taken, other = rest.split(OSError)
        if taken is None or other is not None:
            raise
        first: BaseException = taken
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        click.echo(f"cannot start the demo: {first}", err=True)
        sys.exit(1)


@main.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--explain", default=None, help="Print the resolved policy of this route.")
def check(files: tuple[str, ...], explain: str | None) -> None:
    """Validate policy files; print file:line:col errors; exit 1 on any error."""
    from ._check import run_check

    sys.exit(run_check(list(files), explain=explain))


@main.command()
def schema() -> None:
    """Print the JSON Schema of the policy file (for editors)."""
    from ._check import policy_json_schema

    click.echo(json.dumps(policy_json_schema(), indent=2))


def _route_template(_ctx: click.Context, _param: click.Parameter,
                    value: str | None) -> str | None:
    """A route filter is a route's path template: one without its '/' matches nothing."""
    if value is not None and not value.startswith("/"):
        raise click.BadParameter(f"{value!r} is no route path template; those start "
                                 "with '/' (e.g. /api/users/{id})")
    return value


def _trace_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """A trace-id filter is a W3C trace-id: anything else matches nothing."""
    from ._trace_context import is_trace_id

    if value is not None and not is_trace_id(value):
        raise click.BadParameter(f"{value!r} is no W3C trace-id; those are 32 lower-case "
                                 "hex digits, not all zero")
    return value


@main.command()
@click.option("--admin", default="http://127.0.0.1:9901", show_default=True,
              help="URL of the gateway's admin bind.")
# Filters that could never match are usage errors (exit 2), not an empty answer that
# reads as "no such trace".
@click.option("--cause", type=click.Choice(TRACE_CAUSES), default=None, metavar="CAUSE",
              help="Traces with this cause, of the request or of any cancelled span: "
              + ", ".join(TRACE_CAUSES) + ".")
@click.option("--route", default=None, callback=_route_template,
              help="Traces of the route with this path template.")
@click.option("--status", type=click.IntRange(100, 599), default=None,
              help="Traces answered with this status.")
@click.option("--trace-id", default=None, callback=_trace_id,
              help="Traces of requests in this W3C trace (the trace-id of their "
              "traceparent).")
@click.option("--min-ms", type=click.IntRange(min=0), default=None, metavar="N",
              help="Traces of requests that took at least N ms (the slow ones).")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="At most this many traces, the most recent.")
@click.option("--follow", is_flag=True, help="Keep polling for new traces.")
@click.option("--token", envvar="GATEWAY_ADMIN_TOKEN", default=None,
              help="Admin bearer token (or GATEWAY_ADMIN_TOKEN).")
def traces(admin: str, cause: str | None, route: str | None, status: int | None,
           trace_id: str | None, min_ms: int | None, limit: int, follow: bool,
           token: str | None) -> None:
    """Render recent cancellation traces as trees."""
    import httpx

    from ._trace_view import NoTraces, follow_traces

    try:
        follow_traces(admin, cause=cause, route=route, status=status, min_ms=min_ms,
                      limit=limit, follow=follow, token=token, trace_id=trace_id)
    except NoTraces:
        raise click.ClickException(f"{admin} answered no traces; is it the gateway's "
                                   "admin bind?") from None
    except httpx.HTTPStatusError as error:
        raise click.ClickException(
            f"{admin} answered {error.response.status_code}"
            + (" (give the admin token with --token)" if error.response.status_code == 401
               else "")) from None
    except httpx.HTTPError as error:
        raise click.ClickException(f"cannot reach the admin endpoint {admin}: {error}") from None
