"""`mp2a serve RUN`: check the artifact here, then run `bentoml serve` on the service.

The check happens in this process so that a bad artifact is one clear line (exit 2) rather
than a worker traceback. With the ort backend and no exported encoder, the encoder is
exported first when the export stack (torch) is installed; on an edge install without it
the error says which command to run where it is.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from mp2a.artifact import load_artifact
from mp2a.errors import ArtifactError, Mp2aError
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
    return env


def bentoml_prometheus_dir() -> str:
    """The multiprocess directory `bentoml serve` gives its workers (BENTOML_HOME's); the
    adaptation worker writes its mp2a_adaptation_* metrics there so /metrics shows them."""
    home = os.environ.get("BENTOML_HOME", os.path.join(os.path.expanduser("~"), "bentoml"))
    return os.path.join(home, "prometheus_multiproc_dir")


def worker_command(run: Path, environ: dict[str, str] | None = None) -> list[str] | None:
    """`python -m serving.worker …` as MP2A_ONLINE=1 configures it; None when the traffic
    store is off (nothing to adapt on). MP2A_ADAPT_INTERVAL_S (default 3600) and
    MP2A_ADAPT_MIN_NEW (default 10000) set the schedule; POST /adapt always works."""
    env = os.environ if environ is None else environ
    store = env.get("MP2A_STORE", "").strip()
    if store.lower() == "off":
        log.warning("MP2A_ONLINE=1 but MP2A_STORE=off: no adaptation worker (no traffic kept)")
        return None
    store_path = Path(store).resolve() if store else run.resolve() / "traffic.sqlite"
    cmd = [sys.executable, "-m", "serving.worker", str(run.resolve()), "--store", str(store_path)]
    cmd += ["--interval", env.get("MP2A_ADAPT_INTERVAL_S", "").strip() or "3600"]
    cmd += ["--min-new", env.get("MP2A_ADAPT_MIN_NEW", "").strip() or "10000"]
    return cmd


def start_worker(run: Path) -> subprocess.Popen | None:
    """The adaptation worker as a sibling process of `bentoml serve` (MP2A_ONLINE=1)."""
    if os.environ.get("MP2A_ONLINE", "").strip() != "1":
        return None
    cmd = worker_command(run)
    if cmd is None:
        return None
    env = dict(os.environ)
    env["PROMETHEUS_MULTIPROC_DIR"] = bentoml_prometheus_dir()
    print("mp2a: online adaptation worker: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, env=env, cwd=str(REPO_ROOT))


def stop_worker(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve(
    run: Path,
    port: int = 3000,
    host: str = "0.0.0.0",
    backend: str = "ort",
    precision: str = "fp32",
) -> int:
    """Serve `run` until interrupted; returns the server's exit code."""
    if backend not in BACKENDS:
        raise Mp2aError(f"unknown backend {backend!r}. Available: {', '.join(BACKENDS)}")
    if precision not in ENCODERS:
        raise Mp2aError(f"unknown precision {precision!r}. Available: {', '.join(ENCODERS)}")
    if backend == "ort":
        ensure_encoder(run, precision)
    else:
        load_artifact(run)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(
        f"mp2a: serving {run} ({backend}, {precision}) on http://{shown}:{port}\n"
        f"  try: curl -F image=@photo.png http://{shown}:{port}/predict",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.Popen(serve_command(port, host), env=serve_env(run, backend, precision))
    worker = start_worker(run)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        stop_worker(worker)
