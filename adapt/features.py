"""Encode images once with the frozen image tower and cache the features.

The cache key covers the model weights hash, the preprocessing, the decode path's identity
(full decoding or DCT scaling, `mp2a.preprocess.decode_identity`) and the file list (path,
size, mtime), so a changed image, model, decoding or preprocessing never reuses stale features.

The engine (`extractor`): where `mp2a export` has already exported this backbone's encoder
(the ONNX cache, keyed by the weights: export/onnx_export.py `cached_encoder`), the images are
encoded with ONNX Runtime, which runs the same graph faster on the CPU (`mp2a bench adapt`:
`extraction`); otherwise, on a GPU, or where the two disagree on the first images, with
torch. `MP2A_EXTRACT_ENGINE=torch|onnx|auto` (default auto) chooses. The pixels are the same
either way, so the cache key does not name the engine: the two agree to a cosine of
`PARITY_MIN_COS` on every image checked, far below what a prediction can tell apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from adapt.models import LoadedModel
from mp2a.errors import ModelError
from mp2a.preprocess import PreprocessSpec, decode_identity, load_image, preprocess_image

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx")
PARITY_IMAGES = 8  # the first images of a run, encoded by both engines
PARITY_MIN_COS = 0.9999  # measured: 0.9999998 on the tiny CLIP (docs/RESULTS.md)
# pixels per ONNX Runtime call: 8 images at 224 px (ViT-B-16), a whole batch of the tiny
# CLIP's 32 px ones. Measured on 2 cores, ViT-B-16, 256 photos: 10.0 img/s at 8 per call
# (2.5 GB peak RSS), 7.3 at 64, 5.6 at 256 (8.3 GB); the tiny CLIP is flat from 64 up
ORT_PIXELS_PER_CALL = 8 * 224 * 224


def default_cache_dir() -> Path:
    env = os.environ.get("MP2A_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mp2a" / "features"


def cache_key(lm: LoadedModel, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    ident = [lm.backbone.to_dict(), lm.preprocess.to_dict(), decode_identity()]
    h.update(json.dumps(ident).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_one(path: Path, spec: PreprocessSpec) -> np.ndarray | None:
    try:
        return preprocess_image(load_image(path, spec.image_size), spec)
    except Exception as e:  # any undecodable file is skipped, and reported
        log.warning("skipping %s: cannot decode image (%s)", path, e)
        return None


def _batches(
    files: Sequence[Path], spec: PreprocessSpec, batch_size: int
) -> Iterator[tuple[int, list[np.ndarray | None]]]:
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            yield start, list(pool.map(lambda p: _load_one(p, spec), chunk))


@dataclass
class Extractor:
    """pixel_values (B, 3, S, S) float32 -> normalised features (B, D) float32, by one engine;
    counts what it encoded (a run's figures: metrics.json `feature_extraction`)."""

    engine: str  # "torch" | "onnx"
    run: Callable[[np.ndarray], np.ndarray]
    images: int = 0
    seconds: float = 0.0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.run(pixels)
        self.seconds += time.perf_counter() - t0
        self.images += len(pixels)
        return out

    def figures(self) -> dict:
        rate = self.images / self.seconds if self.seconds > 0 else None
        dropped = isinstance(self.run, _ParityChecked) and self.run.fallback is not None
        return {
            "engine": "torch" if dropped else self.engine,
            "images_encoded": self.images,
            "encoder_seconds": round(self.seconds, 3),
            "images_per_s": None if rate is None else round(rate, 1),
            "parity_min_cosine": self.run.min_cos if isinstance(self.run, _ParityChecked) else None,
            "images_per_call": self.run.chunk if isinstance(self.run, _ParityChecked) else None,
        }


def _torch_run(lm: LoadedModel) -> Callable[[np.ndarray], np.ndarray]:
    @torch.no_grad()
    def run(pixels: np.ndarray) -> np.ndarray:
        return lm.model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()

    return run


def exported_encoder(lm: LoadedModel) -> Path | None:
    """The ONNX encoder `mp2a export` left for these weights (its cache), or None."""
    try:
        from export.onnx_export import encoder_path
    except ImportError:  # no onnx package: nothing can have been exported here
        return None
    path = encoder_path(lm)
    return path if path.is_file() else None


def _on_cpu(lm: LoadedModel) -> bool:
    return all(p.device.type == "cpu" for p in lm.model.parameters())


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return float(((a * b).sum(1) / np.maximum(na * nb, 1e-12)).min())


class _ParityChecked:
    """ONNX Runtime whose first batch is checked against torch on its first images: a graph
    that disagrees (an export of other weights under the same key, a broken file) is dropped
    for torch, with a warning (`strict`: an error instead)."""

    def __init__(self, lm: LoadedModel, path: Path, strict: bool) -> None:
        self.lm, self.path, self.strict = lm, path, strict
        self.ort: Callable[[np.ndarray], np.ndarray] | None = None  # opened on first use
        self.chunk = max(1, ORT_PIXELS_PER_CALL // (lm.preprocess.image_size**2))
        self.fallback: Callable[[np.ndarray], np.ndarray] | None = None
        self.min_cos: float | None = None

    def _drop(self, why: str) -> Callable[[np.ndarray], np.ndarray]:
        if self.strict:
            raise ModelError(f"{why}; delete it and run `mp2a export` again")
        log.warning("%s: encoding with torch", why)
        self.fallback = _torch_run(self.lm)
        return self.fallback

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.fallback is not None:
            return self.fallback(pixels)
        if self.ort is not None:
            return self._chunked(self.ort, pixels)
        from mp2a.runtime import OrtEncoder

        try:
            ort = OrtEncoder(self.path, providers=["CPUExecutionProvider"])
            out = self._chunked(ort, pixels)
        except Exception as e:  # a damaged or foreign file: ONNX Runtime's own words
            first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
            return self._drop(f"cannot run the exported encoder {self.path} ({first})")(pixels)
        ref = _torch_run(self.lm)(pixels[:PARITY_IMAGES])
        self.min_cos = min_cosine(out[:PARITY_IMAGES], ref)
        if not self.min_cos >= PARITY_MIN_COS:
            why = (
                f"the exported encoder {self.path} disagrees with the model on the first "
                f"images (cosine {self.min_cos:.6f} < {PARITY_MIN_COS})"
            )
            return self._drop(why)(pixels)
        self.ort = ort
        return out

    def _chunked(self, run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray) -> np.ndarray:
        """A batch in calls of `chunk` images: a large model's activations for a whole
        batch cost memory and speed (ORT_PIXELS_PER_CALL)."""
        if len(pixels) <= self.chunk:
            return run(pixels)
        return np.concatenate(
            [run(pixels[i : i + self.chunk]) for i in range(0, len(pixels), self.chunk)]
        )


def onnx_extractor(lm: LoadedModel, path: Path, strict: bool = True) -> Extractor:
    """ONNX Runtime over the encoder at `path`, parity-checked on its first batch."""
    return Extractor("onnx", _ParityChecked(lm, path, strict=strict))


def extractor(lm: LoadedModel, engine: str | None = None) -> Extractor:
    """The engine that encodes `lm`'s images here: `engine` or MP2A_EXTRACT_ENGINE (auto:
    ONNX Runtime when an exported encoder of these weights exists and the model is on the
    CPU, else torch)."""
    engine = engine or os.environ.get("MP2A_EXTRACT_ENGINE") or "auto"
    if engine not in ENGINES:
        raise ModelError(
            f"MP2A_EXTRACT_ENGINE={engine!r}: choose {', '.join(ENGINES)} (auto: ONNX Runtime "
            "where `mp2a export` has exported this model's encoder, else torch)"
        )
    if engine == "torch" or not _on_cpu(lm):
        return Extractor("torch", _torch_run(lm))
    path = exported_encoder(lm)
    if path is None:
        if engine == "onnx":
            raise ModelError(
                "MP2A_EXTRACT_ENGINE=onnx but this model's encoder has not been exported here; "
                "run `mp2a export RUN --format onnx` once (or leave MP2A_EXTRACT_ENGINE unset)"
            )
        return Extractor("torch", _torch_run(lm))
    return onnx_extractor(lm, path, strict=engine == "onnx")


def encode_files(
    lm: LoadedModel,
    files: Sequence[Path],
    batch_size: int = 256,
    progress: bool = True,
    engine: Extractor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image features (N, D) float32 and a valid mask (N,) for undecodable files.
    `engine`: an `extractor(lm)` shared by a run's calls (default: a new one)."""
    run = engine or extractor(lm)
    feats = np.zeros((len(files), lm.backbone.embed_dim), np.float32)
    valid = np.zeros(len(files), bool)
    bar = tqdm(total=len(files), disable=not progress, desc="encode", unit="img", leave=False)
    for start, arrays in _batches(files, lm.preprocess, batch_size):
        ok = [i for i, a in enumerate(arrays) if a is not None]
        if ok:
            f = run(np.stack([arrays[i] for i in ok]))  # (B, 3, S, S) -> (B, D)
            feats[[start + i for i in ok]] = f
            valid[[start + i for i in ok]] = True
        bar.update(len(arrays))
    bar.close()
    return feats, valid


def cached_features(
    lm: LoadedModel,
    files: Sequence[Path],
    cache_dir: Path | None,
    progress: bool = True,
    engine: Extractor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`encode_files` through the on-disk cache (None disables it)."""
    if cache_dir is None:
        return encode_files(lm, files, progress=progress, engine=engine)
    path = Path(cache_dir) / f"{cache_key(lm, files)}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            log.info("feature cache hit: %s", path.name)
            return t["features"], t["valid"].astype(bool)
        except Exception as e:  # a damaged cache entry is recomputed, not trusted
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
    feats, valid = encode_files(lm, files, progress=progress, engine=engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"features": feats, "valid": valid.astype(np.uint8)}, tmp)
    os.replace(tmp, path)
    return feats, valid
