import numpy as np
import pytest
import torch
from open_clip.transform import image_transform
from PIL import Image

from mp2a.preprocess import PreprocessSpec, preprocess_batch, preprocess_image


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (32, 32), (17, 9), (300, 200)])
def test_matches_open_clip_eval_transform(size):
    """One numpy implementation serves everywhere; it must equal open_clip's own transform."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    spec = PreprocessSpec(32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    ref = image_transform(32, is_train=False, mean=spec.mean, std=spec.std)(img)
    got = torch.from_numpy(preprocess_image(img, spec))
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)  # uint8 rounding at most
    assert (got - ref).abs().mean() < 2e-3


def test_modes_are_converted_to_rgb():
    spec = PreprocessSpec(8)
    for mode in ("L", "P", "RGBA", "CMYK", "I;16"):
        img = Image.new(mode, (10, 12))
        out = preprocess_batch([img, img], spec)
        assert out.shape == (2, 3, 8, 8) and out.dtype == np.float32


def test_spec_round_trip():
    spec = PreprocessSpec(224)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
