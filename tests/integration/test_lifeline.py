"""`mp2a serve` killed -9 with its whole process group: no BentoML worker outlives it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from benchmarks.procs import alive_processes, descendants, free_port


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_sigkill_of_the_serve_group_leaves_no_worker(street_run, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mp2a", "serve", str(street_run), "--host", "127.0.0.1"]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, as a shell job or a unit would be
        )
    tree: set[int] = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError(f"not ready:\n{log.read_text()[-3000:]}")
        tree = descendants(proc.pid)
        # BentoML's worker lives outside the group: a group kill does not reach it
        outside = {p for p in tree if os.getpgid(p) != proc.pid}
        assert outside, "expected a BentoML worker in a session of its own"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while time.time() < deadline:
            left = tree & set(alive_processes())
            if not left and _port_free(port):
                break
            time.sleep(0.1)
        left = tree & set(alive_processes())
        assert not left, f"processes outlived mp2a serve: {sorted(left)}"
        assert _port_free(port), f"port {port} still held 5 s after the kill"
    finally:
        for pid in tree & set(alive_processes()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
