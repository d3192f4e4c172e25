"""`mp2a bench export --json`: images/s and GFLOP/s of torch eager, ORT fp32 and ORT int8 on CPU.

Same inputs, same thread count, one process, measured side by side; the ceiling is this
machine's fp32 matmul GFLOP/s measured in the same run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from adapt.models import LoadedModel, load_model
from export.onnx_export import export_encoder
from export.quantize import quantize_int8
from mp2a.runtime import OrtEncoder


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def flops_per_image(lm: LoadedModel) -> float:
    s = lm.preprocess.image_size
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        lm.model.encode_image(torch.randn(1, 3, s, s))
    return float(fc.get_total_flops())


def images_per_second(fn: Callable[[np.ndarray], object], x: np.ndarray, min_s: float) -> float:
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and n >= 3:
            return n * len(x) / elapsed


def bench_model(name: str, pretrained: str | None, min_s: float) -> list[dict]:
    lm = load_model(name, pretrained)
    flops = flops_per_image(lm)
    s = lm.preprocess.image_size
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "enc.onnx", Path(tmp) / "enc.int8.onnx"
        export_encoder(lm, fp32)
        quantize_int8(fp32, int8)
        # One engine alive at a time: idle ORT threads spin and would slow whatever runs next.
        makers: dict[str, Callable[[], Callable[[np.ndarray], object]]] = {
            "torch_eager": lambda: (
                lambda x: lm.model.encode_image(torch.from_numpy(x), normalize=True)
            ),
            "ort_fp32": lambda: OrtEncoder(fp32, ["CPUExecutionProvider"]),
            "ort_int8": lambda: OrtEncoder(int8, ["CPUExecutionProvider"]),
        }
        rows = [
            {"model": name, "batch": b, "gflop_per_image": round(flops / 1e9, 4)} for b in (1, 32)
        ]
        for eng, make in makers.items():
            fn = make()
            for row in rows:
                b = row["batch"]
                x = np.random.default_rng(0).normal(size=(b, 3, s, s)).astype(np.float32)
                with torch.no_grad():
                    ips = images_per_second(fn, x, min_s)
                row[f"{eng}_images_per_s"] = round(ips, 2)
                row[f"{eng}_gflops"] = round(ips * flops / 1e9, 2)
            del fn
        for row in rows:
            row["ort_fp32_vs_torch"] = round(
                row["ort_fp32_images_per_s"] / row["torch_eager_images_per_s"], 3
            )
            row["ort_int8_vs_ort_fp32"] = round(
                row["ort_int8_images_per_s"] / row["ort_fp32_images_per_s"], 3
            )
    return rows


def run(quick: bool = False) -> dict:
    min_s = 1.0 if quick else 3.0
    rows = bench_model("tiny-digits", None, min_s)
    if not quick:
        rows += bench_model("ViT-B-16", "random", min_s)
    return {
        "bench": "export",
        "threads": torch.get_num_threads(),
        "matmul_fp32_gflops": round(matmul_gflops(), 1),
        "results": rows,
    }
