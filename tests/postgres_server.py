"""A real PostgreSQL server on loopback for tests: a new cluster in a temporary folder, a free port,
password authentication (scram-sha-256) over TCP, stopped and removed at the end.

The binaries are Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``; the Makefile's
``test`` target installs it where apt-get is available) or any ``initdb``/``pg_ctl`` on PATH. PostgreSQL
refuses to run as root, so under root (CI, containers) the server runs as the ``postgres`` user that the
package creates, through ``runuser``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from mlflow_server import free_port


def find_bin_dir() -> Path | None:
    """The folder holding initdb and pg_ctl (newest Debian version first), or None."""
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    for version in sorted(debian, key=lambda p: int(p.parent.name), reverse=True):
        if (version / "initdb").exists() and (version / "pg_ctl").exists():
            return version
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def unavailable_reason() -> str | None:
    """Why no server can start here (one line), or None when one can."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return "no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root without runuser (PostgreSQL refuses root)"
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]'; the dev extra has it)"
    return None


class PostgresServer:
    """``initdb`` + ``pg_ctl start`` in a temporary folder; a role ``user`` with ``password`` owning ``databases``.

    ``start_s``: seconds from initdb to the databases being created (what the fixture costs).
    """

    def __init__(self, user: str = "mannstudy", password: str = "", databases: tuple[str, ...] = ("optuna",)):
        self.bin_dir = find_bin_dir()
        self.user, self.password, self.databases = user, password, databases
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="pg"))
        self.data = self.folder / "data"
        self.start_s = float("nan")

    def _run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        command = [str(a) for a in args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=True, capture_output=True, text=True, **kw)

    def url(self, database: str, with_password: bool = True) -> str:
        secret = f":{self.password}" if with_password and self.password else ""
        return f"postgresql://{self.user}{secret}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        t0 = time.monotonic()
        if os.geteuid() == 0:
            shutil.chown(self.folder, user="postgres")
        # local (socket) connections trust the superuser; TCP asks every role for its password
        self._run(self.bin_dir / "initdb", "-D", self.data, "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -F -c max_connections=200"
        self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-o", options, "-l", self.folder / "server.log",
                  "-w", "-t", "60", "start")
        psql = shutil.which("psql") or str(self.bin_dir / "psql")
        sql = [f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'"]
        sql += [f"CREATE DATABASE {db} OWNER {self.user}" for db in self.databases]
        for statement in sql:
            self._run(psql, "-h", self.folder, "-p", self.port, "-U", "postgres", "-d", "postgres", "-qc", statement)
        self.start_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin_dir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def write_pgpass(self, path: Path) -> Path:
        """A libpq password file for this server's role (mode 0600, or libpq ignores it)."""
        path.write_text(f"127.0.0.1:{self.port}:*:{self.user}:{self.password}\n")
        path.chmod(0o600)
        return path

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
