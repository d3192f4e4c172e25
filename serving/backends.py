"""Image-encoder backends: pixels (B, 3, S, S) float32 -> normalised embeddings (B, D) float32.

`ort` (default) runs RUN/export/image_encoder.onnx with ONNX Runtime and needs no torch:
this is the edge path. `torch` rebuilds the frozen open_clip tower (fallback, and the
baseline the benchmark compares against); it imports torch only when chosen.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from mp2a.artifact import Artifact
from mp2a.errors import ArtifactError, Mp2aError

log = logging.getLogger(__name__)

BACKENDS = ("ort", "torch")
# exported encoders the ort backend can serve (`mp2a export --format onnx | onnx-int8`)
ENCODERS = {
    "fp32": Path("export") / "image_encoder.onnx",
    "int8": Path("export") / "image_encoder.int8.onnx",
}
EXPORT_FORMAT = {"fp32": "onnx", "int8": "onnx-int8"}
ENCODER = ENCODERS["fp32"]
EXPORT_STAMP = Path("export") / "export.json"  # written by `mp2a export`: weights it came from


class Backend(Protocol):
    name: str

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, D) float32, L2-normalised."""
        ...

    def describe(self) -> dict:
        """What /model reports about the runtime (backend, providers or device, threads)."""
        ...


def cpu_count(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its CPU affinity, and a container's CPU limit (a cgroup
    quota, which the affinity does not show: a pod limited to 2 CPUs on a 64-core node sees
    64), rounded up."""
    try:
        n = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_limit(cgroup)
    return max(1, min(n, math.ceil(quota))) if quota is not None else n


def _cgroup_cpu_limit(root: Path) -> float | None:
    """CPUs a cgroup quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`),
    or None without a limit or a readable cgroup."""
    try:
        fields = (root / "cpu.max").read_text().split()  # "max 100000" or "200000 100000"
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def encoder_path(art: Artifact, precision: str = "fp32") -> Path:
    """The exported encoder of `art`, checked to exist and to match the artifact's weights."""
    if precision not in ENCODERS:
        raise Mp2aError(f"unknown precision {precision!r}. Available: {', '.join(ENCODERS)}")
    path = art.path / ENCODERS[precision]
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: the ort backend serves the exported image encoder. Run "
            f"`mp2a export {art.path} --format {EXPORT_FORMAT[precision]}` first "
            "(or set MP2A_BACKEND=torch)"
        )
    stamp = art.path / EXPORT_STAMP
    if stamp.is_file():
        exported = json.loads(stamp.read_text()).get("weights_sha256")
        if exported != art.backbone.weights_sha256:
            raise ArtifactError(
                f"{path} was exported from other weights than the artifact's backbone; "
                f"re-run `mp2a export {art.path} --format onnx`"
            )
    return path


class OrtBackend:
    """ONNX Runtime; providers by real availability (TensorRT > CUDA > CPU).

    Intra-op threads must not spin-wait after each run here: in a server the spinning threads
    take the cores that the HTTP loop, decoding and the next request need (measured on 2 cores
    with a micro CLIP: 74 -> 129 requests/s at concurrency 1 without spinning).
    """

    name = "ort"

    def __init__(
        self,
        art: Artifact,
        threads: int | None = None,
        providers: list[str] | None = None,
        precision: str = "fp32",
    ) -> None:
        from mp2a.runtime import OrtEncoder

        self.precision = precision
        self.encoder = OrtEncoder(
            encoder_path(art, precision), providers, threads or cpu_count(), spin=False
        )
        self.threads = self.encoder.threads

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder(pixels)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "precision": self.precision,
            "providers": self.encoder.providers,
            "threads": self.threads,
        }


class TorchBackend:
    """PyTorch eager on the artifact's open_clip backbone (CUDA when available)."""

    name = "torch"

    def __init__(self, art: Artifact, threads: int | None = None, device: str | None = None):
        import torch

        from adapt.models import load_backbone

        self._torch = torch
        self.threads = threads or cpu_count()
        torch.set_num_threads(self.threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.lm = load_backbone(art.backbone, self.device)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            return self.lm.model.encode_image(x, normalize=True).float().cpu().numpy()

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "threads": self.threads}


def load_backend(
    name: str, art: Artifact, threads: int | None = None, precision: str = "fp32"
) -> Backend:
    """Build the named backend for `art`; errors say how to fix the choice or the artifact.

    `precision` picks the ort backend's exported encoder (fp32, or int8 from
    `mp2a export --format onnx-int8`); the torch backend always runs fp32.
    """
    if name == "ort":
        return OrtBackend(art, threads, precision=precision)
    if name == "torch":
        try:
            return TorchBackend(art, threads)
        except ImportError as e:
            raise Mp2aError(
                f"the torch backend needs the training extras ({e}); install mp2a[train] "
                "or use the default ort backend"
            ) from e
    raise Mp2aError(f"unknown backend {name!r}. Available: {', '.join(BACKENDS)}")
