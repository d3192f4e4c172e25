import logging
import os

import numpy as np
import pytest

from adapt import features
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


# -- the engine: ONNX Runtime where the encoder was exported, torch otherwise ------------------
def _exported(lm, tmp_path, monkeypatch):
    """Point the ONNX cache (export/onnx_export.py) into tmp_path and export lm's encoder."""
    from export.onnx_export import cached_encoder, default_cache_dir

    monkeypatch.setenv("MP2A_CACHE_DIR", str(tmp_path / "cache" / "features"))
    path, reused = cached_encoder(lm, default_cache_dir())
    assert not reused and path.is_relative_to(tmp_path)
    return path


def test_auto_engine_uses_the_exported_encoder_and_agrees_with_torch(
    tmp_path, digits_small, micro_model_dir, monkeypatch
):
    from adapt.features import exported_encoder, extractor

    lm = load_model(str(micro_model_dir))
    files = read_domain(open_dataset(digits_small), "printed").files[:20]
    monkeypatch.setenv("MP2A_CACHE_DIR", str(tmp_path / "nothing" / "features"))
    assert exported_encoder(lm) is None
    assert extractor(lm).engine == "torch"  # nothing exported here yet
    path = _exported(lm, tmp_path, monkeypatch)
    assert exported_encoder(lm) == path
    ex = extractor(lm)
    assert ex.engine == "onnx"
    f_onnx, v = encode_files(lm, files, batch_size=7, progress=False, engine=ex)
    f_torch, _ = encode_files(lm, files, progress=False, engine=extractor(lm, "torch"))
    assert v.all()
    np.testing.assert_allclose(f_onnx, f_torch, atol=1e-5)
    fig = ex.figures()
    assert fig["engine"] == "onnx" and fig["images_encoded"] == 20
    assert fig["parity_min_cosine"] >= 0.9999 and fig["images_per_s"] > 0
    # a large model's batch goes to ONNX Runtime a few images at a time: the same features
    monkeypatch.setattr(features, "ORT_PIXELS_PER_CALL", 3 * lm.preprocess.image_size**2)
    small = extractor(lm)
    f_small, _ = encode_files(lm, files, batch_size=7, progress=False, engine=small)
    np.testing.assert_allclose(f_small, f_torch, atol=1e-5)
    assert small.figures()["images_per_call"] == 3 and fig["images_per_call"] > 20


def test_an_encoder_that_disagrees_or_is_broken_falls_back_to_torch(
    tmp_path, digits_small, micro_model_dir, monkeypatch, caplog
):
    """Another model's graph under this model's key, or a damaged file: auto encodes with
    torch and says why; MP2A_EXTRACT_ENGINE=onnx refuses with an error naming the file."""
    import open_clip
    import torch

    from adapt.features import extractor
    from export.onnx_export import export_encoder
    from mp2a.errors import ModelError

    lm = load_model(str(micro_model_dir))
    files = read_domain(open_dataset(digits_small), "street").files[:10]
    path = _exported(lm, tmp_path, monkeypatch)
    want, _ = encode_files(lm, files, progress=False, engine=extractor(lm, "torch"))
    torch.manual_seed(1)  # the same architecture, other weights
    other = load_model(str(micro_model_dir))
    other.model.visual.load_state_dict(
        open_clip.create_model(
            "local-dir:" + str(micro_model_dir), load_weights=False
        ).visual.state_dict()
    )
    export_encoder(other, path)
    caplog.set_level(logging.WARNING, logger="adapt.features")
    for content, why in ((None, "disagrees with the model"), (b"not an onnx graph", "cannot run")):
        if content is not None:
            path.write_bytes(content)
        ex = extractor(lm)
        got, _ = encode_files(lm, files, batch_size=4, progress=False, engine=ex)
        np.testing.assert_allclose(got, want, atol=1e-6)  # torch's features
        assert ex.figures()["engine"] == "torch"
        assert why in caplog.text and "encoding with torch" in caplog.text
        assert str(path) in caplog.text
        caplog.clear()
        monkeypatch.setenv("MP2A_EXTRACT_ENGINE", "onnx")
        try:
            with pytest.raises(ModelError, match="mp2a export"):
                encode_files(lm, files, progress=False)
        finally:
            monkeypatch.delenv("MP2A_EXTRACT_ENGINE")


def test_engine_choice_errors_say_how_to_fix(tmp_path, micro_model_dir, monkeypatch):
    from adapt.features import extractor
    from mp2a.errors import ModelError

    lm = load_model(str(micro_model_dir))
    monkeypatch.setenv("MP2A_CACHE_DIR", str(tmp_path / "features"))
    monkeypatch.setenv("MP2A_EXTRACT_ENGINE", "tensorflow")
    with pytest.raises(ModelError, match="choose auto, torch, onnx"):
        extractor(lm)
    monkeypatch.setenv("MP2A_EXTRACT_ENGINE", "onnx")
    with pytest.raises(ModelError, match="has not been exported here"):
        extractor(lm)
    monkeypatch.setenv("MP2A_EXTRACT_ENGINE", "torch")
    assert extractor(lm).engine == "torch"
