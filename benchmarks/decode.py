"""Decode parity and speed: JPEGs decoded at the model's scale against full decoding.

`python -m benchmarks.decode [--photos DIR] [--models tiny-digits,ViT-B-16] [--out FILE]`
prints one JSON object. For each DCT-scaling factor k (the shorter side kept >= k x the
model's input; `mp2a.preprocess.DRAFT_FACTOR` is the chosen one) and each image set:
- `top1_agreement`: the same class as with full decoding, under the model's zero-shot head
  (tiny CLIP on digits, which it knows) or else a prototype head: each class's mean embedding
  of the fully decoded images (the visual prototype rows of an `mp2a-t` head; with random
  weights or out-of-domain photos a zero-shot or random head has near-ties everywhere and
  the figure would measure the ties, not the decoding);
- `cosine_mean` / `cosine_min` of the normalised embeddings;
- `pixel_mean_abs` / `pixel_max_abs`: the final preprocessed tensors, in units of 1/255 of
  the [0, 1] range before normalisation;
- `decode_ms` / `full_decode_ms`: mean time of `open_image` per file.

Image sets: DigitsDA (`mp2a data digits`, PNGs of ~32-64 px) upscaled and saved as JPEG q=90
with shorter sides of 256 to 2048 px (the PNGs themselves never take the DCT path), and, when
--photos names an ImageFolder such as Office-31, its domains as they are (dslr 1000x1000,
webcam 152-752 px, amazon 300x300; --per-domain caps each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0)
SIDES = (256, 512, 1024, 2048)  # shorter sides of the DigitsDA JPEGs


@contextlib.contextmanager
def draft_env(value: str) -> Iterator[None]:
    old = os.environ.get("MP2A_DECODE_DRAFT")
    os.environ["MP2A_DECODE_DRAFT"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MP2A_DECODE_DRAFT", None)
        else:
            os.environ["MP2A_DECODE_DRAFT"] = old


def digits_jpegs(out: Path, per_class: int, seed: int = 0) -> tuple[list[Path], list[int]]:
    """DigitsDA images upscaled (bicubic) to several sizes and saved as JPEG q=90."""
    from PIL import Image

    from adapt.data import open_dataset, read_domain
    from adapt.digits import build_digits

    root = out / "digits"
    build_digits(root, seed=seed, per_class=per_class, workers=1)
    ds = open_dataset(root)
    files, labels = [], []
    i = 0
    for domain in ds.domains:
        d = read_domain(ds, domain)
        for f, y in zip(d.files, d.labels, strict=True):
            side = SIDES[i % len(SIDES)]
            i += 1
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = side / min(w, h)
                big = im.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
            dst = out / "jpeg" / domain / f"{f.stem}-{side}.jpg"
            dst.parent.mkdir(parents=True, exist_ok=True)
            big.save(dst, "JPEG", quality=90)
            files.append(dst)
            labels.append(int(y))
    return files, labels


def photo_sets(root: Path, per_domain: int) -> dict[str, tuple[list[Path], list[int]]]:
    from adapt.data import open_dataset, read_domain

    ds = open_dataset(root)
    sets = {}
    for domain in ds.domains:
        d = read_domain(ds, domain)
        pick = np.unique(np.linspace(0, len(d.files) - 1, num=min(per_domain, len(d.files))))
        sets[domain] = ([d.files[int(i)] for i in pick], [int(d.labels[int(i)]) for i in pick])
    return sets


def _decode_all(files: list[Path], size: int, env: str) -> tuple[list, float]:
    from mp2a.preprocess import open_image

    with draft_env(env):
        t0 = time.perf_counter()
        images = [open_image(f, size) for f in files]
        return images, (time.perf_counter() - t0) / len(files)


def _encode(lm, x: np.ndarray, chunk: int = 32) -> np.ndarray:
    import torch

    with torch.no_grad():
        parts = [
            lm.model.encode_image(torch.from_numpy(x[i : i + chunk]), normalize=True).numpy()
            for i in range(0, len(x), chunk)
        ]
    return np.concatenate(parts)  # (N, D)


def parity(lm, files: list[Path], labels: list[int], head: np.ndarray | None) -> dict:
    """Every factor against full decoding on `files` (head: (C, D) normalised rows; None:
    the class prototypes of the fully decoded embeddings)."""
    from mp2a.head import l2_normalize
    from mp2a.preprocess import preprocess_batch

    spec = lm.preprocess
    full_images, full_ms = _decode_all(files, spec.image_size, "0")
    full_x = preprocess_batch(full_images, spec)  # (N, 3, S, S)
    full_e = _encode(lm, full_x)
    if head is None:
        y = np.asarray(labels)
        head = l2_normalize(np.stack([full_e[y == c].mean(0) for c in np.unique(y)]))
    full_top = np.argmax(full_e @ head.T, axis=1)
    std = np.asarray(spec.std, np.float32)[None, :, None, None]
    out: dict = {"n": len(files), "full_decode_ms": round(1000 * full_ms, 2), "factors": {}}
    seen: dict[bytes, dict] = {}
    for k in FACTORS:
        images, ms = _decode_all(files, spec.image_size, f"{k:g}")
        x = preprocess_batch(images, spec)
        key = x.tobytes()[:: max(1, x.nbytes // 4096)] + bytes(str(x.sum()), "ascii")
        if key in seen:  # the same scales as a smaller factor picked: same embeddings
            row = dict(seen[key])
        else:
            e = _encode(lm, x)
            cos = np.sum(e * full_e, axis=1)
            diff = np.abs(x - full_x) * std * 255  # back to 1/255 units of the [0, 1] range
            row = {
                "top1_agreement": round(float(np.mean(np.argmax(e @ head.T, 1) == full_top)), 4),
                "cosine_mean": round(float(cos.mean()), 6),
                "cosine_min": round(float(cos.min()), 6),
                "pixel_mean_abs": round(float(diff.mean()), 3),
                "pixel_max_abs": round(float(diff.max()), 1),
            }
            seen[key] = row
        sizes = np.asarray([min(im.size) for im in images])
        row["decoded_short_side_median"] = int(np.median(sizes))
        row["decode_ms"] = round(1000 * ms, 2)
        out["factors"][f"{k:g}"] = row
    return out


def _zero_shot_head(lm, classes: list[str]) -> np.ndarray:
    from adapt.digits import PROMPT_TEMPLATE
    from adapt.text import class_text_features

    return class_text_features(lm, classes, PROMPT_TEMPLATE).numpy()  # (C, D)


def run(photos: Path | None, models: list[str], per_class: int, per_domain: int) -> dict:
    import torch

    from adapt.models import load_model

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t0 = time.time()
    result: dict = {"bench": "decode", "factors": list(FACTORS), "results": {}}
    with tempfile.TemporaryDirectory(prefix="mp2a-bench-decode-") as tmp:
        digit_files, digit_labels = digits_jpegs(Path(tmp), per_class)
        digits = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        photo = photo_sets(photos, per_domain) if photos else {}
        for model in models:
            lm = load_model(model, "random" if model != "tiny-digits" else None)
            rows: dict = {}
            head = _zero_shot_head(lm, digits) if model == "tiny-digits" else None
            rows["digits_jpeg"] = parity(lm, digit_files, digit_labels, head)
            for domain, (files, labels) in photo.items():
                rows[domain] = parity(lm, files, labels, None)
            result["results"][model] = rows
    result["sides_digits_jpeg"] = list(SIDES)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode")
    p.add_argument("--photos", type=Path, default=None)
    p.add_argument("--models", default="tiny-digits")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--per-domain", type=int, default=200)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    r = run(a.photos, a.models.split(","), a.per_class, a.per_domain)
    text = json.dumps(r)
    if a.out:
        a.out.write_text(json.dumps(r, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
