"""`mp2a export RUN --format {onnx,onnx-int8,tensorrt}` with a parity report.

Parity compares the exported encoder with PyTorch on real target images (the artifact's
target domain, or `--data`), through the artifact's head: top-1 agreement and the largest
absolute difference of the embeddings. An export below threshold fails loudly (exit 2) and
leaves its report in RUN/export/parity-<format>.json with "passed": false.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from adapt.data import open_dataset, read_domain
from adapt.models import LoadedModel, load_backbone
from adapt.run import data_location
from export.onnx_export import cached_encoder, copy_atomic, fuse_head
from export.quantize import quantize_int8
from mp2a.artifact import Artifact, load_artifact
from mp2a.errors import DataError, ExportError
from mp2a.preprocess import load_image, preprocess_batch
from mp2a.runtime import OrtEncoder

log = logging.getLogger(__name__)

FORMATS = ("onnx", "onnx-int8", "tensorrt")
ENCODER = "image_encoder.onnx"
ENCODER_INT8 = "image_encoder.int8.onnx"
EDGE = "edge_model.onnx"
ENGINE = "image_encoder.plan"
# fp32: the same function up to float rounding; int8: small, bounded damage
THRESHOLDS = {
    "onnx": {"min_top1_agreement": 0.995, "max_abs_diff": 1e-4},
    "onnx-int8": {"min_top1_agreement": 0.97, "max_accuracy_drop": 0.01},
    "tensorrt": {"min_top1_agreement": 0.99, "max_abs_diff": 1e-2},
}


def parity_images(art: Artifact, data: Path | None, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Up to n target images spread over the domain, preprocessed: (N, 3, S, S), labels."""
    target = art.manifest.get("target_domain")
    recorded = data_location(art.path)
    if recorded is None:  # an artifact from before adapt/run.py's LOCAL_FILE
        old = art.metrics().get("data")
        recorded = old if isinstance(old, str) and Path(old).is_absolute() else None
    if data is None and not recorded:
        raise ExportError(f"parity needs the target images: pass --data DIR holding {target!r}")
    try:
        ds = open_dataset(data or Path(recorded))
        d = read_domain(ds, target)
    except DataError as e:
        raise ExportError(
            f"parity needs the target images ({e}); pass --data DIR holding domain {target!r}"
        ) from e
    pick = np.linspace(0, len(d.files) - 1, num=min(n, len(d.files))).round().astype(int)
    images, labels = [], []
    for i in np.unique(pick):
        try:
            images.append(load_image(d.files[i], art.preprocessing.image_size))
            labels.append(d.labels[i])
        except OSError:
            continue
    lab = np.asarray(labels)
    return preprocess_batch(images, art.preprocessing), (lab if (lab >= 0).all() else None)


def _in_chunks(fn, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    return np.concatenate([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def torch_embeddings(lm: LoadedModel, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return _in_chunks(
            lambda b: lm.model.encode_image(torch.from_numpy(b), normalize=True).numpy(), x
        )


def compare(art: Artifact, ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    p_ref, p_got = art.head.probs(ref), art.head.probs(got)
    out = {
        "n": len(ref),
        "top1_agreement": float((p_ref.argmax(1) == p_got.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "max_prob_diff": float(np.abs(p_ref - p_got).max()),
    }
    if labels is not None:
        out["accuracy_reference"] = float((p_ref.argmax(1) == labels).mean())
        out["accuracy"] = float((p_got.argmax(1) == labels).mean())
    return out


def _passed(fmt: str, r: dict) -> bool:
    t = THRESHOLDS[fmt]
    ok = r["top1_agreement"] >= t["min_top1_agreement"]
    if "max_abs_diff" in t:
        ok &= r["max_abs_diff"] <= t["max_abs_diff"]
    if "max_accuracy_drop" in t and "accuracy" in r:
        ok &= r["accuracy_reference"] - r["accuracy"] <= t["max_accuracy_drop"]
    return bool(ok)


def _encoder_into_run(lm: LoadedModel, out: Path, cache_dir: Path | None) -> bool:
    """RUN/export/image_encoder.onnx for this backbone; True when an export was reused."""
    stamp = out / "export.json"
    dst = out / ENCODER
    if dst.is_file() and stamp.is_file():
        info = json.loads(stamp.read_text())
        if info.get("weights_sha256") == lm.backbone.weights_sha256:
            return True
    src, reused = cached_encoder(lm, cache_dir)
    copy_atomic(src, dst)
    stamp.write_text(json.dumps({"weights_sha256": lm.backbone.weights_sha256}) + "\n")
    return reused


def export(
    run: Path, fmt: str, data: Path | None = None, n: int = 512, cache_dir: Path | None = None
) -> dict:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}. Available: {', '.join(FORMATS)}")
    t0 = time.time()
    art = load_artifact(run)
    if fmt == "tensorrt":
        from export.tensorrt import require_gpu

        require_gpu()
    lm = load_backbone(art.backbone)
    out = Path(run) / "export"
    out.mkdir(exist_ok=True)
    reused = _encoder_into_run(lm, out, cache_dir)
    (out / "preprocess.json").write_text(json.dumps(art.preprocessing.to_dict(), indent=2))
    x, labels = parity_images(art, data, n)
    ref = torch_embeddings(lm, x)
    report: dict = {"format": fmt, "encoder_reused": reused, "version": art.version}

    if fmt == "onnx":
        got = _in_chunks(OrtEncoder(out / ENCODER, ["CPUExecutionProvider"]), x)
        report |= compare(art, ref, got, labels)
        fuse_head(out / ENCODER, art.head, out / EDGE)
        edge = OrtEncoder(out / EDGE, ["CPUExecutionProvider"])
        report["edge_model_max_prob_diff"] = float(
            np.abs(_in_chunks(edge, x) - art.head.probs(got)).max()
        )
        report["files"] = [ENCODER, EDGE, "preprocess.json"]
    elif fmt == "onnx-int8":
        report |= quantize_int8(out / ENCODER, out / ENCODER_INT8)
        fp32 = _in_chunks(OrtEncoder(out / ENCODER, ["CPUExecutionProvider"]), x)
        got = _in_chunks(OrtEncoder(out / ENCODER_INT8, ["CPUExecutionProvider"]), x)
        report |= compare(art, ref, got, labels)
        if labels is not None:
            report["accuracy_fp32"] = compare(art, ref, fp32, labels)["accuracy"]
            report["accuracy_delta_vs_fp32"] = report["accuracy"] - report["accuracy_fp32"]
        report["files"] = [ENCODER_INT8, "preprocess.json"]
    else:
        from export.tensorrt import TrtEncoder, build_engine

        report |= build_engine(out / ENCODER, out / ENGINE, art.preprocessing.image_size)
        got = _in_chunks(TrtEncoder(out / ENGINE), x, chunk=32)
        report |= compare(art, ref, got, labels)
        report["files"] = [ENGINE, "preprocess.json"]

    report["thresholds"] = THRESHOLDS[fmt]
    report["passed"] = _passed(fmt, report)
    report["seconds"] = round(time.time() - t0, 2)
    text = json.dumps(report, indent=2) + "\n"
    for name in (f"parity-{fmt}.json", "parity.json"):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    if not report["passed"]:
        raise ExportError(
            f"{fmt} export fails parity (top1_agreement {report['top1_agreement']:.4f}, "
            f"max_abs_diff {report['max_abs_diff']:.2e}; thresholds {THRESHOLDS[fmt]}); "
            f"see {out / 'parity.json'}"
        )
    return report
