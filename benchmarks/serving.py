"""`mp2a bench serving --json`: requests/s, p50 and p99 over HTTP, side by side.

For each model (the embedded tiny CLIP; ViT-B-16 with random weights with --models) an
artifact is built in a temporary folder (random head: the figures are timings) with its
encoder exported to ONNX (ViT-B-16 also int8). Every variant's real server (and every
peer's) is started on 127.0.0.1, all at once; a *separate* load-generating process (`python -m
benchmarks.serving load ...`, one keep-alive connection per client thread) sends each
workload at concurrency 1, 8 and 32. Each level is measured in ROUNDS rounds, the servers
taking turns within a round (order reversed every other round), so the machine's drift
falls on every variant alike; a level's row is its rounds together (throughput over their
summed time, percentiles of the pooled latencies, `rounds_requests_per_s` per round). Every
level is bounded by a request count and a time budget, split among the rounds.

Workloads: `jpeg256` (a 256x256 JPEG), `dslr` and `webcam` (real camera photos from --photos
DIR, e.g. Office-31's 1000x1000 DSLR and 152-752 px webcam JPEGs; left out without it),
`jpeg1080p` and `jpeg12mp` (synthesised photo-like JPEGs, q=90, 1920x1080 and 4000x3000) and
`png_screenshot` (a 1280x800 PNG of flat panels and text).

Variants: `ort` (the service as configured by default: MP2A_WORKERS=auto), `ort-full-decode`
(the service with MP2A_DECODE_DRAFT=0, every JPEG decoded at full size, as before decoding at
the model's scale), `bare` (the threaded reference, benchmarks/bare.py, in as many processes
as the service chose: read from its GET /model), `ort-1-worker` and `bare-1-worker` (both in
one process), `ort-pure-python-http` (uvicorn on h11 and asyncio's loop: httptools and uvloop
made unimportable), `ort-bentoml`, `torch` (the 256 px JPEG only) and with --peers `litserve` and
`bentoml-plain` (benchmarks/peers.py, their own venv).

Time outside the model, per request: 1 - (seconds of the encoder call the request rode in,
from the server's Server-Timing header) / (client-side latency). Both processes share this
machine's cores, so the load generator's own CPU use is part of what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.procs import free_port, stop_group

log = logging.getLogger(__name__)

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CONCURRENCY = (1, 8, 32)
BOUNDARY = "mp2a-bench-boundary"


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int  # at most this many measured requests ...
    seconds: float  # ... or this long, whichever ends first (at least `concurrency` requests)


# name -> (MP2A_BACKEND, MP2A_PRECISION); "bare": the reference (benchmarks/bare.py);
# "ort-bentoml": the service answering through BentoML's own API handling (as before the
# upload guard answered directly)
VARIANTS = {
    "ort": ("ort", "fp32"),
    "ort-int8": ("ort", "int8"),
    "torch": ("torch", "fp32"),
    "bare": ("bare", "fp32"),
    "bare-int8": ("bare", "int8"),  # the reference for a service on the int8 encoder
    "bare-1-worker": ("bare", "fp32"),
    "ort-bentoml": ("ort", "fp32"),
    "ort-1-worker": ("ort", "fp32"),
    "ort-pure-python-http": ("ort", "fp32"),
    "ort-int8-bentoml": ("ort", "int8"),
    "ort-full-decode": ("ort", "fp32"),
    "ort-int8-full-decode": ("ort", "int8"),
}
VARIANT_ENV = {
    "ort-full-decode": {"MP2A_DECODE_DRAFT": "0"},
    "ort-int8-full-decode": {"MP2A_DECODE_DRAFT": "0"},
    "ort-bentoml": {"MP2A_DIRECT_PREDICT": "0"},
    "ort-int8-bentoml": {"MP2A_DIRECT_PREDICT": "0"},
    "ort-1-worker": {"MP2A_WORKERS": "1"},
}
# uvicorn without its C parts: httptools and uvloop made unimportable, so it falls back to
# h11 and asyncio's own loop (as before they were dependencies of the service)
PURE_PYTHON_HTTP = {"ort-pure-python-http"}
# the reference variants and the service variant whose worker count each follows (None: one)
BARE_FOLLOWS = {"bare": "ort", "bare-int8": "ort-int8", "bare-1-worker": None}


@dataclass(frozen=True)
class ModelPlan:
    pretrained: str | None
    variants: tuple[str, ...]  # on the 256 px JPEG
    levels: tuple[Level, ...]
    photo_variants: tuple[str, ...]  # on the other workloads
    photo_levels: tuple[Level, ...]


# ViT-B-16 on 2 CPU cores takes ~0.7 s per image: few requests, generous time budgets
MODELS = {
    "tiny-digits": ModelPlan(
        None,
        (
            "ort",
            "ort-bentoml",
            "ort-1-worker",
            "ort-pure-python-http",
            "bare",
            "bare-1-worker",
            "torch",
        ),
        (Level(1, 300, 8.0), Level(8, 1200, 10.0), Level(32, 2000, 12.0)),
        ("ort", "ort-full-decode", "bare"),
        (Level(1, 150, 5.0), Level(8, 600, 6.0), Level(32, 1000, 6.0)),
    ),
    "ViT-B-16": ModelPlan(
        "random",
        ("ort", "ort-bentoml", "ort-int8", "ort-int8-bentoml", "bare", "torch"),
        (Level(1, 10, 12.0), Level(8, 40, 25.0), Level(32, 80, 30.0)),
        ("ort-int8", "ort-int8-full-decode", "bare-int8"),
        (Level(1, 6, 8.0), Level(8, 24, 15.0), Level(32, 48, 20.0)),
    ),
}


# ---------------------------------------------------------------- artifacts


def _save_model_folder(lm, model: str, folder: Path) -> Path:
    """An open_clip model folder (config + safetensors) holding `lm`'s weights."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    spec = lm.preprocess
    config = {
        "model_cfg": open_clip.get_model_config(model),
        "preprocess_cfg": {
            "size": spec.image_size,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "interpolation": spec.interpolation,
            "resize_mode": spec.resize_mode,
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in lm.model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def build_artifact(out: Path, model: str, pretrained: str | None, int8: bool = False) -> Path:
    """An artifact for `model` with a random head and its encoder exported to ONNX (and
    quantized to int8 when asked)."""
    from adapt.models import load_model
    from export.onnx_export import export_encoder
    from mp2a.artifact import ArtifactContents, write_artifact
    from mp2a.head import Head, l2_normalize

    lm = load_model(model, pretrained)
    if pretrained == "random":  # save the draw, so the torch backend loads these same weights
        lm = load_model(str(_save_model_folder(lm, model, out.parent / f"{model}-weights")))
    d = lm.backbone.embed_dim
    rng = np.random.default_rng(0)
    weight = l2_normalize(rng.normal(size=(1, len(CLASSES), d))).astype(np.float32)  # (S, C, D)
    write_artifact(
        out,
        ArtifactContents(
            backbone=lm.backbone,
            classes=CLASSES,
            preprocessing=lm.preprocess,
            head=Head(weight, 100.0),
            method="bench",
            source_features={
                "features": np.zeros((1, d), np.float32),
                "labels": np.zeros((1,), np.int64),
                "domains": np.zeros((1,), np.int64),
            },
            source_domains=[],
            target_domain=None,
            metrics={"method": "bench", "target_accuracy": None},
        ),
    )
    (out / "export").mkdir(exist_ok=True)
    export_encoder(lm, out / "export" / "image_encoder.onnx")
    if int8:
        from export.quantize import quantize_int8

        quantize_int8(
            out / "export" / "image_encoder.onnx", out / "export" / "image_encoder.int8.onnx"
        )
    (out / "export" / "export.json").write_text(
        json.dumps({"weights_sha256": lm.backbone.weights_sha256}) + "\n"
    )
    return out


WORKLOADS = ("jpeg256", "dslr", "webcam", "jpeg1080p", "jpeg12mp", "png_screenshot")
QUICK_WORKLOADS = ("jpeg256", "jpeg1080p")
PHOTOS_PER_DOMAIN = 100  # camera photos cycled through by the load generator


def bench_image(size: int = 256) -> bytes:
    """A deterministic photo-like JPEG (smooth gradients and shapes, not noise)."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1)  # (H, W, 3)
    im = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    draw.ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(240, 240, 240))
    draw.text((size // 2 - 4, size // 2 - 6), "7", fill=(10, 10, 10))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def photo_like_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A deterministic photo-like JPEG (q=90): smooth colour fields, discs, sensor-like noise;
    about the size a camera writes (12 MP: ~2.5 MB)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((width // 4, height // 4), Image.Resampling.BICUBIC)
    im = im.filter(ImageFilter.GaussianBlur(2)).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.integers(-8, 9, size=(height, width, 1), dtype=np.int16)  # (H, W, 1)
    im = Image.fromarray(np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(min(width, height) // 20, min(width, height) // 5))
        draw.ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def screenshot_png(width: int = 1280, height: int = 800) -> bytes:
    """A deterministic screenshot-like PNG: flat panels, lines of text."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (width, height), (246, 246, 248))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, width, 48), fill=(40, 44, 52))
    draw.rectangle((0, 48, 240, height), fill=(225, 228, 232))
    for i in range(40):
        y = 70 + 18 * i
        draw.text(
            (260, y), f"line {i}: the quick brown fox jumps over the lazy dog", fill=(20, 20, 20)
        )
        draw.text((16, y), f"item {i}", fill=(60, 60, 60))
    draw.rectangle((900, 120, 1240, 420), fill=(70, 130, 200), outline=(20, 40, 80), width=3)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def make_workloads(folder: Path, names: tuple[str, ...], photos: Path | None) -> dict[str, Path]:
    """Each workload as one image file or a folder of files the load generator cycles through;
    the camera-photo workloads only with `photos` (an ImageFolder holding dslr / webcam)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    makers = {
        "jpeg256": lambda: bench_image(256),
        "jpeg1080p": lambda: photo_like_jpeg(1920, 1080),
        "jpeg12mp": lambda: photo_like_jpeg(4000, 3000),
        "png_screenshot": screenshot_png,
    }
    for name in names:
        if name in makers:
            path = folder / f"{name}.img"
            path.write_bytes(makers[name]())
            out[name] = path
        elif photos is not None and (photos / name).is_dir():
            # absolute targets: a link to a relative path resolves from the link's folder
            files = sorted(f.resolve() for f in (photos / name).rglob("*") if f.is_file())
            pick = np.unique(np.linspace(0, len(files) - 1, num=min(PHOTOS_PER_DOMAIN, len(files))))
            d = folder / name
            d.mkdir(exist_ok=True)
            for i in pick:
                (d / f"{int(i):05d}{files[int(i)].suffix}").symlink_to(files[int(i)])
            out[name] = d
    return out


# ---------------------------------------------------------------- server


def wait_ready(
    url: str, proc: subprocess.Popen, timeout: float = 180.0, path: str = "/readyz"
) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before {path}")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}{path} not ready after {timeout:.0f} s")


@contextlib.contextmanager
def running_server(run: Path, variant: str, log_file: Path, workers: int = 1) -> Iterator[str]:
    """`bentoml serve` on `run` on a free loopback port (the bare reference, in `workers`
    processes, for "bare*"); yields its base URL."""
    from serving.launch import serve_command, serve_env

    port = free_port()
    backend, precision = VARIANTS[variant]
    env = {**serve_env(run, backend, precision), **VARIANT_ENV.get(variant, {})}
    if variant in PURE_PYTHON_HTTP:
        blocked = log_file.with_name(log_file.stem + "-no-c-http")
        blocked.mkdir(exist_ok=True)
        for name in ("httptools", "uvloop"):
            (blocked / f"{name}.py").write_text(f"raise ImportError('{name} left out')\n")
        env["PYTHONPATH"] = os.pathsep.join([str(blocked), env.get("PYTHONPATH", "")])
    # a home of its own: servers running side by side must not share (and reset) BentoML's
    # metrics directory
    env["BENTOML_HOME"] = str(log_file.with_name(log_file.stem + "-bentoml-home"))
    cmd = serve_command(port, "127.0.0.1")
    if backend == "bare":
        cmd = [sys.executable, "-m", "benchmarks.bare", str(run), "--port", str(port),
               "--precision", precision, "--workers", str(workers)]  # fmt: skip
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            yield url
        finally:
            stop_group(proc)


def served_workers(url: str) -> int:
    """The worker processes a running service chose (GET /model runtime.workers)."""
    with urllib.request.urlopen(url + "/model", timeout=10) as r:
        info = json.load(r)
    return int(info["runtime"].get("workers", {}).get("count", 1))


def scrape_batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of mp2a_encoder_batch_size from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = []
    for name in ("sum", "count"):
        m = re.search(rf"^mp2a_encoder_batch_size_{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        out.append(float(m.group(1)) if m else 0.0)
    return out[0], out[1]


# ---------------------------------------------------------------- load generator


def media_type(data: bytes) -> str:
    """The image's media type from its magic bytes (the service's own sniffing), as a client
    labels the part it sends: some servers open the upload with the decoder its label names."""
    from serving.decode import sniff

    fmt = sniff(data)
    return f"image/{fmt.lower()}" if fmt else "application/octet-stream"


def multipart(
    images: bytes | list[bytes], field: str = "image", content_type: str | None = None
) -> bytes:
    """A multipart/form-data body (boundary BOUNDARY): one part per image, all in `field`,
    each labelled with `content_type` or, by default, its own media type."""
    parts = [images] if isinstance(images, bytes) else images
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename='
    return (
        b"".join(
            f'{head}"{i}.img"\r\nContent-Type: {content_type or media_type(img)}\r\n\r\n'.encode()
            + img
            + b"\r\n"
            for i, img in enumerate(parts)
        )
        + f"--{BOUNDARY}--\r\n".encode()
    )


def _parse_timing(header: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        m = re.match(r"\s*(\w+);dur=([\d.]+)", part)
        if m:
            out[m.group(1)] = float(m.group(2)) / 1000
    return out


def generate_load(
    host: str,
    port: int,
    body: bytes | list[bytes],
    concurrency: int,
    requests: int,
    seconds: float,
) -> dict:
    """Closed-loop load: `concurrency` threads, each one keep-alive connection; several
    bodies are sent in turn (each thread starting at its own offset)."""
    bodies = [body] if isinstance(body, bytes) else body
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    lock = threading.Lock()
    issued = 0
    results: list[tuple[float, float, int, dict[str, float]]] = []  # start, latency, status
    deadline = time.perf_counter() + seconds
    need = max(requests, concurrency)

    def worker(offset: int) -> None:
        nonlocal issued
        conn = http.client.HTTPConnection(host, port, timeout=300)
        n = offset
        while True:
            with lock:
                if issued >= need or (time.perf_counter() > deadline and issued >= concurrency):
                    break
                issued += 1
            body = bodies[n % len(bodies)]
            n += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status, timing = resp.status, _parse_timing(resp.getheader("Server-Timing"))
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=300)
                status, timing = 0, {}
            with lock:
                results.append((t0, time.perf_counter() - t0, status, timing))
        conn.close()

    step = max(1, len(bodies) // concurrency)
    threads = [threading.Thread(target=worker, args=(i * step,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r[2] == 200]
    lat = np.asarray([r[1] for r in ok])
    span = max(r[0] + r[1] for r in results) - min(r[0] for r in results)
    stage = {
        k: float(np.mean([r[3].get(k, 0.0) for r in ok])) if ok else 0.0
        for k in ("decode", "preprocess", "encode", "model", "head")
    }
    mean_lat = float(lat.mean()) if len(lat) else 0.0
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "seconds": round(span, 3),
        "requests_per_s": round(len(ok) / span, 2) if span > 0 else 0.0,
        "p50_ms": round(1000 * float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(1000 * float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "mean_ms": round(1000 * mean_lat, 2),
        "stage_mean_ms": {k: round(1000 * v, 3) for k, v in stage.items()},
        "outside_model_fraction": round(1 - stage["model"] / mean_lat, 3) if mean_lat else None,
        "latencies_ms": [round(1000 * float(v), 3) for v in lat],  # pooled across rounds
    }


def run_load_process(url: str, image: Path, level: Level) -> dict:
    """The load generator in its own process, so it does not share the server's GIL."""
    host, port = url.removeprefix("http://").split(":")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.serving",
        "load",
        "--host",
        host,
        "--port",
        port,
        "--image",
        str(image),
        "--concurrency",
        str(level.concurrency),
        "--requests",
        str(level.requests),
        "--seconds",
        str(level.seconds),
    ]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


# ---------------------------------------------------------------- the benchmark


# Each level is measured in ROUNDS rounds; within a round every variant (and peer) of the
# workload runs the level in turn, all servers up at once, the order reversed every other
# round. The machine's drift over a run (minutes of +-15 % here) then falls on every
# variant alike instead of on whichever ran at the time.
ROUNDS = 3


def _split(level: Level, rounds: int) -> Level:
    return Level(level.concurrency, max(1, math.ceil(level.requests / rounds)),
                 level.seconds / rounds)  # fmt: skip


def _measure_level(url: str, variant: str, image: Path, level: Level) -> dict:
    if variant not in VARIANTS or VARIANTS[variant][0] == "bare":  # no mp2a metrics
        return run_load_process(url, image, level)
    s0, c0 = scrape_batch_stats(url)
    row = run_load_process(url, image, level)
    s1, c1 = scrape_batch_stats(url)
    row["batch_images"], row["batch_calls"] = s1 - s0, c1 - c0
    return row


def combine_rounds(rounds: list[dict]) -> dict:
    """One level's rounds as one row: throughput over the rounds' summed time, latency
    percentiles of the pooled answers, each round's throughput kept."""
    lat = np.concatenate([np.asarray(r.get("latencies_ms", []), float) for r in rounds])
    ok = [r["requests"] - r["errors"] for r in rounds]
    span = sum(r["seconds"] for r in rounds)
    mean = float(lat.mean()) if len(lat) else 0.0
    pairs = list(zip(np.asarray(ok, float) / max(1, sum(ok)), rounds, strict=True))
    stage = {
        k: round(float(sum(w * r["stage_mean_ms"].get(k, 0.0) for w, r in pairs)), 3)
        for k in rounds[0]["stage_mean_ms"]
    }
    row = {
        "concurrency": rounds[0]["concurrency"],
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "seconds": round(span, 3),
        "requests_per_s": round(sum(ok) / span, 2) if span > 0 else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "mean_ms": round(mean, 2),
        "stage_mean_ms": stage,
        "outside_model_fraction": round(1 - stage.get("model", 0.0) / mean, 3) if mean else None,
        "rounds_requests_per_s": [r["requests_per_s"] for r in rounds],
    }
    if "batch_calls" in rounds[0]:
        calls = sum(r["batch_calls"] for r in rounds)
        images = sum(r["batch_images"] for r in rounds)
        row["mean_encoder_batch"] = round(images / calls, 2) if calls > 0 else None
    return row


def measure_interleaved(
    urls: dict[str, str],
    image: Path,
    levels_of: dict[str, tuple[Level, ...]],
    rounds: int = ROUNDS,
) -> dict[str, list[dict]]:
    """Every server in `urls` (variant -> base URL) on `image` at its levels, the variants
    interleaved within each of `rounds` rounds (see ROUNDS)."""
    names = list(urls)
    for v in names:  # warm-up: first calls, allocations
        run_load_process(urls[v], image, Level(2, 6, 30.0))
    depth = max(len(levels_of[v]) for v in names)
    got: dict[str, list[list[dict]]] = {v: [[] for _ in levels_of[v]] for v in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for i in range(depth):
            for v in order:
                if i < len(levels_of[v]):
                    level = _split(levels_of[v][i], rounds)
                    got[v][i].append(_measure_level(urls[v], v, image, level))
    return {v: [combine_rounds(x) for x in got[v]] for v in names}


def run(
    quick: bool = False,
    photos: Path | None = None,
    peers: bool = False,
    models: tuple[str, ...] | None = None,
    workloads: tuple[str, ...] | None = None,
    only: tuple[str, ...] | None = None,
) -> dict:
    """The whole benchmark (--quick: the tiny CLIP, the 256 px and 1080p JPEGs, the service,
    its full-decode variant and the reference, short levels); `workloads` and `only` (variant
    names) narrow it for a shorter measurement."""
    from benchmarks.peers import PEERS, ensure_venv, running_peer, versions, write_model
    from serving.backends import cpu_count

    t0 = time.time()
    models = models or ("tiny-digits",)
    names = workloads or (QUICK_WORKLOADS if quick else WORKLOADS)
    results: dict[str, dict] = {}
    peer_versions = versions(ensure_venv()) if peers else None
    with tempfile.TemporaryDirectory(prefix="mp2a-bench-serving-") as tmp:
        tmp_path = Path(tmp)
        images = make_workloads(tmp_path / "workloads", names, photos)
        for model in models:
            plan = MODELS[model]
            levels, photo_levels = plan.levels, plan.photo_levels
            if quick:
                levels = tuple(Level(v.concurrency, v.requests // 3, v.seconds / 3) for v in levels)
                photo_levels = tuple(  # c=32 waits for 32 full decodes at least
                    Level(v.concurrency, v.requests // 3, v.seconds / 3)
                    for v in photo_levels
                    if v.concurrency < 32
                )
            t_build = time.time()
            int8 = "ort-int8" in plan.variants
            run_dir = build_artifact(tmp_path / model, model, plan.pretrained, int8)
            results[model] = {"artifact_build_seconds": round(time.time() - t_build, 1)}
            variants = list(dict.fromkeys([*plan.photo_variants, *plan.variants]))
            if quick or only:  # `only`: these variants (and peers) of the plan
                keep = only or ("ort", "ort-full-decode", "bare")
                variants = [v for v in variants if v in keep]
            # variant -> workload -> levels (the 256 px JPEG for every variant of the plan,
            # the other workloads for its photo variants; peers take every workload)
            plan_of: dict[str, dict[str, tuple[Level, ...]]] = {
                v: {
                    name: levels if name == "jpeg256" else photo_levels
                    for name in images
                    if (name == "jpeg256" and v in plan.variants) or v in plan.photo_variants
                }
                for v in variants
            }
            by_workload: dict[str, dict[str, list[dict]]] = {name: {} for name in images}
            with contextlib.ExitStack() as servers:
                urls: dict[str, str] = {}
                processes: dict[str, int] = {}  # variant -> worker processes it runs
                # the services first: each reference runs as many processes as its service
                for v in sorted(variants, key=lambda v: v in BARE_FOLLOWS):
                    log_file = tmp_path / f"{model}-{v}.log"
                    follows = BARE_FOLLOWS.get(v)
                    n = processes.get(follows, 1) if follows else 1
                    urls[v] = servers.enter_context(running_server(run_dir, v, log_file, n))
                    processes[v] = n if v in BARE_FOLLOWS else served_workers(urls[v])
                results[model]["worker_processes"] = processes
                if peers:
                    precision = "int8" if int8 else "fp32"
                    peer_model = write_model(run_dir, tmp_path / f"{model}-peer", precision)
                    for peer in PEERS:
                        log_file = tmp_path / f"{model}-{peer}.log"
                        urls[peer] = servers.enter_context(running_peer(peer, peer_model, log_file))
                        plan_of[peer] = {
                            name: levels if name == "jpeg256" else photo_levels for name in images
                        }
                for name, image in images.items():
                    takers = {v: u for v, u in urls.items() if name in plan_of[v]}
                    levels_of = {v: plan_of[v][name] for v in takers}
                    by_workload[name] = measure_interleaved(takers, image, levels_of)
                    for v, rows in by_workload[name].items():
                        for row in rows:
                            log.info("%s %s %s c=%d: %.1f req/s", model, v, name,
                                     row["concurrency"], row["requests_per_s"])  # fmt: skip
            results[model].update(by_workload)
    return {
        "bench": "serving",
        "cpus": cpu_count(),
        "workloads": {
            "jpeg256": "256x256 JPEG",
            "dslr": "Office-31 dslr photos, 1000x1000 JPEG (--photos)",
            "webcam": "Office-31 webcam photos, 152-752 px JPEG (--photos)",
            "jpeg1080p": "1920x1080 photo-like JPEG q=90",
            "jpeg12mp": "4000x3000 photo-like JPEG q=90",
            "png_screenshot": "1280x800 screenshot-like PNG",
        },
        "peers": peer_versions,
        "results": results,
        "summary": _summary(results),
        "seconds": round(time.time() - t0, 1),
    }


def _at(rows: list[dict], c: int) -> dict:
    return next(r for r in rows if r["concurrency"] == c)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _summary(results: dict) -> dict:
    """Per model and workload, at every level: the service against the threaded reference
    (throughput and p99), against itself decoding in full (`after_vs_before`), against the
    best peer; the c=1 p50 overhead over the reference; ORT against torch at c=8."""
    out: dict = {}
    peers = ("litserve", "bentoml-plain")
    for model, by_workload in results.items():
        row: dict = {}
        for name, r in by_workload.items():
            if name == "worker_processes" or not isinstance(r, dict):
                continue
            if not {"bare", "bare-int8"} & set(r):
                continue
            svc_name = "ort" if "ort" in r else "ort-int8"
            before = f"{svc_name}-full-decode"
            # the reference on the service's own encoder (fp32 or int8)
            ref = "bare-int8" if svc_name == "ort-int8" and "bare-int8" in r else "bare"
            if ref not in r or svc_name not in r:  # a narrowed run: nothing to compare
                continue
            for level in r[ref]:
                c = level["concurrency"]
                svc = _at(r[svc_name], c)
                rps = svc["requests_per_s"]
                row[f"{name}_service_vs_bare_throughput_c{c}"] = _ratio(
                    rps, level["requests_per_s"]
                )
                row[f"{name}_service_vs_bare_p99_c{c}"] = _ratio(svc["p99_ms"], level["p99_ms"])
                if before in r:
                    old = _at(r[before], c)["requests_per_s"]
                    row[f"{name}_after_vs_before_throughput_c{c}"] = _ratio(rps, old)
                measured = {p: _at(r[p], c)["requests_per_s"] for p in peers if p in r}
                if measured:
                    best = max(measured, key=lambda p: measured[p])
                    row[f"{name}_best_peer_c{c}"] = best
                    row[f"{name}_service_vs_best_peer_throughput_c{c}"] = _ratio(
                        rps, measured[best]
                    )
                for other in ("ort-bentoml", "ort-1-worker", "ort-pure-python-http"):
                    if other in r:
                        key = other.removeprefix("ort-").replace("-", "_")
                        row[f"{name}_{key}_vs_bare_throughput_c{c}"] = _ratio(
                            _at(r[other], c)["requests_per_s"], level["requests_per_s"]
                        )
                if "ort-1-worker" in r and "bare-1-worker" in r:  # both in one process
                    row[f"{name}_1_worker_vs_bare_1_worker_throughput_c{c}"] = _ratio(
                        _at(r["ort-1-worker"], c)["requests_per_s"],
                        _at(r["bare-1-worker"], c)["requests_per_s"],
                    )
                if c == 1 and svc["p50_ms"] is not None and level["p50_ms"] is not None:
                    row[f"{name}_c1_p50_overhead_ms"] = round(svc["p50_ms"] - level["p50_ms"], 2)
            if "torch" in r:
                torch8 = _at(r["torch"], 8)["requests_per_s"]
                for variant in ("ort", "ort-int8"):
                    if variant in r:
                        at8 = _at(r[variant], 8)
                        key = variant.replace("-", "_")
                        row[f"{name}_{key}_vs_torch_throughput_c8"] = _ratio(
                            at8["requests_per_s"], torch8
                        )
                        row[f"{name}_{key}_outside_model_fraction_c8"] = at8[
                            "outside_model_fraction"
                        ]
        out[model] = row
    return out


def _load_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving load")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    image = Path(a.image)  # one file, or a folder of files sent in turn
    files = sorted(f for f in image.iterdir() if f.is_file()) if image.is_dir() else [image]
    if not files:
        sys.exit(f"--image {image}: no readable image file there")
    body = [multipart(f.read_bytes()) for f in files]
    print(json.dumps(generate_load(a.host, a.port, body, a.concurrency, a.requests, a.seconds)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["load"]:
        sys.exit("usage: python -m benchmarks.serving load --port PORT --image FILE [...]")
    sys.exit(_load_main(sys.argv[2:]))
