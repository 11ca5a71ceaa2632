"""Run the benchmark: ``.venv/bin/python -m bench.run [--quick] [--only ...] [--scenarios ...]``.

Phase 1 serves S1-S3 from the nginx upstream; phase 2 swaps in the S4 upstream on the
same port. In each phase every selected system is started, measured and stopped by pid
in turn. A system whose command does not come up is reported "not available".
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import _procs, _report, _scenarios
from bench._scenarios import Budget, Recorder
from bench._services import ECHO_MODULE, ROOT, WORK, NotAvailable, Service
from bench._systems import SYSTEMS, System, nginx_upstream, s4_upstream

SCENARIOS = ("S1", "S2", "S3", "S4")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit; every process we start inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < 2 * _scenarios.S2_CONNECTIONS:
        _log(
            f"note: open-file hard limit {hard} is tight for S2's "
            f"{_scenarios.S2_CONNECTIONS:,} connections plus upstream connections"
        )


def check_tools() -> None:
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if not ECHO_MODULE.exists():
        missing.append(f"libnginx-mod-http-echo ({ECHO_MODULE})")
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (bench/run.sh installs them with apt-get)")


def _command_line(system: System) -> str:
    service = system.service()
    if service is None:
        return "the upstream itself (nginx in S1-S3, bench.s4_upstream in S4)"
    return shlex.join(
        Path(a).relative_to(ROOT).as_posix() if a.startswith(str(ROOT)) else a for a in service.argv
    )


def _scenario(
    name: str, system: System, root: int, budget: Budget, rec: Recorder, entry: dict[str, Any]
) -> dict[str, Any]:
    if name == "S1":
        return _scenarios.s1_throughput(system, root, budget, rec)
    if name == "S2":
        return _scenarios.s2_concurrency(system, root, budget, rec)
    if name == "S3":
        capacity = entry.get("S1", {}).get("c64", {}).get("rps")
        return _scenarios.s3_overload(system, root, budget, rec, capacity)
    return _scenarios.s4_orphans(system, budget, rec)


def run_system(
    system: System,
    upstream: Service,
    scenarios: list[str],
    budget: Budget,
    rec: Recorder,
    entry: dict[str, Any],
    tag: str,
) -> None:
    """Measure one system. It is started before the first scenario and checked after
    each one; a system that stopped answering is noted and restarted for the next."""
    service = system.service()
    if service is not None:
        service.log_name = f"{system.name}.{tag}"
    running = False
    try:
        for name in scenarios:
            if service is not None and not running:
                _log(f"{system.name}: starting")
                try:
                    service.start()
                except NotAvailable as exc:
                    entry.update(available=False, reason=str(exc))
                    _log(f"{system.name}: not available: {exc}")
                    return
                running = True
            root = service.pid if service is not None else upstream.pid
            _log(f"{system.name}: {name}")
            try:
                entry[name] = _scenario(name, system, root, budget, rec, entry)
            except Exception as exc:  # one broken measurement must not lose the others
                last = (str(exc).strip().splitlines() or [""])[-1]
                entry[name] = {"error": f"{type(exc).__name__}: {last}"[:200].replace("|", "/")}
                _log(f"{system.name}: {name} failed: {entry[name]['error']}")
            probe = service if service is not None else upstream
            if not probe.healthy():
                state = (
                    "still running"
                    if probe.proc is not None and probe.proc.poll() is None
                    else "exited"
                )
                note = (
                    f"no 200 from 5 probes after {name} ({state}); stopped and started "
                    f"again for any later scenario (log: bench/work/{probe.log_path.name})"
                )
                entry.setdefault("notes", []).append(note)
                _log(f"{system.name}: {note}")
                if service is None:
                    raise RuntimeError("the upstream stopped answering")
                service.stop()
                running = False
            elif name != scenarios[-1]:
                # The next scenario starts from an idle system, not one still unwinding
                # this one (10,000 connections closing after S2, say).
                waited = _procs.wait_quiet(root)
                if waited is None:
                    note = f"still busy 15 s after {name}; the next scenario started anyway"
                    entry.setdefault("notes", []).append(note)
                    _log(f"{system.name}: {note}")
                elif waited > 1:
                    _log(f"{system.name}: quiet {waited:.1f} s after {name}")
    finally:
        if service is not None and running:
            service.stop()
            _log(f"{system.name}: stopped")


def run_phase(
    upstream: Service,
    systems: list[System],
    scenarios: list[str],
    budget: Budget,
    rec: Recorder,
    results: dict[str, Any],
    tag: str,
) -> None:
    """Start the upstream, then measure each system in turn."""
    rec.add(shlex.join(upstream.argv).replace(str(ROOT) + "/", ""))
    upstream.start()
    try:
        for system in systems:
            entry = results["systems"][system.name]
            if entry["available"]:
                run_system(system, upstream, scenarios, budget, rec, entry, tag)
    finally:
        upstream.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 s measurements, for a smoke run (results in <date>-quick.md)",
    )
    parser.add_argument(
        "--only", default="", help="comma-separated systems: " + ",".join(s.name for s in SYSTEMS)
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of S1,S2,S3,S4"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results",
        help="where the markdown, JSON and PNG files go",
    )
    args = parser.parse_args(argv)
    names = {s.name for s in SYSTEMS}
    args.only = [n for n in args.only.split(",") if n] or [s.name for s in SYSTEMS]
    if unknown := set(args.only) - names:
        parser.error(f"--only: unknown system(s) {sorted(unknown)}; known: {sorted(names)}")
    args.scenarios = [s.upper() for s in args.scenarios.split(",") if s]
    if unknown := set(args.scenarios) - set(SCENARIOS):
        parser.error(f"--scenarios: unknown {sorted(unknown)}; known: {list(SCENARIOS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_tools()
    raise_nofile()
    budget = _scenarios.QUICK if args.quick else Budget()
    systems = [s for s in SYSTEMS if s.name in args.only]
    started = time.monotonic()
    rec = Recorder()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "quick": args.quick,
        "invocation": shlex.join(
            [".venv/bin/python", "-m", "bench.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "budget": budget.__dict__,
        "environment": _report.environment(),
        "systems": {
            s.name: {"label": s.label, "available": True, "reason": "", "command": _command_line(s)}
            for s in systems
        },
    }
    phase1 = [s for s in args.scenarios if s != "S4"]
    if phase1:
        _log(f"phase 1 ({', '.join(phase1)}) on the nginx upstream")
        run_phase(nginx_upstream(), systems, phase1, budget, rec, results, "s1-s3")
    if "S4" in args.scenarios:
        _log("phase 2 (S4) on the S4 upstream")
        run_phase(s4_upstream(), systems, ["S4"], budget, rec, results, "s4")
    results["elapsed_s"] = time.monotonic() - started
    results["commands"] = rec.commands
    args.out.mkdir(parents=True, exist_ok=True)
    stem = results["date"] + ("-quick" if args.quick else "")
    plot_files = _report.plots(results, args.out, stem)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(_report.markdown(results, plot_files))
    _log(f"done in {results['elapsed_s'] / 60:.1f} min: {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
