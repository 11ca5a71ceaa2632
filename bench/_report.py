"""Results: the machine and versions, a markdown table per scenario, a PNG per scenario."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import resource
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench._scenarios import S1_ACCEPT_LIMIT_S, s1_ratio

PACKAGES = (
    "trio",
    "hypercorn",
    "quart",
    "quart-trio",
    "h11",
    "httpx",
    "httpcore",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "aiohttp",
    "matplotlib",
)


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.stdout + out.stderr else "?"


def environment() -> dict[str, Any]:
    """Machine and versions, recorded with every result."""
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["nginx"] = _first_line(["nginx", "-v"])
    versions["nginx echo module"] = _first_line(
        ["dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-http-echo"]
    )
    versions["wrk"] = _first_line(["wrk", "-v"])
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    machine = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
    }
    return {"versions": versions, "machine": machine}


def _f(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _rows(results: dict[str, Any], scenario: str, columns: int, row: Any) -> list[str]:
    lines = []
    for name, entry in results["systems"].items():
        label = f"{entry['label']}"
        data = entry.get(scenario)
        if not entry["available"]:
            cells = ["not available"] + [""] * (columns - 1)
        elif data is None:
            continue
        elif "error" in data:
            cells = [f"failed: {data['error']}"] + [""] * (columns - 1)
        else:
            cells = row(data)
        lines.append("| " + " | ".join([f"{label} (`{name}`)", *cells]) + " |")
    return lines


Cell = Callable[[dict[str, Any]], str]


def _num(key: str, digits: int = 0) -> Cell:
    return lambda d: _f(d[key], digits)


def _share(key: str) -> Cell:
    return lambda d: _pct(d[key])


def _at(connections: str, key: str, digits: int) -> Cell:
    return lambda d: _f(d.get(connections, {}).get(key), digits)


S1_TITLE = "## S1 throughput: `GET /api/fast` (~200-byte JSON from the upstream)"


def _c1000_over_c64(d: dict[str, Any]) -> str:
    ratio = s1_ratio(d)
    return "-" if ratio is None else _f(ratio, 2)


def _accept_s(connections: str) -> Cell:
    """Seconds the system took to accept every connection ("> limit" if it never did)."""
    def cell(d: dict[str, Any]) -> str:
        run = d.get(connections, {})
        if "accept_s" not in run:
            return "-"
        if run["accept_s"] is None:
            return f"> {S1_ACCEPT_LIMIT_S:g}"
        return _f(run["accept_s"], 1)
    return cell


S1_COLUMNS: list[tuple[str, Cell]] = [
    *((f"{c} {header}", _at(c, key, digits))
      for c in ("c64", "c1000")
      for header, key, digits in (("req/s", "rps", 0), ("p50 ms", "p50_ms", 1),
                                  ("p99 ms", "p99_ms", 1), ("errors", "errors", 0),
                                  ("CPU s/1k req", "cpu_s_per_1k", 3))),
    *((f"{c} accept s", _accept_s(c)) for c in ("c64", "c1000")),
    ("c64 again req/s", _at("c64_after", "rps", 0)),
    ("c1000 ÷ c64 req/s", _c1000_over_c64),
]
_LATER_TABLES: list[tuple[str, str, list[tuple[str, Cell]]]] = [
    ("S2", "## S2 concurrency: `GET /api/slow1s` (1 s upstream) at 10,000 connections", [
        ("req/s", _num("rps")), ("p50 ms", _num("p50_ms")), ("p99 ms", _num("p99_ms")),
        ("errors", _num("errors")), ("peak RSS MiB", _num("peak_rss_mib")),
        ("CPU s/1k req", _num("cpu_s_per_1k", 3)),
    ]),
    ("S3", "## S3 overload: `GET /api/slow` (50 ms upstream), `x-request-timeout-ms: 200`, "
     "open loop at 4x capacity", [
        ("offered req/s", _num("offered_rps")), ("x capacity", _num("overload_factor", 1)),
        ("goodput req/s", _num("goodput_rps")), ("good", _share("good_share")),
        ("shed < 10 ms", _share("shed_fast_share")),
        ("shed slower", _share("shed_slow_share")),
        ("timed out", _share("timed_out_share")), ("not sent", _share("not_sent_share")),
        ("errors", _share("error_share")), ("p50 ms", _num("p50_ms", 1)),
        ("p99 ms", _num("p99_ms", 1)), ("client stall ms", _num("client_max_stall_ms")),
        ("client nice", _num("client_nice")),
    ]),
    ("S4", "## S4 orphaned work: `GET /api/slow1s`, callers give up after 100 ms", [
        ("requests", _num("requests")), ("reached upstream", _num("reached_upstream")),
        ("ran the full 1 s", _num("ran_full")),
        ("orphaned upstream work-s", _num("orphaned_work_s", 2)),
        ("per abandoned request ms", _num("orphaned_ms_per_abandoned")),
        ("upstream stop lag p50 ms", _num("stop_lag_p50_ms")),
    ]),
]


def _table(results: dict[str, Any], plots: dict[str, str], scenario: str, title: str,
           columns: list[tuple[str, Cell]]) -> list[str]:
    """One scenario's section: title, table (a row per system) and plot."""
    return [
        title,
        "",
        "| system | " + " | ".join(header for header, _ in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
        *_rows(results, scenario, len(columns), lambda d: [cell(d) for _, cell in columns]),
        "",
        f"![{scenario}]({plots.get(scenario, '')})",
        "",
    ]


def markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """The results file."""
    env, budget = results["environment"], results["budget"]
    out = [
        f"# Benchmark results, {results['date']}" + (" (quick run)" if results["quick"] else ""),
        "",
        f"Measured with `{results['invocation']}`; {budget['measure_s']:g} s per measurement "
        f"after a {budget['warmup_s']:g} s warm-up (in S1, once the system has accepted "
        "every connection); total run time "
        f"{results['elapsed_s'] / 60:.1f} min. Load generator, systems and upstream share "
        "the same cores, so absolute numbers are low and ratios are what to compare.",
        "How to read these tables: `bench/README.md`.",
        "",
    ]
    systems = results["systems"]
    skipped = [f"`{n}`: {e['reason']}" for n, e in systems.items() if not e["available"]]
    if skipped:
        out += ["Not available: " + "; ".join(skipped), ""]
    if any("S1" in e for e in systems.values()) or skipped:
        out += _table(results, plots, "S1", S1_TITLE, S1_COLUMNS)
    for scenario, title, columns in _LATER_TABLES:
        if any(scenario in e for e in systems.values()):
            out += _table(results, plots, scenario, title, columns)
    notes = [f"- `{n}`: {note}" for n, e in systems.items() for note in e.get("notes", [])]
    if notes:
        out += ["## Notes", "", *notes, ""]
    out += ["## Machine", ""]
    out += [f"- {k}: {v}" for k, v in env["machine"].items()]
    out += ["", "## Versions", ""]
    out += [f"- {k}: {v}" for k, v in env["versions"].items()]
    out += ["", "## Systems (command lines, run from the repository root)", ""]
    for name, entry in systems.items():
        out.append(f"- `{name}`: `{entry['command']}`")
    out += ["", "## Load commands", "", "```"] + results["commands"] + ["```", ""]
    return "\n".join(out)


def _measured(results: dict[str, Any], scenario: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (name, e[scenario])
        for name, e in results["systems"].items()
        if e["available"] and isinstance(e.get(scenario), dict) and "error" not in e[scenario]
    ]


def _bars(
    ax: Any,
    names: list[str],
    series: dict[str, list[float]],
    title: str,
    fmt: str = "{:,.0f}",
    log: bool = False,
) -> None:
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [x + i * width - 0.4 + width / 2 for x in range(len(names))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt=fmt, fontsize=7)
    if log:
        ax.set_yscale("log")
        ax.margins(y=0.15)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)


def plots(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """One PNG per scenario that has data; returns scenario -> file name."""
    files: dict[str, str] = {}

    def save(fig: Any, scenario: str, title: str) -> None:
        fig.suptitle(title)
        fig.tight_layout()
        name = f"{stem}-{scenario.lower()}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files[scenario] = name

    if s1 := _measured(results, "S1"):
        names = [n for n, _ in s1]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        _bars(
            axes[0],
            names,
            {f"{c} conns": [d[c]["rps"] for _, d in s1] for c in ("c64", "c1000")},
            "req/s, log scale (higher is better)",
            log=True,
        )
        _bars(
            axes[1],
            names,
            {f"{c} conns": [d[c]["cpu_s_per_1k"] for _, d in s1] for c in ("c64", "c1000")},
            "CPU s per 1,000 requests, log scale (lower is better)",
            fmt="{:.3g}",
            log=True,
        )
        save(fig, "S1", "S1 throughput: GET /api/fast")
    if s2 := _measured(results, "S2"):
        names = [n for n, _ in s2]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
        _bars(axes[0], names, {"req/s": [d["rps"] for _, d in s2]}, "req/s (ideal 10,000)")
        _bars(
            axes[1],
            names,
            {"p99 s": [d["p99_ms"] / 1e3 for _, d in s2]},
            "p99 latency, s (ideal 1.0)",
            fmt="{:.2f}",
        )
        _bars(axes[2], names, {"MiB": [d["peak_rss_mib"] for _, d in s2]}, "peak RSS, MiB")
        save(fig, "S2", "S2 concurrency: 10,000 connections on a 1 s upstream")
    if s3 := _measured(results, "S3"):
        names = [n for n, _ in s3]
        fig, ax = plt.subplots(figsize=(10, 5.5))
        left = [0.0] * len(s3)
        for key, label, color in (
            ("good_share", "2xx within 200 ms", "tab:green"),
            ("shed_fast_share", "503 within 10 ms", "tab:blue"),
            ("shed_slow_share", "503 slower", "tab:cyan"),
            ("timed_out_share", "timed out (504, late, no answer)", "tab:red"),
            ("not_sent_share", "not sent (client at its connection cap)", "tab:orange"),
            ("error_share", "errors", "tab:gray"),
        ):
            values = [100 * d[key] for _, d in s3]
            ax.barh(names, values, left=left, label=label, color=color)
            left = [a + b for a, b in zip(left, values, strict=True)]
        for y, (_, d) in enumerate(s3):
            ax.text(
                101,
                y,
                f"goodput {d['goodput_rps']:,.0f}/s of {d['offered_rps']:,.0f}/s",
                va="center",
                fontsize=8,
            )
        ax.set_xlim(0, 135)
        ax.set_xlabel("share of requests, %")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
        save(fig, "S3", "S3 overload: 200 ms client deadline, 4x capacity")
    if s4 := _measured(results, "S4"):
        names = [n for n, _ in s4]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        _bars(
            ax,
            names,
            {"work-s": [d["orphaned_work_s"] for _, d in s4]},
            "upstream work-seconds after the caller left (lower is better)",
            fmt="{:.1f}",
        )
        save(fig, "S4", f"S4 orphaned work: {s4[0][1]['requests']} callers give up at 100 ms")
    return files
