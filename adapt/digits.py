"""DigitsDA: a four-domain digit benchmark built offline from real data shipped in wheels.

Layout written by `build_digits`::

    DIR/meta.json
    DIR/<domain>/<class>/<index:04d>.png      RGB, image_size x image_size

Domains (classes `zero` ... `nine`):

- `printed`     digits set in matplotlib's serif / STIX / Computer Modern faces (PRINTED_FONTS,
                never the pretraining fonts) on plain high-contrast backgrounds;
- `handwritten` the UCI handwritten digits from scikit-learn (8x8, 16 grey levels) upscaled;
- `textured`    MNIST-M style: a thickened PRINTED_FONTS digit mask blended over crops of the
                photographs and textures bundled with scikit-image, out = |crop - mask*255|;
- `street`      SVHN-like: a coloured bold digit with neighbouring digits cut by the image
                edges, gradient background, clutter, blur and a low-resolution look.

Two more target styles, `lcd` and `dotmatrix` (adapt/shift.py), are built only when asked for
(`domains=`): they are held-out targets beside the leave-one-domain-out protocol.

Every (seed, domain, class) has its own random stream, so the same seed gives byte-identical
files and a domain does not change when another one does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from adapt.glyphs import CLASS_NAMES, PRINTED_FONTS, load_font, render_glyph
from adapt.shift import SHIFT_DOMAINS, render_dotmatrix, render_lcd
from mp2a.errors import DataError

logger = logging.getLogger(__name__)

DOMAINS = ("printed", "handwritten", "textured", "street")  # built by default
ALL_DOMAINS = DOMAINS + SHIFT_DOMAINS
PROMPT_TEMPLATE = "a photo of the number {}."
NAME = "DigitsDA"
FORMAT_VERSION = 1

# Bold/heavy faces look like house-number plates. Street is a target domain, not a test of
# font memory, so it may share faces with pretraining; its difficulty is the clutter.
STREET_FONTS = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "STIXGeneralBol.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
)

# skimage.data images that are bundled in the wheel (no pooch download needed).
TEXTURES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "immunohistochemistry",
    "moon",
    "rocket",
)

Rgb = np.ndarray  # (H, W, 3) float32 in [0, 255]


# ----------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _uci_digits() -> tuple[np.ndarray, ...]:
    """The UCI digits grouped by class: tuple of 10 arrays (N_c, 8, 8), values 0..16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return tuple(data.images[data.target == c].astype(np.float32) for c in range(10))


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[tuple[Rgb, bool], ...]:
    """The bundled skimage photographs/textures as (RGB float array, is_grey) pairs."""
    import skimage.data

    out = []
    for name in TEXTURES:
        try:
            img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        except Exception as e:  # a stripped install would try to download
            raise DataError(
                f"scikit-image sample image {name!r} is not available offline: {e}. "
                "Reinstall scikit-image from its wheel: pip install --force-reinstall scikit-image."
            ) from e
        grey = img.ndim == 2
        if grey:
            img = np.repeat(img[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
        out.append((img[:, :, :3], grey))
    return tuple(out)


# ----------------------------------------------------------------------------- helpers


def _luma(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _contrasting_colours(rng: np.random.Generator, min_gap: float = 110.0) -> tuple[Rgb, Rgb]:
    """A (background, ink) pair of RGB colours whose luminances differ by at least min_gap."""
    while True:
        bg, ink = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
        if abs(_luma(bg) - _luma(ink)) >= min_gap:
            return bg, ink


def _mask(img: Image.Image) -> np.ndarray:
    """L-mode mask -> (H, W, 1) float in [0, 1], ready to broadcast over RGB."""
    return (np.asarray(img, dtype=np.float32) / 255.0)[:, :, None]


def _blend(bg: Rgb, ink: Rgb, mask: np.ndarray) -> Rgb:
    return bg * (1.0 - mask) + ink * mask


def _to_image(rgb: Rgb) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def _jitter(rng: np.random.Generator, img: Image.Image, size: int) -> Image.Image:
    """A small random affine (rotation, scale, shift) for reused handwritten samples."""
    angle = rng.uniform(-12, 12)
    scale = rng.uniform(0.88, 1.08)
    dx, dy = rng.uniform(-0.06, 0.06, size=2) * size
    # inverse map: output pixel -> input pixel, about the image centre
    a = np.deg2rad(angle)
    cos, sin = np.cos(a) / scale, np.sin(a) / scale
    c = size / 2
    coeffs = (cos, sin, c - cos * (c + dx) - sin * (c + dy),
              -sin, cos, c + sin * (c + dx) - cos * (c + dy))  # fmt: skip
    return img.transform((size, size), Image.Transform.AFFINE, coeffs,
                         Image.Resampling.BICUBIC, fillcolor=0)  # fmt: skip


# ----------------------------------------------------------------------------- domains


def _printed_mask(
    rng: np.random.Generator,
    digit: int,
    size: int,
    height: tuple[float, float],
    rotation: float,
    offset: float,
) -> Image.Image:
    """A PRINTED_FONTS glyph mask with random height, rotation (±deg) and offset (±frac)."""
    font = PRINTED_FONTS[rng.integers(len(PRINTED_FONTS))]
    return render_glyph(
        str(digit),
        font,
        size,
        height_frac=rng.uniform(*height),
        rotation=rng.uniform(-rotation, rotation),
        offset=tuple(rng.uniform(-offset, offset, size=2)),
    )


def _render_printed(rng: np.random.Generator, digit: int, size: int) -> Image.Image:
    """A PRINTED_FONTS digit on a plain background with mild size/position/rotation jitter."""
    mask = _printed_mask(rng, digit, size, height=(0.55, 0.8), rotation=8, offset=0.06)
    bg, ink = _contrasting_colours(rng)
    return _to_image(_blend(np.broadcast_to(bg, (size, size, 3)), ink, _mask(mask)))


def _handwritten_mask(sample: np.ndarray, size: int) -> Image.Image:
    """UCI 8x8 sample (0..16) -> smooth size x size L mask, with a one-pixel margin."""
    padded = np.pad(sample * (255.0 / 16.0), 1)  # (10, 10): keep ink off the edges
    img = Image.fromarray(padded.astype(np.uint8), "L")
    return img.resize((size, size), Image.Resampling.BICUBIC)


def _render_handwritten(
    rng: np.random.Generator, sample: np.ndarray, size: int, jitter: bool
) -> Image.Image:
    """An upscaled UCI digit as dark pen ink on light paper."""
    mask = _handwritten_mask(sample, size)
    if jitter:
        mask = _jitter(rng, mask, size)
    paper = rng.uniform(215, 255) - rng.uniform(0, 20, size=3)  # off-white, slightly tinted
    ink = rng.uniform(0, 70, size=3) * np.array([1.0, 1.0, rng.uniform(1.0, 2.5)])  # black/blue
    return _to_image(_blend(np.broadcast_to(paper, (size, size, 3)), ink, _mask(mask)))


def _texture_crop(rng: np.random.Generator, size: int) -> Rgb:
    """A random crop of a random bundled photograph, resized to size x size."""
    textures = _textures()
    tex, grey = textures[rng.integers(len(textures))]
    h, w = tex.shape[:2]
    side = int(min(rng.uniform(1.0, 4.0) * size, h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = _to_image(tex[y : y + side, x : x + side]).resize((size, size), Image.Resampling.BOX)
    rgb = np.asarray(crop, dtype=np.float32)
    if grey:  # grey source: tint it, BSDS photos are colour
        rgb = rgb * rng.uniform(0.45, 1.0, size=3).astype(np.float32)
    return rgb


def _render_textured(rng: np.random.Generator, digit: int, size: int) -> Image.Image:
    """MNIST-M blend of a thick PRINTED_FONTS digit over a photo crop: |crop - mask*255|."""
    mask = _printed_mask(rng, digit, size, height=(0.6, 0.85), rotation=12, offset=0.05)
    mask = mask.filter(ImageFilter.MaxFilter(3 if size < 48 else 5))  # MNIST-like thick strokes
    crop = _texture_crop(rng, size)
    return _to_image(np.abs(crop - _mask(mask) * 255.0))


def _street_background(rng: np.random.Generator, size: int) -> Rgb:
    """A linear gradient between two random colours in a random direction."""
    c0 = rng.uniform(0, 255, size=3)
    c0 = c0.mean() + (c0 - c0.mean()) * rng.uniform(0.2, 0.9)  # walls and plates are muted
    c1 = np.clip(c0 + rng.normal(0, 50, size=3), 0, 255)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1) - 0.5  # (H, W) each
    t = np.clip(0.5 + xx * np.cos(angle) + yy * np.sin(angle), 0, 1)[:, :, None]
    return (c0 * (1 - t) + c1 * t).astype(np.float32)  # (H, W, 3)


def _street_clutter(rng: np.random.Generator, img: Image.Image) -> None:
    """Draw a few thin lines and plate edges, like the surroundings of a house number."""
    size = img.width
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 5)):
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        pts = rng.uniform(-0.1, 1.1, size=4) * size
        width = int(rng.integers(1, max(2, size // 16)))
        if rng.random() < 0.6:  # mostly near-horizontal/vertical edges
            if rng.random() < 0.5:
                pts[3] = pts[1] + rng.uniform(-0.1, 0.1) * size
            else:
                pts[2] = pts[0] + rng.uniform(-0.1, 0.1) * size
        draw.line([(pts[0], pts[1]), (pts[2], pts[3])], fill=colour, width=width)


def _street_mask(rng: np.random.Generator, digit: int, size: int) -> np.ndarray:
    """Ink mask (H, W, 1) of a house number cropped around `digit`: neighbours cut by the edges."""
    font = STREET_FONTS[rng.integers(len(STREET_FONTS))]
    height = rng.uniform(0.58, 0.8)
    rotation = rng.uniform(-6, 6)
    offset = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
    pitch = height * rng.uniform(0.85, 1.05)  # digit spacing, as a fraction of the canvas
    # upright glyphs skip render_glyph's costly supersampled rotation; the whole number is
    # rotated once below, which also keeps the neighbours on the same baseline
    mask = render_glyph(str(digit), font, size, height, 0.0, offset)
    for side in (-1, 1):
        if rng.random() < 0.8:  # sometimes the centre digit is the first/last of the number
            off = (offset[0] + side * pitch, offset[1])
            other = render_glyph(str(rng.integers(10)), font, size, height, 0.0, off)
            mask = ImageChops.lighter(mask, other)
    return _mask(mask.rotate(rotation, resample=Image.Resampling.BICUBIC))


def _render_street(rng: np.random.Generator, digit: int, size: int) -> Image.Image:
    """An SVHN-like crop: coloured centre digit, cut-off neighbours, clutter, blur, low res."""
    mask = _street_mask(rng, digit, size)
    bg_img = _to_image(_street_background(rng, size))
    _street_clutter(rng, bg_img)
    bg = np.asarray(bg_img, dtype=np.float32)
    while True:  # ink that stands out from the local background colour
        ink = rng.uniform(0, 255, size=3)
        ink = ink.mean() + (ink - ink.mean()) * rng.uniform(0.3, 1.0)
        if abs(_luma(ink) - _luma(bg.mean(axis=(0, 1)))) >= 100:
            break
    rgb = _blend(bg, ink, mask)
    rgb = rgb + rng.normal(0, rng.uniform(2, 10), size=rgb.shape)  # sensor noise
    img = _to_image(rgb).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9) * size / 32))
    low = max(8, int(size * rng.uniform(0.5, 0.85)))  # SVHN crops are upscaled from few pixels
    return img.resize((low, low), Image.Resampling.BILINEAR).resize(
        (size, size), Image.Resampling.BILINEAR
    )


# ----------------------------------------------------------------------------- build


def _rng(seed: int, domain: str, cls: int) -> np.random.Generator:
    return np.random.default_rng([seed, ALL_DOMAINS.index(domain), cls])


def _check_args(out: Path, seed: int, per_class: int, image_size: int) -> None:
    if not isinstance(per_class, int) or per_class < 1:
        raise DataError(f"per_class must be an integer >= 1, got {per_class!r}.")
    if not isinstance(image_size, int) or image_size < 16:
        raise DataError(
            f"image_size must be an integer >= 16 (digits are illegible below), got {image_size!r}."
        )
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}.")
    if out.exists() and not out.is_dir():
        raise DataError(f"Output path {out} exists and is not a folder; choose another --out.")


def _is_digits_tree(out: Path) -> bool:
    try:
        return json.loads((out / "meta.json").read_text()).get("name") == NAME
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_out(out: Path) -> None:
    """Create `out`, or clear an old DigitsDA tree; refuse to touch any other non-empty folder."""
    if out.is_dir() and any(out.iterdir()):
        if not _is_digits_tree(out):
            raise DataError(
                f"Output folder {out} is not empty and holds no DigitsDA meta.json; "
                "choose a new or empty folder, or delete it first."
            )
        logger.info("Overwriting the DigitsDA tree in %s", out)
        for domain in ALL_DOMAINS:
            shutil.rmtree(out / domain, ignore_errors=True)
        (out / "meta.json").unlink()
    out.mkdir(parents=True, exist_ok=True)


_RENDERERS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "printed": _render_printed,
    "textured": _render_textured,
    "street": _render_street,
    "lcd": render_lcd,
    "dotmatrix": render_dotmatrix,
}

_SOURCES = {
    "printed": "digits set in matplotlib's bundled serif/STIX/Computer Modern typefaces "
    "on plain high-contrast backgrounds",
    "handwritten": "UCI ML handwritten digits (sklearn.datasets.load_digits, 8x8, 16 grey "
    "levels) upscaled bicubically, dark ink on light paper",
    "textured": "thickened PRINTED_FONTS digit masks blended MNIST-M style over random crops "
    "of the photographs/textures bundled in skimage.data",
    "street": "SVHN-like crops: coloured bold matplotlib typefaces with cut-off neighbouring "
    "digits over gradient backgrounds, with clutter, noise, blur and a low-res look",
    "lcd": "seven-segment displays: lit bar segments on an LED board (glow) or a reflective "
    "LCD panel, faint unlit segments, italic skew (adapt/shift.py)",
    "dotmatrix": "5x7 dot-matrix characters: lit dots on an LED board with faint unlit dots, "
    "or dots printed on thermal paper (adapt/shift.py)",
}


def _build_class(job: tuple[Path, str, int, int, int, int]) -> int:
    """Write the PNGs of one (domain, class); return how many are jittered reuses."""
    out, domain, c, seed, per_class, size = job
    rng = _rng(seed, domain, c)
    folder = out / domain / CLASS_NAMES[c]
    folder.mkdir(parents=True)
    if domain == "handwritten":
        samples = _uci_digits()[c]
        order = rng.permutation(len(samples))
        for i in range(per_class):
            jitter = i >= len(samples)  # beyond the real samples: reuse, jittered
            img = _render_handwritten(rng, samples[order[i % len(order)]], size, jitter)
            img.save(folder / f"{i:04d}.png")
        return max(0, per_class - len(samples))
    for i in range(per_class):
        _RENDERERS[domain](rng, c, size).save(folder / f"{i:04d}.png")
    return 0


def _domain_meta(domain: str, reused: int) -> dict:
    entry: dict = {"source": _SOURCES[domain]}
    if domain in ("printed", "textured"):
        entry["fonts"] = list(PRINTED_FONTS)
    if domain == "handwritten":
        entry["available_per_class"] = [len(s) for s in _uci_digits()]
        entry["reused_with_jitter"] = reused
    elif domain == "textured":
        entry["textures"] = [f"skimage.data.{t}" for t in TEXTURES]
        entry["blend"] = "|crop - mask*255| per channel (MNIST-M)"
    elif domain == "street":
        entry["fonts"] = list(STREET_FONTS)
    return entry


def build_digits(
    out: Path,
    seed: int = 0,
    per_class: int = 100,
    image_size: int = 32,
    progress: bool = False,
    workers: int | None = None,
    domains: Sequence[str] | None = None,
) -> dict:
    """Write DIR/<domain>/<class>/<index>.png for the 4 domains (or `domains`, which may
    also name the shift styles of adapt/shift.py; each
    domain's images are the same whichever others are built) and DIR/meta.json.

    Images are RGB, image_size x image_size; indices are zero-padded (`0000.png`). The same
    seed gives byte-identical files whatever `workers` is (default: up to 4 CPU cores; 1 runs
    in-process). An existing DigitsDA tree in `out` is replaced; any other non-empty folder is
    refused. With `progress`, each domain is logged at INFO level. Returns the meta dict also
    written to meta.json.
    """
    out = Path(out)
    _check_args(out, seed, per_class, image_size)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"workers must be an integer >= 1, got {workers!r}.")
    built = tuple(DOMAINS if domains is None else dict.fromkeys(domains))
    unknown = [d for d in built if d not in ALL_DOMAINS]
    if unknown or not built:
        raise DataError(
            f"unknown DigitsDA domain(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(ALL_DOMAINS)}."
        )
    _prepare_out(out)
    # load the real data once, before any fork, so worker processes inherit it
    _uci_digits()
    _textures()

    jobs = [(out, d, c, seed, per_class, image_size) for d in built for c in range(10)]
    log = logger.info if progress else logger.debug
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            )
            results = pool.map(_build_class, jobs)
        else:
            results = map(_build_class, jobs)
        reused = dict.fromkeys(built, 0)
        for k, n in enumerate(results):
            domain = jobs[k][1]
            reused[domain] += n
            if jobs[k][2] == len(CLASS_NAMES) - 1:
                log("DigitsDA %s done (%.1fs elapsed)", domain, time.perf_counter() - t0)

    meta: dict = {
        "name": NAME,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "per_class": per_class,
        "image_size": image_size,
        "classes": list(CLASS_NAMES),
        "prompt_template": PROMPT_TEMPLATE,
        "layout": "<domain>/<class>/<index:04d>.png",
        "protocol": "leave-one-domain-out",
        "domains": {
            d: {"count": per_class * len(CLASS_NAMES), **_domain_meta(d, reused[d])} for d in built
        },
    }
    if reused.get("handwritten"):
        logger.warning(
            "per_class=%d exceeds the UCI samples of some classes (%s): %d handwritten images "
            "are reused samples with a small random affine jitter.",
            per_class,
            meta["domains"]["handwritten"]["available_per_class"],
            reused["handwritten"],
        )
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    n = len(built) * 10 * per_class
    log("DigitsDA: %d images in %s (%.1fs)", n, out, time.perf_counter() - t0)
    return meta


# ----------------------------------------------------------------------------- contact sheet


def contact_sheet(root: Path, out_png: Path, per_domain: int = 20, scale: int = 2) -> None:
    """Save a PNG grid with one labelled row per domain, cycling through the classes.

    Sample k of a row is image k // 10 of class k % 10, so columns line up across domains
    and the domain gap reads off each column.
    """
    root = Path(root)
    if not _is_digits_tree(root):
        raise DataError(f"{root} is not a DigitsDA tree (no meta.json); run `mp2a data digits`.")
    meta = json.loads((root / "meta.json").read_text())
    size, classes = meta["image_size"] * scale, meta["classes"]
    per_domain = min(per_domain, meta["per_class"] * len(classes))
    shown = [d for d in ALL_DOMAINS if d in meta["domains"]]
    label_w, pad = 8 * 12, 2
    font = load_font("DejaVuSans.ttf", 13)
    sheet = Image.new(
        "RGB",
        (label_w + per_domain * (size + pad), len(shown) * (size + pad) + pad),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for r, domain in enumerate(shown):
        y = pad + r * (size + pad)
        draw.text((4, y + size // 2), domain, fill=(0, 0, 0), font=font, anchor="lm")
        for k in range(per_domain):
            path = root / domain / classes[k % len(classes)] / f"{k // len(classes):04d}.png"
            tile = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.NEAREST)
            sheet.paste(tile, (label_w + k * (size + pad), y))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, optimize=True)
