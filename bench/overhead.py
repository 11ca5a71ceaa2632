"""A/B cost of one gateway feature on the same run (tracing on vs off, by default).

Starts the nginx upstream of ``make bench`` and the gateway (1 worker) twice per round
with policies that differ only in the feature, interleaving the variants (A B A B …)
so that drift of a noisy machine hits both alike. Each measurement is wrk at 64
connections on ``/api/fast``, measured as S1 measures (a window once every connection
is accepted and warmed up); the figures are req/s and the worker's CPU per request
(from /proc), reported as medians and as the ratio B/A.

    .venv/bin/python -m bench.overhead                 # tracing, 3 rounds of 8 s
    .venv/bin/python -m bench.overhead --feature gc    # tuned GC vs CPython's default
    .venv/bin/python -m bench.overhead --feature worker  # Hypercorn's worker as tuned vs stock
    .venv/bin/python -m bench.overhead --rounds 5 --seconds 10 --connections 1000
    .venv/bin/python -m bench.overhead --revision 22401f2  # this tree vs an older commit
    .venv/bin/python -m bench.overhead --revision 22401f2 --on-revision HEAD

With ``--revision``, "off" is the gateway of that commit (exported with ``git archive``
into ``bench/work/``, served with its own ``bench/gateway.yaml``) and "on" is this
tree's, or ``--on-revision``'s (so that editing the tree during a run changes nothing),
both run by this tree's Python environment.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from bench._scenarios import Budget, Recorder, steady_window
from bench._services import WORK, Service
from bench._systems import System, nginx_upstream

ROOT = Path(__file__).resolve().parent.parent
PORT = 18190
ADMIN_PORT = 18191
BASE_POLICY = (ROOT / "bench" / "gateway.yaml").read_text()

#: feature → (policy text when on, policy text when off, env when on, env when off)
VARIANTS: dict[str, tuple[str, str, dict[str, str], dict[str, str]]] = {
    "tracing": ("tracing: true", "tracing: false", {}, {}),
    "gc": ("tracing: true", "tracing: true", {}, {"GATEWAY_GC": "default"}),
    "worker": ("tracing: true", "tracing: true", {}, {"GATEWAY_WORKER": "stock"}),
}
CONNECTIONS = 64


def _policy(text: str, name: str) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"overhead-{name}.yaml"
    path.write_text(text)
    return path


def _revision_tree(revision: str) -> Path:
    """The commit's files under ``bench/work/rev-<sha>`` (exported once)."""
    sha = subprocess.run(["git", "rev-parse", "--short", revision], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = WORK / f"rev-{sha}"
    if not (tree / "gateway").is_dir():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _gateway(policy: Path, name: str, env: dict[str, str], tree: Path) -> Service:
    argv = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy),
            "--config", str(tree / "bench" / "hypercorn-1.toml"),
            "--bind", f"127.0.0.1:{PORT}", "--admin-bind", f"127.0.0.1:{ADMIN_PORT}"]
    return Service(f"overhead-{name}", argv, PORT, "/api/fast", env=env, cwd=tree)


def measure(policy: Path, name: str, seconds: float,
            env: dict[str, str], tree: Path = ROOT) -> tuple[float, float]:
    """(req/s, worker CPU ms per request) of one gateway run, measured as S1 measures:
    a window once every connection is accepted and warmed up."""
    service = _gateway(policy, name, env, tree)
    service.start()
    system = System(f"overhead-{name}", f"gateway ({name})", PORT, "/api", True)
    try:
        run = steady_window(system, CONNECTIONS, service.pid, Budget(measure_s=seconds),
                            Recorder())
    finally:
        service.stop()
    return float(run["rps"] or 0), float(run["cpu_s_per_1k"] or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feature", choices=sorted(VARIANTS), default="tracing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--revision", default=None,
                        help="compare this tree (on) with a commit's gateway (off) "
                             "instead of a feature")
    parser.add_argument("--on-revision", default=None,
                        help="with --revision: the commit measured as on (default: this tree)")
    args = parser.parse_args()
    global CONNECTIONS
    CONNECTIONS = args.connections
    trees = {"on": ROOT, "off": ROOT}
    if args.revision:
        args.feature = f"revision {args.revision}"
        trees["off"] = _revision_tree(args.revision)
        if args.on_revision:
            args.feature += f" vs {args.on_revision}"
            trees["on"] = _revision_tree(args.on_revision)
        envs: dict[str, dict[str, str]] = {"on": {}, "off": {}}
        policies = {"on": _policy((trees["on"] / "bench" / "gateway.yaml").read_text(), "on"),
                    "off": _policy((trees["off"] / "bench" / "gateway.yaml").read_text(),
                                   "off")}
    else:
        on_text, off_text, on_env, off_env = VARIANTS[args.feature]
        envs = {"on": on_env, "off": off_env}
        assert on_text in BASE_POLICY, f"bench/gateway.yaml must contain {on_text!r}"
        policies = {"on": _policy(BASE_POLICY, "on"),
                    "off": _policy(BASE_POLICY.replace(on_text, off_text), "off")}
    upstream = nginx_upstream()
    upstream.start()
    figures: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    try:
        for round_ in range(args.rounds):
            for name in ("off", "on") if round_ % 2 else ("on", "off"):
                figures[name].append(measure(policies[name], name, args.seconds, envs[name],
                                             trees[name]))
                rps, cpu = figures[name][-1]
                print(f"round {round_ + 1} {args.feature} {name:>3}: {rps:8.0f} req/s "
                      f"{cpu:.3f} ms CPU/request", flush=True)
    finally:
        upstream.stop()
    med = {name: (statistics.median(r for r, _ in values),
                  statistics.median(c for _, c in values)) for name, values in figures.items()}
    print(f"\n{args.feature}: off {med['off'][0]:.0f} req/s {med['off'][1]:.3f} ms/req | "
          f"on {med['on'][0]:.0f} req/s {med['on'][1]:.3f} ms/req")
    print(f"throughput ratio on/off = {med['on'][0] / med['off'][0]:.3f}; "
          f"CPU per request ratio on/off = {med['on'][1] / med['off'][1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
