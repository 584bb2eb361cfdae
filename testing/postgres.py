"""A throwaway PostgreSQL server for tests, benchmarks and the demo (issue 11).

``PostgresServer`` runs Debian's (or any) PostgreSQL binaries in a temporary directory:
``initdb`` with trust authentication for one role, then ``pg_ctl start`` on 127.0.0.1 and a
free port, its socket in the same directory. PostgreSQL refuses to run as root, so when this
process is root the directory is handed to an unprivileged user (``nobody`` unless
``TRAINGUARD_PG_USER`` names another) and every server command runs as that user through
``setpriv``. ``database()`` creates a fresh database and returns its URL; ``restart()`` is
``pg_ctl restart -m fast`` (what the chaos test does to it); ``down()`` / ``up()`` an outage
that lasts; ``stop()`` removes everything.

Nothing here is imported by ``trainguard run``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

ROLE = "trainguard"
#: Where distributions put the server binaries when they are not on PATH (Debian, Ubuntu).
_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/opt/homebrew/opt/postgresql*/bin")
INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, pg_ctl) were not found: on Debian or Ubuntu"
    " `apt-get install postgresql`, elsewhere your distribution's PostgreSQL server package"
)


class PostgresUnavailable(RuntimeError):
    """The server binaries are absent or the server did not start (the message says which)."""


def find_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl``: on PATH first, then the places
    distributions use; None when there is none."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = sorted(
        (p for pattern in _SEARCH for p in Path("/").glob(pattern.lstrip("/"))),
        key=lambda p: p.as_posix(),
        reverse=True,  # the newest major version first
    )
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One temporary PostgreSQL server on loopback (see the module doc)."""

    def __init__(self, *, fsync: bool = False, bin_dir: Path | None = None) -> None:
        directory = bin_dir or find_binaries()
        if directory is None:
            raise PostgresUnavailable(INSTALL_HINT)
        self.bin_dir = directory
        #: Off for tests (a crash of the test machine loses nothing that matters); benchmarks
        #: that report PostgreSQL figures start it with fsync on.
        self.fsync = fsync
        self.port = _free_port()
        self.host = "127.0.0.1"
        self.root = Path(tempfile.mkdtemp(prefix="trainguard-pg-"))
        self.data = self.root / "data"
        self.log_file = self.root / "server.log"
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = pwd.getpwnam(os.environ.get("TRAINGUARD_PG_USER", "nobody"))
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
            self.root.chmod(0o700)

    # -- running the server's own commands -----------------------------------------------
    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin_dir / argv[0]), *argv[1:]]
        if self._user is not None:
            command = [
                "setpriv",
                f"--reuid={self._user.pw_uid}",
                f"--regid={self._user.pw_gid}",
                "--clear-groups",
                "--",
                *command,
            ]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            cwd=self.root,
        )
        if check and done.returncode != 0:
            raise PostgresUnavailable(
                f"{argv[0]} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}"
                + self._log_tail()
            )
        return done

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()[-15:]
        except OSError:
            return ""
        return "\nserver log:\n" + "\n".join(lines) if lines else ""

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.data), "-U", ROLE, "-A", "trust", "-E", "UTF8")
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={self.host}"
            f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            action,
            "-D",
            str(self.data),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            *extra,
        )

    def restart(self) -> None:
        """``pg_ctl restart -m fast``: every connection is cut, the server comes back."""
        self._pg_ctl("restart", "-m", "fast")

    def down(self) -> None:
        """``pg_ctl stop -m fast``, keeping the data: every connection is cut and none is
        accepted until ``up`` (an outage longer than a restart)."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60")

    def up(self) -> None:
        """Start the server again after ``down``."""
        self._pg_ctl("start")

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------
    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{ROLE}@{self.host}:{self.port}/{database}"

    def database(self, name: str | None = None) -> str:
        """Create a fresh, empty database and return its URL."""
        name = name or f"tg_{uuid.uuid4().hex[:12]}"
        psql = self.bin_dir / "psql"
        client = str(psql) if psql.exists() else shutil.which("psql")
        if client is None:
            raise PostgresUnavailable("psql (PostgreSQL's client) was not found")
        done = subprocess.run(
            [client, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.admin_url],
            input=f'CREATE DATABASE "{name}";\n',
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise PostgresUnavailable(f"CREATE DATABASE failed: {done.stderr.strip()}")
        return self.url(name)


@contextlib.contextmanager
def running(*, fsync: bool = False) -> Iterator[PostgresServer]:
    """A started server for the duration of the block, removed afterwards."""
    server = PostgresServer(fsync=fsync)
    try:
        yield server.start()
    finally:
        server.stop()
