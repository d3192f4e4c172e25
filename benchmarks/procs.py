"""Real server processes for benchmarks and tests: start `mp2a serve` on a free loopback port,
wait for /readyz, stop it with SIGTERM, or kill it -9 with every process under it (BentoML's
workers run in sessions of their own, so a process group does not hold them all)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive_processes() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process, from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if stat[0] not in ("Z", "X"):
                out[int(d.name)] = int(stat[1])
    return out


def descendants(pid: int) -> set[int]:
    """`pid` and every process under it."""
    parents = alive_processes()
    found, todo = {pid}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in found]
        found.update(kids)
        todo.extend(kids)
    return found


class ServerProcess:
    """`cmd --port P` (an `mp2a serve …` command line) in its own session."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path | None = None):
        self.cmd, self.env, self.log, self.cwd = cmd, env, log, cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ServerProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.cmd, "--port", str(self.port)],
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.cmd} exited {self.proc.returncode}:\n{tail}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/readyz", timeout=2) as r,
            ):
                if r.status == 200:
                    return self
            time.sleep(0.3)
        raise TimeoutError(f"{self.url}/readyz not ready after {timeout:.0f} s")

    def kill9(self) -> None:
        """SIGKILL to the server and everything under it, at once."""
        assert self.proc is not None
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (the launcher stops BentoML and its helpers), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()


def stop_group(proc, group_first: bool = False, timeout: float = 20.0) -> None:
    """Stop a server started in its own process group: SIGTERM (to the whole group when
    `group_first`, else to the process), wait, kill if it hangs, then SIGKILL whatever of its
    group is left (workers it did not reap)."""
    from online.supervisor import terminate

    if group_first:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    terminate(proc, timeout, signal_it=not group_first)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
