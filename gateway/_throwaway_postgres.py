"""A throwaway PostgreSQL cluster (tests and the demo), from the Debian package's binaries.

``initdb`` into a temporary directory, ``pg_ctl start`` on 127.0.0.1 with a free
ephemeral port and a unix socket directory inside the temporary directory, trust auth,
``fsync=off``; ``pg_ctl stop -m immediate`` and the directory removed at teardown.
``stop()``/``start()`` take the same cluster down and up again on the same port, for
outage tests.

PostgreSQL refuses to run as root, so as root every server-side command runs as the
unprivileged ``postgres`` user that the Debian package creates, through ``runuser``
(or ``setpriv``), and the temporary directory is handed to that user.

Missing binaries raise :class:`PostgresUnavailable`; the test fixture turns that into a
skip, or a failure under CI, and the demo runs without its SQL routes.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

DATABASE = "gateway_test"
SUPERUSER = "postgres"
#: Bounds on the server's own start and stop, in seconds (pg_ctl -t).
START_TIMEOUT_S = 30
#: Bound on any one helper command (initdb, psql, pg_ctl), in seconds.
COMMAND_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin``, else ``pg_config --bindir``."""
    candidates = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        version = Path(initdb).parent.parent.name
        key = tuple(int(part) for part in re.findall(r"\d+", version))
        candidates.append((key, Path(initdb).parent))
    if candidates:
        return max(candidates)[1]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False, timeout=10
        )
        bindir = Path(out.stdout.strip())
        if out.returncode == 0 and (bindir / "initdb").exists():
            return bindir
    found = shutil.which("initdb")
    if found is not None:
        return Path(found).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
        "/usr/lib/postgresql/*/bin or via pg_config; install the Debian package "
        "`postgresql` (.ci/install-postgres.sh)"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _unprivileged_prefix() -> tuple[list[str], pwd.struct_passwd | None]:
    """The command prefix that drops root to the ``postgres`` user (none if not root)."""
    if os.geteuid() != 0:
        return [], None
    try:
        user = pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root and there is no {SUPERUSER!r} system user to run the server "
            "as; install the Debian package `postgresql`, which creates it"
        ) from None
    if shutil.which("runuser"):
        return ["runuser", "-u", SUPERUSER, "--"], user
    if shutil.which("setpriv"):
        return [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
        ], user
    raise PostgresUnavailable("running as root and neither runuser nor setpriv is available")


class PostgresCluster:
    """One PostgreSQL server in a temporary directory; see the module docstring."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.database = DATABASE
        self.user = SUPERUSER
        self._prefix, self._owner = _unprivileged_prefix()
        self.root = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self.sockdir.mkdir()
        if self._owner is not None:
            for path in (self.root, self.sockdir):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        self.running = False

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    # ---- commands

    def _server_cmd(self, name: str, *args: str) -> list[str]:
        return [*self._prefix, str(self.bindir / name), *args]

    def _run(self, cmd: list[str]) -> str:
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                check=False,
                cwd=self.root,
                timeout=COMMAND_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{cmd[0]} timed out: {' '.join(cmd)}") from exc
        if done.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"command failed ({done.returncode}): {' '.join(cmd)}\n"
                f"{done.stdout}{done.stderr}\n--- server log tail ---\n{log}"
            )
        return done.stdout

    def init(self) -> None:
        self._run(
            self._server_cmd(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        )

    def start(self) -> None:
        """Start (or restart after ``stop()``) on the same port and directory."""
        options = " ".join(
            [
                f"-c listen_addresses={self.host}",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.sockdir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=100",
            ]
        )
        self._run(
            self._server_cmd(
                "pg_ctl",
                "start",
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-o",
                options,
                "-w",
                "-t",
                str(START_TIMEOUT_S),
            )
        )
        self.running = True

    def stop(self) -> None:
        """Stop at once (``-m immediate``): clients see their connections die."""
        if not self.running:
            return
        self._run(
            self._server_cmd("pg_ctl", "stop", "-D", str(self.datadir), "-m", "immediate", "-w")
        )
        self.running = False

    def create_database(self) -> None:
        self.psql(f"CREATE DATABASE {self.database}", database="postgres")

    def psql(self, sql: str, *, database: str | None = None) -> str:
        """Run SQL out of band through the ``psql`` binary; unaligned tuples only."""
        return self._run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database or self.database,
                "-c",
                sql,
            ]
        ).strip()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PostgresCluster:
    """A started cluster with the test database; raises PostgresUnavailable."""
    cluster = PostgresCluster(find_bindir())
    try:
        cluster.init()
        cluster.start()
        cluster.create_database()
    except BaseException:
        cluster.destroy()
        raise
    return cluster
