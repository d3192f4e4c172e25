"""Rendering single digit glyphs with real typefaces, shared by DigitsDA and tiny-CLIP pretraining.

Two font sets that never overlap: DigitsDA's `printed` domain uses serif/STIX/Computer Modern
faces, pretraining uses the DejaVu Sans families and Pillow's built-in face. Keeping them
disjoint is what makes zero-shot on `printed` a test of generalisation, not of memory.
"""

from __future__ import annotations

import functools
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

PRINTED_FONTS = (
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)

PRETRAIN_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "pillow-default",  # Pillow's embedded FreeType face
)


def font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=512)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "pillow-default":
        return ImageFont.load_default(size)  # type: ignore[return-value]
    return ImageFont.truetype(str(font_dir() / name), size)


def render_glyph(
    text: str,
    font: str,
    canvas: int,
    height_frac: float,
    rotation: float = 0.0,
    offset: tuple[float, float] = (0.0, 0.0),
) -> Image.Image:
    """Render `text` as a white-on-black 8-bit mask (canvas x canvas).

    height_frac: glyph ink height as a fraction of the canvas; offset: shift of the ink
    centre from the canvas centre, as fractions of the canvas.
    """
    big = canvas * 4  # supersample, then downscale: smooth edges at any size
    f = load_font(font, max(8, int(big * height_frac * 1.35)))
    img = Image.new("L", (big * 2, big * 2), 0)
    ImageDraw.Draw(img).text((big, big), text, fill=255, font=f, anchor="mm")
    img = img.rotate(rotation, resample=Image.Resampling.BICUBIC)
    bbox = img.getbbox()
    if bbox is None:
        return Image.new("L", (canvas, canvas), 0)
    ink = img.crop(bbox)
    target_h = big * height_frac
    scale = target_h / max(1, ink.height)
    w, h = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
    if w > big * 0.95:  # wide glyph strings: fit the width instead
        scale = big * 0.95 / ink.width
        w, h = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
    ink = ink.resize((w, h), Image.Resampling.LANCZOS)
    out = Image.new("L", (big, big), 0)
    cx, cy = big / 2 + offset[0] * big, big / 2 + offset[1] * big
    out.paste(ink, (round(cx - w / 2), round(cy - h / 2)))
    return out.resize((canvas, canvas), Image.Resampling.LANCZOS)
