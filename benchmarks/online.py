"""`mp2a bench online --json`: the online loop on domain shifts, measured end to end.

1. DigitsDA with the shift styles (`mp2a data digits --domains …`) and an artifact adapted by
   MP²A for one domain (default: target printed, sources textured + street), its encoder
   exported to ONNX.
2. Scenarios, each on a fresh copy of that artifact served by `MP2A_ONLINE=1 mp2a serve` on
   127.0.0.1 (the real server, traffic store and adaptation worker; the schedule is off, so
   only POST /adapt starts a run):
   - the main stream (default handwritten): a *stream* (10,000 images: DigitsDA seed 1,
     `--per-class 1000`) that lands in the traffic store, and a *fresh* draw (the seed-0
     DigitsDA images of that domain) that the worker never trains on. Latency of a steady
     probe (open loop, `probe_rate` requests/s) while idle, then POST /adapt and the probe
     until the run ends: p50/p99 both ways. Served accuracy on stream and fresh images
     before and after (after = whatever the server serves once the worker is done);
   - the other shift streams (default `lcd`, `dotmatrix`: styles neither the artifact nor
     the tiny CLIP's pretraining saw): the same, without the probe;
   - harmful streams, which the gate must reject: `noise`, `letters` (the right style, the
     wrong label set; adapt/shift.py) and `flood` (90 % of the main stream's images are one
     class).
   Labels stay in this client: they only score the served answers.
3. In-process on the main stream's stored traffic (the worker's own functions, no HTTP):
   - a candidate whose first pseudo-labels were permuted on purpose, put to the gate;
   - drift: `drift_rounds` consecutive runs of the worker on the stream; after each, the true
     accuracy of the served head on stream and fresh embeddings and the gate's estimates.

The figures are one JSON object; `targets` says which targets were met.
"""

from __future__ import annotations

import contextlib
import gc
import io
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
from mp2a import versions
from mp2a.errors import Mp2aError
from online.state import WORKER_LOCK
from online.store import peek_int
from online.supervisor import REPO_ROOT

log = logging.getLogger(__name__)

CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
DOMAINS = ("printed", "handwritten", "textured", "street")
SHIFT = ("lcd", "dotmatrix")
HARMFUL = ("noise", "letters", "flood")
FLOOD_SHARE = 0.9
STATUS_FIELDS = (
    "state", "reasons", "method", "n_traffic", "n_traffic_used", "n_traffic_duplicates",
    "n_traffic_ood", "seconds", "load_seconds", "fit_seconds", "version", "head_fit",
)  # fmt: skip
FLOOD_CLASS = 3


@dataclass(frozen=True)
class OnlinePlan:
    adapted_for: str = "printed"
    stream_domain: str = "handwritten"  # the main stream: latency, 10k timing, drift
    extra_streams: tuple[str, ...] = SHIFT
    harmful: tuple[str, ...] = HARMFUL
    per_class: int = 100  # DigitsDA for the artifact and the fresh draws
    stream_per_class: int = 1000  # 10 classes: 10,000 stored samples per stream
    harmful_images: int = 2000
    adapt_stages: int = 3  # the offline artifact's schedule (`mp2a adapt`)
    adapt_steps: int = 100
    probe_rate: float = 20.0  # probe requests per second
    probe_seconds: float = 20.0  # idle probe length
    batch: int = 32  # images per /predict_batch call while streaming
    drift_rounds: int = 20
    method: str | None = None  # worker method (MP2A_ADAPT_METHOD); None: the server's default
    source_margin: float | None = None  # MP2A_GATE_SOURCE_MARGIN; None: the server's default

    @classmethod
    def quick(cls) -> OnlinePlan:
        return cls(
            per_class=8,
            stream_per_class=30,
            harmful_images=120,
            extra_streams=(),
            harmful=("noise",),
            adapt_stages=2,
            adapt_steps=10,
            probe_seconds=3,
            drift_rounds=2,
        )

    def check(self) -> None:
        known = set(DOMAINS) | set(SHIFT)
        if self.adapted_for not in DOMAINS or self.stream_domain not in known:
            raise Mp2aError(
                f"adapted_for must be one of {DOMAINS} and stream_domain of {sorted(known)}"
            )
        if self.stream_domain == self.adapted_for or self.adapted_for in self.extra_streams:
            raise Mp2aError("the streams must differ from the domain the artifact was made for")
        if unknown := set(self.harmful) - set(HARMFUL):
            raise Mp2aError(f"unknown harmful stream(s) {sorted(unknown)}; choose {HARMFUL}")


def _mp2a(*args: str) -> None:
    """`mp2a ARGS` in this process (what the bench prepares: data, adapt, export), its output
    kept out of the bench's own; a failure raises with what it said. In-process: a bench (or
    the test session) has the model stack imported once, not again per command."""
    from mp2a.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    if rc != 0:
        said = (err.getvalue() or out.getvalue())[-2000:]
        raise Mp2aError(f"mp2a {' '.join(args)} failed ({rc}): {said}")


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
    plan.check()
    t_all = time.time()
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mp2a-online-")))
        return _run(plan, Path(work), t_all)


PREPARE_FIELDS = (
    "adapted_for", "stream_domain", "extra_streams", "per_class", "stream_per_class",
    "adapt_stages", "adapt_steps",
)  # fmt: skip


def _streams(plan: OnlinePlan) -> list[str]:
    return [plan.stream_domain, *plan.extra_streams]


def _sources(plan: OnlinePlan) -> list[str]:
    return [d for d in DOMAINS if d not in (plan.adapted_for, plan.stream_domain)]


def _prepare(plan: OnlinePlan, data: Path, stream_data: Path, run: Path) -> None:
    domains = ",".join(dict.fromkeys([*DOMAINS, *_streams(plan)]))
    _mp2a(
        "data", "digits", "--out", str(data), "--per-class", str(plan.per_class),
        "--domains", domains, "--quiet",
    )  # fmt: skip
    _mp2a(
        "data", "digits", "--out", str(stream_data), "--seed", "1",
        "--per-class", str(plan.stream_per_class), "--domains", ",".join(_streams(plan)),
        "--quiet",
    )  # fmt: skip
    _mp2a(
        "adapt", "--data", str(data), "--target", plan.adapted_for,
        "--sources", ",".join(_sources(plan)), "--method", "mp2a", "--out", str(run),
        "--stages", str(plan.adapt_stages), "--steps-per-stage", str(plan.adapt_steps),
        "--no-cache", "--quiet",
    )  # fmt: skip
    _mp2a("export", str(run), "--format", "onnx")


def _fresh_copy(base: Path, dest: Path) -> Path:
    """The artifact alone (its export included): no traffic, no versions."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(
        base, dest, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions", "*.log")
    )
    return dest


def _shuffled(images: list[bytes], labels: np.ndarray | None, seed: int = 0) -> tuple:
    order = np.random.default_rng(seed).permutation(len(images))  # traffic arrives mixed
    return [images[i] for i in order], None if labels is None else labels[order]


def _flood(images: list[bytes], labels: np.ndarray, n: int) -> tuple[list[bytes], np.ndarray]:
    """Up to `n` distinct images, FLOOD_SHARE of them class FLOOD_CLASS, the rest mixed."""
    one = np.flatnonzero(labels == FLOOD_CLASS)
    rest = np.flatnonzero(labels != FLOOD_CLASS)
    k = min(round(FLOOD_SHARE * n), len(one))
    idx = np.concatenate([one[:k], rest[: round(k * (1 - FLOOD_SHARE) / FLOOD_SHARE)]])
    return _shuffled([images[i] for i in idx], labels[idx], seed=1)


class Scenario:
    """One stream through a fresh server: before, store, adapt, after."""

    def __init__(self, plan: OnlinePlan, work: Path, base_run: Path, classes: list[str]):
        self.plan, self.work, self.base_run, self.classes = plan, work, base_run, classes
        self.token = secrets.token_hex(16)

    def env(self, n_stream: int) -> dict[str, str]:
        env = {
            **os.environ,
            "BENTOML_DO_NOT_TRACK": "True",
            "BENTOML_HOME": str(self.work / "bentoml-home"),
            "MP2A_ONLINE": "1",
            "MP2A_ADMIN_TOKEN": self.token,
            "MP2A_ADAPT_INTERVAL_S": "1e9",  # runs only on POST /adapt
            "MP2A_ADAPT_MIN_NEW": str(10**9),
            "MP2A_ADAPT_MAX_SAMPLES": str(n_stream),
            "MP2A_ADAPT_MIN_SAMPLES": "20",
        }
        if self.plan.method is not None:
            env["MP2A_ADAPT_METHOD"] = self.plan.method
        if self.plan.source_margin is not None:
            env["MP2A_GATE_SOURCE_MARGIN"] = str(self.plan.source_margin)
        return env

    def run(
        self,
        name: str,
        stream: list[bytes],
        y_stream: np.ndarray | None,
        fresh: list[bytes] | None = None,
        y_fresh: np.ndarray | None = None,
        probe: bool = False,
    ) -> dict:
        run = _fresh_copy(self.base_run, self.work / f"scenario-{name}")
        store = run / "traffic.sqlite"
        out: dict = {"stream": name, "stream_images": len(stream)}
        acc: dict = {}
        with online_server(run, self.env(len(stream)), self.work / f"serve-{name}.log") as url:
            if fresh is not None:  # fresh first, then the stream: the newest rows are the stream
                pred, _ = served_labels(url, fresh, self.classes, self.plan.batch)
                acc["fresh_before"] = float((pred == y_fresh).mean())
            t_stream = time.time()
            pred, seen_before = served_labels(url, stream, self.classes, self.plan.batch)
            out["stream_images_per_second"] = round(len(stream) / (time.time() - t_stream), 1)
            out["served_versions_before"] = seen_before
            if y_stream is not None:
                acc["stream_before"] = float((pred == y_stream).mean())
            total = len(stream) + (len(fresh) if fresh is not None else 0)
            deadline = time.time() + 120
            while (n := peek_int(store, "SELECT COUNT(*) FROM samples")) < total:
                if time.time() > deadline:
                    raise Mp2aError(f"only {n} rows reached {store}")
                time.sleep(0.2)
            # the worker leads (it writes who it is into the lock) before the probe starts: a
            # worker still starting at idle priority on a busy box picked the request up so
            # late that the probe's one repeated image filled the newest rows it read
            lock = versions.versions_dir(run) / WORKER_LOCK
            deadline = time.time() + 120
            while not (lock.is_file() and lock.read_text().strip()):
                if time.time() > deadline:
                    raise Mp2aError(f"the adaptation worker never took the lead on {run}")
                time.sleep(0.2)
            status, latency = self._adapt(url, fresh[0] if probe and fresh else None)
            version = str(status.get("version")) if status.get("state") == "accepted" else None
            deadline = time.time() + 30
            while version is not None and _get(url + "/model")["version"] != version:
                if time.time() > deadline:
                    raise Mp2aError(f"the server never served the accepted version {version}")
                time.sleep(0.2)
            pred, seen_after = served_labels(url, stream, self.classes, self.plan.batch)
            if y_stream is not None:
                acc["stream_after"] = float((pred == y_stream).mean())
            if fresh is not None:
                pred, _ = served_labels(url, fresh, self.classes, self.plan.batch)
                acc["fresh_after"] = float((pred == y_fresh).mean())
            out["served_version_after"] = _get(url + "/model")["version"]
            out["served_versions_during_after_pass"] = seen_after
        for k in ("stream", "fresh"):
            if f"{k}_before" in acc:
                acc[f"{k}_gain_pts"] = round(100 * (acc[f"{k}_after"] - acc[f"{k}_before"]), 2)
        out["accuracy"] = {k: round(v, 4) for k, v in acc.items()}
        gate_figures = {k: v for k, v in (status.get("gate") or {}).items() if k != "config"}
        out["adaptation"] = {**{k: status.get(k) for k in STATUS_FIELDS}, "gate": gate_figures}
        if latency is not None:
            out["latency"] = latency
        out["run"] = str(run)
        return out

    def _adapt(self, url: str, probe_image: bytes | None) -> tuple[dict, dict | None]:
        """POST /adapt and wait for its outcome; with `probe_image`, the latency probe idle
        first and then during the run."""
        status: dict = {}
        watch = {"checked": 0.0}

        def poll_status() -> dict:
            """GET /adapt/status every 0.25 s in both phases (the same extra load)."""
            if time.perf_counter() - watch["checked"] >= 0.25:
                watch["checked"] = time.perf_counter()
                status.clear()
                status.update(_get(url + "/adapt/status"))
            return status

        probe = idle = None
        if probe_image is not None:
            # this client holds thousands of images: keep its collector from pausing the probe
            gc.collect()
            gc.freeze()
            probe = Probe(url, probe_image, self.plan.probe_rate)
            t_idle = time.perf_counter() + self.plan.probe_seconds
            idle = probe.figures(
                *probe.run(lambda: poll_status() is None or time.perf_counter() >= t_idle)
            )
        auth = {"Authorization": f"Bearer {self.token}"}
        requested = _post(url + "/adapt", b"", "application/json", auth)
        watch["checked"] = 0.0

        def finished() -> bool:
            st = poll_status()
            return (st.get("request") or {}).get("id") == requested["id"] and st.get("state") in (
                "accepted",
                "rejected",
                "failed",
            )

        if probe is None:
            deadline = time.time() + 600
            while not finished():
                if time.time() > deadline:
                    raise Mp2aError("the adaptation run did not end within 600 s")
                time.sleep(0.1)
            return dict(status), None
        t_adapt = time.perf_counter()
        window = probe.run(finished)
        during = probe.figures(*window)
        inside = [s for s in probe.samples if window[0] <= s[0] < window[1]]
        slow = sorted(inside, key=lambda s: -s[1])
        during["slowest"] = [
            {"at_s": round(s[0] - t_adapt, 2), "ms": round(s[1] * 1000, 1)} for s in slow[:5]
        ]
        ratio = (
            during["p99_ms"] / idle["p99_ms"] if "p99_ms" in during and "p99_ms" in idle else None
        )
        latency = {
            "probe_rate_per_s": self.plan.probe_rate,
            "idle": idle,
            "during_adaptation": during,
            "p99_ratio": round(ratio, 3) if ratio is not None else None,
        }
        return dict(status), latency


def _embeddings(run: Path, images: list[bytes]) -> np.ndarray:
    """What the server's encoder makes of `images` (the same ONNX file and preprocessing)."""
    import io

    from PIL import Image

    from mp2a.artifact import load_artifact
    from mp2a.preprocess import preprocess_image
    from mp2a.runtime import OrtEncoder

    art = load_artifact(run)
    enc = OrtEncoder(run / "export" / "image_encoder.onnx", threads=os.cpu_count() or 1)
    out = []
    for i in range(0, len(images), 256):
        x = np.stack(
            [
                preprocess_image(Image.open(io.BytesIO(b)).convert("RGB"), art.preprocessing)
                for b in images[i : i + 256]
            ]
        )
        out.append(enc(x))
    return np.concatenate(out)


def _permuted_candidate(run: Path, traffic: np.ndarray) -> dict:
    """A candidate trained from deliberately permuted first pseudo-labels, put to the gate."""
    from online import gate, worker

    art = _artifact(run)
    sf = art.tensors("source_features.safetensors")
    x, y, d = sf["features"], sf["labels"], sf["domains"]
    sh, th = gate.holdout_mask(len(y)), gate.holdout_mask(len(traffic))
    sources = [(x[~sh & (d == k)], y[~sh & (d == k)]) for k in np.unique(d)]
    target = traffic[~th]
    c = len(art.classes)
    shift = np.roll(np.arange(c), c // 2)  # every class to another one
    cfg = worker.WorkerConfig()
    permuted = art.head.probs(target)[:, shift]
    cand = worker.train_candidate(art, sources, target, cfg, init_probs=permuted)
    decision = gate.evaluate(
        art.head, cand.head, x[sh], y[sh], traffic[th], cfg.gate,
        serving_prompts=art.prompt_head(), candidate_prompts=cand.prompt_head,
    )  # fmt: skip
    return {k: v for k, v in decision.items() if k != "config"}


def _artifact(run: Path):
    from mp2a import versions

    return versions.load_current(run)


def _drift(run: Path, rounds: int, stream: tuple, fresh: tuple) -> dict:
    """`rounds` consecutive worker runs on the stream's embeddings in a real traffic store;
    the served head's true accuracy and the gate's estimates after each."""
    from online import worker
    from online.state import FileState
    from online.store import StoreConfig, TrafficStore

    x_s, y_s = stream
    x_f, y_f = fresh
    store = run / "traffic.sqlite"
    ts = TrafficStore(StoreConfig(path=store, dim=x_s.shape[1]))
    for e in x_s:
        ts.offer(e, 0, 1.0, "1")
    ts.close()
    n_traffic = len(x_s)

    def true(art) -> dict:
        return {
            "stream": round(float((art.head.probs(x_s).argmax(1) == y_s).mean()), 4),
            "fresh": round(float((art.head.probs(x_f).argmax(1) == y_f).mean()), 4),
        }

    cfg = worker.WorkerConfig(min_samples=20, max_samples=n_traffic)
    art = _artifact(run)
    rows = [{"round": 0, "version": art.version, "true": true(art)}]
    for r in range(1, rounds + 1):
        st = worker.run_once(FileState(run, store), cfg, request={"trigger": "bench-drift"})
        art = _artifact(run)
        g = st.get("gate") or {}
        rows.append(
            {
                "round": r,
                "state": st["state"],
                "version": art.version,
                "seconds": st.get("seconds"),
                "estimate_serving": g.get("estimate_serving"),
                "estimate_candidate": g.get("estimate_candidate"),
                "true": true(art),
            }
        )
        log.info("drift round %d: %s", r, rows[-1])
    first, last = rows[0]["true"], rows[-1]["true"]
    served_estimates = [
        row["estimate_candidate"] if row.get("state") == "accepted" else row.get("estimate_serving")
        for row in rows[1:]
    ]
    return {
        "rounds": rows,
        "accepted_rounds": sum(1 for row in rows if row.get("state") == "accepted"),
        "true_stream_first_last": [first["stream"], last["stream"]],
        "true_fresh_first_last": [first["fresh"], last["fresh"]],
        "worst_true_stream": min(row["true"]["stream"] for row in rows),
        "served_estimates": served_estimates,
    }


def _run(plan: OnlinePlan, work: Path, t_all: float) -> dict:
    t0 = time.time()
    data, stream_data, base = work / "digits", work / "stream", work / "run"
    prepared = work / "prepared.json"  # a reused work folder skips what it already holds
    recipe = json.loads(json.dumps({k: getattr(plan, k) for k in PREPARE_FIELDS}))
    if not (prepared.is_file() and json.loads(prepared.read_text()) == recipe):
        prepared.unlink(missing_ok=True)
        _prepare(plan, data, stream_data, base)
        prepared.write_text(json.dumps(recipe))
    prepare_seconds = time.time() - t0

    classes = json.loads((data / "meta.json").read_text())["classes"]
    scen = Scenario(plan, work, base, classes)
    results: dict[str, dict] = {}
    inputs: dict[str, tuple] = {}
    for i, name in enumerate(_streams(plan)):
        stream, y_stream = _shuffled(*_images(stream_data, name, classes))
        fresh, y_fresh = _images(data, name, classes)
        inputs[name] = (stream, y_stream, fresh, y_fresh)
        results[name] = scen.run(name, stream, y_stream, fresh, y_fresh, probe=i == 0)
    harmful: dict[str, dict] = {}
    main_stream, main_y = inputs[plan.stream_domain][:2]
    n_harm = min(plan.harmful_images, len(main_stream))
    for name in plan.harmful:
        if name == "flood":
            images, labels = _flood(main_stream, main_y, n_harm)
        else:
            from adapt.shift import harmful_stream

            images, labels = harmful_stream(name, n_harm, seed=1), None
        harmful[name] = scen.run(name, images, labels)

    main = results[plan.stream_domain]
    stream, y_stream, fresh, y_fresh = inputs[plan.stream_domain]
    x_stream, x_fresh = _embeddings(base, stream), _embeddings(base, fresh)
    t_perm = time.time()
    permuted = _permuted_candidate(_fresh_copy(base, work / "permuted"), x_stream)
    permuted["seconds"] = round(time.time() - t_perm, 1)
    t_drift = time.time()
    drift = _drift(
        _fresh_copy(base, work / "drift"),
        plan.drift_rounds,
        (x_stream, y_stream),
        (x_fresh, y_fresh),
    )
    drift["seconds"] = round(time.time() - t_drift, 1)

    a = main["adaptation"]
    lat = main["latency"]
    ratio = lat["p99_ratio"]
    legit_ok = {
        name: r["adaptation"]["state"] == "accepted"
        and r["accuracy"].get("stream_gain_pts", 0) >= 6
        and r["accuracy"].get("fresh_gain_pts", 0) >= 6
        for name, r in results.items()
    }
    accepted_harmful = [n for n, r in harmful.items() if r["adaptation"]["state"] == "accepted"]
    accepted_harmful += ["permuted"] if permuted["accepted"] else []
    return {
        "bench": "online",
        "plan": asdict(plan),
        "adapted_for": plan.adapted_for,
        "artifact_sources": _sources(plan),
        "stream_domain": plan.stream_domain,
        "streams": results,
        "harmful": harmful,
        "permuted_candidate": permuted,
        "drift": drift,
        "targets": {
            "accepted_and_ge_6_pts_on_stream_and_fresh": legit_ok,
            "harmful_accepted": accepted_harmful,
            "no_harmful_accepted": not accepted_harmful,
            "drift_keeps_true_accuracy": drift["true_stream_first_last"][1]
            >= drift["true_stream_first_last"][0] - 0.005
            and drift["true_fresh_first_last"][1] >= drift["true_fresh_first_last"][0] - 0.005,
            "adaptation_lt_60_s_on_10k": (
                a.get("seconds") is not None
                and a["seconds"] < 60
                and (a.get("n_traffic") or 0) >= 10_000
            ),
            "p99_during_le_1_5x_idle": ratio is not None and ratio <= 1.5,
        },
        "prepare_seconds": round(prepare_seconds, 1),
        "seconds": round(time.time() - t_all, 1),
        "cpu_count": os.cpu_count(),
    }
