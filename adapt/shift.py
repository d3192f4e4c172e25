"""Target styles beyond DigitsDA's four, and harmful streams, all rendered offline.

Shift styles (`mp2a data digits --domains lcd,dotmatrix`; held-out targets of `make results`
with the four DigitsDA domains as sources, and streams of `mp2a bench online`). Neither the
tiny CLIP's pretraining nor any DigitsDA domain draws glyphs this way:

- `lcd`        seven-segment displays (meters, clocks, scales): the digit as lit bar
               segments, either an LED panel (bright segments with a glow on a dark panel) or
               a reflective LCD (dark segments on a grey-green panel), with faint unlit
               segments, italic skew and a bezel;
- `dotmatrix`  5x7 dot-matrix characters (LED boards, receipts, old terminals): round dots
               on a grid, lit on a dark board or printed on thermal paper, with unlit dots
               faintly visible on boards.

Harmful streams (`letters`, `noise`: PNG bytes, no digit labels) for the gate's tests and
benchmark: traffic that is not from the label set must never be adapted to.

- `letters`    Latin letters that do not look like digits, set exactly like `printed`
               (same faces, backgrounds, jitter): the right style, the wrong label set;
- `noise`      per-pixel colour noise, half of it smoothed into blobs.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from adapt.glyphs import PRINTED_FONTS, render_glyph

SHIFT_DOMAINS = ("lcd", "dotmatrix")
HARMFUL_STREAMS = ("letters", "noise")

# segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle); 6, 7 and 9 come in the two variants real displays use
SEGMENTS = {
    0: ("abcdef",),
    1: ("bc",),
    2: ("abdeg",),
    3: ("abcdg",),
    4: ("bcfg",),
    5: ("acdfg",),
    6: ("acdefg", "cdefg"),
    7: ("abc", "abcf"),
    8: ("abcdefg",),
    9: ("abcdfg", "abcfg"),
}

# 5x7 dot-matrix digits (the common character-LCD/LED-board face), one string per row
DOTS = {
    0: ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    1: ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    2: ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    3: ("11111", "00010", "00100", "00010", "00001", "10001", "01110"),
    4: ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    5: ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    6: ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    7: ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    8: ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    9: ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
}

# letters whose shapes are not digits in any common face (no O, I, l, S, Z, B, g, q, …)
LETTERS = "ACEFHKMNPRTUVWXYadefhkmnprtuvwxy"

LED_COLOURS = ((255, 40, 30), (60, 255, 80), (255, 170, 20), (80, 200, 255), (240, 240, 240))


def _segment_polygons(w: float, h: float, t: float) -> dict[str, list[tuple[float, float]]]:
    """Hexagonal bars of a seven-segment digit in a w x h box, bar thickness t."""
    g = t * 0.15  # gap between neighbouring segments
    m = h / 2

    def horizontal(y: float) -> list[tuple[float, float]]:
        x0, x1 = t / 2 + g, w - t / 2 - g
        return [(x0, y), (x0 + t / 2, y - t / 2), (x1 - t / 2, y - t / 2), (x1, y),
                (x1 - t / 2, y + t / 2), (x0 + t / 2, y + t / 2)]  # fmt: skip

    def vertical(x: float, y0: float, y1: float) -> list[tuple[float, float]]:
        y0, y1 = y0 + g, y1 - g
        return [(x, y0), (x + t / 2, y0 + t / 2), (x + t / 2, y1 - t / 2), (x, y1),
                (x - t / 2, y1 - t / 2), (x - t / 2, y0 + t / 2)]  # fmt: skip

    return {
        "a": horizontal(t / 2),
        "g": horizontal(m),
        "d": horizontal(h - t / 2),
        "f": vertical(t / 2, t / 2, m),
        "b": vertical(w - t / 2, t / 2, m),
        "e": vertical(t / 2, m, h - t / 2),
        "c": vertical(w - t / 2, m, h - t / 2),
    }


def _place(rng: np.random.Generator, size: int, big: int, aspect: float) -> tuple:
    """Box (x0, y0, w, h) of the glyph on a big x big canvas, with size/position jitter."""
    h = big * rng.uniform(0.55, 0.78)
    w = h * aspect
    cx = big / 2 + rng.uniform(-0.06, 0.06) * big
    cy = big / 2 + rng.uniform(-0.06, 0.06) * big
    return cx - w / 2, cy - h / 2, w, h


def _panel(rng: np.random.Generator, dark: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(background, lit, unlit) colours of an LED board (dark) or a reflective panel."""
    if dark:
        bg = rng.uniform(0, 45, size=3)
        lit = np.asarray(LED_COLOURS[rng.integers(len(LED_COLOURS))], float)
        lit = lit * rng.uniform(0.75, 1.0)
        unlit = bg + (lit - bg) * rng.uniform(0.04, 0.14)
    else:  # reflective LCD or paper: dark ink on a light, tinted panel
        bg = np.asarray([rng.uniform(150, 215), rng.uniform(165, 225), rng.uniform(140, 200)])
        lit = rng.uniform(10, 60, size=3)
        unlit = bg + (lit - bg) * rng.uniform(0.0, 0.08)
    return bg, lit, unlit


def _finish(
    rng: np.random.Generator, lit_mask: Image.Image, unlit_mask: Image.Image, size: int, dark: bool
) -> Image.Image:
    """Colour the masks (L, big) into a size x size RGB image with glow, noise and blur."""
    bg, lit, unlit = _panel(rng, dark)
    big = lit_mask.width
    a = np.asarray(lit_mask, np.float32)[:, :, None] / 255.0
    u = np.asarray(unlit_mask, np.float32)[:, :, None] / 255.0
    rgb = bg * (1 - u) + unlit * u
    rgb = rgb * (1 - a) + lit * a
    if dark:  # LEDs glow into the board around them
        glow = lit_mask.filter(ImageFilter.GaussianBlur(big * rng.uniform(0.02, 0.05)))
        gl = np.asarray(glow, np.float32)[:, :, None] / 255.0 * rng.uniform(0.3, 0.7)
        rgb = rgb + (lit - rgb) * gl * (1 - a)
    rgb = rgb + rng.normal(0, rng.uniform(2, 8), size=rgb.shape)  # sensor noise
    img = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6) * size / 32))


def _skew(img: Image.Image, shear: float) -> Image.Image:
    """Italic slant: x' = x + shear * (y - centre)."""
    c = img.height / 2
    return img.transform(
        img.size, Image.Transform.AFFINE, (1, shear, -shear * c, 0, 1, 0),
        Image.Resampling.BICUBIC, fillcolor=0,
    )  # fmt: skip


def render_lcd(rng: np.random.Generator, digit: int, size: int) -> Image.Image:
    """A seven-segment digit: LED (dark panel) or reflective LCD, italic or upright."""
    big = size * 4
    x0, y0, w, h = _place(rng, size, big, aspect=rng.uniform(0.5, 0.62))
    t = w * rng.uniform(0.16, 0.24)
    polys = _segment_polygons(w, h, t)
    on = SEGMENTS[digit][rng.integers(len(SEGMENTS[digit]))]
    lit, unlit = Image.new("L", (big, big), 0), Image.new("L", (big, big), 0)
    dl, du = ImageDraw.Draw(lit), ImageDraw.Draw(unlit)
    for name, poly in polys.items():
        pts = [(x0 + x, y0 + y) for x, y in poly]
        (dl if name in on else du).polygon(pts, fill=255)
    shear = rng.uniform(0.0, 0.2) if rng.random() < 0.7 else 0.0  # most displays slant
    dark = rng.random() < 0.6
    return _finish(rng, _skew(lit, shear), _skew(unlit, shear), size, dark)


def render_dotmatrix(rng: np.random.Generator, digit: int, size: int) -> Image.Image:
    """A 5x7 dot-matrix digit: LED board (lit and faint unlit dots) or thermal print."""
    big = size * 4
    x0, y0, w, h = _place(rng, size, big, aspect=rng.uniform(0.62, 0.75))
    pitch_x, pitch_y = w / 5, h / 7
    r = min(pitch_x, pitch_y) * rng.uniform(0.3, 0.48)
    dark = rng.random() < 0.6
    lit, unlit = Image.new("L", (big, big), 0), Image.new("L", (big, big), 0)
    dl, du = ImageDraw.Draw(lit), ImageDraw.Draw(unlit)
    square = not dark and rng.random() < 0.5  # thermal heads print square-ish dots
    for row, bits in enumerate(DOTS[digit]):
        for col, bit in enumerate(bits):
            cx, cy = x0 + (col + 0.5) * pitch_x, y0 + (row + 0.5) * pitch_y
            box = (cx - r, cy - r, cx + r, cy + r)
            draw = dl if bit == "1" else du
            if bit == "0" and not dark:
                continue  # paper shows no unlit dots
            (draw.rectangle if square else draw.ellipse)(box, fill=255)
    shear = rng.uniform(0.0, 0.12) if rng.random() < 0.3 else 0.0
    return _finish(rng, _skew(lit, shear), _skew(unlit, shear), size, dark)


def render_letter(rng: np.random.Generator, size: int) -> Image.Image:
    """A non-digit letter set exactly like DigitsDA `printed` (faces, colours, jitter)."""
    from adapt.digits import _blend, _contrasting_colours, _mask, _to_image

    letter = LETTERS[rng.integers(len(LETTERS))]
    font = PRINTED_FONTS[rng.integers(len(PRINTED_FONTS))]
    mask = render_glyph(
        letter,
        font,
        size,
        height_frac=rng.uniform(0.55, 0.8),
        rotation=rng.uniform(-8, 8),
        offset=tuple(rng.uniform(-0.06, 0.06, size=2)),
    )
    bg, ink = _contrasting_colours(rng)
    return _to_image(_blend(np.broadcast_to(bg, (size, size, 3)), ink, _mask(mask)))


def render_noise(rng: np.random.Generator, size: int) -> Image.Image:
    """Per-pixel colour noise, or the same smoothed into blobs (half each)."""
    x = rng.uniform(0, 255, size=(size, size, 3))
    img = Image.fromarray(x.astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 3.0) * size / 32))
        a = np.asarray(img, np.float32)
        a = (a - a.mean()) * rng.uniform(3, 6) + 128  # restore contrast lost to the blur
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    return img


def harmful_stream(kind: str, n: int, seed: int = 0, size: int = 32) -> list[bytes]:
    """`n` PNG images of a harmful stream (`letters` or `noise`), deterministic per seed."""
    if kind not in HARMFUL_STREAMS:
        raise ValueError(f"unknown harmful stream {kind!r}; choose {', '.join(HARMFUL_STREAMS)}")
    rng = np.random.default_rng([seed, HARMFUL_STREAMS.index(kind), 7919])
    out = []
    for _ in range(n):
        img = render_letter(rng, size) if kind == "letters" else render_noise(rng, size)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out
