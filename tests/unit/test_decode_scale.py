"""Decoding at the model's scale (mp2a.preprocess.open_image): a large JPEG is DCT-scaled
towards the model's input, keeps the geometry of the full decode, and serving and offline
extraction get the same pixels from the same bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from mp2a.preprocess import DRAFT_FACTOR, open_image, preprocess_image
from mp2a.preprocess import PreprocessSpec as Spec
from serving.decode import InputError, decode_image

SPEC = Spec(image_size=32)
NEED = math.ceil(DRAFT_FACTOR * SPEC.image_size)  # shorter side kept by the DCT scaling


def scaled_size(w: int, h: int) -> tuple[int, int]:
    """The size libjpeg decodes a (w, h) JPEG at: the largest of 1/8, 1/4, 1/2 keeping both
    sides >= NEED (the decoder rounds up)."""
    s = next((s for s in (8, 4, 2) if min(w // NEED, h // NEED) >= s), 1)
    return math.ceil(w / s), math.ceil(h / s)


def photo(width: int, height: int) -> Image.Image:
    """Smooth colour fields with a few sharp shapes (JPEG-friendly, asymmetric)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)  # (H, W)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(9 * x * y)], axis=-1)  # (H, W, 3)
    a = (rgb * 255).astype(np.uint8)
    a[: height // 5, : width // 4] = (250, 20, 20)  # red block top-left
    a[-height // 6 :, -width // 3 :] = (20, 20, 250)  # blue block bottom-right
    return Image.fromarray(a)


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def full_and_scaled(data: bytes, monkeypatch) -> tuple[Image.Image, Image.Image]:
    monkeypatch.setenv("MP2A_DECODE_DRAFT", "0")
    full = decode_image(data, image_size=SPEC.image_size)
    monkeypatch.delenv("MP2A_DECODE_DRAFT")
    return full, decode_image(data, image_size=SPEC.image_size)


def test_a_large_jpeg_decodes_at_a_reduced_scale_never_below_the_factor(monkeypatch):
    data = jpeg(photo(1421, 1003))
    full, scaled = full_and_scaled(data, monkeypatch)
    assert full.size == (1421, 1003)
    assert NEED <= min(scaled.size) < 2 * NEED  # the smallest DCT scale keeping >= NEED
    assert scaled.size == scaled_size(1421, 1003) != (1421, 1003)
    # without the model's size (or for PNG) nothing is scaled
    assert decode_image(data).size == (1421, 1003)
    png = io.BytesIO()
    photo(1421, 1003).save(png, "PNG")
    assert decode_image(png.getvalue(), image_size=32).size == (1421, 1003)


def test_the_model_sees_the_pixels_of_the_full_decode_within_tolerance(monkeypatch):
    for size in ((1421, 1003), (423, 1000), (2000, 2000)):
        full, scaled = full_and_scaled(jpeg(photo(*size)), monkeypatch)
        a, b = preprocess_image(full, SPEC), preprocess_image(scaled, SPEC)  # (3, S, S)
        diff = np.abs(a - b) * np.asarray(SPEC.std, np.float32)[:, None, None] * 255
        assert diff.mean() < 1.0, (size, diff.mean())  # in 1/255 steps
        assert diff.max() < 24, (size, diff.max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_exif_rotated_large_jpeg_keeps_its_orientation(orientation, monkeypatch):
    up = photo(1200, 800)
    stored = (
        up.transpose(
            {
                2: Image.Transpose.FLIP_LEFT_RIGHT,
                3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_90,
                7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_270,
            }[orientation]
        )
        if orientation > 1
        else up
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    full, scaled = full_and_scaled(jpeg(stored, exif=exif), monkeypatch)
    assert full.size == (1200, 800) and scaled.size == scaled_size(1200, 800)  # upright
    a, b = preprocess_image(full, SPEC), preprocess_image(scaled, SPEC)
    ref = preprocess_image(up, SPEC)
    assert np.abs(b - a).mean() < 0.02 and np.abs(b - ref).mean() < 0.02
    red = np.asarray(scaled)[5, 5]  # the top-left block, wherever the camera stored it
    assert red[0] > 200 and red[2] < 60


def test_serving_and_offline_extraction_get_identical_arrays(tmp_path):
    data = jpeg(photo(1600, 1200), progressive=True)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    served = preprocess_image(decode_image(data, image_size=32), SPEC)
    offline = preprocess_image(open_image(path, 32), SPEC)
    np.testing.assert_array_equal(served, offline)
    assert min(open_image(path, 32).size) < 1200  # through the scaled path


def test_cmyk_and_grayscale_large_jpegs_are_scaled_to_rgb():
    cmyk = photo(1000, 800).convert("CMYK")
    gray = photo(1000, 800).convert("L")
    for im in (cmyk, gray):
        got = decode_image(jpeg(im), image_size=32)
        assert got.mode == "RGB" and got.size == scaled_size(1000, 800) != (1000, 800)


def test_truncated_and_strip_jpegs_still_refused():
    data = jpeg(photo(1600, 1200))
    with pytest.raises(InputError) as e:
        decode_image(data[: len(data) // 2], image_size=32)
    assert e.value.status == 422
    with pytest.raises(InputError) as e:
        decode_image(jpeg(Image.new("RGB", (20000, 1))), image_size=32)
    assert e.value.status == 422
