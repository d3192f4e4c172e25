"""serving.decode: format sniffing, limits and pixel-mode conversion on real encoded files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.decode import DecodeLimits, InputError, decode_image, sniff


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` (a decompression-bomb header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def upright() -> Image.Image:
    """Asymmetric, so every rotation and flip gives different pixels."""
    a = np.zeros((30, 40, 3), np.uint8)  # (H, W, 3)
    a[:5, :10] = (255, 0, 0)  # red block top-left
    a[20:, 30:] = (0, 0, 255)  # blue block bottom-right
    a[10:20, :] = (0, 200, 0)
    return Image.fromarray(a)


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("JPEG", "JPEG"), ("PNG", "PNG"), ("GIF", "GIF"), ("BMP", "BMP"), ("WEBP", "WEBP")],
)
def test_sniff_and_decode_every_supported_format(fmt, name):
    data = encode(upright(), fmt)
    assert sniff(data) == name
    im = decode_image(data)
    assert im.mode == "RGB" and im.size == (40, 30)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"hello world", "text"),
        (b"<!DOCTYPE html><html></html>", "HTML"),
        (b"%PDF-1.7\n%\xe2\xe3", "PDF"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"<?xml version='1.0'?><svg/>", "SVG"),
        (b"II*\x00\x08\x00\x00\x00", "TIFF"),
        (b"PK\x03\x04rest", "ZIP"),
        (b'{"image": "x"}', "JSON"),
        (bytes(range(256)), "unknown"),
    ],
)
def test_non_images_are_415_and_named(data, what):
    with pytest.raises(InputError) as e:
        decode_image(data)
    assert e.value.status == 415
    assert what.lower() in e.value.message.lower()


def test_declared_type_and_name_are_ignored():
    """Only the bytes count: a PNG is a PNG whatever it claims, text is never an image."""
    assert sniff(encode(upright(), "PNG")) == "PNG"
    assert sniff(b"GIF89a but actually text") == "GIF"  # sniffed, then refused by the decoder
    with pytest.raises(InputError) as e:
        decode_image(b"GIF89a but actually text")
    assert e.value.status == 422


def test_empty_is_400():
    with pytest.raises(InputError) as e:
        decode_image(b"")
    assert e.value.status == 400


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP"])
def test_truncated_files_are_422(fmt):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    data = encode(big, fmt)
    with pytest.raises(InputError) as e:
        decode_image(data[: len(data) // 2])
    assert e.value.status == 422


@pytest.mark.parametrize("side", [7_000, 10_000, 100_000])
def test_bomb_header_is_refused_before_decoding(side):
    """Ours (40 MP), Pillow's warning (89 MP) and Pillow's error (179 MP) all give 413."""
    data = png_declaring(side, side)
    assert len(data) < 200
    with pytest.raises(InputError) as e:
        decode_image(data)
    assert e.value.status == 413
    assert f"{side}x{side}" in e.value.message or "decompression bomb" in e.value.message


def test_pixel_limit_and_aspect_ratio():
    with pytest.raises(InputError) as e:
        decode_image(encode(upright(), "PNG"), DecodeLimits(max_pixels=1000))
    assert e.value.status == 413
    with pytest.raises(InputError) as e:
        decode_image(encode(Image.new("RGB", (4000, 20)), "PNG"))
    assert e.value.status == 422 and "aspect" in e.value.message
    assert decode_image(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")).size == (1, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    """Store the upright picture the way a camera with that orientation tag would."""
    up = upright()
    # what the camera stores for tag t is the inverse of what the viewer applies
    stored = {
        1: up,
        2: up.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        3: up.transpose(Image.Transpose.ROTATE_180),
        4: up.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        5: up.transpose(Image.Transpose.TRANSPOSE),
        6: up.transpose(Image.Transpose.ROTATE_90),
        7: up.transpose(Image.Transpose.TRANSVERSE),
        8: up.transpose(Image.Transpose.ROTATE_270),
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    got = decode_image(encode(stored, "PNG", exif=exif))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(up))


def test_broken_exif_keeps_the_image():
    data = encode(upright(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff")
    assert decode_image(data).size == (40, 30)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    a = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    got = np.asarray(decode_image(encode(Image.fromarray(a), "PNG")))  # (64, 64, 3)
    expect = np.round(a / 257.0).astype(np.uint8)
    assert np.abs(got[..., 0].astype(int) - expect).max() <= 1
    assert (got[..., 0] == got[..., 1]).all() and got.min() == 0 and got.max() == 255


def test_cmyk_jpeg_becomes_rgb():
    got = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"))
    r, g, b = np.asarray(got)[8, 8].astype(int)
    assert r > 200 and g < 50 and b < 50


def test_transparency_is_composited_over_white():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    got = np.asarray(decode_image(encode(pal, "PNG", transparency=0)))
    assert tuple(got[4, 4]) == (255, 255, 255) and tuple(got[0, 0]) == (255, 0, 0)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert tuple(np.asarray(decode_image(encode(rgba, "PNG")))[0, 0]) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 255))
    assert tuple(np.asarray(decode_image(encode(la, "PNG")))[0, 0]) == (0, 0, 0)


def test_animations_use_the_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    for fmt, kw in [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})]:
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
        assert tuple(np.asarray(decode_image(data))[5, 5]) == (255, 0, 0), fmt


def test_bilevel_and_grayscale():
    assert decode_image(encode(Image.new("1", (5, 5), 1), "BMP")).getpixel((0, 0)) == (
        255,
        255,
        255,
    )
    assert decode_image(encode(Image.new("L", (5, 5), 77), "PNG")).getpixel((2, 2)) == (77, 77, 77)
