"""The four scenarios. Each takes a running system and returns plain numbers (a dict).

S1 throughput   wrk on /fast at 64 and 1,000 connections; CPU of the system's tree.
S2 concurrency  wrk on /slow1s at 10,000 connections; peak RSS of the tree.
S3 overload     bench.loadclient, open loop at 4x the S1 capacity on /slow with a
                200 ms client deadline; every request classified by status and latency.
S4 orphans      bench.loadclient, 200 requests to /slow1s abandoned after 100 ms; the
                S4 upstream says how long each one kept running after its caller left.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from bench import _procs, _wrk
from bench._services import PYTHON, ROOT
from bench._systems import UPSTREAM_PORT, System

S1_CONNECTIONS = (64, 1000)
WRK_THREADS = 2
S1_ACCEPT_LIMIT_S = 150.0  # longest wait for a system to accept all of S1's connections
S2_CONNECTIONS = 10_000
S3_DEADLINE_MS = 200
S3_OVERLOAD_FACTOR = 4
S3_MAX_RATE = 20_000  # what the Python load client can offer on a shared core
S3_FALLBACK_CAPACITY = 2_000  # req/s, when S1 did not run for this system
S4_GIVE_UP_MS = 100


@dataclass(frozen=True)
class Budget:
    """Durations and counts of one benchmark run."""

    warmup_s: float = 2.0
    measure_s: float = 10.0
    s4_requests: int = 200
    s4_concurrency: int = 50


QUICK = Budget(warmup_s=1.0, measure_s=3.0, s4_requests=100, s4_concurrency=50)


class Recorder:
    """Keeps every command line a run executed, for the results file."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    def add(self, command: str) -> str:
        if command not in self.commands:
            self.commands.append(command)
        return command


def _wrk_measured(
    cmd: str, duration_s: float, root: int, sample_rss: bool = False
) -> dict[str, float | int]:
    cpu_before = _procs.cpu_seconds(root)
    with _procs.RssSampler(root) as rss:
        result = _wrk.run(cmd, duration_s)
    cpu = _procs.cpu_seconds(root) - cpu_before
    out: dict[str, float | int] = {
        **asdict(result),
        "rps": result.rps,
        "errors": result.errors,
        "cpu_s": cpu,
        "cpu_s_per_1k": cpu / result.requests * 1000 if result.requests else float("nan"),
    }
    if sample_rss:
        out["peak_rss_mib"] = rss.peak / 2**20
    return out


def s1_throughput(system: System, root: int, budget: Budget, rec: Recorder) -> dict[str, object]:
    """req/s, p50, p99, errors and CPU s per 1,000 requests at each connection count.

    The 64-connection window is measured again after the 1,000-connection one
    (``c64_after``), so that the c1000 ÷ c64 ratio compares windows centred on the
    same moment: this machine's speed drifts by more than the ratio's margin between
    two windows a minute and a half apart (see bench/README.md).
    """
    results: dict[str, object] = {}
    for connections in S1_CONNECTIONS:
        time.sleep(0.5)
        results[f"c{connections}"] = steady_window(system, connections, root, budget, rec)
    time.sleep(0.5)
    _procs.wait_quiet(root)
    results["c64_after"] = steady_window(system, S1_CONNECTIONS[0], root, budget, rec)
    return results


def s1_ratio(s1: dict[str, Any]) -> float | None:
    """req/s at 1,000 connections over the mean of the two 64-connection windows around
    it (over the first alone when the second is missing, as in older results)."""
    before = s1.get("c64", {}).get("rps")
    after = s1.get("c64_after", {}).get("rps")
    c1000 = s1.get("c1000", {}).get("rps")
    if not before or c1000 is None:
        return None
    return c1000 / (before if not after else (before + after) / 2)


def steady_window(system: System, connections: int, root: int, budget: Budget,
                  rec: Recorder) -> dict[str, float | int | None]:
    """One wrk run: wait until the system has accepted all ``connections`` (a server
    that accepts one connection per loop pass takes seconds to take in 1,000 under
    load), warm up on them, then measure a window of ``budget.measure_s``: requests
    counted at the upstream, CPU of the system's tree. Latency and errors are wrk's
    over the whole run, ramp included."""
    duration_s = S1_ACCEPT_LIMIT_S + budget.warmup_s + budget.measure_s + 5
    threads = min(WRK_THREADS, connections)
    command = _wrk.command(system.url("/fast"), connections, duration_s, 5, threads=threads)
    proc = _wrk.start(rec.add(command))
    try:
        # wrk opens the same number of connections per thread.
        opened = connections // threads * threads
        accept_s = _wait_accepted(system.port, opened, S1_ACCEPT_LIMIT_S)
        time.sleep(budget.warmup_s)
        served_before, cpu_before = upstream_requests(), _procs.cpu_split(root)
        started = time.monotonic()
        time.sleep(budget.measure_s)
        served_after, cpu_after = upstream_requests(), _procs.cpu_split(root)
        window_s = time.monotonic() - started
    except BaseException:
        proc.kill()  # the error is the one to report, not wrk's missing summary
        proc.communicate()
        raise
    result = _wrk.stop(proc)
    served = served_after - served_before - 1  # the second status request itself
    user, kernel = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
    cpu = user + kernel
    return {
        **asdict(result),
        "rps": served / window_s,
        "errors": result.errors,
        "accept_s": accept_s,
        "window_requests": served,
        "cpu_s": cpu,
        "cpu_user_s": user,
        "cpu_kernel_s": kernel,
        "cpu_s_per_1k": cpu / served * 1000 if served > 0 else float("nan"),
    }


def _wait_accepted(port: int, connections: int, limit_s: float) -> float | None:
    """Seconds until ``connections`` are established to ``port`` and none waits in its
    listen backlog, or None if that took longer than ``limit_s``."""
    started = time.monotonic()
    while (waited := time.monotonic() - started) < limit_s:
        established, backlog = _procs.tcp_accept_state(port)
        if established >= connections and backlog == 0:
            return waited
        time.sleep(0.1)
    return None


def upstream_requests() -> int:
    """Requests the nginx upstream has served since it started (its ``stub_status``)."""
    url = f"http://127.0.0.1:{UPSTREAM_PORT}/nginx_status"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    # "Active connections: N\nserver accepts handled requests\n A H R\n..."
    return int(text.splitlines()[2].split()[2])


def s2_concurrency(system: System, root: int, budget: Budget, rec: Recorder) -> dict[str, object]:
    """10,000 connections each waiting on a 1 s upstream: req/s, p99, errors, peak RSS."""
    time.sleep(1.0)
    cmd = rec.add(_wrk.command(system.url("/slow1s"), S2_CONNECTIONS, budget.measure_s, 10))
    result = _wrk_measured(cmd, budget.measure_s, root, sample_rss=True)
    time.sleep(2.0)  # let the server close 10,000 connections before the next scenario
    return result


def _loadclient(args: list[str], timeout_s: float, rec: Recorder) -> dict[str, object]:
    argv = [str(PYTHON), "-m", "bench.loadclient", *args]
    rec.add(shlex.join([".venv/bin/python", *argv[1:]]))
    out = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"loadclient failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def s3_overload(
    system: System, root: int, budget: Budget, rec: Recorder, capacity_rps: float | None
) -> dict[str, object]:
    """Open-loop overload with a 200 ms client deadline; goodput and outcome shares."""
    capacity = capacity_rps or S3_FALLBACK_CAPACITY
    rate = min(S3_MAX_RATE, S3_OVERLOAD_FACTOR * capacity)
    time.sleep(1.0)
    cpu_before = _procs.cpu_seconds(root)
    data = _loadclient(
        [
            "overload",
            system.url("/slow"),
            "--rate",
            f"{rate:.0f}",
            "--duration",
            f"{budget.measure_s:g}",
            "--deadline-ms",
            str(S3_DEADLINE_MS),
            "--give-up-ms",
            "1000",
            "-H",
            f"x-request-timeout-ms: {S3_DEADLINE_MS}",
        ],
        budget.measure_s + 60,
        rec,
    )
    counts: dict[str, int] = data["counts"]  # type: ignore[assignment]
    sent = max(1, counts.get("sent", 0))
    duration = float(data["duration_s"])  # type: ignore[arg-type]
    timed_out = counts.get("deadline", 0) + counts.get("late", 0) + counts.get("client_timeout", 0)
    return {
        "capacity_rps": capacity,
        "capacity_from_s1": capacity_rps is not None,
        "offered_rps": counts.get("sent", 0) / duration,
        "overload_factor": counts.get("sent", 0) / duration / capacity,
        "goodput_rps": counts.get("good", 0) / duration,
        "good_share": counts.get("good", 0) / sent,
        "shed_fast_share": counts.get("shed_fast", 0) / sent,
        "shed_slow_share": counts.get("shed_slow", 0) / sent,
        "timed_out_share": timed_out / sent,
        "not_sent_share": counts.get("not_sent", 0) / sent,
        "error_share": (counts.get("other", 0) + counts.get("conn_error", 0)) / sent,
        "p50_ms": data["p50_ms"],
        "p99_ms": data["p99_ms"],
        # The longest gap between turns of the open-loop client's issuing loop, the
        # niceness it ran at and its memory: what to check before trusting "offered".
        "client_max_stall_ms": data.get("max_stall_ms"),
        "client_nice": data.get("client_nice"),
        "client_peak_rss_mib": data.get("peak_rss_mib"),
        "counts": counts,
        "cpu_s": _procs.cpu_seconds(root) - cpu_before,
    }


def _upstream_records() -> dict[str, object]:
    url = f"http://127.0.0.1:{UPSTREAM_PORT}/__records"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def s4_orphans(system: System, budget: Budget, rec: Recorder) -> dict[str, object]:
    """Upstream work-seconds spent after callers that gave up at 100 ms had left."""
    run_id = system.name
    data = _loadclient(
        [
            "giveup",
            system.url("/slow1s"),
            "--run-id",
            run_id,
            "--requests",
            str(budget.s4_requests),
            "--concurrency",
            str(budget.s4_concurrency),
            "--give-up-ms",
            str(S4_GIVE_UP_MS),
        ],
        60,
        rec,
    )
    client = {r["id"]: r for r in data["records"]}  # type: ignore[union-attr]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(0.5)
        upstream = _upstream_records()
        if upstream["inflight"] == 0:
            break
    marker = f"-{run_id}-"
    records = [r for r in upstream["records"] if marker in r["path"]]  # type: ignore[union-attr]
    orphaned_s, lags = 0.0, []
    for record in records:
        gave_up = client.get(record["path"].lstrip("/"), {}).get("gave_up")
        if gave_up is None or "end" not in record:
            continue
        orphaned_s += max(0.0, record["end"] - max(record["start"], gave_up))
        lags.append(record["end"] - gave_up)
    abandoned = sum(1 for r in client.values() if r.get("gave_up") is not None)
    return {
        "requests": len(client),
        "abandoned": abandoned,
        "reached_upstream": len(records),
        "ran_full": sum(1 for r in records if r.get("outcome") == "completed"),
        "orphaned_work_s": orphaned_s,
        "orphaned_ms_per_abandoned": orphaned_s / abandoned * 1000 if abandoned else 0.0,
        "stop_lag_p50_ms": statistics.median(lags) * 1000 if lags else None,
        "stop_lag_max_ms": max(lags) * 1000 if lags else None,
    }
