"""`mp2a serve RUN`: check the artifact here, then run `bentoml serve` on the service.

The check happens in this process so that a bad artifact is one clear line (exit 2) rather
than a worker traceback. With the ort backend and no exported encoder, the encoder is
exported first when the export stack (torch) is installed; on an edge install without it
the error says which command to run where it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from mp2a import lifeline
from mp2a.artifact import load_artifact
from mp2a.errors import ArtifactError, Mp2aError
from online.hub import EdgeTokens
from online.supervisor import WorkerSupervisor, edge_supervisor
from serving import workers as worker_count
from serving.backends import BACKENDS, ENCODERS, EXPORT_FORMAT, encoder_path

log = logging.getLogger(__name__)

SERVICE = "serving.service:Mp2aService"
REPO_ROOT = Path(__file__).resolve().parent.parent  # the folder holding serving/


def ensure_encoder(run: Path, precision: str = "fp32") -> None:
    """The exported encoder exists and matches the artifact; export it if we can."""
    art = load_artifact(run)
    try:
        encoder_path(art, precision)
        return
    except ArtifactError as missing:
        try:
            from export.run import export
        except ImportError:
            raise missing from None
        if (run / ENCODERS[precision]).is_file():
            raise  # present but stale: re-exporting silently would hide a mixed-up artifact
    fmt = EXPORT_FORMAT[precision]
    log.warning("%s has no exported encoder; exporting it now (mp2a export --format %s)", run, fmt)
    export(run, fmt)


def serve_command(port: int, host: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        SERVICE,
        "--working-dir",
        str(REPO_ROOT),
        "--host",
        host,
        "--port",
        str(port),
    ]


def serve_env(run: Path, backend: str, precision: str = "fp32") -> dict[str, str]:
    env = dict(os.environ)
    env["MP2A_RUN"] = str(run.resolve())
    env["MP2A_BACKEND"] = backend
    env["MP2A_PRECISION"] = precision
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")  # no usage reporting from a model server
    env[lifeline.ENV] = str(os.getpid())  # BentoML's workers end with us (mp2a/lifeline.py)
    return env


def bentoml_prometheus_dir() -> str:
    """The multiprocess directory `bentoml serve` gives its workers (BENTOML_HOME's); the
    adaptation worker writes its mp2a_adaptation_* metrics there so /metrics shows them."""
    home = os.environ.get("BENTOML_HOME", os.path.join(os.path.expanduser("~"), "bentoml"))
    return os.path.join(home, "prometheus_multiproc_dir")


def check_state(run: Path) -> None:
    """MP2A_STATE reachable and fit for `run`, checked before anything starts. A database
    that cannot be reached is one line (exit 2), unless this machine verified a version of
    it before: then the server starts on that version and reconnects in the background."""
    from online.state import StateError, open_state

    try:
        open_state(run).close()
    except StateError as e:
        if os.environ.get("MP2A_STATE", "").strip().startswith(("postgresql://", "postgres://")):
            offline = open_state(run, connect=False)
            cached = offline._last_verified("")  # type: ignore[attr-defined]
            if cached is not None and "cannot reach" in str(e):
                print(
                    f"mp2a: warning: {e}; serving the last verified version {cached.version} "
                    "and reconnecting in the background",
                    file=sys.stderr,
                    flush=True,
                )
                return
        raise Mp2aError(str(e)) from None


MIN_TOKEN_CHARS = 16  # as the edge tokens (online/hub.py)


def check_admin_token(env: Mapping[str, str]) -> None:
    """MP2A_ADMIN_TOKEN, when set, is long enough to resist guessing and has no whitespace
    around it (a token read from a file keeps its newline, and then never matches)."""
    token = env.get("MP2A_ADMIN_TOKEN")
    if token is None or token == "":
        return
    if token != token.strip():
        raise Mp2aError(
            "MP2A_ADMIN_TOKEN has whitespace around it (a newline from a file?); set it "
            "without, e.g. MP2A_ADMIN_TOKEN=\"$(tr -d '[:space:]' < token.txt)\""
        )
    if len(token) < MIN_TOKEN_CHARS:
        raise Mp2aError(
            f"MP2A_ADMIN_TOKEN is shorter than {MIN_TOKEN_CHARS} characters; use a random one "
            "(openssl rand -hex 16)"
        )


def check_port(port: int, host: str) -> None:
    """The port is a TCP port and free on `host`: one line now, instead of BentoML's
    traceback once it fails to bind (or a silent modulo 65536 for a number too large)."""
    if not 1 <= port <= 65535:
        raise Mp2aError(f"--port {port} is not a TCP port; choose one in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind((host, port))
        except socket.gaierror:
            raise Mp2aError(f"--host {host!r} is not an address of this machine") from None
        except OSError as e:
            raise Mp2aError(
                f"port {port} on {host} is not free ({e.strerror}): another server holds it; "
                "stop it or choose another --port"
            ) from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(
    run: Path,
    port: int = 3000,
    host: str = "0.0.0.0",
    backend: str = "ort",
    precision: str = "fp32",
    hub: str | None = None,
    site: str | None = None,
) -> int:
    """Serve `run` until interrupted; returns the server's exit code. With `hub` and `site`,
    the server is an edge of that hub (uploads its traffic, installs the site's heads)."""
    check_port(port, host)
    check_admin_token(os.environ)
    if backend not in BACKENDS:
        raise Mp2aError(f"unknown backend {backend!r}. Available: {', '.join(BACKENDS)}")
    if precision not in ENCODERS:
        raise Mp2aError(f"unknown precision {precision!r}. Available: {', '.join(ENCODERS)}")
    if backend == "ort":
        ensure_encoder(run, precision)
    else:
        load_artifact(run)
    check_state(run)
    supervisors = []
    env = serve_env(run, backend, precision)
    if (hub is None) != (site is None):
        raise Mp2aError("an edge needs both --hub URL and --site NAME")
    if hub is not None and site is not None:
        if os.environ.get("MP2A_ONLINE", "").strip() == "1":
            raise Mp2aError(
                "an edge adapts through its hub: unset MP2A_ONLINE (the hub runs the worker)"
            )
        edge = edge_supervisor(run, hub, site, bentoml_prometheus_dir())
        env.update(edge.extra_env)
        supervisors.append(edge)
    try:
        EdgeTokens.from_env(os.environ)
    except ValueError as e:
        raise Mp2aError(str(e)) from None
    try:
        worker_count.requested(os.environ)  # the count itself is chosen by the service
    except ValueError as e:
        raise Mp2aError(str(e)) from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(
        f"mp2a: serving {run} ({backend}, {precision}) on http://{shown}:{port}\n"
        f"  try: curl -F image=@photo.png http://{shown}:{port}/predict",
        file=sys.stderr,
        flush=True,
    )
    # a bad MP2A_ADAPT_* value fails here, before anything starts
    worker = WorkerSupervisor.from_env(run, bentoml_prometheus_dir())
    if worker is not None:
        supervisors.append(worker)
    # SIGTERM (docker stop, systemd, kill) stops like Ctrl-C: the server and the worker are
    # shut down with us instead of being left running as orphans. SIGINT is set too: a shell
    # starts background jobs with it ignored, and a Python started so never installs its own.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    # `bentoml serve` empties its metrics directory as it starts: the supervised processes
    # start once it has made it anew, so what they write there is not wiped (and not missing)
    metrics_dir = bentoml_prometheus_dir()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    proc = subprocess.Popen(serve_command(port, host), env=env, preexec_fn=lifeline.die_with_parent)
    started = time.monotonic()
    try:
        waiting = list(supervisors)
        while True:
            if waiting and (os.path.isdir(metrics_dir) or time.monotonic() - started > 60):
                for sup in waiting:
                    sup.start()
                waiting = []
            try:
                return proc.wait(timeout=0.2 if waiting else 1.0)
            except subprocess.TimeoutExpired:
                for sup in supervisors:
                    sup.check()  # a no-op until started
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        for sup in supervisors:
            sup.stop()
