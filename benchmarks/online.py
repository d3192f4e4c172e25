"""`mp2a bench online --json`: the online loop on a domain shift, measured end to end.

1. DigitsDA (`mp2a data digits`) and an artifact adapted by MP²A for one domain
   (default: target printed, sources textured + street), its encoder exported to ONNX.
2. `MP2A_ONLINE=1 mp2a serve` on 127.0.0.1 (the real server, traffic store and adaptation
   worker; the schedule is off so that only POST /adapt starts a run).
3. A shifted domain the artifact never saw (default handwritten) is streamed as unlabeled
   traffic: a *stream* (10,000 images: DigitsDA seed 1, `--per-class 1000`) that lands in the
   traffic store, and a *fresh* draw (the seed-0 DigitsDA images of that domain) that the
   worker never trains on. Labels stay in this client: they only score the served answers.
4. Latency of a steady probe (open loop, `probe_rate` requests/s of one image each) while the
   server is idle, then POST /adapt and the same probe until the run ends: p50/p99 both ways.
5. Served accuracy on stream and fresh images before and after the run (after = whatever the
   server serves once the worker is done: the new version if the gate accepted it).

The figures are one JSON object; `targets` says which targets were met.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.serving import BOUNDARY, free_port, multipart, wait_ready
from mp2a.errors import Mp2aError
from online.store import peek_int
from serving.launch import REPO_ROOT

log = logging.getLogger(__name__)

CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
DOMAINS = ("printed", "handwritten", "textured", "street")


@dataclass(frozen=True)
class OnlinePlan:
    adapted_for: str = "printed"
    stream_domain: str = "handwritten"
    per_class: int = 100  # DigitsDA for the artifact and the fresh draw
    stream_per_class: int = 1000  # 10 classes: 10,000 stored samples
    adapt_stages: int = 3  # the offline artifact's schedule (`mp2a adapt`)
    adapt_steps: int = 100
    probe_rate: float = 20.0  # probe requests per second
    probe_seconds: float = 20.0  # idle probe length
    batch: int = 32  # images per /predict_batch call while streaming
    refine: int = 0  # worker settings (MP2A_ADAPT_REFINE, MP2A_GATE_SOURCE_MARGIN)
    source_margin: float | None = None  # None: the server's default

    @classmethod
    def quick(cls) -> OnlinePlan:
        return cls(
            per_class=8, stream_per_class=30, adapt_stages=2, adapt_steps=10, probe_seconds=3
        )


def _mp2a(*args: str) -> None:
    cmd = [sys.executable, "-m", "mp2a", *args]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise Mp2aError(f"{' '.join(cmd[2:])} failed ({r.returncode}): {r.stderr[-2000:]}")


def _images(root: Path, domain: str, classes: list[str]) -> tuple[list[bytes], np.ndarray]:
    files = sorted((root / domain).glob("*/*.png"))
    labels = np.array([classes.index(f.parent.name) for f in files])
    return [f.read_bytes() for f in files], labels


def _post(url: str, body: bytes, ctype: str, headers: dict | None = None) -> dict:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": ctype, **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def served_labels(url: str, images: list[bytes], classes: list[str], batch: int) -> tuple:
    """Stream `images` through POST /predict_batch (2 clients); (labels, versions seen)."""
    chunks = [images[i : i + batch] for i in range(0, len(images), batch)]

    def one(chunk: list[bytes]) -> list[dict]:
        body = multipart(chunk, "images", "image/png")
        return _post(url + "/predict_batch", body, CONTENT_TYPE)["predictions"]

    with ThreadPoolExecutor(2) as pool:
        answers = [p for part in pool.map(one, chunks) for p in part]
    return np.array([classes.index(a["label"]) for a in answers]), sorted(
        {a["model_version"] for a in answers}
    )


class Probe:
    """Open-loop latency probe: one /predict every 1/rate s, each on its own thread."""

    def __init__(self, url: str, image: bytes, rate: float) -> None:
        self.body, self.ctype = multipart(image, "image", "image/png"), CONTENT_TYPE
        self.url, self.rate = url + "/predict", rate
        self.samples: list[tuple[float, float, bool]] = []  # (start, latency s, ok)
        self._lock = threading.Lock()

    def _one(self) -> None:
        t = time.perf_counter()
        ok = True
        try:
            _post(self.url, self.body, self.ctype)
        except (OSError, urllib.error.HTTPError, ValueError):
            ok = False
        with self._lock:
            self.samples.append((t, time.perf_counter() - t, ok))

    def run(self, until) -> tuple[float, float]:
        """Send until `until()` is true; returns (start, end) perf_counter times."""
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            k = 0
            while not until():
                pool.submit(self._one)
                k += 1
                time.sleep(max(0.0, start + k / self.rate - time.perf_counter()))
        return start, time.perf_counter()

    def figures(self, start: float, end: float) -> dict:
        lat = [s[1] for s in self.samples if start <= s[0] < end and s[2]]
        errors = sum(1 for s in self.samples if start <= s[0] < end and not s[2])
        if not lat:
            return {"requests": 0, "errors": errors}
        ms = np.array(lat) * 1000
        return {
            "requests": len(lat),
            "errors": errors,
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2),
        }


@contextlib.contextmanager
def online_server(run: Path, env: dict[str, str], log_file: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env=env,
            cwd=REPO_ROOT,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server, its workers and the adaptation worker
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            yield url
        finally:
            proc.terminate()  # SIGTERM: the launcher stops bentoml and the worker
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError):  # anything of it still alive
                os.killpg(proc.pid, signal.SIGKILL)


def run(quick: bool = False, plan: OnlinePlan | None = None, work: Path | None = None) -> dict:
    plan = plan or (OnlinePlan.quick() if quick else OnlinePlan())
    pair = {plan.adapted_for, plan.stream_domain}
    if len(pair) != 2 or not pair <= set(DOMAINS):
        raise Mp2aError(f"adapted_for and stream_domain: two different domains of {DOMAINS}")
    t_all = time.time()
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mp2a-online-")))
        return _run(plan, Path(work), t_all)


PREPARE_FIELDS = (
    "adapted_for", "stream_domain", "per_class", "stream_per_class", "adapt_stages", "adapt_steps"
)  # fmt: skip


def _prepare(plan: OnlinePlan, data: Path, stream_data: Path, run: Path) -> None:
    _mp2a("data", "digits", "--out", str(data), "--per-class", str(plan.per_class), "--quiet")
    _mp2a(
        "data", "digits", "--out", str(stream_data), "--seed", "1",
        "--per-class", str(plan.stream_per_class), "--domains", plan.stream_domain, "--quiet",
    )  # fmt: skip
    sources = [d for d in DOMAINS if d not in (plan.adapted_for, plan.stream_domain)]
    _mp2a(
        "adapt", "--data", str(data), "--target", plan.adapted_for,
        "--sources", ",".join(sources), "--method", "mp2a", "--out", str(run),
        "--stages", str(plan.adapt_stages), "--steps-per-stage", str(plan.adapt_steps),
        "--no-cache", "--quiet",
    )  # fmt: skip
    _mp2a("export", str(run), "--format", "onnx")


def _run(plan: OnlinePlan, work: Path, t_all: float) -> dict:
    t0 = time.time()
    data, stream_data, run = work / "digits", work / "stream", work / "run"
    prepared = work / "prepared.json"  # a reused work folder skips what it already holds
    recipe = {k: getattr(plan, k) for k in PREPARE_FIELDS}
    if not (prepared.is_file() and json.loads(prepared.read_text()) == recipe):
        prepared.unlink(missing_ok=True)
        _prepare(plan, data, stream_data, run)
        prepared.write_text(json.dumps(recipe))
    for leftover in ("traffic.sqlite", "traffic.sqlite-wal", "traffic.sqlite-shm"):
        (run / leftover).unlink(missing_ok=True)
    shutil.rmtree(run / "versions", ignore_errors=True)
    sources = [d for d in DOMAINS if d not in (plan.adapted_for, plan.stream_domain)]
    prepare_seconds = time.time() - t0

    classes = json.loads((data / "meta.json").read_text())["classes"]
    stream, y_stream = _images(stream_data, plan.stream_domain, classes)
    fresh, y_fresh = _images(data, plan.stream_domain, classes)
    order = np.random.default_rng(0).permutation(len(stream))  # traffic arrives mixed
    stream, y_stream = [stream[i] for i in order], y_stream[order]

    token = secrets.token_hex(16)
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(work / "bentoml-home"),
        "MP2A_ONLINE": "1",
        "MP2A_ADMIN_TOKEN": token,
        "MP2A_ADAPT_INTERVAL_S": "1e9",  # runs only on POST /adapt
        "MP2A_ADAPT_MIN_NEW": str(10**9),
        "MP2A_ADAPT_MAX_SAMPLES": str(len(stream)),
        "MP2A_ADAPT_MIN_SAMPLES": "20",
        "MP2A_ADAPT_REFINE": str(plan.refine),
    }
    if plan.source_margin is not None:
        env["MP2A_GATE_SOURCE_MARGIN"] = str(plan.source_margin)
    store = run / "traffic.sqlite"
    with online_server(run, env, work / "serve.log") as url:
        # before: fresh first, then the stream, so the newest stored rows are the stream
        pred, _ = served_labels(url, fresh, classes, plan.batch)
        fresh_before = float((pred == y_fresh).mean())
        t_stream = time.time()
        pred, seen_before = served_labels(url, stream, classes, plan.batch)
        stream_seconds = time.time() - t_stream
        stream_before = float((pred == y_stream).mean())
        deadline = time.time() + 120
        rows = "SELECT COUNT(*) FROM samples"
        while (n := peek_int(store, rows)) < len(stream) + len(fresh):
            if time.time() > deadline:
                raise Mp2aError(f"only {n} rows reached {store}")
            time.sleep(0.2)

        # this client holds ~11k images: keep its garbage collector from pausing the probe
        gc.collect()
        gc.freeze()
        probe = Probe(url, fresh[0], plan.probe_rate)
        status: dict = {}
        watch = {"checked": 0.0, "id": None}

        def poll_status() -> dict:
            """GET /adapt/status every 0.25 s in both phases (the same extra load)."""
            if time.perf_counter() - watch["checked"] >= 0.25:
                watch["checked"] = time.perf_counter()
                status.clear()
                status.update(_get(url + "/adapt/status"))
            return status

        t_idle = time.perf_counter() + plan.probe_seconds
        idle = probe.figures(
            *probe.run(lambda: poll_status() is None or time.perf_counter() >= t_idle)
        )

        auth = {"Authorization": f"Bearer {token}"}
        requested = _post(url + "/adapt", b"", "application/json", auth)
        watch["checked"] = 0.0

        def finished() -> bool:
            st = poll_status()
            return (st.get("request") or {}).get("id") == requested["id"] and st.get("state") in (
                "accepted",
                "rejected",
                "failed",
            )

        t_adapt = time.perf_counter()
        during_window = probe.run(finished)
        during = probe.figures(*during_window)
        slow = sorted(
            (s for s in probe.samples if during_window[0] <= s[0] < during_window[1]),
            key=lambda s: -s[1],
        )[:5]
        during["slowest"] = [
            {"at_s": round(s[0] - t_adapt, 2), "ms": round(s[1] * 1000, 1)} for s in slow
        ]
        version = str(status.get("version")) if status["state"] == "accepted" else None
        deadline = time.time() + 30
        while version is not None and _get(url + "/model")["version"] != version:
            if time.time() > deadline:
                raise Mp2aError(f"the server never served the accepted version {version}")
            time.sleep(0.2)
        pred, seen_after = served_labels(url, stream, classes, plan.batch)
        stream_after = float((pred == y_stream).mean())
        pred, _ = served_labels(url, fresh, classes, plan.batch)
        fresh_after = float((pred == y_fresh).mean())
        served_after = _get(url + "/model")["version"]

    gate_figures = status.get("gate") or {}
    ratio = during["p99_ms"] / idle["p99_ms"] if "p99_ms" in during and "p99_ms" in idle else None
    gain = stream_after - stream_before
    return {
        "bench": "online",
        "plan": asdict(plan),
        "adapted_for": plan.adapted_for,
        "artifact_sources": sources,
        "stream_domain": plan.stream_domain,
        "stream_images": len(stream),
        "fresh_images": len(fresh),
        "stream_images_per_second": round(len(stream) / stream_seconds, 1),
        "served_versions_before": seen_before,
        "served_version_after": served_after,
        "served_versions_during_after_pass": seen_after,
        "accuracy": {
            "stream_before": round(stream_before, 4),
            "stream_after": round(stream_after, 4),
            "stream_gain_pts": round(100 * gain, 2),
            "fresh_before": round(fresh_before, 4),
            "fresh_after": round(fresh_after, 4),
            "fresh_gain_pts": round(100 * (fresh_after - fresh_before), 2),
        },
        "adaptation": {
            "state": status.get("state"),
            "reasons": status.get("reasons"),
            "n_traffic": status.get("n_traffic"),
            "seconds": status.get("seconds"),
            "load_seconds": status.get("load_seconds"),
            "fit_seconds": status.get("fit_seconds"),
            "version": status.get("version"),
            "gate": {k: v for k, v in gate_figures.items() if k != "config"},
        },
        "latency": {
            "probe_rate_per_s": plan.probe_rate,
            "idle": idle,
            "during_adaptation": during,
            "p99_ratio": round(ratio, 3) if ratio is not None else None,
        },
        "targets": {
            "stream_gain_ge_10_pts": gain >= 0.10,
            "adaptation_lt_60_s_on_10k": (
                status.get("seconds") is not None
                and status["seconds"] < 60
                and (status.get("n_traffic") or 0) >= 10_000
            ),
            "p99_during_le_1_5x_idle": ratio is not None and ratio <= 1.5,
        },
        "prepare_seconds": round(prepare_seconds, 1),
        "seconds": round(time.time() - t_all, 1),
        "cpu_count": os.cpu_count(),
    }
