"""serving.backends / serving.launch: errors that say how to fix the artifact or the choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mp2a.artifact import ArtifactContents, Backbone, load_artifact, write_artifact
from mp2a.cli import main
from mp2a.errors import ArtifactError, Mp2aError
from mp2a.head import Head, l2_normalize
from mp2a.preprocess import PreprocessSpec
from serving.backends import encoder_path, load_backend


@pytest.fixture
def run(tmp_path) -> Path:
    w = l2_normalize(np.random.default_rng(0).normal(size=(1, 3, 8))).astype(np.float32)
    return write_artifact(
        tmp_path / "run",
        ArtifactContents(
            backbone=Backbone("tiny-digits", None, "a" * 64, 8),
            classes=["a", "b", "c"],
            preprocessing=PreprocessSpec(16),
            head=Head(w, 10.0),
            method="zeroshot",
            source_features={"features": np.zeros((1, 8), np.float32)},
            source_domains=[],
            target_domain=None,
            metrics={},
        ),
    )


def test_missing_export_names_the_command(run):
    with pytest.raises(ArtifactError, match=r"mp2a export .* --format onnx"):
        encoder_path(load_artifact(run))


def test_stale_export_is_refused(run):
    (run / "export").mkdir()
    (run / "export" / "image_encoder.onnx").write_bytes(b"onnx")
    (run / "export" / "export.json").write_text(json.dumps({"weights_sha256": "b" * 64}))
    with pytest.raises(ArtifactError, match="other weights"):
        encoder_path(load_artifact(run))
    (run / "export" / "export.json").write_text(json.dumps({"weights_sha256": "a" * 64}))
    assert encoder_path(load_artifact(run)).name == "image_encoder.onnx"


def test_unknown_backend_lists_the_choices(run, capsys):
    with pytest.raises(Mp2aError, match="Available: ort, torch"):
        load_backend("tensorflow", load_artifact(run))
    assert main(["serve", str(run), "--backend", "tensorflow"]) == 2
    assert "Available: ort, torch" in capsys.readouterr().err


def test_int8_encoder_is_named_by_its_export_format(run):
    with pytest.raises(ArtifactError, match=r"--format onnx-int8"):
        encoder_path(load_artifact(run), "int8")
    with pytest.raises(Mp2aError, match="Available: fp32, int8"):
        encoder_path(load_artifact(run), "fp16")
