"""`mp2a export` on a real artifact: ONNX Runtime against PyTorch on real target images."""

import json
import shutil

import numpy as np
import pytest

from export.run import ENCODER, ENCODER_INT8, export
from mp2a.artifact import load_artifact
from mp2a.cli import main
from mp2a.preprocess import preprocess_batch
from mp2a.runtime import OrtEncoder, has_nvidia_gpu


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, street_run):
    """A copy of the shared zero-shot street artifact, before any export."""
    out = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(street_run, out, ignore=shutil.ignore_patterns("export"))
    return out


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def test_fp32_parity_and_reuse(run_dir, onnx_cache):
    r = export(run_dir, "onnx", cache_dir=onnx_cache)
    assert r["passed"] and r["n"] == 40
    assert r["top1_agreement"] >= 0.995 and r["max_abs_diff"] <= 1e-4
    saved = json.loads((run_dir / "export" / "parity.json").read_text())
    assert saved["format"] == "onnx" and saved["top1_agreement"] == r["top1_agreement"]
    assert r["encoder_reused"] is False
    enc = run_dir / "export" / ENCODER
    mtime = enc.stat().st_mtime_ns
    again = export(run_dir, "onnx", cache_dir=onnx_cache)
    assert again["encoder_reused"] is True and enc.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_dynamic_batch(run_dir, onnx_cache, batch):
    export(run_dir, "onnx", cache_dir=onnx_cache)
    enc = OrtEncoder(run_dir / "export" / ENCODER, ["CPUExecutionProvider"])
    x = np.random.default_rng(batch).normal(size=(batch, 3, 32, 32)).astype(np.float32)
    y = enc(x)
    assert y.shape == (batch, 128)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # each row depends only on its own image
    np.testing.assert_allclose(enc(x[:1]), y[:1], atol=1e-5)


def test_fused_edge_model_equals_encoder_plus_head(run_dir, onnx_cache, digits_small):
    from PIL import Image

    export(run_dir, "onnx", cache_dir=onnx_cache)
    art = load_artifact(run_dir)
    files = sorted((digits_small / "street" / "three").iterdir())
    x = preprocess_batch([Image.open(f) for f in files], art.preprocessing)
    emb = OrtEncoder(run_dir / "export" / ENCODER, ["CPUExecutionProvider"])(x)
    probs = OrtEncoder(run_dir / "export" / "edge_model.onnx", ["CPUExecutionProvider"])(x)
    assert probs.shape == (len(files), 10)
    np.testing.assert_allclose(probs, art.head.probs(emb), atol=1e-5)


def test_fused_edge_model_of_a_head_with_a_prototype_row(transductive_run, digits_small):
    """Rows with their own scale, bias and mixing weight fuse into plain ONNX operators."""
    from PIL import Image

    art = load_artifact(transductive_run)
    assert art.head.num_rows == 2 and not art.head.is_plain
    assert [r["kind"] for r in art.manifest["head_rows"]] == ["prompt", "prototype"]
    files = sorted((digits_small / "street").glob("*/*.png"))
    x = preprocess_batch([Image.open(f) for f in files], art.preprocessing)
    export_dir = transductive_run / "export"
    emb = OrtEncoder(export_dir / ENCODER, ["CPUExecutionProvider"])(x)
    probs = OrtEncoder(export_dir / "edge_model.onnx", ["CPUExecutionProvider"])(x)
    np.testing.assert_allclose(probs, art.head.probs(emb), atol=1e-5)
    parity = json.loads((export_dir / "parity.json").read_text())
    assert parity["top1_agreement"] >= 0.995


def test_int8_parity(run_dir, onnx_cache):
    r = export(run_dir, "onnx-int8", cache_dir=onnx_cache)
    assert (run_dir / "export" / ENCODER_INT8).is_file()
    assert r["passed"] and r["top1_agreement"] >= 0.97
    assert r["kept_fp32"] and r["quantized_nodes"] > 0
    assert abs(r["accuracy_delta_vs_fp32"]) <= 0.05  # 40 images: one error is 2.5 points
    assert r["max_abs_diff"] > 0  # really quantized


def test_damaged_artifact_is_refused(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    (bad / "head.safetensors").write_bytes(b"\x00" * 64)
    assert main(["export", str(bad), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert "fails its sha256 check" in err and err.count("\n") == 1


@pytest.mark.skipif(has_nvidia_gpu(), reason="checks the message shown on machines without a GPU")
def test_tensorrt_without_gpu_is_one_clear_line(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "tensorrt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "needs a CUDA GPU" in err and "gpu" in err


@pytest.mark.gpu
@pytest.mark.skipif(not has_nvidia_gpu(), reason="needs a CUDA device")
def test_tensorrt_parity_on_gpu(run_dir, onnx_cache):
    r = export(run_dir, "tensorrt", cache_dir=onnx_cache)
    assert r["passed"] and r["top1_agreement"] >= 0.99
