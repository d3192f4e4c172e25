"""Image preprocessing spec and its one implementation (PIL + numpy, no torch).

Training, evaluation, export parity and serving all call `preprocess_image`, so the pixels a
model sees are identical everywhere. It mirrors open_clip's eval transform: resize the shorter
side with bicubic filtering, centre crop, RGB, scale to [0, 1], normalise per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps

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


def load_image(path: str | object) -> Image.Image:
    """Open an image file the way the server decodes uploads: first frame, EXIF, RGB."""
    with Image.open(path) as im:  # type: ignore[arg-type]
        im.seek(0)
        im.load()
        return to_rgb(ImageOps.exif_transpose(im) or im)


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image -> float32 array (3, S, S), normalised."""
    img = img if img.mode == "RGB" else to_rgb(img)
    s = spec.image_size
    w, h = img.size
    # Same integer arithmetic as torchvision's Resize(int) and CenterCrop, for exact parity.
    if w <= h:
        new_w, new_h = s, int(s * h / w)
    else:
        new_w, new_h = int(s * w / h), s
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _FILTERS[spec.interpolation])
    left, top = round((new_w - s) / 2.0), round((new_h - s) / 2.0)
    if (new_w, new_h) != (s, s):  # a square image is already cropped (crop would copy it)
        img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Images -> float32 array (B, 3, S, S)."""
    return np.stack([preprocess_image(im, spec) for im in images])
