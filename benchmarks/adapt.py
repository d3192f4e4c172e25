"""`mp2a bench adapt --json`: one adaptation epoch on cached features vs re-encoding images,
and feature extraction with torch vs ONNX Runtime.

Both epoch paths run the same prompt-training steps on the same images (3 sources + the
target, `batch` images each per step). The re-encoding path does what the reference
implementation of MPA does: decode, preprocess and run the frozen image tower (torch) on
every batch. The cached path encodes once (timed separately: `cache_build_seconds`) and then
trains on features.

`extraction`: every domain's images encoded (decode and preprocessing included) by torch and
by ONNX Runtime over the encoder `mp2a export` writes, in `ROUNDS` rounds taking turns, with
the lowest cosine between the two engines' features: what `mp2a adapt` gains by extracting
with ONNX Runtime where the encoder was exported (adapt/features.py).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adapt.data import open_dataset, read_domain
from adapt.features import encode_files, extractor, min_cosine, onnx_extractor
from adapt.models import LoadedModel, load_model
from adapt.progressive import make_optimizer, train_step
from adapt.prompts import MultiPromptLearner


def _epoch(
    lm: LoadedModel,
    learner: MultiPromptLearner,
    files: list[list[Path]],  # [source_1, ..., source_S, target]
    labels: list[np.ndarray],
    cached: list[np.ndarray] | None,
    batch: int,
) -> float:
    """Seconds for one pass over the target, `batch` images per domain per step."""
    opt = make_optimizer(learner, 2e-3)
    torch_engine = extractor(lm, "torch")  # the reference implementation's engine
    scale = float(lm.model.logit_scale.exp())
    n_steps = max(1, len(files[-1]) // batch)
    t0 = time.perf_counter()
    for step in range(n_steps):
        sl = slice(step * batch, (step + 1) * batch)
        feats = []
        for d, fs in enumerate(files):
            if cached is None:
                f, _ = encode_files(
                    lm, fs[sl], batch_size=batch, progress=False, engine=torch_engine
                )
            else:
                f = cached[d][sl]
            feats.append(torch.from_numpy(f))
        srcs = [(feats[d], torch.from_numpy(labels[d][sl])) for d in range(len(files) - 1)]
        pseudo = torch.from_numpy(labels[-1][sl])  # stands in for pseudo-labels: same cost
        train_step(learner, opt, srcs, (feats[-1], pseudo), scale, 1.0)
    return time.perf_counter() - t0


def bench_model(name: str, pretrained: str | None, data: Path, images: int, batch: int) -> dict:
    lm = load_model(name, pretrained)
    ds = open_dataset(data)
    doms = ["printed", "handwritten", "textured", "street"]
    files = [read_domain(ds, d).files[:images] for d in doms]
    labels = [read_domain(ds, d).labels[:images] for d in doms]
    t0 = time.perf_counter()
    cached = [
        encode_files(lm, f, batch_size=batch, progress=False, engine=extractor(lm, "torch"))[0]
        for f in files
    ]
    build = time.perf_counter() - t0
    template = ds.prompt_template or "a photo of a {}."
    learner = MultiPromptLearner(lm, ds.classes, len(doms) - 1, template)
    _epoch(lm, learner, files, labels, cached, batch)  # warm-up
    t_cached = _epoch(lm, learner, files, labels, cached, batch)
    t_reencode = _epoch(lm, learner, files, labels, None, batch)
    return {
        "model": name,
        "pretrained": pretrained,
        "images_per_domain": images,
        "batch_per_domain": batch,
        "steps_per_epoch": max(1, images // batch),
        "cache_build_seconds": round(build, 3),
        "epoch_seconds_cached": round(t_cached, 4),
        "epoch_seconds_reencode": round(t_reencode, 4),
        "speedup": round(t_reencode / t_cached, 2),
        "extraction": extraction(lm, [f for fs in files for f in fs]),
    }


ROUNDS = 3


def extraction(lm: LoadedModel, files: list[Path], batch: int = 256) -> dict:
    """torch vs ONNX Runtime over the same files in `mp2a adapt`'s batches, rounds taking
    turns (order reversed every other round); images/s per round, the median round's ratio."""
    from export.onnx_export import cached_encoder

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = cached_encoder(lm, Path(tmp))
        engines = {"torch": extractor(lm, "torch"), "onnx": onnx_extractor(lm, path)}
        encode_files(lm, files[:batch], batch_size=batch, progress=False, engine=engines["onnx"])
        rates: dict[str, list[float]] = {k: [] for k in engines}
        feats = {}
        for r in range(ROUNDS):
            for name in list(engines)[:: 1 if r % 2 == 0 else -1]:
                t0 = time.perf_counter()
                feats[name], _ = encode_files(
                    lm, files, batch_size=batch, progress=False, engine=engines[name]
                )
                rates[name].append(round(len(files) / (time.perf_counter() - t0), 1))
    ratios = sorted(o / t for o, t in zip(rates["onnx"], rates["torch"], strict=True))
    return {
        "images": len(files),
        "rounds": ROUNDS,
        "images_per_s_torch": rates["torch"],
        "images_per_s_onnx": rates["onnx"],
        "onnx_over_torch": round(ratios[len(ratios) // 2], 2),
        "min_cosine": round(min_cosine(feats["torch"], feats["onnx"]), 7),
    }


def run(quick: bool = False) -> dict:
    """Tiny CLIP (real weights) and ViT-B-16 (random weights: timing only)."""
    from adapt.digits import build_digits

    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        build_digits(data, seed=0, per_class=13)  # 130 images per domain
        rows = [bench_model("tiny-digits", None, data, 128, 32)]
        if not quick:
            rows.append(bench_model("ViT-B-16", "random", data, 32, 16))
    return {"bench": "adapt", "threads": torch.get_num_threads(), "results": rows}
