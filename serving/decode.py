"""Untrusted upload bytes -> one RGB PIL image, or an InputError that says what is wrong.

Torch-free and BentoML-free, so it is cheap to test and safe for the edge server. The rules:
- the format comes from the magic bytes, never from the declared content type or file name,
  and Pillow is only allowed the one decoder that matches (no EPS/Ghostscript, no exotic
  parsers reachable by a crafted upload);
- the declared dimensions are checked *before* pixels are decoded (decompression bombs);
- EXIF orientation is applied, the first frame of an animation is used, and every pixel mode
  (grayscale, palette, CMYK, 16-bit, alpha) becomes 8-bit RGB;
- the pixels come from `mp2a.preprocess.open_image`, the decode path offline feature
  extraction uses too (a large JPEG is DCT-scaled towards the model's input size).
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

from PIL import Image

from mp2a.preprocess import open_image

log = logging.getLogger(__name__)

# (magic prefix, offset, Pillow format name)
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"WEBP", 8, "WEBP"),  # RIFF....WEBP, checked together with the RIFF prefix below
)
SUPPORTED = ("JPEG", "PNG", "WebP", "BMP", "GIF")

# What a rejected upload most likely is, so the 415 message can say so.
_KNOWN_OTHER: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"<?xml", "an XML document"),
    (b"<!doctype html", "an HTML page"),
    (b"<html", "an HTML page"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"II*\x00", "a TIFF image (not supported; convert it to PNG or JPEG)"),
    (b"MM\x00*", "a TIFF image (not supported; convert it to PNG or JPEG)"),
    (b"%!PS", "a PostScript file"),
    (b"{", "JSON text"),
)


class InputError(Exception):
    """A client error: HTTP `status` and a message that says what is wrong and how to fix it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int = 40_000_000  # declared width * height, checked before decoding
    max_side: int = 20_000
    max_aspect: float = 64.0  # the shorter-side resize makes extreme strips huge in memory


def sniff(data: bytes) -> str | None:
    """The Pillow format name of a supported image from its magic bytes, else None."""
    for magic, offset, fmt in _MAGIC:
        if data[offset : offset + len(magic)] == magic:
            if fmt == "WEBP" and data[:4] != b"RIFF":
                continue
            return fmt
    return None


def _describe(data: bytes) -> str:
    if b"<svg" in data[:1024].lower():  # before XML: an SVG usually starts with <?xml
        return "an SVG drawing (vector images are not supported; rasterise it to PNG)"
    head = data[:64].lstrip().lower()
    for magic, what in _KNOWN_OTHER:
        if head.startswith(magic.lower()):
            return what
    try:
        data[:256].decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary data of an unknown format"


def _check_geometry(w: int, h: int, limits: DecodeLimits) -> None:
    if w < 1 or h < 1:
        raise InputError(422, f"the image declares an empty size {w}x{h}")
    if w * h > limits.max_pixels or max(w, h) > limits.max_side:
        raise InputError(
            413,
            f"the image is {w}x{h} ({w * h / 1e6:.1f} MP); the limit is "
            f"{limits.max_pixels / 1e6:.0f} MP and {limits.max_side} px per side: downscale it",
        )
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise InputError(
            422,
            f"the image is {w}x{h}, an aspect ratio above {limits.max_aspect:.0f}:1; "
            "crop it to the region to classify",
        )


def decode_image(
    data: bytes, limits: DecodeLimits | None = None, image_size: int | None = None
) -> Image.Image:
    """Validate and decode one upload into an RGB image (raises InputError); `image_size`, the
    model's input size, lets a large JPEG decode at a reduced DCT scale (None: full size)."""
    limits = limits or DecodeLimits()
    if not data:
        raise InputError(400, "the uploaded image is empty (0 bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise InputError(
            415,
            f"the upload is {_describe(data)}, not a supported image; "
            f"send one of {', '.join(SUPPORTED)}",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like
            # Pillow's own bomb check only warns below 2x its limit; make it an error
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return open_image(
                io.BytesIO(data),
                image_size,
                formats=[fmt],
                check=lambda w, h: _check_geometry(w, h, limits),
            )
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(413, f"the image is too large to decode safely ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise InputError(
            422, f"the {fmt} header is damaged or incomplete; Pillow cannot read the image"
        ) from e
    except MemoryError as e:
        raise InputError(413, "the image is too large to decode in memory; downscale it") from e
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error...
        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise InputError(
            422, f"the {fmt} image cannot be decoded ({first}); is the file complete?"
        ) from e
