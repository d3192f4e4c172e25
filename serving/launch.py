"""`mp2a serve RUN`: check the artifact here, then run `bentoml serve` on the service.

The check happens in this process so that a bad artifact is one clear line (exit 2) rather
than a worker traceback. With the ort backend and no exported encoder, the encoder is
exported first when the export stack (torch) is installed; on an edge install without it
the error says which command to run where it is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
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


# optional worker settings from the environment: (variable, flag, type, zero allowed)
WORKER_SETTINGS = (
    ("MP2A_ADAPT_STEPS", "--steps", int, False),
    ("MP2A_ADAPT_STAGES", "--stages", int, False),
    ("MP2A_ADAPT_MIN_SAMPLES", "--min-samples", int, False),
    ("MP2A_ADAPT_MAX_SAMPLES", "--max-samples", int, False),
    ("MP2A_ADAPT_REFINE", "--refine", int, True),
    ("MP2A_GATE_SOURCE_MARGIN", "--gate-source-margin", float, True),
    ("MP2A_GATE_AGREEMENT_FLOOR", "--gate-agreement-floor", float, True),
)


def _positive(
    env: dict[str, str] | os._Environ, name: str, kind: type, default: str, zero: bool = False
) -> str:
    raw = env.get(name, "").strip() or default
    try:
        value = kind(raw)
        ok = value >= 0 if zero else value > 0
    except ValueError:
        ok = False
    if not ok:
        what = ("non-negative " if zero else "positive ") + ("integer" if kind is int else "number")
        raise Mp2aError(f"{name} must be a {what}, got {raw!r}; fix or unset it")
    return raw


def worker_command(run: Path, environ: dict[str, str] | None = None) -> list[str] | None:
    """`python -m serving.worker …` as MP2A_ONLINE=1 configures it; None when the traffic
    store is off (nothing to adapt on). MP2A_ADAPT_INTERVAL_S (default 3600) and
    MP2A_ADAPT_MIN_NEW (default 10000) set the schedule; POST /adapt always works;
    WORKER_SETTINGS' variables override the run's size. A bad value raises Mp2aError."""
    env = os.environ if environ is None else environ
    store = env.get("MP2A_STORE", "").strip()
    if store.lower() == "off":
        log.warning("MP2A_ONLINE=1 but MP2A_STORE=off: no adaptation worker (no traffic kept)")
        return None
    store_path = Path(store).resolve() if store else run.resolve() / "traffic.sqlite"
    cmd = [sys.executable, "-m", "serving.worker", str(run.resolve()), "--store", str(store_path)]
    cmd += ["--interval", _positive(env, "MP2A_ADAPT_INTERVAL_S", float, "3600")]
    cmd += ["--min-new", _positive(env, "MP2A_ADAPT_MIN_NEW", int, "10000")]
    for name, flag, kind, zero in WORKER_SETTINGS:
        if env.get(name, "").strip():
            cmd += [flag, _positive(env, name, kind, "", zero)]
    return cmd


class WorkerSupervisor:
    """Keeps the adaptation worker (MP2A_ONLINE=1) running next to `bentoml serve`: a worker
    that dies (killed, out of memory) is started again after a back-off of 1 s doubling to
    60 s (reset once a worker has lived a minute). The new worker marks the dead one's run
    failed (serving/worker.py `recover`)."""

    MAX_BACKOFF = 60.0
    HEALTHY_AFTER = 60.0

    def __init__(self, run: Path, cmd: list[str]) -> None:
        self.run, self.cmd = run, cmd
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = 1.0
        self.restart_at: float | None = None
        self.restarts = 0

    @classmethod
    def from_env(cls, run: Path) -> WorkerSupervisor | None:
        if os.environ.get("MP2A_ONLINE", "").strip() != "1":
            return None
        missing = [m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]
        if missing:  # an edge install: serving only
            raise Mp2aError(
                f"MP2A_ONLINE=1 needs the training stack ({', '.join(missing)} not installed): "
                "pip install 'mp2a[train]', or run `python -m serving.worker RUN` where it is"
            )
        cmd = worker_command(run)
        return None if cmd is None else cls(run, cmd)

    def start(self) -> None:
        env = dict(os.environ)
        env["PROMETHEUS_MULTIPROC_DIR"] = bentoml_prometheus_dir()
        print("mp2a: online adaptation worker: " + " ".join(self.cmd[1:]), file=sys.stderr)
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=str(REPO_ROOT))
        self.started = time.monotonic()
        self.restart_at = None

    def check(self) -> None:
        """Call every second or so: restarts a dead worker when its back-off has passed."""
        now = time.monotonic()
        if self.proc is not None and self.restart_at is None:
            code = self.proc.poll()
            if code is None:
                return
            if now - self.started >= self.HEALTHY_AFTER:
                self.backoff = 1.0
            self.restart_at = now + self.backoff
            print(
                f"mp2a: adaptation worker exited ({code}); restarting in {self.backoff:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            self.backoff = min(self.MAX_BACKOFF, self.backoff * 2)
        if self.restart_at is not None and now >= self.restart_at:
            self.restarts += 1
            self.start()

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
    supervisor = WorkerSupervisor.from_env(run)  # a bad MP2A_ADAPT_* value fails here
    # SIGTERM (docker stop, systemd, kill) stops like Ctrl-C: the server and the worker are
    # shut down with us instead of being left running as orphans. SIGINT is set too: a shell
    # starts background jobs with it ignored, and a Python started so never installs its own.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    proc = subprocess.Popen(serve_command(port, host), env=serve_env(run, backend, precision))
    try:
        if supervisor is not None:
            supervisor.start()
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                if supervisor is not None:
                    supervisor.check()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    finally:
        if supervisor is not None:
            supervisor.stop()
