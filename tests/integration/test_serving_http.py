"""The BentoML service in-process (Service.to_asgi() + TestClient) on a real tiny-CLIP artifact:
parity with offline evaluation, batching under concurrency, metrics, and a corpus of bad input.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from mp2a import versions
from mp2a.artifact import load_artifact
from mp2a.head import Head
from mp2a.preprocess import load_image, preprocess_batch
from mp2a.runtime import OrtEncoder


@pytest.fixture(scope="module")
def run_dir(street_run):
    return street_run


@pytest.fixture(scope="module")
def images(digits_small) -> list[Path]:
    """Images from every domain: different pictures, different answers."""
    return sorted(digits_small.glob("*/*/*.png"))[::3]


@pytest.fixture(scope="module")
def offline(run_dir, images) -> dict[Path, np.ndarray]:
    """Offline evaluation: the shared preprocessing, ORT embeddings, the head. (N, C) probs."""
    art = load_artifact(run_dir)
    enc = OrtEncoder(run_dir / "export" / "image_encoder.onnx", ["CPUExecutionProvider"])
    pils = [load_image(f) for f in images]
    probs = art.head.probs(enc(preprocess_batch(pils, art.preprocessing)))
    return dict(zip(images, probs, strict=True))


@pytest.fixture(scope="module", autouse=True)
def _restore_environment():
    """make_client sets MP2A_RUN / MP2A_BACKEND for the service; leave no trace."""
    saved = {k: os.environ.get(k) for k in ("MP2A_RUN", "MP2A_BACKEND")}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@functools.cache
def asgi_app():
    """One ASGI app per process: BentoML registers its request metrics when it builds one.
    Each TestClient context runs the app's lifespan, i.e. a fresh service instance that
    reads MP2A_RUN and MP2A_BACKEND."""
    from serving.service import Mp2aService

    return Mp2aService.to_asgi()


def make_client(run_dir: Path, backend: str = "ort") -> TestClient:
    os.environ["MP2A_RUN"] = str(run_dir)
    os.environ["MP2A_BACKEND"] = backend
    return TestClient(asgi_app(), raise_server_exceptions=False)


@pytest.fixture
def client(run_dir):
    """A fresh service instance per test (the app allows one running instance at a time)."""
    with make_client(run_dir) as c:
        yield c


def post_image(client: TestClient, data: bytes, name: str = "x.png", route: str = "/predict"):
    return client.post(route, files={"image": (name, data, "application/octet-stream")})


def served_probs(body: dict, classes: list[str]) -> dict[str, float]:
    assert body["label"] == body["top_k"][0]["label"] and body["score"] == body["top_k"][0]["score"]
    return {t["label"]: t["score"] for t in body["top_k"]}


def assert_matches(body: dict, probs: np.ndarray, classes: list[str], tol: float = 1e-4) -> None:
    got = served_probs(body, classes)
    assert body["label"] == classes[int(np.argmax(probs))]
    assert body["index"] == int(np.argmax(probs)) == body["top_k"][0]["index"]
    assert all(classes[t["index"]] == t["label"] for t in body["top_k"])
    for label, score in got.items():
        assert abs(score - probs[classes.index(label)]) <= tol, (label, score)
    scores = list(got.values())
    assert scores == sorted(scores, reverse=True) and len(scores) == 5


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


# ------------------------------------------------------------------ behaviour


def test_served_probabilities_equal_offline_evaluation(client, run_dir, images, offline):
    classes = load_artifact(run_dir).classes
    for f in images[:12]:
        r = post_image(client, f.read_bytes(), f.name)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "1"
        assert_matches(r.json(), offline[f], classes)
        assert "model;dur=" in r.headers["server-timing"]


def test_a_head_with_a_prototype_row_serves_its_offline_probabilities(transductive_run, images):
    """The served head is the whole mixture of rows (prototype row included)."""
    art = load_artifact(transductive_run)
    enc = OrtEncoder(transductive_run / "export" / "image_encoder.onnx", ["CPUExecutionProvider"])
    want = art.head.probs(
        enc(preprocess_batch([load_image(f) for f in images[:6]], art.preprocessing))
    )
    with make_client(transductive_run) as c:
        assert c.get("/model").json()["method"] == "transductive"
        for f, p in zip(images[:6], want, strict=True):
            r = post_image(c, f.read_bytes(), f.name)
            assert r.status_code == 200, r.text
            assert_matches(r.json(), p, art.classes)


def test_torch_backend_equals_offline_evaluation(run_dir, images, offline):
    """The torch fallback serves the same probabilities as the exported encoder."""
    classes = load_artifact(run_dir).classes
    with make_client(run_dir, "torch") as c:
        assert c.get("/model").json()["runtime"]["backend"] == "torch"
        for f in images[:6]:
            r = post_image(c, f.read_bytes(), f.name)
            assert r.status_code == 200, r.text
            assert_matches(r.json(), offline[f], classes)


def test_batch_endpoint_keeps_order(client, run_dir, images, offline):
    classes = load_artifact(run_dir).classes
    chosen = images[:7]
    files = [("images", (f.name, f.read_bytes(), "image/png")) for f in chosen]
    r = client.post("/predict_batch", files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 7 and r.json()["model_version"] == "1"
    for f, p in zip(chosen, preds, strict=True):
        assert_matches(p, offline[f], classes)


def test_concurrent_requests_get_their_own_answers(client, run_dir, images, offline):
    classes = load_artifact(run_dir).classes
    work = images * 2  # 2 rounds of every image, 16 threads at once

    def one(f: Path) -> tuple[Path, dict]:
        r = post_image(client, f.read_bytes(), f.name)
        assert r.status_code == 200, r.text
        return f, r.json()

    with ThreadPoolExecutor(16) as pool:
        for f, body in pool.map(one, work):
            assert_matches(body, offline[f], classes)


def test_model_health_and_metrics(client, run_dir, images):
    assert post_image(client, images[0].read_bytes()).status_code == 200
    info = client.get("/model").json()
    art = load_artifact(run_dir)
    assert info["version"] == "1" and info["classes"] == art.classes
    assert info["backbone"]["model"] == "tiny-digits" and info["created_at"]
    assert info["metrics"]["method"] == "zeroshot" and info["previous_versions"] == []
    assert info["runtime"]["backend"] == "ort"
    assert client.get("/livez").status_code == 200 and client.get("/readyz").status_code == 200

    r = client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    for name in (
        "mp2a_inference_latency_seconds",
        "mp2a_predictions",
        "mp2a_prediction_confidence",
        "mp2a_model_version_info",
        "mp2a_traffic_samples",
        "mp2a_adaptation_runs",
        "mp2a_adaptation_duration_seconds",
        "mp2a_pseudo_label_selected_ratio",
        "bentoml_service_request",
    ):
        assert name in families, name
    stages = {
        s.labels["stage"]
        for s in families["mp2a_inference_latency_seconds"].samples
        if s.name.endswith("_count") and s.value > 0
    }
    assert stages == {"decode", "preprocess", "encode", "head"}
    version = [s for s in families["mp2a_model_version_info"].samples if s.value == 1]
    assert [s.labels for s in version] == [{"version": "1", "backbone": "tiny-digits"}]
    outcomes = {s.labels["outcome"] for s in families["mp2a_adaptation_runs"].samples}
    assert outcomes == {"accepted", "rejected", "failed"}
    assert sum(s.value for s in families["mp2a_predictions"].samples) > 0
    # answered by the upload guard directly, the routes still count in BentoML's metrics
    predict_requests = [
        s
        for s in families["bentoml_service_request"].samples
        if s.labels.get("endpoint") == "/predict" and s.labels.get("http_response_code") == "200"
    ]
    assert predict_requests and predict_requests[0].value > 0, families["bentoml_service_request"]
    assert "mp2a_traffic_dropped" in families


def _traffic_samples(client: TestClient) -> float:
    text = client.get("/metrics").text
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "mp2a_traffic_samples")
    return max(s.value for s in fam.samples)


def test_served_images_end_up_in_the_traffic_store(run_dir, images, tmp_path, monkeypatch):
    """Every served image is one row: its embedding, the served label and score, the version;
    a rejected upload is none."""
    from online.store import StoreConfig, TrafficStore

    path = tmp_path / "traffic.sqlite"
    monkeypatch.setenv("MP2A_STORE", str(path))
    art = load_artifact(run_dir)
    chosen = images[:9]
    with make_client(run_dir) as c:
        served = []
        for f in chosen[:5]:
            r = post_image(c, f.read_bytes(), f.name)
            assert r.status_code == 200, r.text
            served.append(r.json())
        assert post_image(c, b"not an image at all").status_code == 415
        files = [("images", (f.name, f.read_bytes(), "image/png")) for f in chosen[5:]]
        r = c.post("/predict_batch", files=files)
        assert r.status_code == 200, r.text
        served += r.json()["predictions"]
        # the writer publishes the row count after each batch (an earlier service's may linger)
        deadline = time.monotonic() + 30
        while _traffic_samples(c) != len(chosen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _traffic_samples(c) == len(chosen)
    # the service has shut down: its store is flushed and closed
    store = TrafficStore(StoreConfig(path=path, dim=art.backbone.embed_dim), start=False)
    got = store.read()
    assert store.count() == len(chosen) and store.versions() == {"1": len(chosen)}
    assert [art.classes[i] for i in got.labels] == [b["label"] for b in served]
    np.testing.assert_allclose(got.confidences, [b["score"] for b in served], rtol=1e-6)
    probs = art.head.probs(got.embeddings)  # (N, C): the stored embeddings give the answers
    for p, b in zip(probs, served, strict=True):
        assert_matches(b, p, art.classes, tol=1e-5)


# ------------------------------------------------------------------ versions and admin

TOKEN = "test-admin-token"


@pytest.fixture
def versioned_run(run_dir, tmp_path) -> Path:
    """A private copy of the street artifact: publishing must not touch the shared one."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    return out


@pytest.fixture(scope="module")
def embeddings(run_dir, images) -> np.ndarray:
    """(N, D) offline embeddings of `images` (the encoder never changes between versions)."""
    art = load_artifact(run_dir)
    enc = OrtEncoder(run_dir / "export" / "image_encoder.onnx", ["CPUExecutionProvider"])
    return enc(preprocess_batch([load_image(f) for f in images], art.preprocessing))


def permuted_head(run: Path, shift: int = 1) -> Head:
    """The base head with its class rows rotated: clearly different answers."""
    h = load_artifact(run).head
    return Head(np.roll(h.weight, shift, axis=1), h.logit_scale * 0.9)


def wait_version(c: TestClient, image: bytes, version: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = post_image(c, image).json()
        if body["model_version"] == version or time.monotonic() > deadline:
            assert body["model_version"] == version, body
            return body
        time.sleep(0.05)


def served_version_series(c: TestClient) -> dict[str, float]:
    text = c.get("/metrics").text
    fam = next(
        f for f in text_string_to_metric_families(text) if f.name == "mp2a_model_version_info"
    )
    return {s.labels["version"]: s.value for s in fam.samples}


def test_published_version_is_served_and_rolled_back_over_http(
    versioned_run, images, embeddings, monkeypatch
):
    monkeypatch.setenv("MP2A_ADMIN_TOKEN", TOKEN)
    base = load_artifact(versioned_run)
    new = permuted_head(versioned_run)
    data = images[0].read_bytes()
    with make_client(versioned_run) as c:
        assert post_image(c, data).json()["model_version"] == "1"
        assert versions.publish(versioned_run, new, {"note": "test"}, decision={"ok": 1}) == 2
        wait_version(c, data, "2")
        for f, e in zip(images[:8], embeddings[:8], strict=True):
            body = post_image(c, f.read_bytes()).json()
            assert body["model_version"] == "2"
            assert_matches(body, new.probs(e[None])[0], base.classes)
        info = c.get("/model").json()
        assert info["version"] == "2" and info["previous_versions"] == ["1"]
        assert info["metrics"] == {"note": "test"} and info["decision"] == {"ok": 1}
        assert served_version_series(c) == {"1": 0.0, "2": 1.0}

        assert c.post("/rollback").status_code == 401
        wrong = c.post("/rollback", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "MP2A_ADMIN_TOKEN" in wrong.json()["error"]
        assert c.post("/rollback", headers={"Authorization": TOKEN}).status_code == 401
        assert versions.current(versioned_run) == 2
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = c.post("/rollback", headers=auth)
        assert r.status_code == 200 and r.json() == {"version": "1", "previous": "2"}
        body = post_image(c, images[0].read_bytes()).json()  # at once in this worker
        assert body["model_version"] == "1"
        assert_matches(body, base.head.probs(embeddings[:1])[0], base.classes)
        info = c.get("/model").json()
        assert info["previous_versions"] == []
        kept = {v["version"]: v for v in info["versions"]}  # what a rollback left
        assert kept["1"]["served"] and kept["2"]["rolled_back"]["to"] == 1
        status = c.get("/adapt/status").json()
        assert status["state"] == "rolled_back" and status["version"] == "1", status
        assert c.get("/adapt/history").json()["decisions"][0]["state"] == "rolled_back"
        assert served_version_series(c) == {"1": 1.0, "2": 0.0}
        again = c.post("/rollback", headers=auth)
        assert again.status_code == 409 and "nothing to roll back" in again.json()["error"]


def test_admin_endpoints_are_disabled_without_the_token_env(versioned_run, monkeypatch):
    monkeypatch.delenv("MP2A_ADMIN_TOKEN", raising=False)
    versions.publish(versioned_run, permuted_head(versioned_run), {})
    with make_client(versioned_run) as c:
        assert c.get("/model").json()["version"] == "2"  # a restart serves CURRENT
        for route in ("/rollback", "/adapt"):
            r = c.post(route, headers={"Authorization": "Bearer anything"})
            assert r.status_code == 403, route
            assert "MP2A_ADMIN_TOKEN" in r.json()["error"]
        status = c.get("/adapt/status").json()
        assert status["state"] == "idle" and status["pending_request"] is None
    assert versions.current(versioned_run) == 2


def test_adapt_request_is_written_for_the_worker(versioned_run, monkeypatch):
    monkeypatch.setenv("MP2A_ADMIN_TOKEN", TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with make_client(versioned_run) as c:
        assert c.post("/adapt").status_code == 401
        r = c.post("/adapt", headers=auth)
        assert r.status_code == 202 and "worker" in r.json()["message"]
        written = json.loads((versioned_run / "versions" / "adapt_request.json").read_text())
        assert written["id"] == r.json()["id"] and written["serving_version"] == "1"
        assert c.get("/adapt/status").json()["pending_request"]["id"] == written["id"]
        status = {"state": "rejected", "reason": "source accuracy dropped 7 pts"}
        (versioned_run / "versions" / "adapt_status.json").write_text(json.dumps(status))
        got = c.get("/adapt/status").json()
        assert got["state"] == "rejected" and got["reason"] == status["reason"]


def test_adapt_settings_are_checked_and_passed_to_the_worker(versioned_run, monkeypatch):
    monkeypatch.setenv("MP2A_ADMIN_TOKEN", TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    request_file = versioned_run / "versions" / "adapt_request.json"
    with make_client(versioned_run) as c:
        for body, says in [
            (b"{not json", "Expecting property name"),
            (b"[1, 2]", "JSON object"),
            (b'{"steps": 5}', "unknown setting(s) steps"),
            (b'{"stages": 0}', "stages must be an integer in 1..20"),
            (b'{"steps_per_stage": true}', "steps_per_stage must be an integer"),
            (b'{"max_samples": 2.5}', "max_samples must be an integer"),
            (b'{"gain_correction": "off"}', "gain_correction must be one of auto, sources"),
        ]:
            r = c.post("/adapt", headers=auth, content=body)
            assert r.status_code == 400 and says in r.json()["error"], (body, r.text)
            assert not request_file.exists()
        r = c.post("/adapt", headers=auth, content=b"x" * 5000)
        assert r.status_code == 413 and not request_file.exists()
        body = {"steps_per_stage": 7, "stages": 2, "gain_correction": "none"}
        r = c.post("/adapt", headers=auth, json=body)
        assert r.status_code == 202, r.text
        written = json.loads(request_file.read_text())
        assert written["settings"] == body


def test_status_of_a_run_whose_worker_died_reads_failed(versioned_run, monkeypatch):
    """A "running" status whose worker process no longer exists (kill -9) is reported as
    failed, not as running forever; a live worker's run stays running. The pid is told to
    admin callers only."""
    import socket

    monkeypatch.setenv("MP2A_ADMIN_TOKEN", "status-token")
    auth = {"Authorization": "Bearer status-token"}

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = versioned_run / "versions" / "adapt_status.json"
    path.parent.mkdir(exist_ok=True)
    host = socket.gethostname()
    with make_client(versioned_run) as c:
        path.write_text(json.dumps({"state": "running", "pid": dead.pid, "host": host}))
        got = c.get("/adapt/status", headers=auth).json()
        assert got["state"] == "failed" and f"pid {dead.pid}" in got["reasons"][0]
        assert got["pid"] == dead.pid and got["host"] == host
        anonymous = c.get("/adapt/status").json()
        assert anonymous["state"] == "failed" and "pid" not in anonymous and "host" not in anonymous
        assert str(dead.pid) not in anonymous["reasons"][0]
        path.write_text(json.dumps({"state": "running", "pid": os.getpid(), "host": host}))
        assert c.get("/adapt/status").json()["state"] == "running"
        other = {"state": "running", "pid": dead.pid, "host": host + "-elsewhere"}
        path.write_text(json.dumps(other))
        assert c.get("/adapt/status").json()["state"] == "running"


def test_requests_during_swaps_all_succeed_with_their_versions_answer(
    versioned_run, images, embeddings
):
    """Clients hammer /predict while versions are published and rolled back underneath:
    no request fails, and each answer is exactly the head of the version it reports."""
    base = load_artifact(versioned_run)
    heads = {"1": base.head}
    work = list(zip(images, embeddings, strict=True)) * 6
    stop = time.monotonic() + 60

    def one(item: tuple[Path, np.ndarray]) -> tuple[np.ndarray, dict, int]:
        f, e = item
        r = c.post("/predict", files={"image": (f.name, f.read_bytes(), "image/png")})
        return e, (r.json() if r.status_code == 200 else {"error": r.text}), r.status_code

    with make_client(versioned_run) as c, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, item) for item in work]
        for shift in (1, 2, 3):
            h = permuted_head(versioned_run, shift)
            heads[str(versions.publish(versioned_run, h, {"shift": shift}))] = h
            time.sleep(0.6)  # a watcher period
        versions.rollback(versioned_run)
        results = [fu.result(timeout=max(1.0, stop - time.monotonic())) for fu in futures]
        seen = set()
        for e, body, status in results:
            assert status == 200, body
            seen.add(body["model_version"])
            assert_matches(body, heads[body["model_version"]].probs(e[None])[0], base.classes)
        wait_version(c, images[0].read_bytes(), "3")
    assert len(seen) >= 2, f"the swaps must happen while requests run: {seen}"


# ------------------------------------------------------------------ malformed input


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _sample(digits: Path) -> Image.Image:
    with Image.open(sorted(digits.glob("street/*/*.png"))[0]) as im:
        return im.convert("RGB")


def _bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 99))


def bad_requests(digits: Path) -> dict[str, tuple[dict, int]]:
    """name -> (TestClient.post kwargs for /predict, expected status)."""
    ok = _enc(_sample(digits), "PNG")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    big_png, big_jpg = _enc(noise, "PNG"), _enc(noise, "JPEG")
    corrupt_png = bytearray(big_png)
    corrupt_png[100:140] = b"\xff" * 40
    mp = "multipart/form-data; boundary=xyz"
    tiny_gif = _enc(Image.new("RGB", (4, 4)), "GIF")
    tiny_bmp = _enc(Image.new("RGB", (4, 4)), "BMP")

    def patched(data: bytes, at: int, new: bytes) -> bytes:
        return data[:at] + new + data[at + len(new) :]

    def f(data: bytes, name: str = "upload.bin", field: str = "image") -> dict:
        return {"files": {field: (name, data, "image/png")}}

    return {
        "zero bytes": (f(b""), 400),
        "plain text": (f(b"just some text\n"), 415),
        "html page": (f(b"<!doctype html><html><body>hi</body></html>"), 415),
        "pdf header": (f(b"%PDF-1.4\n1 0 obj\n"), 415),
        "svg drawing": (f(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>'), 415),
        "tiff image": (f(b"II*\x00" + b"\0" * 64), 415),
        "zip archive": (f(b"PK\x03\x04" + b"\0" * 64), 415),
        "elf binary": (f(b"\x7fELF" + bytes(range(200))), 415),
        "truncated jpeg": (f(big_jpg[: len(big_jpg) // 2]), 422),
        "truncated png": (f(big_png[: len(big_png) // 2]), 422),
        "jpeg magic only": (f(b"\xff\xd8\xff"), 422),
        "png signature only": (f(b"\x89PNG\r\n\x1a\n"), 422),
        "corrupt png data": (f(bytes(corrupt_png)), 422),
        "gif magic then text": (f(b"GIF89a this is not a gif"), 422),
        "webp riff header only": (f(b"RIFF\x00\x00\x00\x00WEBPVP8 "), 422),
        "decompression bomb header": (f(_bomb()), 413),
        "huge gif screen size": (f(patched(tiny_gif, 6, b"\xff\xff\xff\xff")), 413),
        "huge bmp dimensions": (f(patched(tiny_bmp, 18, struct.pack("<ii", 30000, 30000))), 413),
        "oversize body": (f(b"\xff\xd8\xff" + b"\0" * (17 * 2**20)), 413),
        "extremely wide image": (f(_enc(Image.new("RGB", (5000, 10)), "PNG")), 422),
        "wrong field name": (f(ok, field="file"), 400),
        "missing field": ({"data": {"note": "hello"}, "files": {"x": ("a", b"")}}, 400),
        "image as text field (url)": (
            {"data": {"image": "http://169.254.169.254/latest"}, "files": {"x": ("a", b"")}},
            400,
        ),
        "empty multipart": ({"content": b"--xyz--\r\n", "headers": {"content-type": mp}}, 400),
        "garbage multipart": ({"content": b"\x00\x01junk", "headers": {"content-type": mp}}, 400),
        "multipart without boundary": (
            {"content": ok, "headers": {"content-type": "multipart/form-data"}},
            400,
        ),
        "raw image body": ({"content": ok, "headers": {"content-type": "image/png"}}, 415),
        "json body": ({"json": {"image": "aGVsbG8="}}, 415),
        "no body at all": ({}, 415),
        "two images on /predict": (
            {"files": [("image", ("a.png", ok)), ("image", ("b.png", ok))]},
            400,
        ),
        "over-long file name": (f(ok, name="x" * 400 + ".png"), 400),
    }


def odd_but_valid(digits: Path) -> dict[str, bytes]:
    """Valid images in unusual encodings: each must be answered 200."""
    base = _sample(digits)
    a16 = (np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16)
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [base, base.transpose(Image.Transpose.ROTATE_180)]
    return {
        "16-bit grayscale png": _enc(Image.fromarray(a16), "PNG"),
        "cmyk jpeg": _enc(base.convert("CMYK"), "JPEG"),
        "palette with transparency": _enc(pal, "PNG", transparency=0),
        "rgba png": _enc(base.convert("RGBA"), "PNG"),
        "grayscale+alpha png": _enc(base.convert("LA"), "PNG"),
        "grayscale jpeg": _enc(base.convert("L"), "JPEG"),
        "bilevel bmp": _enc(base.convert("1"), "BMP"),
        "bmp": _enc(base, "BMP"),
        "webp": _enc(base, "WEBP"),
        "animated gif": _enc(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated webp": _enc(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "1x1 pixel": _enc(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "tall 2x100": _enc(Image.new("RGB", (2, 100), (10, 200, 30)), "PNG"),
        "png declared as text/plain": _enc(base, "PNG"),
    }


def test_malformed_input_corpus_gets_json_4xx_never_5xx(client, digits_small):
    bad = bad_requests(digits_small)
    assert len(bad) >= 30
    for name, (kwargs, status) in bad.items():
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        assert isinstance(r.json()["error"], str) and len(r.json()["error"]) > 10, name
    assert post_image(client, _enc(_sample(digits_small), "PNG")).status_code == 200


def test_odd_but_valid_images_are_answered(client, digits_small):
    for name, data in odd_but_valid(digits_small).items():
        declared = "text/plain" if "text/plain" in name else "image/png"
        r = client.post("/predict", files={"image": ("odd", data, declared)})
        assert r.status_code == 200, (name, r.text[:300])
        assert r.json()["score"] > 0


def test_animated_gif_is_its_first_frame(client, digits_small):
    base = _sample(digits_small)
    anim = _enc(base, "GIF", save_all=True, append_images=[Image.new("RGB", base.size)])
    first = _enc(Image.open(io.BytesIO(anim)).convert("RGB"), "PNG")  # frame 0, lossless
    a, b = post_image(client, anim).json(), post_image(client, first).json()
    assert a["top_k"] == b["top_k"]


def test_exif_rotated_jpeg_is_served_upright(client, digits_small):
    """A camera JPEG stored sideways with orientation 6 scores like the upright pixels."""
    upright = _sample(digits_small).resize((48, 32))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    tagged = _enc(stored, "JPEG", quality=95, exif=exif)
    untagged = _enc(stored, "JPEG", quality=95)
    decoded = Image.open(io.BytesIO(untagged)).convert("RGB")  # the same JPEG pixels
    by_hand = png(decoded.transpose(Image.Transpose.ROTATE_270))  # rotated losslessly
    served, expect = post_image(client, tagged).json(), post_image(client, by_hand).json()
    sideways = post_image(client, untagged).json()
    classes = [t["label"] for t in expect["top_k"]]
    assert [t["label"] for t in served["top_k"]] == classes
    for s, e in zip(served["top_k"], expect["top_k"], strict=True):
        assert abs(s["score"] - e["score"]) <= 1e-4
    assert sideways["top_k"] != served["top_k"]


def test_batch_endpoint_errors_name_the_bad_image(client, digits_small):
    ok = _enc(_sample(digits_small), "PNG")
    files = [("images", ("a.png", ok)), ("images", ("b.txt", b"not an image"))]
    r = client.post("/predict_batch", files=files)
    assert r.status_code == 415 and "images[1]" in r.json()["error"]
    r = client.post("/predict_batch", files=[("images", ("a", ok))] * 65)
    assert r.status_code == 413
    r = client.post("/predict_batch", files={"image": ("a.png", ok)})
    assert r.status_code == 400 and "'images'" in r.json()["error"]
    assert client.get("/readyz").status_code == 200


def test_adapt_history_lists_recorded_outcomes_newest_first(versioned_run):
    with make_client(versioned_run) as c:
        assert c.get("/adapt/history").json() == {"decisions": []}
        versions.record_decision(versioned_run, {"state": "rejected", "reasons": ["entropy"]})
        versions.record_decision(versioned_run, {"state": "accepted", "version": 2})
        got = c.get("/adapt/history").json()["decisions"]
        assert [d["state"] for d in got] == ["accepted", "rejected"]
        assert got[1]["reasons"] == ["entropy"]
        assert [d["state"] for d in c.get("/adapt/history?limit=1").json()["decisions"]] == [
            "accepted"
        ]
        for bad in ("0", "-1", "x", "100000"):
            r = c.get(f"/adapt/history?limit={bad}")
            assert r.status_code == 400 and "limit" in r.json()["error"], r.text
