"""Fan-out routes: named calls run concurrently in one nursery, merged into one JSON.

``mode`` says how many answers are needed (all, first, quorum N); once they are in,
the remaining calls are cancelled with cause ``quorum_reached``. ``on_failure:
fail_fast`` cancels the siblings once a failure leaves too few calls to reach that
number (cause ``sibling_failed``, naming the call): at the first failure for ``all``;
``partial`` lets them finish and reports failures in an ``errors`` map; a call still
running when the request's deadline is near is cut then (cause ``deadline``, by the
fan-out stage), so that what arrived is answered rather than lost to a 504.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from ._calls import http_json_call, sql_call
from ._errors import GatewayError, UpstreamError, UpstreamTimeout
from ._policy import FanoutCall, Quorum, resolve_call_settings
from ._request import RequestContext, error_payload
from ._trace import traced_scope


def partial_reserve(budget_s: float) -> float:
    """Time a ``partial`` fan-out keeps back from the request's deadline to send what
    arrived: a tenth of the budget, between 5 and 50 ms."""
    return min(max(0.1 * budget_s, 0.005), 0.05)


def _needed(mode: Any, total: int) -> int:
    if isinstance(mode, Quorum):
        return mode.quorum
    return 1 if mode == "first" else total


def _left_out(stage: Any, name: str) -> None:
    for span in reversed(stage.span.children):
        if span.kind == "call" and span.name == name:
            span.outcome, span.cause, span.fired_scope = "cancelled", "quorum_reached", \
                stage.span.label
            return


async def _run_call(ctx: RequestContext, parent: Any, name: str, call: FanoutCall) -> Any:
    state = ctx.snapshot.upstreams[call.upstream]
    settings = ctx.snapshot.call_settings(call, resolve_call_settings)
    if call.query is not None:
        return await sql_call(ctx, parent, name, call, state, settings)
    return await http_json_call(ctx, parent, name, call, state, settings)


async def fanout(ctx: RequestContext) -> None:
    action = ctx.match.route.fanout
    assert action is not None and ctx.request_scope is not None
    needed = _needed(action.mode, len(action.calls))
    results: dict[str, Any] = {}
    errors: dict[str, GatewayError] = {}
    first_failure: list[tuple[str, GatewayError]] = []
    mode = action.mode if isinstance(action.mode, str) else f"quorum:{action.mode.quorum}"
    partial = action.on_failure == "partial"
    stage_deadline = (ctx.deadline.at - partial_reserve(ctx.deadline.budget_s) if partial
                      else math.inf)
    try:
        with traced_scope(ctx.trace, ctx.request_scope, "stage", "fanout", mode=mode,
                          on_failure=action.on_failure, deadline=stage_deadline) as stage:
            async with trio.open_nursery() as nursery:  # run() raises only Cancelled

                async def run(name: str, call: FanoutCall) -> None:
                    try:
                        value = await _run_call(ctx, stage, name, call)
                    except GatewayError as error:
                        errors[name] = error
                        # Fail fast once the answer can no longer be had: at the first
                        # failure for ``all``, only when too few calls are left for
                        # ``first`` or a quorum (a failed call there is what the others
                        # are for).
                        if (action.on_failure == "fail_fast" and not first_failure
                                and len(errors) > len(action.calls) - needed):
                            first_failure.append((name, error))
                            nursery.cancel_scope.cancel(reason=f"sibling_failed|call {name}")
                        return
                    if needed < len(action.calls) and len(results) >= needed:
                        # Answered in the same pass as the answers that made the
                        # quorum, before its cancellation reached this task: not one
                        # of the first N, so left out, and traced as the others are.
                        _left_out(stage, name)
                        return
                    results[name] = value
                    if needed < len(action.calls) and len(results) >= needed:
                        nursery.cancel_scope.cancel(reason=f"quorum_reached|call {name}")

                for name, call in action.calls.items():
                    nursery.start_soon(run, name, call)
    except UpstreamTimeout:
        if not partial:
            raise
        for name in action.calls:  # cut at the stage's deadline: reported, not lost
            if name not in results and name not in errors:
                errors[name] = UpstreamTimeout(
                    f"call {name!r}: no answer before the request's deadline",
                    scope="stage fanout")
    if first_failure:
        name, error = first_failure[0]
        error.detail.setdefault("call", name)
        raise error
    if len(results) < needed and (action.on_failure == "fail_fast" or not results):
        if errors:
            name, error = next(iter(errors.items()))
            error.detail.setdefault("call", name)
            raise error
        raise UpstreamError("the fan-out did not gather enough answers")
    # In the policy's order, not the order the answers came in.
    payload: dict[str, Any] = {name: results[name] for name in action.calls if name in results}
    if errors and action.on_failure == "partial":
        payload["errors"] = {  # in the policy's order too
            name: {**error_payload(errors[name], ctx.request_id),
                   "status": errors[name].status}
            for name in action.calls if name in errors}
        for entry in payload["errors"].values():
            entry.pop("request_id", None)
    await ctx.send_json(200, payload)
