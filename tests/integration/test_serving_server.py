"""Real processes on loopback: `mp2a serve`, `bentoml serve` with torch made unimportable
(edge mode), and a real Prometheus server scraping /metrics."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from image_env import PROJECT, image_modules  # tests/ (pytest's path)
from PIL import Image
from prereqs import require_binary

from benchmarks.procs import descendants, free_port
from mp2a.artifact import load_artifact
from mp2a.preprocess import preprocess_batch
from mp2a.runtime import OrtEncoder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(street_run):
    return street_run


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def fresh_run(src: Path, dest: Path) -> Path:
    """A copy of an artifact without its traffic and versions: a server starts on it anew."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    return dest


def server_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a test server: its own BentoML home (metrics directory), no
    tracking, and `extra` (MP2A_* settings)."""
    return {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
        **extra,
    }


def predict_ok(c: httpx.Client, f: Path) -> dict:
    """POST /predict of one PNG file; asserts a 200 and returns the JSON answer."""
    r = c.post("/predict", files={"image": (f.name, f.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


@contextlib.contextmanager
def serve_client(cmd: list[str], env: dict, log: Path) -> Iterator[httpx.Client]:
    """`cmd --port P` on a free port until the block ends; yields an HTTP client of it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        process([*cmd, "--port", str(port)], env, log, url + "/readyz"),
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        yield c


@contextlib.contextmanager
def process(cmd: list[str], env: dict, log: Path, ready_url: str) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_http(ready_url, proc, log)
            yield proc
        finally:
            proc.terminate()  # SIGTERM, as a process manager stops it
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory) -> Iterator[str]:
    """`mp2a serve RUN --port P` as a user would start it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("mp2a-serve") / "serve.log"
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run_dir), "--host", "127.0.0.1"]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    with process([*cmd, "--port", str(port)], env, log, url + "/readyz"):
        yield url


@pytest.fixture(scope="module")
def expected(run_dir, digits_small) -> dict[Path, np.ndarray]:
    """Offline evaluation of every street image: (C,) probabilities each."""
    art = load_artifact(run_dir)
    enc = OrtEncoder(run_dir / "export" / "image_encoder.onnx", ["CPUExecutionProvider"])
    files = sorted(digits_small.glob("street/*/*.png"))
    pils = [Image.open(f).convert("RGB") for f in files]
    probs = art.head.probs(enc(preprocess_batch(pils, art.preprocessing)))
    return dict(zip(files, probs, strict=True))


def check(body: dict, probs: np.ndarray, classes: list[str]) -> None:
    assert body["label"] == classes[int(np.argmax(probs))]
    for t in body["top_k"]:
        assert abs(t["score"] - probs[classes.index(t["label"])]) <= 1e-4


def batch_histogram(url: str) -> tuple[float, float]:
    """(model calls of one image, all model calls) from mp2a_encoder_batch_size."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    fam = next(
        f for f in text_string_to_metric_families(text) if f.name == "mp2a_encoder_batch_size"
    )
    ones = next(
        s.value for s in fam.samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0"
    )
    total = next(s.value for s in fam.samples if s.name.endswith("_count"))
    return ones, total


def test_concurrent_http_clients_share_batches_and_get_their_own_answers(server, run_dir, expected):
    classes = load_artifact(run_dir).classes
    files = list(expected) * 3
    ones0, total0 = batch_histogram(server)

    def one(f: Path) -> tuple[Path, httpx.Response]:
        with httpx.Client(base_url=server, timeout=60) as c:
            return f, c.post("/predict", files={"image": (f.name, f.read_bytes(), "image/png")})

    with ThreadPoolExecutor(24) as pool:
        for f, r in pool.map(one, files):
            assert r.status_code == 200, r.text
            check(r.json(), expected[f], classes)
    ones1, total1 = batch_histogram(server)
    calls, single = total1 - total0, ones1 - ones0
    assert calls < len(files), "concurrent requests must share model calls"
    assert single < calls


def test_bad_input_over_a_real_socket_keeps_the_server_up(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        big = c.post("/predict", files={"image": ("big.jpg", b"\xff\xd8\xff" + bytes(17 << 20))})
        assert big.status_code == 413 and "MiB" in big.json()["error"]
        text = c.post("/predict", files={"image": ("a.png", b"<html>hi</html>")})
        assert text.status_code == 415
        form = c.post("/predict", data={"image": "http://127.0.0.1:1/x.png"})
        assert form.status_code == 415
        info = c.get("/model").json()
        assert info["version"] == "1" and info["backbone"]["model"] == "tiny-digits"
        assert c.get("/livez").status_code == 200


def test_real_server_hot_swaps_a_published_version_and_rolls_back(run_dir, expected, tmp_path):
    """`mp2a serve` with MP2A_ADMIN_TOKEN: a version published by another process is served
    by the running worker (answers equal the new head's), POST /rollback returns to 1."""
    from mp2a import versions
    from mp2a.head import Head

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    art = load_artifact(run)
    token = "server-test-token"
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "MP2A_ADMIN_TOKEN": token}
    env["MP2A_STORE"] = "off"
    # BentoML wipes BENTOML_HOME/prometheus_multiproc_dir when a server starts: a home of its
    # own keeps these servers from wiping the metrics of the module's running server
    env["BENTOML_HOME"] = str(tmp_path / "bentoml-home")
    # offline: (C,) probabilities of the base head for each image -> the new head's
    enc = OrtEncoder(run / "export" / "image_encoder.onnx", ["CPUExecutionProvider"])
    files = list(expected)[:6]
    emb = enc(preprocess_batch([Image.open(f).convert("RGB") for f in files], art.preprocessing))
    new = Head(np.roll(art.head.weight, 3, axis=1), art.head.logit_scale)
    log = tmp_path / "serve.log"
    with serve_client(cmd, env, log) as c:
        predict = functools.partial(predict_ok, c)

        assert predict(files[0])["model_version"] == "1"
        assert versions.publish(run, new, {"note": "published by the test"}) == 2
        deadline = time.time() + 60
        while predict(files[0])["model_version"] != "2":
            assert time.time() < deadline, "the server never swapped to version 2"
            time.sleep(0.1)
        for f, e in zip(files, emb, strict=True):
            body = predict(f)
            assert body["model_version"] == "2"
            check(body, new.probs(e[None])[0], art.classes)
        info = c.get("/model").json()
        assert info["version"] == "2" and info["previous_versions"] == ["1"]
        assert c.post("/rollback").status_code == 401
        r = c.post("/rollback", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["version"] == "1", r.text
        for f in files:
            body = predict(f)
            assert body["model_version"] == "1"
            check(body, expected[f], art.classes)
        metrics = c.get("/metrics").text
        assert 'mp2a_model_version_info{backbone="tiny-digits",version="1"} 1.0' in metrics
    assert versions.current(run) == 1

    # kill -9 of the whole server (workers included) serving version 3, with a crashed
    # publisher's partial folder 4 beside it: a restart serves 3, complete and verified
    assert versions.publish(run, new, {"note": "again"}) == 3
    (run / "versions" / "4").mkdir()
    (run / "versions" / "4" / "head.safetensors").write_bytes(b"half")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "killed.log", "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_http(url + "/readyz", proc, tmp_path / "killed.log")
        finally:  # every process of it at once, as a crash of the machine would
            for pid in descendants(proc.pid):  # BentoML's workers run in their own sessions
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([*cmd, "--port", str(port)], env, tmp_path / "restart.log", url + "/readyz"):
        r = httpx.post(url + "/predict", files={"image": (files[0].name, files[0].read_bytes())})
        assert r.status_code == 200 and r.json()["model_version"] == "3", r.text
        check(r.json(), new.probs(emb[:1])[0], art.classes)


def test_prometheus_scrapes_the_latency_histogram(server, run_dir, expected, tmp_path):
    prometheus = require_binary("prometheus", "prometheus")
    port = int(server.rsplit(":", 1)[1])
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        textwrap.dedent(
            f"""\
            global:
              scrape_interval: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: mp2a
                static_configs:
                  - targets: ["127.0.0.1:{port}"]
            """
        )
    )
    cmd = [
        prometheus,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    ]
    prom = f"http://127.0.0.1:{prom_port}"
    with process(cmd, dict(os.environ), tmp_path / "prometheus.log", prom + "/-/ready"):
        for f in list(expected)[:5]:
            r = httpx.post(server + "/predict", files={"image": (f.name, f.read_bytes())})
            assert r.status_code == 200
        queries = {
            "count": 'sum(mp2a_inference_latency_seconds_count{stage="encode"})',
            "p99": "histogram_quantile(0.99, sum by (le) "
            '(mp2a_inference_latency_seconds_bucket{stage="decode"}))',
            "up": 'up{job="mp2a"}',
            "version": "mp2a_model_version_info == 1",
        }
        deadline, got = time.time() + 60, {}
        while time.time() < deadline:
            got = {}
            for key, q in queries.items():
                data = httpx.get(prom + "/api/v1/query", params={"query": q}).json()
                assert data["status"] == "success", data
                got[key] = data["data"]["result"]
            if got["count"] and float(got["count"][0]["value"][1]) >= 5:
                break
            time.sleep(0.5)
        assert got["count"] and float(got["count"][0]["value"][1]) >= 5, got
        p99 = float(got["p99"][0]["value"][1])
        assert 0 < p99 < 10  # seconds
        assert float(got["up"][0]["value"][1]) == 1
        assert got["version"][0]["metric"]["backbone"] == "tiny-digits"


IMAGE_ONLY = """\
import os, sys

with open(os.environ["MP2A_NO_TORCH_MARKER"], "a") as f:
    f.write(f"{os.getpid()}\\n")

_ALLOWED = set(os.environ["MP2A_IMAGE_MODULES"].split(","))


class _ImageOnly:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if (
            top in _ALLOWED
            or top in sys.stdlib_module_names
            or top.startswith(("__editable__", "_distutils_hack", "_sysconfigdata"))
        ):
            return None
        raise ModuleNotFoundError(
            f"{top} is blocked in this process: not in the torch-free image (Dockerfile)",
            name=name,
        )


sys.meta_path.insert(0, _ImageOnly())
"""


def test_edge_mode_serves_without_torch(run_dir, expected, tmp_path):
    """`bentoml serve serving.service:Mp2aService` with MP2A_RUN, where only what the
    torch-free image installs can be imported (torch, fastapi-less images… fail) in every
    process (a sitecustomize on PYTHONPATH), still answers /predict correctly."""
    (tmp_path / "sitecustomize.py").write_text(IMAGE_ONLY)
    marker = tmp_path / "pids.txt"
    allowed = image_modules() | set(PROJECT) | {"sitecustomize"}
    assert "torch" not in allowed
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        "MP2A_NO_TORCH_MARKER": str(marker),
        "MP2A_IMAGE_MODULES": ",".join(sorted(allowed)),
        "MP2A_RUN": str(run_dir),
        "MP2A_BACKEND": "ort",
        "BENTOML_DO_NOT_TRACK": "True",
    }
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
    assert probe.returncode != 0 and b"blocked" in probe.stderr
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:Mp2aService"]
    cmd += ["--working-dir", str(ROOT), "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    marker.write_text("")
    with process(cmd, env, tmp_path / "edge.log", url + "/readyz"):
        f = next(iter(expected))
        r = httpx.post(url + "/predict", files={"image": (f.name, f.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        check(r.json(), expected[f], load_artifact(run_dir).classes)
    pids = set(marker.read_text().split())
    assert len(pids) >= 2, "the blocker must be active in the server and its worker"
    assert "ImportError" not in (tmp_path / "edge.log").read_text()


def test_serve_refuses_a_missing_artifact_in_one_line(tmp_path, capsys):
    from mp2a.cli import main

    assert main(["serve", str(tmp_path / "nope"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an mp2a artifact" in err[0]


def test_two_worker_processes_share_the_port_the_store_the_versions_and_the_metrics(
    run_dir, expected, tmp_path
):
    """MP2A_WORKERS=2: two model processes behind one port, each with its own session and
    half the cores; concurrent clients get correct answers, every served image reaches the
    one traffic store, a published version is served by both, /metrics adds both up."""
    from mp2a import versions
    from mp2a.head import Head
    from online.state import FileState
    from serving.backends import cpu_count

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    art = load_artifact(run)
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "MP2A_WORKERS": "2"}
    env["BENTOML_HOME"] = str(tmp_path / "bentoml-home")
    files = list(expected)
    rounds = 4
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([*cmd, "--port", str(port)], env, tmp_path / "serve.log", url + "/readyz") as p:
        workers = [
            pid
            for pid in descendants(p.pid)
            if "_bentoml_impl.worker.service" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert len(workers) == 2, workers

        def one(f: Path) -> tuple[Path, dict]:
            # a connection of its own per request: the kernel spreads them over the workers
            with httpx.Client(base_url=url, timeout=60) as c:
                return f, predict_ok(c, f)

        with ThreadPoolExecutor(8) as pool:
            for f, body in pool.map(one, files * rounds):
                check(body, expected[f], art.classes)
        with httpx.Client(base_url=url, timeout=60) as c:
            info = c.get("/model").json()
            assert info["runtime"]["threads"] == max(1, cpu_count() // 2)
            text = c.get("/metrics").text
        served = sum(
            float(v) for v in re.findall(r"^mp2a_predictions_total\{[^}]*\} (\S+)$", text, re.M)
        )
        assert served == len(files) * rounds  # both workers' counters, added up
        state = FileState(run)
        deadline = time.time() + 60
        while state.traffic_count() < len(files) * rounds:  # the store's writer flushes
            assert time.time() < deadline, state.traffic_count()
            time.sleep(0.2)
        assert state.traffic_count() == len(files) * rounds

        new = Head(np.roll(art.head.weight, 3, axis=1), art.head.logit_scale)
        assert versions.publish(run, new, {"note": "published by the test"}) == 2
        deadline = time.time() + 60
        while True:  # every worker swaps: 32 fresh connections all answer version 2
            with ThreadPoolExecutor(8) as pool:
                got = {b["model_version"] for _, b in pool.map(one, [files[0]] * 32)}
            if got == {"2"}:
                break
            assert time.time() < deadline, f"versions still served: {got}"
            time.sleep(0.2)


def test_the_default_worker_count_is_measured_once_and_shared_by_every_worker(
    run_dir, expected, tmp_path
):
    """MP2A_WORKERS unset (auto): the server times its encoder once and starts that many
    worker processes; every worker reports the same measurement in GET /model and answers
    correctly, with its session on its share of the cores."""
    from serving import workers as worker_rule
    from serving.backends import cpu_count

    art = load_artifact(run_dir)
    env = {k: v for k, v in os.environ.items() if k != "MP2A_WORKERS"}
    env |= {"BENTOML_DO_NOT_TRACK": "True", "BENTOML_HOME": str(tmp_path / "bentoml-home")}
    env["MP2A_STORE"] = "off"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run_dir), "--host", "127.0.0.1"]
    with process([*cmd, "--port", str(port)], env, tmp_path / "serve.log", url + "/readyz") as p:
        procs = [
            pid
            for pid in descendants(p.pid)
            if "_bentoml_impl.worker.service" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        seen = []
        for _ in range(16):  # fresh connections: the kernel spreads them over the workers
            with httpx.Client(base_url=url, timeout=60) as c:
                seen.append(c.get("/model").json()["runtime"])
                f = next(iter(expected))
                check(predict_ok(c, f), expected[f], art.classes)
    chosen = seen[0]["workers"]
    assert chosen["chosen"] == "auto" and chosen["count"] == len(procs) >= 1
    assert all(r["workers"] == chosen for r in seen)  # one measurement, not one per worker
    assert all(r["threads"] == max(1, cpu_count() // len(procs)) for r in seen)
    if cpu_count() > 1:
        ms = chosen["encoder_ms_by_threads"]
        lone_cost = ms["1"] - ms[str(cpu_count())]
        assert (len(procs) > 1) == (lone_cost <= worker_rule.LONE_COST_MS), chosen


def test_serve_refuses_a_bad_worker_count_in_one_line(run_dir, capsys, monkeypatch):
    from mp2a.cli import main

    monkeypatch.setenv("MP2A_WORKERS", "0")
    assert main(["serve", str(run_dir), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MP2A_WORKERS" in err[0]


def test_the_benchmark_reference_answers_like_the_service(run_dir, expected, tmp_path):
    """benchmarks/bare.py, the bare ASGI route `mp2a bench serving` compares the service
    with, does the service's work: its answers are the same probabilities."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "benchmarks.bare", str(run_dir), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    classes = load_artifact(run_dir).classes
    with process(cmd, env, tmp_path / "bare.log", url + "/readyz"):
        for f in list(expected)[:4]:
            r = httpx.post(url + "/predict", files={"image": (f.name, f.read_bytes())})
            assert r.status_code == 200, r.text
            check(r.json(), expected[f], classes)
        r = httpx.post(url + "/predict", files={"image": ("x.png", b"not an image")})
        assert r.status_code == 415
