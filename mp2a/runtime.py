"""ONNX Runtime sessions for the exported image encoder (no torch needed).

Providers are chosen by what this machine can really run: TensorRT > CUDA > CPU when an NVIDIA
device is present, CPU otherwise (the GPU wheel lists CUDA providers even on CPU-only hosts).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def has_nvidia_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/dev/nvidia0").exists()


def pick_providers(prefer_gpu: bool = True) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    order = ["CPUExecutionProvider"]
    if prefer_gpu and has_nvidia_gpu():
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *order]
    return [p for p in order if p in available] or ["CPUExecutionProvider"]


class OrtEncoder:
    """pixel_values (B, 3, S, S) float32 -> normalised embeddings (B, D) float32."""

    def __init__(
        self,
        path: Path | str,
        providers: list[str] | None = None,
        threads: int | None = None,
        spin: bool = True,
    ) -> None:
        """spin=False: idle intra-op threads sleep instead of busy-waiting. Spinning suits
        back-to-back batch work; in a server it takes the cores that HTTP and decoding need."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.threads = opts.intra_op_num_threads
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=providers or pick_providers()
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]
