import json

import numpy as np
import pytest

from mp2a.artifact import (
    HEAD_FILE,
    MANIFEST,
    ArtifactContents,
    Backbone,
    load_artifact,
    write_artifact,
)
from mp2a.errors import ArtifactError
from mp2a.head import Head, l2_normalize
from mp2a.preprocess import PreprocessSpec


def small_contents(seed: int = 0, version: int = 1) -> ArtifactContents:
    rng = np.random.default_rng(seed)
    w = l2_normalize(rng.normal(size=(2, 3, 8)).astype(np.float32))
    return ArtifactContents(
        backbone=Backbone("tiny-digits", None, "ab" * 32, 8),
        classes=["zero", "one", "two"],
        preprocessing=PreprocessSpec(32),
        head=Head(w, 50.0),
        method="zeroshot",
        source_features={
            "features": rng.normal(size=(5, 8)).astype(np.float32),
            "labels": np.arange(5, dtype=np.int64) % 3,
            "domains": np.zeros(5, np.int64),
        },
        source_domains=["printed"],
        target_domain="street",
        metrics={"method": "zeroshot", "target_accuracy": 0.5},
        extra_files={"report.png": b"\x89PNG fake bytes"},
        version=version,
    )


def test_round_trip(tmp_path):
    c = small_contents()
    write_artifact(tmp_path / "run", c)
    a = load_artifact(tmp_path / "run")
    np.testing.assert_array_equal(a.head.weight, c.head.weight)
    assert a.head.logit_scale == pytest.approx(50.0)
    assert a.classes == c.classes
    assert a.preprocessing == c.preprocessing
    assert a.backbone == c.backbone
    assert a.version == 1 and a.manifest["parent_version"] is None
    np.testing.assert_array_equal(
        a.tensors("source_features.safetensors")["labels"], c.source_features["labels"]
    )
    assert a.metrics()["target_accuracy"] == 0.5
    assert set(a.manifest["files"]) == {
        HEAD_FILE,
        "source_features.safetensors",
        "metrics.json",
        "report.png",
    }
    # no temporary folders left behind
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_rewrite_replaces_whole_artifact(tmp_path):
    write_artifact(tmp_path / "run", small_contents(0))
    (tmp_path / "run" / "export").mkdir()
    (tmp_path / "run" / "export" / "kept.txt").write_text("x")
    write_artifact(tmp_path / "run", small_contents(1, version=2))
    a = load_artifact(tmp_path / "run")
    assert a.version == 2
    np.testing.assert_array_equal(a.head.weight, small_contents(1).head.weight)
    assert (tmp_path / "run" / "export" / "kept.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("victim", [HEAD_FILE, "source_features.safetensors", "metrics.json"])
def test_corrupted_file_is_refused(tmp_path, victim):
    write_artifact(tmp_path / "run", small_contents())
    f = tmp_path / "run" / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{victim} fails its sha256 check"):
        load_artifact(tmp_path / "run")


def test_missing_file_and_missing_manifest(tmp_path):
    write_artifact(tmp_path / "run", small_contents())
    (tmp_path / "run" / HEAD_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(tmp_path / "run")
    with pytest.raises(ArtifactError, match="not an mp2a artifact"):
        load_artifact(tmp_path / "nowhere")


def test_bad_manifest_json(tmp_path):
    write_artifact(tmp_path / "run", small_contents())
    (tmp_path / "run" / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(tmp_path / "run")
    (tmp_path / "run" / MANIFEST).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version"):
        load_artifact(tmp_path / "run")


def test_refuses_to_overwrite_non_artifact(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not an mp2a artifact"):
        write_artifact(tmp_path / "run", small_contents())
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_head_probs_average_of_softmaxes():
    rng = np.random.default_rng(0)
    w = l2_normalize(rng.normal(size=(3, 4, 6)).astype(np.float32))
    f = l2_normalize(rng.normal(size=(5, 6)).astype(np.float32))
    p = Head(w, 10.0).probs(f)
    want = np.zeros((5, 4))
    for s in range(3):
        logits = 10.0 * f @ w[s].T
        e = np.exp(logits - logits.max(1, keepdims=True))
        want += e / e.sum(1, keepdims=True) / 3
    np.testing.assert_allclose(p, want, rtol=1e-5)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)


def test_a_head_of_rows_round_trips_and_says_which_rows_are_prototypes(tmp_path):
    """K rows with their own scale, bias and mixing weight; the manifest names each row's
    kind; prompt_head() is the prompt rows alone."""
    c = small_contents()
    rng = np.random.default_rng(1)
    w = l2_normalize(rng.normal(size=(3, 3, 8)).astype(np.float32))
    c.head = Head(
        w,
        50.0,
        row_scale=np.array([50.0, 50.0, 1.0], np.float32),
        row_bias=np.array([[0, 0, 0], [0, 0, 0], [0.5, -1.0, 0.2]], np.float32),
        row_weight=np.array([0.05, 0.05, 0.9], np.float32),
    )
    c.head_rows = [
        {"kind": "prompt", "source": "printed"},
        {"kind": "prompt"},
        {"kind": "prototype"},
    ]
    write_artifact(tmp_path / "run", c)
    a = load_artifact(tmp_path / "run")
    f = l2_normalize(rng.normal(size=(6, 8)).astype(np.float32))
    np.testing.assert_allclose(a.head.probs(f), c.head.probs(f), atol=1e-6)
    assert [r["kind"] for r in a.manifest["head_rows"]] == ["prompt", "prompt", "prototype"]
    prompts = a.prompt_head()
    assert prompts.num_rows == 2
    np.testing.assert_allclose(prompts.weights(), [0.5, 0.5])
    np.testing.assert_allclose(prompts.probs(f), Head(w[:2], 50.0).probs(f), atol=1e-6)
    # the mixture is what the docstring says: sum_k a_k softmax(s_k f.W_k + b_k)
    logits = np.einsum("bd,kcd->kbc", f, w) * c.head.scales()[:, None, None]
    logits = logits + c.head.biases()[:, None, :]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        a.head.probs(f), np.einsum("k,kbc->bc", [0.05, 0.05, 0.9], p), atol=1e-6
    )


def test_a_head_written_before_rows_had_figures_loads_as_the_mean_of_its_rows(tmp_path):
    from safetensors.numpy import save_file

    from mp2a.artifact import sha256_file

    c = small_contents()
    write_artifact(tmp_path / "run", c)
    run = tmp_path / "run"
    manifest = json.loads((run / MANIFEST).read_text())
    del manifest["head_rows"]  # an artifact of an earlier mp2a
    save_file(
        {"weight": c.head.weight, "logit_scale": np.array([50.0], np.float32)}, str(run / HEAD_FILE)
    )
    manifest["files"][HEAD_FILE] = sha256_file(run / HEAD_FILE)
    (run / MANIFEST).write_text(json.dumps(manifest))
    a = load_artifact(run)
    assert a.head.is_plain and a.prompt_head() is a.head
    f = l2_normalize(np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32))
    logits = 50.0 * np.einsum("bd,scd->sbc", f, c.head.weight)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(a.head.probs(f), (p / p.sum(-1, keepdims=True)).mean(0), atol=1e-6)


def test_bad_row_figures_are_refused():
    w = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="row_scale must have shape"):
        Head(w, 1.0, row_scale=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="sum to 1"):
        Head(w, 1.0, row_weight=np.array([0.7, 0.7], np.float32))


def test_rewrite_drops_the_exports_made_for_the_old_head(tmp_path):
    """A new head keeps the encoders of its backbone but not what was fused with or measured
    through the old head; another backbone keeps nothing (serve then exports afresh)."""
    import dataclasses

    run = tmp_path / "run"
    write_artifact(run, small_contents(0))
    export = run / "export"
    export.mkdir()
    for name in ("image_encoder.onnx", "export.json", "edge_model.onnx", "parity.json"):
        (export / name).write_text(name)
    (export / "parity-onnx.json").write_text("{}")
    write_artifact(run, small_contents(1, version=2))
    assert sorted(p.name for p in export.iterdir()) == ["export.json", "image_encoder.onnx"]

    other = dataclasses.replace(small_contents(2), backbone=Backbone("other", None, "cd" * 32, 8))
    write_artifact(run, other)
    assert not export.exists()
    assert load_artifact(run).backbone.model == "other"
