"""Running the gateway under Hypercorn: config checks, process limits, workers, signals.

``serve`` runs Hypercorn's trio workers with what a gateway needs on top: unknown keys
in ``hypercorn.toml`` are errors (Hypercorn stores a typo silently), the admin bind is
added next to the public binds with its real port known before workers start, workers
ignore SIGTERM so that a terminating master lets them drain through Hypercorn's
shutdown event instead of dropping in-flight requests, and the master replaces a
worker that dies (:mod:`gateway._supervisor`) instead of stopping the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import functools
import json
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import trio_worker, worker_serve
from hypercorn.utils import load_application, write_pid_file

from ._binds import http_url, split_bind
from ._logging import configure_logging
from ._supervisor import MASTER_SIGNALS, Supervisor
from ._trace_peers import PEER_DIR_ENV, socket_dir_fits, socket_path, write_worker_list

log = logging.getLogger("gateway.server")

APPLICATION_PATH = "gateway._asgi:app"
#: Keys of hypercorn.toml the gateway sets itself; an operator's value would be ignored.
_MANAGED_KEYS = frozenset({"application_path"})


class HypercornConfigError(Exception):
    """hypercorn.toml names a key Hypercorn does not know, or a value it cannot use."""


def known_hypercorn_keys() -> set[str]:
    config = Config()
    keys = {name for name in dir(Config) if not name.startswith("_")}
    keys |= set(vars(config))
    # Properties and methods are not settable keys.
    return {k for k in keys if not callable(getattr(Config, k, None))
            or isinstance(getattr(Config, k, None), property)}


def check_hypercorn_mapping(mapping: Mapping[str, Any], source: str) -> None:
    known = known_hypercorn_keys()
    problems = []
    for key, value in mapping.items():
        if key in _MANAGED_KEYS:
            problems.append(f"{source}: {key}: set by the gateway, remove it")
        elif key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{source}: {key}: not a Hypercorn setting{hint}")
        elif (wrong := _wrong_type(key, value)) is not None:
            problems.append(f"{source}: {key}: {wrong}")
        elif key in _TLS_KEYS:
            problems.append(f"{source}: {key}: TLS is not served by the gateway (the "
                            "reverse proxy in front terminates it); remove the setting")
    if problems:
        raise HypercornConfigError("\n".join(problems))


#: Hypercorn settings that would serve TLS: its secure sockets would not be told apart
#: from the admin bind, which then answered as a second public listener.
_TLS_KEYS = frozenset({"certfile", "keyfile", "ca_certs", "ciphers", "verify_mode",
                       "keyfile_password"})


def _wrong_type(key: str, value: Any) -> str | None:
    """What is wrong with a value whose type is not that of Hypercorn's default (a
    ``workers = "two"`` ended in a traceback), or None."""
    default = getattr(Config, key, None)
    if default is None or isinstance(default, property):
        return None
    if isinstance(default, bool):
        expected: tuple[type, ...] = (bool,)
    elif isinstance(default, int | float):
        expected = (int, float)
    elif isinstance(default, str):
        expected = (str,)
    elif isinstance(default, list):
        expected = (list, str)
    else:
        return None
    if isinstance(value, bool) and bool not in expected:
        return f"{value!r} is not a {type(default).__name__}"
    if not isinstance(value, expected):
        return f"{value!r} is not a {type(default).__name__}"
    if (isinstance(default, int | float) and not isinstance(default, bool)
            and isinstance(value, int | float) and value < 0):
        # A count or a duration; a negative worker count served in one process.
        return f"{value!r} is negative"
    return None


class GatewayConfig(Config):
    """Hypercorn config whose sockets are bound once, before workers start."""

    _bound: Sockets | None = None

    def create_sockets(self) -> Sockets:
        if self._bound is None:
            # The master binds once and the workers inherit its sockets, so Hypercorn's
            # SO_REUSEPORT for several workers (each binding its own) would only let a
            # second gateway, or an admin bind equal to a public one, share a port.
            workers, self.workers = self.workers, min(self.workers, 1)
            try:
                self._bound = super().create_sockets()
            finally:
                self.workers = workers
        return self._bound

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_bound", None)
        return state


def load_hypercorn_config(path: str | os.PathLike[str] | None) -> GatewayConfig:
    mapping: dict[str, Any] = {}
    if path is not None:
        with open(path, "rb") as handle:
            try:
                mapping = tomllib.load(handle)
            except tomllib.TOMLDecodeError as error:
                raise HypercornConfigError(f"{path}: not TOML: {error}") from None
        check_hypercorn_mapping(mapping, str(path))
    config = GatewayConfig.from_mapping(mapping)
    assert isinstance(config, GatewayConfig)
    config.worker_class = config.worker_class or "trio"
    if config.worker_class != "trio":
        raise HypercornConfigError(f"{path}: worker_class: the gateway needs 'trio', got "
                                   f"{config.worker_class!r}")
    if config.h11_pass_raw_headers:
        # The request path reads header names as ASGI servers give them, lower-cased.
        raise HypercornConfigError(f"{path}: h11_pass_raw_headers: the gateway needs "
                                   "lower-cased header names; remove the setting")
    if config.read_timeout is not None:
        # Hypercorn applies it to every read, also while a client waits for its answer:
        # a request slower than it was cut and counted as the client leaving.
        raise HypercornConfigError(
            f"{path}: read_timeout: not supported; it cuts requests whose answer takes "
            "longer. A request head is bounded by keep_alive_timeout, a body by the "
            "policy's server.limits.body_timeout")
    if config.use_reloader:
        raise HypercornConfigError(f"{path}: use_reloader: not supported; the gateway "
                                   "reloads its policy on SIGHUP")
    config.application_path = APPLICATION_PATH
    if "errorlog" not in mapping:
        # Hypercorn's default writes to stderr synchronously; ours goes through a queue.
        config.errorlog = logging.getLogger("hypercorn.error")
    return config


def raise_open_file_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn when it is still short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning("could not raise the open-file limit: %s", error)
    if soft < needed:
        log.warning("open-file limit %d is below what a worker needs for max_inflight "
                    "clients and its upstream pools (~%d)",
                    soft, needed)
    return soft


def check_somaxconn(backlog: int) -> None:
    try:
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return
    if somaxconn < backlog:
        log.warning("net.core.somaxconn is %d, below the configured backlog %d: the kernel "
                    "will cap the accept queue", somaxconn, backlog)


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
#: prctl(2) option: the signal this process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def _failing_bind(binds: list[str], public_count: int) -> str:
    """Which of ``binds`` cannot be bound now, as ``bind HOST:PORT (public|admin)``."""
    for index, bind in enumerate(binds):
        role = "public" if index < public_count else "admin"
        host, _, port = bind.rpartition(":")
        if host.startswith("unix:") or not port.isdigit():
            continue
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(infos[0][4])
        except OSError:
            return f"bind {bind} ({role})"
    return "bind " + ", ".join(binds)


def close_listening(sockets: Sockets) -> None:
    """Close the master's copies of the listening sockets. A worker closes its own
    public ones as it begins to drain (trio's ``serve_listeners`` does); once the master
    has too, new connections are refused at once (a proxy in front tries another
    instance) instead of waiting in the backlog until the drain ends and being reset
    then. The workers keep their admin listeners until their drain ends
    (:mod:`gateway._drain`), which keeps the admin bind open until then."""
    for sock in [*sockets.insecure_sockets, *sockets.secure_sockets]:
        sock.close()


def bound_ports(sockets: Sockets) -> list[tuple[str, int]]:
    return [sock.getsockname()[:2] for sock in sockets.insecure_sockets]


def serve(policy_file: str, config_path: str | None, *, admin_bind: str | None = None,
          workers: int | None = None, public_bind: list[str] | None = None) -> int:
    """Run Hypercorn with the gateway app until stopped; returns the exit code."""
    from ._policy import upstream_sockets
    from ._policy_loader import LAST_GOOD_ENV, load_policy_file, record_last_good

    configure_logging()

    loaded = load_policy_file(policy_file)  # fail before binding anything
    config = load_hypercorn_config(config_path)
    if workers is not None:
        config.workers = workers
    if public_bind:
        config.bind = list(public_bind)
    if config.workers == 0 and config.max_requests:
        # Hypercorn ends a worker after max_requests for its master to start another;
        # with no master the gateway would just stop serving, and exit 0.
        raise HypercornConfigError("max_requests: needs workers >= 1 (with workers = 0 "
                                   "the gateway would stop serving after that many "
                                   "requests, with no worker started in its place)")
    admin = admin_bind or os.environ.get("GATEWAY_ADMIN_BIND") or loaded.policy.server.admin_bind
    if admin.startswith(("unix:", "fd://")):
        # Admin connections are told by the TCP address they arrive on.
        raise HypercornConfigError(f"admin bind {admin!r}: the admin endpoints need a "
                                   "host:port bind")
    public_count = len(config.bind)
    config.bind = [*config.bind, admin]
    for bind in config.bind:
        if problem := bind_problem(bind):
            raise HypercornConfigError(f"bind {bind!r}: {problem}")
    # Per process (each worker has its own descriptor table): its clients, twice over
    # for the upstream socket each may hold, its pools' sockets, and a margin.
    raise_open_file_limit(loaded.policy.server.max_inflight * 2
                          + upstream_sockets(loaded.policy) + 256)
    check_somaxconn(config.backlog)
    try:
        sockets = config.create_sockets()
    except OSError as error:  # name the bind: "Address already in use" alone says too little
        raise OSError(error.errno, error.strerror or str(error),
                      _failing_bind(config.bind, public_count)) from None
    addresses = bound_ports(sockets)
    # Admin connections are told by the local address they arrive on: by port alone
    # when the admin bind is a wildcard, else by host and port, since a public bind
    # may use the same port number on another address.
    admin_bound = addresses[public_count:]
    admin_ports = {port for host, port in admin_bound if host in _WILDCARD_HOSTS}
    admin_addresses = sorted({(host, port) for host, port in admin_bound
                              if host not in _WILDCARD_HOSTS})
    # Absolute, but not resolved: a symlink repointed by a release (``ln -sfn``, a
    # Kubernetes ConfigMap update) is followed at each reload, not pinned to its target.
    os.environ["GATEWAY_POLICY"] = os.path.abspath(policy_file)
    os.environ["GATEWAY_ADMIN_PORTS"] = ",".join(str(p) for p in sorted(admin_ports))
    os.environ["GATEWAY_ADMIN_ADDRESSES"] = json.dumps(admin_addresses)
    # The policy's admin bind the listener was bound to ("" when the command line or the
    # environment chose it): what a worker, a replacement one included, compares with.
    os.environ["GATEWAY_ADMIN_BIND_STARTED"] = "" if (
        admin_bind or os.environ.get("GATEWAY_ADMIN_BIND")) else loaded.policy.server.admin_bind
    if operator_metrics_dir := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        clear_metrics_dir(operator_metrics_dir)
    run_dir = None
    if config.workers > 1:
        # Shared by the workers: their trace sockets, and their metrics unless the
        # operator names a directory for those.
        run_dir = tempfile.mkdtemp(prefix="gateway-run-")
        if not socket_dir_fits(run_dir):  # a long TMPDIR: socket paths would not bind
            os.rmdir(run_dir)
            run_dir = tempfile.mkdtemp(prefix="gateway-run-", dir="/tmp")
        os.environ[PEER_DIR_ENV] = run_dir
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            metrics_dir = os.path.join(run_dir, "metrics")
            os.mkdir(metrics_dir)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    supervisor = None
    policy_dir = None
    if config.workers > 0:
        # Replacement workers start from the policy the workers serve when the file on
        # disk has since gone bad (see create_gateway_from_env); they keep it current.
        policy_dir = tempfile.mkdtemp(prefix="gateway-policy-")
        os.environ[LAST_GOOD_ENV] = os.path.join(policy_dir, "active.yaml")
        record_last_good(loaded)
        supervisor = Supervisor(config.workers, gateway_worker,
                                {"config": config, "sockets": sockets},
                                drain_timeout_s=functools.partial(
                                    drain_timeout, policy_file, config.graceful_timeout,
                                    loaded.policy.server.send_timeout),
                                on_worker_exit=forget_worker,
                                on_workers_changed=worker_list_recorder(run_dir),
                                on_stop=functools.partial(close_listening, sockets))
        supervisor.take_signals()
    if supervisor is None:
        # As in a worker: a reload asked for before the app listens for SIGHUP (its
        # import, its start-up) must not end the process. A stop asked for before the
        # app listens is kept for it (a second one ends the process at once), from
        # before the gateway announces itself.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _early_stop)
        signal.signal(signal.SIGINT, _early_stop)
    public = ", ".join(http_url(h, p) for h, p in addresses[:public_count])
    admin_urls = ", ".join(http_url(h, p) for h, p in addresses[public_count:])
    print(f"gateway: policy {loaded.file} ({loaded.version}), {config.workers} worker(s)\n"
          f"gateway: serving {public}\ngateway: admin {admin_urls}", flush=True)
    try:
        if config.pid_path is not None:
            write_pid_file(config.pid_path)
        if supervisor is None:
            return serve_in_process(config, sockets)
        return supervisor.run()  # returns once every worker has ended
    finally:
        if config.pid_path is not None:
            _remove_pid_file(config.pid_path)
        for directory in (run_dir, policy_dir):
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        close_listening(sockets)


def gateway_worker(config: Config, sockets: Sockets | None = None,
                   shutdown_event: Any = None, retiring_event: Any = None) -> None:
    """A worker process: Hypercorn's trio worker, which tells the master through
    ``retiring_event`` when it starts to drain past ``max_requests``, so that its
    replacement starts then, not once it has exited."""
    if retiring_event is not None:
        from ._hypercorn_fixes import set_retire_hook

        set_retire_hook(retiring_event.set)
    trio_worker(config, sockets, shutdown_event)


def _remove_pid_file(path: str) -> None:
    """Remove the PID file at exit if it is still ours (as nginx does): a stale one
    would name a dead, or an unrelated, process."""
    with contextlib.suppress(OSError, ValueError):
        if os.path.isfile(path) and int(Path(path).read_text().strip()) == os.getpid():
            os.unlink(path)


def serve_in_process(config: Config, sockets: Sockets) -> int:
    """``workers = 0``: serve in this process, draining on SIGTERM or SIGINT.

    Hypercorn's runner installs no shutdown trigger here, so SIGTERM would end the
    process with its requests in flight."""
    for sock in [*sockets.insecure_sockets, *sockets.secure_sockets]:
        sock.listen(config.backlog)
    app = load_application(config.application_path, config.wsgi_max_body_size)
    trio.run(functools.partial(worker_serve, app, config, sockets=sockets,
                               shutdown_trigger=_stop_signal))
    return 0


#: Stop signals received (``workers = 0``): the first drains, a second ends the process.
_stops: list[int] = []
#: How a stop signal reaches the running app: its trio token and the event it sets.
_stop_wakeup: tuple[trio.lowlevel.TrioToken, trio.Event] | None = None


def _early_stop(signum: int, frame: object) -> None:
    """SIGTERM and SIGINT with ``workers = 0``, from before the gateway announces itself
    to its end: one asked for while the app loads and starts is kept for it (a clean
    stop, not a killed process); a second one ends the process at once."""
    if _stops:
        _exit_at_once(signum, frame)
    _stops.append(signum)
    os.write(2, b"gateway: stop signal: draining (a second one exits at once)\n")
    if _stop_wakeup is not None:
        token, event = _stop_wakeup
        with contextlib.suppress(trio.RunFinishedError):  # the app has already ended
            token.run_sync_soon(event.set)


async def _stop_signal() -> None:
    """Hypercorn's shutdown trigger: returns once a stop signal has come."""
    global _stop_wakeup
    event = trio.Event()
    _stop_wakeup = (trio.lowlevel.current_trio_token(), event)
    if not _stops:
        await event.wait()


def _exit_at_once(signum: int, frame: object) -> None:
    os.write(2, b"gateway: second stop signal: exiting without draining\n")
    os._exit(1)


def drain_timeout(policy_file: str, graceful_timeout: float, send_timeout: float) -> float:
    """How long the master waits for stopping workers before it kills them.

    Past graceful_timeout a worker cancels what is left; a write to a client that
    stopped reading can take send_timeout more (from the policy file as it is now, which
    the workers may have reloaded; else from the last good policy they serve;
    ``send_timeout`` if neither can be read), and closing pools a few seconds."""
    from ._policy_loader import LAST_GOOD_ENV, PolicyError, load_policy_file

    for path in (policy_file, os.environ.get(LAST_GOOD_ENV)):
        if path:
            with contextlib.suppress(PolicyError, OSError):
                send_timeout = load_policy_file(path).policy.server.send_timeout
                break
    return graceful_timeout + send_timeout + 15


def clear_metrics_dir(directory: str) -> None:
    """Remove an earlier run's metric files from an operator's PROMETHEUS_MULTIPROC_DIR.

    prometheus_client sums every ``*.db`` file it finds there, so an earlier run's files
    would add its counts to this run's and keep its processes' gauges for ever."""
    os.makedirs(directory, exist_ok=True)
    stale = list(Path(directory).glob("*.db"))
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d metric files of an earlier run from %s", len(stale), directory)


def worker_list_recorder(run_dir: str | None) -> Callable[[list[int]], None] | None:
    """What records the running workers for trace queries (none with one worker)."""
    if run_dir is None:
        return None
    return functools.partial(write_worker_list, run_dir)


def forget_worker(pid: int) -> None:
    """Drop what an ended worker shared: its live gauges (in flight, pool sizes) from
    the metrics scrape, and its trace socket."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
    directory = os.environ.get(PEER_DIR_ENV)
    if directory:
        with contextlib.suppress(OSError):
            os.unlink(socket_path(directory, pid))


def prepare_worker_process() -> None:
    """Run in each worker at import: drain on the master's shutdown event, not SIGTERM.

    SIGHUP is ignored until the app's reload task listens for it, so a reload asked
    for during start-up cannot kill a worker.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        # The master handles SIGINT (a terminal's Ctrl-C reaches the whole group) and
        # SIGTERM; it started this process with them blocked (see _supervisor).
        for signum in MASTER_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)
        _end_with(parent.pid)
    configure_logging()


def _end_with(master_pid: int | None) -> None:
    """Have the kernel kill this worker when its master dies (Linux): a master killed
    without running its handlers (the OOM killer, kill -9) left workers serving for
    ever, holding the ports and deaf to SIGTERM, which they ignore."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot ask to end with the master: errno %d", ctypes.get_errno())
    elif os.getppid() != master_pid:  # it died before the request was in place
        os._exit(1)


def bind_problem(bind: str) -> str | None:
    """Why a bind is no ``host[:port]`` (``[v6]:port`` for an IPv6 address), or None.
    Hypercorn raised an OverflowError from deep in its start-up for a port above 65535,
    took a port that is no number (``host:http``) as part of the host name, and read a
    stray bracket or an IPv6 address outside brackets as another address."""
    if bind.startswith(("unix:", "fd://")):
        return None
    try:
        split_bind(bind)
    except ValueError as error:
        return str(error)
    return None


def listen_socket(bind: str = "127.0.0.1:0", backlog: int = 4096) -> socket.socket:
    """A non-blocking listening socket for ``host:port`` (port 0: an ephemeral one).

    Bound before serving, so the caller knows the real port (tests, the demo). Raises
    ValueError, saying why, for a bind that is no ``host:port`` (``[v6]:port`` for an
    IPv6 address, as ``serve`` takes it)."""
    host, port = split_bind(bind)
    if port is None:
        raise ValueError("no port (a bind is host:port)")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
