"""Image preprocessing spec and its one implementation (PIL + numpy, no torch).

Training, evaluation, export parity and serving all call `preprocess_image`, so the pixels a
model sees are identical everywhere. It mirrors open_clip's eval transform: resize the shorter
side with bicubic filtering, centre crop, RGB, scale to [0, 1], normalise per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

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


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """One PIL image -> float32 array (3, S, S), normalised."""
    img = img.convert("RGB")
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
    img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Images -> float32 array (B, 3, S, S)."""
    return np.stack([preprocess_image(im, spec) for im in images])
