"""A throwaway PgBouncer in front of a throwaway PostgreSQL (benchmarks/pgserver.py), for
tests and benchmarks: Debian's `pgbouncer` binary, pool_mode=transaction, trust auth, on a free
loopback port, its files in a temporary folder.

PgBouncer refuses to run as root, so as root it runs as the `postgres` user (runuser), like
the server. Nothing is mocked: clients speak to the real pooler, which hands each transaction
to one of `pool_size` server connections.

`nice` (a bench's choice, negative needs root) runs the pooler at that scheduling niceness. A
bench that packs a hundred replica processes onto the cores of one machine needs it: the
kernel gives each runnable process an equal share, so the one single-threaded pooler gets
1/N of the cores where a deployment gives it a core of its own (measured on 2 cores and 100
light replicas: clients waited for the pool while PostgreSQL sat idle). `niceness` reads back
what the running pooler got.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.pgserver import PgServer, _free_port

INSTALL_HINT = "apt-get install pgbouncer"
SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path=SBIN)


class PgBouncer:
    """`pgbouncer` in transaction mode forwarding every database to `server`."""

    def __init__(
        self, server: PgServer, pool_size: int = 10, max_clients: int = 2000, nice: int = 0
    ) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError(f"pgbouncer is not installed: {INSTALL_HINT}")
        self.binary, self.server, self.nice = binary, server, nice
        self.root = Path(tempfile.mkdtemp(prefix="mp2a-pgbouncer-", dir="/tmp"))
        self.port = _free_port()
        self.ini = self.root / "pgbouncer.ini"
        self.log = self.root / "pgbouncer.log"
        (self.root / "users.txt").write_text('"postgres" ""\n')
        self.ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={server.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir = {self.root}\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            f"max_client_conn = {max_clients}\n"
            "server_reset_query =\n"
            "server_check_delay = 1\n"
            f"logfile = {self.log}\npidfile = {self.root / 'pgbouncer.pid'}\n"
            "admin_users = postgres\n"
        )
        self.as_root = os.geteuid() == 0
        if self.as_root:
            for p in [self.root, *self.root.iterdir()]:
                shutil.chown(p, "postgres", "postgres")
        self.proc: subprocess.Popen | None = None

    def dsn_for(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> PgBouncer:
        cmd = [self.binary, str(self.ini)]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        if self.nice:
            cmd = ["nice", "-n", str(self.nice), *cmd]  # unprivileged: a warning, then nice 0
        # the pooler holds one file descriptor per client: 100 replicas and their threads
        with contextlib.suppress(ValueError, OSError):
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                raise RuntimeError(f"pgbouncer exited {self.proc.returncode}:\n{log[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return self
            time.sleep(0.1)
        raise TimeoutError(f"pgbouncer not listening on {self.port} after {timeout:.0f} s")

    @property
    def niceness(self) -> int | None:
        """The running pooler's scheduling niceness (None: not running or not readable)."""
        try:
            pid = int((self.root / "pgbouncer.pid").read_text().split()[0])
            return os.getpriority(os.PRIO_PROCESS, pid)
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
