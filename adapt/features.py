"""Encode images once with the frozen image tower and cache the features.

The cache key covers the model weights hash, the preprocessing, the decode path's identity
(full decoding or DCT scaling, `mp2a.preprocess.decode_identity`) and the file list (path,
size, mtime), so a changed image, model, decoding or preprocessing never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from adapt.models import LoadedModel
from mp2a.preprocess import PreprocessSpec, decode_identity, load_image, preprocess_image

log = logging.getLogger(__name__)


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


@torch.no_grad()
def encode_files(
    lm: LoadedModel, files: Sequence[Path], batch_size: int = 256, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised image features (N, D) float32 and a valid mask (N,) for undecodable files."""
    feats = np.zeros((len(files), lm.backbone.embed_dim), np.float32)
    valid = np.zeros(len(files), bool)
    bar = tqdm(total=len(files), disable=not progress, desc="encode", unit="img", leave=False)
    for start, arrays in _batches(files, lm.preprocess, batch_size):
        ok = [i for i, a in enumerate(arrays) if a is not None]
        if ok:
            x = torch.from_numpy(np.stack([arrays[i] for i in ok]))  # (B, 3, S, S)
            f = lm.model.encode_image(x, normalize=True)  # (B, D)
            feats[[start + i for i in ok]] = f.numpy()
            valid[[start + i for i in ok]] = True
        bar.update(len(arrays))
    bar.close()
    return feats, valid


def cached_features(
    lm: LoadedModel,
    files: Sequence[Path],
    cache_dir: Path | None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """`encode_files` through the on-disk cache (None disables it)."""
    if cache_dir is None:
        return encode_files(lm, files, progress=progress)
    path = Path(cache_dir) / f"{cache_key(lm, files)}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            log.info("feature cache hit: %s", path.name)
            return t["features"], t["valid"].astype(bool)
        except Exception as e:  # a damaged cache entry is recomputed, not trusted
            log.warning("ignoring unreadable feature cache %s (%s)", path, e)
    feats, valid = encode_files(lm, files, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file({"features": feats, "valid": valid.astype(np.uint8)}, tmp)
    os.replace(tmp, path)
    return feats, valid
