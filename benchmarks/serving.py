"""`mp2a bench serving --json`: requests/s, p50 and p99 over HTTP, ORT against torch.

For each model (the embedded tiny CLIP; ViT-B-16 with random weights unless --quick) an
artifact is built in a temporary folder (random head: the figures are timings) with its
encoder exported to ONNX (ViT-B-16 also int8), then for each backend (ort, torch; ViT-B-16
also ort with the int8 encoder) a real `bentoml serve` process is started
on 127.0.0.1 and a *separate* load-generating process (`python -m benchmarks.serving load ...`,
one keep-alive connection per client thread) sends the same 256x256 JPEG at concurrency 1, 8
and 32. Every level is bounded by a request count and a time budget.

Time outside the model, per request: 1 - (seconds of the encoder call the request rode in,
from the server's Server-Timing header) / (client-side latency). The rest is HTTP, BentoML,
decode, preprocess, waiting for the batch and the head. Both processes share this machine's
cores, so the load generator's own CPU use is part of what is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import logging
import os
import re
import signal
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

from benchmarks.procs import free_port

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
    "ort-bentoml": ("ort", "fp32"),
    "ort-2-workers": ("ort", "fp32"),
    "ort-int8-bentoml": ("ort", "int8"),
}
VARIANT_ENV = {
    "ort-bentoml": {"MP2A_DIRECT_PREDICT": "0"},
    "ort-int8-bentoml": {"MP2A_DIRECT_PREDICT": "0"},
    "ort-2-workers": {"MP2A_WORKERS": "2"},
}


@dataclass(frozen=True)
class ModelPlan:
    pretrained: str | None
    variants: tuple[str, ...]
    levels: tuple[Level, ...]


# ViT-B-16 on 2 CPU cores takes ~0.7 s per image: few requests, generous time budgets
MODELS = {
    "tiny-digits": ModelPlan(
        None,
        ("ort", "ort-bentoml", "ort-2-workers", "bare", "torch"),
        (Level(1, 300, 8.0), Level(8, 1200, 10.0), Level(32, 2000, 12.0)),
    ),
    "ViT-B-16": ModelPlan(
        "random",
        ("ort", "ort-bentoml", "ort-int8", "ort-int8-bentoml", "ort-2-workers", "bare", "torch"),
        (Level(1, 10, 12.0), Level(8, 40, 25.0), Level(32, 80, 30.0)),
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


# ---------------------------------------------------------------- server


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before /readyz")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url}/readyz not ready after {timeout:.0f} s")


@contextlib.contextmanager
def running_server(run: Path, variant: str, log_file: Path) -> Iterator[str]:
    """`bentoml serve` on `run` on a free loopback port (the bare reference for "bare");
    yields its base URL."""
    from serving.launch import serve_command, serve_env

    port = free_port()
    backend, precision = VARIANTS[variant]
    env = {**serve_env(run, backend, precision), **VARIANT_ENV.get(variant, {})}
    cmd = serve_command(port, "127.0.0.1")
    if backend == "bare":
        cmd = [sys.executable, "-m", "benchmarks.bare", str(run), "--port", str(port),
               "--precision", precision]  # fmt: skip
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
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError):  # workers left behind, if any
                os.killpg(proc.pid, signal.SIGKILL)


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


def multipart(
    images: bytes | list[bytes], field: str = "image", content_type: str = "image/jpeg"
) -> bytes:
    """A multipart/form-data body (boundary BOUNDARY): one part per image, all in `field`."""
    parts = [images] if isinstance(images, bytes) else images
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename='
    return (
        b"".join(
            f'{head}"{i}.img"\r\nContent-Type: {content_type}\r\n\r\n'.encode() + img + b"\r\n"
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
    host: str, port: int, body: bytes, concurrency: int, requests: int, seconds: float
) -> dict:
    """Closed-loop load: `concurrency` threads, each one keep-alive connection."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    lock = threading.Lock()
    issued = 0
    results: list[tuple[float, float, int, dict[str, float]]] = []  # start, latency, status
    deadline = time.perf_counter() + seconds
    need = max(requests, concurrency)

    def worker() -> None:
        nonlocal issued
        conn = http.client.HTTPConnection(host, port, timeout=300)
        while True:
            with lock:
                if issued >= need or (time.perf_counter() > deadline and issued >= concurrency):
                    break
                issued += 1
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

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
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


def bench_variant(
    run: Path, variant: str, image: Path, levels: tuple[Level, ...], logs: Path
) -> list[dict]:
    rows = []
    with running_server(run, variant, logs / f"{run.name}-{variant}.log") as url:
        run_load_process(url, image, Level(2, 6, 30.0))  # warm-up: first calls, allocations
        for level in levels:
            if variant == "bare":  # no batching, no metrics: one image per model call
                rows.append({**run_load_process(url, image, level), "mean_encoder_batch": 1.0})
                continue
            s0, c0 = scrape_batch_stats(url)
            row = run_load_process(url, image, level)
            s1, c1 = scrape_batch_stats(url)
            row["mean_encoder_batch"] = round((s1 - s0) / (c1 - c0), 2) if c1 > c0 else None
            rows.append(row)
            log.info("%s %s c=%d: %.1f req/s", run.name, variant, level.concurrency,
                     row["requests_per_s"])  # fmt: skip
    return rows


def run(quick: bool = False) -> dict:
    """The whole benchmark (a few minutes; --quick: the tiny CLIP only)."""
    from serving.backends import cpu_count

    t0 = time.time()
    models = ["tiny-digits"] if quick else list(MODELS)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mp2a-bench-serving-") as tmp:
        tmp_path = Path(tmp)
        image = tmp_path / "bench.jpg"
        image.write_bytes(bench_image())
        for model in models:
            plan = MODELS[model]
            levels = plan.levels
            if quick:
                levels = tuple(Level(v.concurrency, v.requests // 3, v.seconds / 3) for v in levels)
            t_build = time.time()
            int8 = "ort-int8" in plan.variants
            run_dir = build_artifact(tmp_path / model, model, plan.pretrained, int8)
            build_s = time.time() - t_build
            results[model] = {"artifact_build_seconds": round(build_s, 1)}
            for variant in plan.variants:
                results[model][variant] = bench_variant(run_dir, variant, image, levels, tmp_path)
    summary = _summary(results)
    return {
        "bench": "serving",
        "cpus": cpu_count(),
        "image": "256x256 JPEG",
        "results": results,
        "summary": summary,
        "seconds": round(time.time() - t0, 1),
    }


def _at(rows: list[dict], c: int) -> dict:
    return next(r for r in rows if r["concurrency"] == c)


def _summary(results: dict) -> dict:
    """Throughput ratios against torch and time outside the model at c=8; the service against
    the bare reference at every level (requests/s ratio and p99 ratio)."""
    out: dict = {}
    for model, r in results.items():
        torch8 = _at(r["torch"], 8)["requests_per_s"]
        row: dict = {}
        if "bare" in r:
            for level in r["bare"]:
                c = level["concurrency"]
                svc = _at(r["ort"], c)
                row[f"service_vs_bare_throughput_c{c}"] = round(
                    svc["requests_per_s"] / level["requests_per_s"], 2
                )
                row[f"service_vs_bare_p99_c{c}"] = round(svc["p99_ms"] / level["p99_ms"], 2)
                for other in ("ort-bentoml", "ort-2-workers"):
                    if other in r:
                        rps = _at(r[other], c)["requests_per_s"]
                        key = other.removeprefix("ort-").replace("-", "_")
                        row[f"{key}_vs_bare_throughput_c{c}"] = round(
                            rps / level["requests_per_s"], 2
                        )
        for variant in ("ort", "ort-int8"):
            if f"{variant}-bentoml" in r:  # the direct path against BentoML's, side by side
                for level in r[variant]:
                    c = level["concurrency"]
                    old = _at(r[f"{variant}-bentoml"], c)["requests_per_s"]
                    key = variant.replace("-", "_")
                    row[f"{key}_direct_vs_bentoml_path_throughput_c{c}"] = round(
                        level["requests_per_s"] / old, 2
                    )
            if variant in r:
                at8 = _at(r[variant], 8)
                key = variant.replace("-", "_")
                row[f"{key}_vs_torch_throughput_c8"] = round(at8["requests_per_s"] / torch8, 2)
                row[f"{key}_outside_model_fraction_c8"] = at8["outside_model_fraction"]
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
    body = multipart(Path(a.image).read_bytes())
    print(json.dumps(generate_load(a.host, a.port, body, a.concurrency, a.requests, a.seconds)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["load"]:
        sys.exit("usage: python -m benchmarks.serving load --port PORT --image FILE [...]")
    sys.exit(_load_main(sys.argv[2:]))
