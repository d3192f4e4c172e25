"""The frozen image tower to ONNX, once per backbone, and the fused edge model.

torch >= 2.9 exports through torch.export (dynamo=True). nn.MultiheadAttention's inference
fast path (`_native_multi_head_attention`) has no ONNX translation, so it is switched off for
the export; the batch axis is dynamic via `dynamic_shapes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from adapt.models import LoadedModel
from mp2a.head import Head

log = logging.getLogger(__name__)

OPSET = 18
INPUT = "pixel_values"
OUTPUT = "embeddings"
PROBS = "probabilities"


class ImageEncoder(nn.Module):
    """What the serving path runs: pixels -> L2-normalised embeddings."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixel_values), dim=-1)  # (B, D)


@contextlib.contextmanager
def _mha_fastpath_off():
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def export_encoder(lm: LoadedModel, path: Path, max_batch: int = 4096) -> None:
    """Export the image tower with a dynamic batch axis to `path` and check the graph."""
    size = lm.preprocess.image_size
    dummy = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    # the exporter reports progress on stdout; keep stdout for our JSON
    with _mha_fastpath_off(), contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        torch.onnx.export(
            ImageEncoder(lm.model.visual).eval(),
            (dummy,),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=OPSET,
            dynamo=True,
            dynamic_shapes={INPUT: {0: batch}},
            external_data=False,
        )
    onnx.checker.check_model(str(path))


def encoder_key(lm: LoadedModel) -> str:
    blob = json.dumps(
        [lm.backbone.weights_sha256, lm.preprocess.to_dict(), OPSET, torch.__version__]
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    env = os.environ.get("MP2A_CACHE_DIR")
    base = Path(env).parent if env else Path.home() / ".cache" / "mp2a"
    return base / "onnx"


def encoder_path(lm: LoadedModel, cache_dir: Path | None = None) -> Path:
    """Where the cache keeps the backbone's exported encoder (it may not be there yet)."""
    return (cache_dir or default_cache_dir()) / encoder_key(lm) / "image_encoder.onnx"


def cached_encoder(lm: LoadedModel, cache_dir: Path | None = None) -> tuple[Path, bool]:
    """The backbone's encoder ONNX, exported on first use: (path, reused)."""
    path = encoder_path(lm, cache_dir)
    folder = path.parent
    if path.is_file():
        return path, True
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp_path = Path(tmp) / "image_encoder.onnx"
        export_encoder(lm, tmp_path)
        os.replace(tmp_path, path)
    return path, False


def fuse_head(encoder: Path, head: Head, out: Path) -> None:
    """encoder + head -> probabilities (B, C): sum over rows k of
    a_k * softmax(s_k * f @ W_k^T + b_k) (mp2a/head.py), as plain ONNX operators."""
    model = onnx.load(str(encoder))
    g = model.graph
    k, c, d = head.weight.shape
    w = head.weight.reshape(k * c, d).T.astype(np.float32)  # (D, K*C)
    scale = np.repeat(head.scales(), c).astype(np.float32)  # (K*C,) each row's scale
    bias = head.biases().reshape(k * c).astype(np.float32)  # (K*C,)
    mix = head.weights().reshape(1, k, 1).astype(np.float32)  # (1, K, 1)
    g.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(w), "head_weight"),
            numpy_helper.from_array(scale, "head_scale"),
            numpy_helper.from_array(bias, "head_bias"),
            numpy_helper.from_array(mix, "head_mix"),
            numpy_helper.from_array(np.asarray([0, k, c], np.int64), "head_shape"),
            numpy_helper.from_array(np.asarray([1], np.int64), "head_axes"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("MatMul", [OUTPUT, "head_weight"], ["head_logits"]),  # (B, K*C)
            helper.make_node("Mul", ["head_logits", "head_scale"], ["head_scaled"]),
            helper.make_node("Add", ["head_scaled", "head_bias"], ["head_biased"]),
            helper.make_node("Reshape", ["head_biased", "head_shape"], ["head_per_row"]),
            helper.make_node("Softmax", ["head_per_row"], ["head_softmax"], axis=-1),
            helper.make_node("Mul", ["head_softmax", "head_mix"], ["head_mixed"]),  # (B, K, C)
            helper.make_node("ReduceSum", ["head_mixed", "head_axes"], [PROBS], keepdims=0),
        ]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", c]))
    onnx.checker.check_model(model)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".tmp", delete=False) as f:
        tmp = Path(f.name)
    onnx.save(model, str(tmp))
    os.replace(tmp, out)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_suffix(dst.suffix + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
