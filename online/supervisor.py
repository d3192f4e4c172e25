"""The adaptation worker beside a server (MP2A_ONLINE=1): its command line from the
environment, and a supervisor that restarts it when it dies."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from mp2a import lifeline
from mp2a.errors import Mp2aError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent  # the folder holding online/


# optional worker settings from the environment: (variable, flag, type, zero allowed)
WORKER_SETTINGS = (
    ("MP2A_ADAPT_STEPS", "--steps", int, False),
    ("MP2A_ADAPT_STAGES", "--stages", int, False),
    ("MP2A_ADAPT_MIN_SAMPLES", "--min-samples", int, False),
    ("MP2A_ADAPT_MAX_SAMPLES", "--max-samples", int, False),
    ("MP2A_GATE_SOURCE_MARGIN", "--gate-source-margin", float, True),
    ("MP2A_GATE_AGREEMENT_FLOOR", "--gate-agreement-floor", float, True),
    ("MP2A_GATE_MIN_GAIN", "--gate-min-gain", float, True),
)
METHOD_SETTING = ("MP2A_ADAPT_METHOD", "--method", ("mp2a-t", "mp2a"))
CHOICE_SETTINGS = (
    METHOD_SETTING,
    ("MP2A_GATE_GAIN_CORRECTION", "--gate-gain-correction", ("auto", "sources", "none")),
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
    """`python -m online.worker …` as MP2A_ONLINE=1 configures it; None when the traffic
    store is off (nothing to adapt on). MP2A_ADAPT_INTERVAL_S (default 3600) and
    MP2A_ADAPT_MIN_NEW (default 10000) set the schedule; POST /adapt always works;
    WORKER_SETTINGS' variables override the run's size. A bad value raises Mp2aError."""
    env = os.environ if environ is None else environ
    store = env.get("MP2A_STORE", "").strip()
    if store.lower() == "off":
        log.warning("MP2A_ONLINE=1 but MP2A_STORE=off: no adaptation worker (no traffic kept)")
        return None
    store_path = Path(store).resolve() if store else run.resolve() / "traffic.sqlite"
    cmd = [sys.executable, "-m", "online.worker", str(run.resolve()), "--store", str(store_path)]
    cmd += ["--interval", _positive(env, "MP2A_ADAPT_INTERVAL_S", float, "3600")]
    cmd += ["--min-new", _positive(env, "MP2A_ADAPT_MIN_NEW", int, "10000")]
    for name, flag, kind, zero in WORKER_SETTINGS:
        if env.get(name, "").strip():
            cmd += [flag, _positive(env, name, kind, "", zero)]
    for name, flag, choices in CHOICE_SETTINGS:
        if value := env.get(name, "").strip():
            if value not in choices:
                raise Mp2aError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
            cmd += [flag, value]
    from online.worker import drift_from_env  # the drift trigger's settings, checked here

    try:
        drift_from_env(env)
    except ValueError as e:
        raise Mp2aError(f"{e}; fix or unset it") from None
    return cmd


class WorkerSupervisor:
    """Keeps the adaptation worker (MP2A_ONLINE=1) running next to `bentoml serve`: a worker
    that dies (killed, out of memory) is started again after a back-off of 1 s doubling to
    60 s (reset once a worker has lived a minute). The new worker marks the dead one's run
    failed (online/worker.py `recover`)."""

    MAX_BACKOFF = 60.0
    HEALTHY_AFTER = 60.0

    def __init__(
        self,
        run: Path,
        cmd: list[str],
        metrics_dir: str | None = None,
        label: str = "online adaptation worker",
        env: dict[str, str] | None = None,
    ) -> None:
        self.run, self.cmd, self.metrics_dir = run, cmd, metrics_dir
        self.label, self.extra_env = label, env or {}
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.backoff = 1.0
        self.restart_at: float | None = None
        self.restarts = 0

    @classmethod
    def from_env(cls, run: Path, metrics_dir: str | None = None) -> WorkerSupervisor | None:
        if os.environ.get("MP2A_ONLINE", "").strip() != "1":
            return None
        missing = [m for m in ("torch", "open_clip") if importlib.util.find_spec(m) is None]
        if missing:  # an edge install: serving only
            raise Mp2aError(
                f"MP2A_ONLINE=1 needs the training stack ({', '.join(missing)} not installed): "
                "pip install 'mp2a[train]', or run `python -m online.worker RUN` where it is"
            )
        cmd = worker_command(run)
        return None if cmd is None else cls(run, cmd, metrics_dir)

    def start(self) -> None:
        env = {**os.environ, **self.extra_env}
        if self.metrics_dir is not None:  # the server's: /metrics shows the worker's figures
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        print(f"mp2a: {self.label}: " + " ".join(self.cmd[1:]), file=sys.stderr)
        # ends with `mp2a serve` even if that is killed -9 (mp2a/lifeline.py)
        self.proc = subprocess.Popen(
            self.cmd, env=env, cwd=str(REPO_ROOT), preexec_fn=lifeline.die_with_parent
        )
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
                f"mp2a: {self.label} exited ({code}); restarting in {self.backoff:.0f} s",
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
        terminate(proc, timeout)


def terminate(proc: subprocess.Popen, timeout: float, signal_it: bool = True) -> None:
    """SIGTERM (unless the caller signalled it already), wait up to `timeout` s, SIGKILL if
    it hangs; reaped either way."""
    if signal_it:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def edge_supervisor(run: Path, hub: str, site: str, metrics_dir: str | None) -> WorkerSupervisor:
    """`python -m online.edge RUN` (uploads and head polls of an edge), supervised like the
    worker. The hub's URL, the site and the token reach it through the environment; a bad
    one is refused here, before anything starts (one line)."""
    from online.edge import EdgeConfig

    env = {"MP2A_HUB": hub, "MP2A_SITE": site}
    try:
        EdgeConfig.from_env({**os.environ, **env})
    except ValueError as e:
        raise Mp2aError(str(e)) from None
    store = os.environ.get("MP2A_STORE", "").strip()
    if store.lower() == "off":
        raise Mp2aError("an edge buffers its traffic for the hub: unset MP2A_STORE=off")
    cmd = [sys.executable, "-m", "online.edge", str(run.resolve())]
    if store:
        cmd += ["--store", str(Path(store).resolve())]
    return WorkerSupervisor(run, cmd, metrics_dir, label="edge sync", env=env)
