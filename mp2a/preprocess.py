"""Image preprocessing spec and its one implementation (PIL + numpy, no torch).

Training, evaluation, export parity and serving all call `preprocess_image`, so the pixels a
model sees are identical everywhere. It mirrors open_clip's eval transform: resize the shorter
side with bicubic filtering, centre crop, RGB, scale to [0, 1], normalise per channel.

`open_image` is the one decode path in front of it (serving's upload checks, the edge, feature
extraction and export parity all call it). A JPEG much larger than the model's input is decoded
with libjpeg's DCT scaling (1/2, 1/4 or 1/8, Pillow's `Image.draft`) to the smallest scale whose
shorter side is still >= DRAFT_FACTOR x the input size, then resized as usual: a 12 MP photo
decodes in ~1/7 of the time, and the model's pixels barely move (measured on DigitsDA and
Office-31, serving/README.md "Decoding at the model's scale").
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import IO

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"  # resize the shorter side, then centre crop

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessSpec:
        return cls(
            image_size=int(d["image_size"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            interpolation=str(d.get("interpolation", "bicubic")),
            resize_mode=str(d.get("resize_mode", "shortest")),
        )


_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _eight_bit(im: Image.Image) -> Image.Image:
    """High-bit-depth single-channel modes -> 'L', scaled rather than clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNGs decode to these modes (0..65535): scale to 8 bits, where PIL's convert
        # would clip everything above 255 to white
        a = np.asarray(im, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min(initial=0)), float(a.max(initial=0))
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return Image.fromarray((a * 255 + 0.5).astype(np.uint8), "L")
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded PIL image -> 8-bit RGB; transparency is composited over white.

    Dropping alpha (PIL's plain convert) would show whatever colour the transparent pixels
    happen to hold, often black: a black glyph on a transparent background would vanish.
    """
    im = _eight_bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "RGB":
        return im  # convert would copy it
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr


# Shorter side kept >= DRAFT_FACTOR x the model's input by the JPEG DCT scaling. Chosen by
# measuring against full decoding (benchmarks/decode.py, serving/README.md): the smallest of
# 1, 1.5, 2, 3, 4, 5 and 6 whose top-1 agreement is >= 99.5 % on every set (DigitsDA JPEGs and
# Office-31 under the tiny CLIP; 3 gave 99.0 % on amazon and 98.75 % on dslr, 5 gives 100 %
# and 99.5 %). It costs little where the time goes: a 12 MP photo still decodes at 1/8 for
# the tiny CLIP; for ViT-B-16 at 1/2 instead of 1/4 (51 instead of 39 ms here, beside an
# encoder that serves ~4 images/s on 2 cores).
DRAFT_FACTOR = 5.0


def draft_factor() -> float | None:
    """The DCT-scaling factor in force: MP2A_DECODE_DRAFT=0 decodes every JPEG in full (for
    measuring), another number overrides DRAFT_FACTOR; None when disabled."""
    raw = os.environ.get("MP2A_DECODE_DRAFT", "").strip()
    if not raw:
        return DRAFT_FACTOR
    try:
        k = float(raw)
    except ValueError:
        log.warning("ignoring MP2A_DECODE_DRAFT=%r (not a number); using %s", raw, DRAFT_FACTOR)
        return DRAFT_FACTOR
    return k if k >= 1 else None


def decode_identity() -> str:
    """What decides the decoded pixels besides the file, for cache keys ('full' or 'draft-2')."""
    k = draft_factor()
    return "full" if k is None else f"draft-{k:g}"


def draft_to_scale(
    im: Image.Image, image_size: int, factor: float | None = None
) -> tuple[float, float, float, float] | None:
    """Ask the JPEG decoder of a not-yet-loaded `im` for the smallest DCT scale that keeps its
    shorter side >= factor x image_size; other formats and small JPEGs are left alone.

    Returns the region of the scaled image that holds the whole picture, (0, 0, W/s, H/s):
    the decoder rounds the scaled size up, so its last row and column may be partly outside
    the picture (a 423 px side at 1/4 gives 106 px for 105.75). None when nothing was scaled.
    """
    k = draft_factor() if factor is None else factor
    if k is None or im.format != "JPEG" or not image_size:
        return None
    target = math.ceil(k * image_size)
    if min(im.size) < 2 * target:  # no scale (1/2 at least) could apply
        return None
    full = im.size
    got = im.draft("RGB", (target, target))  # the mode stays as decoded (L, RGB, CMYK)
    if got is None or im.size == full:
        return None
    return tuple(float(v) for v in got[1])  # type: ignore[return-value]


# EXIF orientation -> where a point (x, y) of a (w, h) image lands after exif_transpose
_ORIENT: dict[int, Callable[[float, float, float, float], tuple[float, float]]] = {
    2: lambda x, y, w, h: (w - x, y),  # FLIP_LEFT_RIGHT
    3: lambda x, y, w, h: (w - x, h - y),  # ROTATE_180
    4: lambda x, y, w, h: (x, h - y),  # FLIP_TOP_BOTTOM
    5: lambda x, y, w, h: (y, x),  # TRANSPOSE
    6: lambda x, y, w, h: (h - y, x),  # ROTATE_270
    7: lambda x, y, w, h: (h - y, w - x),  # TRANSVERSE
    8: lambda x, y, w, h: (y, w - x),  # ROTATE_90
}
_BOX = "mp2a_region"  # im.info key: (box in the decoded image, full size), for preprocess_image


def _oriented(box, size, orientation: int):
    """`box` of an image of `size`, as it lies after the EXIF `orientation` is applied."""
    move = _ORIENT.get(orientation)
    if move is None:
        return box
    (x0, y0), (x1, y1) = (move(box[0], box[1], *size), move(box[2], box[3], *size))
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def open_image(
    fp: str | os.PathLike | IO[bytes],
    image_size: int | None = None,
    *,
    formats: Sequence[str] | None = None,
    check: Callable[[int, int], None] | None = None,
) -> Image.Image:
    """Decode one image file the way every part of mp2a does: first frame, DCT-scaled towards
    `image_size` when it is a large JPEG (None: full size), EXIF orientation, 8-bit RGB.

    `check(width, height)` sees the declared size before any pixel is decoded (serving
    refuses decompression bombs there). Order matters: the draft is set before the pixels
    load, and the EXIF rotation is applied after, to the scaled image. A scaled image carries
    the exact region of the picture and its full size in `info`, so `preprocess_image`
    resizes it with the geometry of the full decode (same crop, no sub-pixel shift).
    """
    with Image.open(fp, formats=formats) as im:
        if check is not None:
            check(*im.size)
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animations: the first frame
        full = im.size
        box = draft_to_scale(im, image_size) if image_size else None
        im.load()
        scaled = im.size
        orientation = 1
        try:
            if box is not None:
                orientation = int(im.getexif().get(0x0112, 1) or 1)
            ImageOps.exif_transpose(im, in_place=True)  # a copy only if it rotates
        except Exception as e:  # a broken EXIF block must not lose a good image
            orientation = 1
            log.debug("ignoring unreadable EXIF orientation: %s", e)
        out = to_rgb(im)
        if box is not None:
            if orientation in (5, 6, 7, 8) and out.size == scaled[::-1]:
                full = full[::-1]
            elif out.size != scaled:  # the orientation was not applied after all
                orientation = 1
            out.info[_BOX] = (_oriented(box, scaled, orientation), full)
        return out


def load_image(path: str | os.PathLike | IO[bytes], image_size: int | None = None) -> Image.Image:
    """Open an image file the way the server decodes uploads (`open_image`)."""
    return open_image(path, image_size)


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image -> float32 array (3, S, S), normalised."""
    region = img.info.get(_BOX)  # set by open_image on a DCT-scaled JPEG
    img = img if img.mode == "RGB" else to_rgb(img)
    s = spec.image_size
    box, (w, h) = region if region else (None, img.size)  # the full decode's size
    # Same integer arithmetic as torchvision's Resize(int) and CenterCrop, for exact parity.
    if w <= h:
        new_w, new_h = s, int(s * h / w)
    else:
        new_w, new_h = int(s * w / h), s
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), _FILTERS[spec.interpolation], box=box)
    left, top = round((new_w - s) / 2.0), round((new_h - s) / 2.0)
    if (new_w, new_h) != (s, s):  # a square image is already cropped (crop would copy it)
        img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Images -> float32 array (B, 3, S, S)."""
    return np.stack([preprocess_image(im, spec) for im in images])
