"""A throwaway PostgreSQL server from the Debian binaries, for tests and benchmarks (never for production).

``initdb`` refuses to run as root, so as root the cluster is created and run as the ``postgres`` user
(``runuser -u postgres --``) in a temp dir it owns; as any other user it runs as that user. The server
listens on 127.0.0.1 on a free port with trust authentication; durability settings are PostgreSQL's
defaults (fsync on, synchronous_commit on).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_pg_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, or $RLHF_PG_BIN."""
    candidates = [os.environ["RLHF_PG_BIN"]] if os.environ.get("RLHF_PG_BIN") else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    for candidate in candidates:
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    """Start with :meth:`start`, connect with :attr:`url` or :meth:`create_database`, :meth:`stop` at the end."""

    def __init__(self, base_dir: str | os.PathLike | None = None, pg_bin: Path | None = None):
        self.pg_bin = pg_bin or find_pg_bin()
        if self.pg_bin is None:
            raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.dir = Path(tempfile.mkdtemp(prefix="rlhf-pg-", dir=base_dir))
        self.data = self.dir / "data"
        self.port = 0
        self._shared: set[str] = set()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
            os.chmod(self.dir, 0o700)

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        return subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=True, cwd=self.dir
        )

    def start(self) -> LocalPostgres:
        self._run(
            str(self.pg_bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"
        )
        last_error = None
        for _ in range(5):  # the free port may be taken between choosing and binding it
            self.port = _free_port()
            options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=200"
            try:
                self._run(
                    str(self.pg_bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.dir / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                )
                return self
            except subprocess.CalledProcessError as exc:
                last_error = exc
                time.sleep(0.2)
        raise RuntimeError(
            f"PostgreSQL did not start: {last_error.stderr if last_error else ''}\n{self.log_tail()}"
        )

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def create_database(self, name: str) -> str:
        """Create a fresh database; returns its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def create_schema(self, name: str, database: str = "rlhf_tests") -> str:
        """Create a fresh schema in one shared database; returns a URL whose connections use it (search_path).

        Much cheaper than a database per test: no copy of the 8 MB template to write, then delete.
        """
        import psycopg

        if database not in self._shared:
            self.create_database(database)
            self._shared.add(database)
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname={database}", autocommit=True
        ) as c:
            c.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            c.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.database_url(database)}?options=-csearch_path%3D{name}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.dir / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the server and delete the cluster.

        Immediate mode: no shutdown checkpoint, since the data is deleted next (after a test session that
        created many databases, a checkpoint on a busy disk can take minutes). If pg_ctl fails, the postmaster
        is killed, so that no server outlives its deleted data directory.
        """
        if self.data.exists() and self.port:
            try:
                self._run(
                    str(self.pg_bin / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                    timeout=60,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGKILL)  # its backends exit when they see the postmaster gone
        except (OSError, ValueError, IndexError):
            pass

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
