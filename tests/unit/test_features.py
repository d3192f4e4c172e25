import logging
import os

import numpy as np

from adapt.data import open_dataset, read_domain
from adapt.features import cache_key, cached_features, encode_files
from adapt.models import load_model
from mp2a.preprocess import DRAFT_FACTOR


def test_second_run_reuses_cache(tmp_path, digits_small, micro_model_dir, caplog):
    lm = load_model(str(micro_model_dir))
    files = read_domain(open_dataset(digits_small), "printed").files[:12]
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="adapt.features")
    f1, v1 = cached_features(lm, files, cache, progress=False)
    assert "cache hit" not in caplog.text
    assert len(list(cache.iterdir())) == 1
    f2, v2 = cached_features(lm, files, cache, progress=False)
    assert "feature cache hit" in caplog.text
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(v1, v2)
    # the cached features are what the encoder computes
    f3, _ = encode_files(lm, files, progress=False)
    np.testing.assert_allclose(f1, f3, atol=1e-6)


def test_key_changes_with_files_and_content(tmp_path, digits_small, micro_model_dir):
    lm = load_model(str(micro_model_dir))
    files = read_domain(open_dataset(digits_small), "street").files[:5]
    k = cache_key(lm, files)
    assert cache_key(lm, files[:4]) != k
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert cache_key(lm, files) != k
    finally:
        os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_key(lm, files) == k


def test_damaged_cache_entry_is_recomputed(tmp_path, digits_small, micro_model_dir):
    lm = load_model(str(micro_model_dir))
    files = read_domain(open_dataset(digits_small), "textured").files[:6]
    cache = tmp_path / "cache"
    f1, _ = cached_features(lm, files, cache, progress=False)
    entry = next(cache.iterdir())
    entry.write_bytes(b"garbage")
    f2, _ = cached_features(lm, files, cache, progress=False)
    np.testing.assert_array_equal(f1, f2)


def test_undecodable_images_are_skipped(tmp_path, micro_model_dir):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lm = load_model(str(micro_model_dir))
    feats, valid = encode_files(lm, [good, bad, good], progress=False)
    assert valid.tolist() == [True, False, True]
    assert np.allclose(np.linalg.norm(feats[valid], axis=1), 1.0, atol=1e-5)


def test_key_changes_with_the_decode_path(tmp_path, digits_small, micro_model_dir, monkeypatch):
    """Decoding at the model's scale or in full gives other pixels: other cache entries."""
    lm = load_model(str(micro_model_dir))
    files = read_domain(open_dataset(digits_small), "street").files[:3]
    k = cache_key(lm, files)
    monkeypatch.setenv("MP2A_DECODE_DRAFT", "0")
    assert cache_key(lm, files) != k
    monkeypatch.setenv("MP2A_DECODE_DRAFT", str(DRAFT_FACTOR))
    assert cache_key(lm, files) == k
