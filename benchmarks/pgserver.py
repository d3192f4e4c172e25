"""A throwaway PostgreSQL server for tests and benchmarks: the Debian `postgresql` package's
`initdb` and `pg_ctl` in a temporary folder, on a free loopback port.

initdb refuses to run as root, so as root the server runs as the `postgres` user the package
creates (runuser). Nothing is mocked: it is the real server, stopped (and its folder removed)
on `stop()`. `restart()` stops it fast and starts it again on the same port and data, for
fault tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

INSTALL_HINT = "apt-get install postgresql (Debian's package gives initdb and pg_ctl)"


def pg_bindir() -> Path | None:
    """The folder holding initdb/pg_ctl: pg_config's, or the newest /usr/lib/postgresql/*/bin."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if (Path(out) / "initdb").is_file():
            return Path(out)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or pg_bindir()
        if self.bindir is None:
            raise RuntimeError(f"PostgreSQL is not installed: {INSTALL_HINT}")
        self.root = Path(tempfile.mkdtemp(prefix="mp2a-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.max_connections = 200  # PostgreSQL's default is 100; a bench may set its own
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            os.chmod(self.root, 0o700)
        self._run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"],
        )

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> PgServer:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        opts += f" -c max_connections={self.max_connections}"
        r = self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
             str(self.log), "-w", "-t", "60", "start"],
            check=False,
        )  # fmt: skip
        if r.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{log[-2000:]}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            check=False,
        )

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stop the server at once (connections are cut), wait, start it again."""
        self.stop("immediate")
        time.sleep(down_seconds)
        self.start()

    def create_db(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PgServer]:
    server = PgServer().start()
    try:
        yield server
    finally:
        server.destroy()
