"""End-to-end `mp2a adapt --method zeroshot`, on the micro model and on the real tiny CLIP."""

import json
import shutil

import numpy as np
import pytest

from adapt.data import open_dataset, read_domain
from adapt.features import encode_files
from adapt.models import load_model
from mp2a.artifact import load_artifact
from mp2a.cli import main


def test_zeroshot_artifact(tmp_path, digits_small, micro_model_dir, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "adapt",
            "--data",
            str(digits_small),
            "--target",
            "street",
            "--method",
            "zeroshot",
            "--model",
            str(micro_model_dir),
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--quiet",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    art = load_artifact(out)
    m = art.metrics()
    assert summary["target_accuracy"] == m["target_accuracy"]
    assert {"method", "target", "target_accuracy", "per_stage", "seconds"} <= set(m)
    assert m["method"] == "zeroshot" and m["target"] == "street" and m["per_stage"] == []
    assert sorted(m["sources"]) == ["handwritten", "printed", "textured"]
    assert art.manifest["source_domains"] == m["sources"]
    assert art.classes[:3] == ["zero", "one", "two"]
    assert art.head.weight.shape == (1, 10, 32)
    sf = art.tensors("source_features.safetensors")
    assert sf["features"].shape == (3 * 40, 32)
    assert np.bincount(sf["labels"]).tolist() == [12] * 10
    # served-style probabilities from the artifact equal a fresh evaluation
    lm = load_model(str(micro_model_dir))
    d = read_domain(open_dataset(digits_small), "street")
    f, _ = encode_files(lm, d.files, progress=False)
    acc = float((art.head.probs(f).argmax(1) == d.labels).mean())
    assert acc == pytest.approx(m["target_accuracy"])


def test_unlabeled_target_and_broken_image(tmp_path, digits_small, micro_model_dir, capsys):
    root = tmp_path / "data"
    shutil.copytree(digits_small, root)
    flat = root / "camera"  # an unlabeled target: images directly in the domain folder
    flat.mkdir()
    for i, p in enumerate(sorted((root / "street" / "seven").iterdir())):
        shutil.copy(p, flat / f"{i}.png")
    (flat / "broken.png").write_bytes(b"not an image")
    code = main(
        [
            "adapt",
            "--data",
            str(root),
            "--target",
            "camera",
            "--sources",
            "printed,textured",
            "--model",
            str(micro_model_dir),
            "--out",
            str(tmp_path / "run"),
            "--no-cache",
            "--quiet",
        ]
    )
    assert code == 0
    m = load_artifact(tmp_path / "run").metrics()
    assert m["target_accuracy"] is None
    assert m["n_target"] == 4 and m["skipped_images"] == 1


def test_tiny_clip_offline_meets_printed_target(tmp_path, monkeypatch):
    """The embedded tiny CLIP loads with no network and reads printed digits zero-shot."""
    from adapt.digits import build_digits

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "digits"
    build_digits(root, seed=1, per_class=20)
    code = main(
        [
            "adapt",
            "--data",
            str(root),
            "--target",
            "printed",
            "--out",
            str(tmp_path / "run"),
            "--no-cache",
            "--quiet",
        ]
    )
    assert code == 0
    acc = load_artifact(tmp_path / "run").metrics()["target_accuracy"]
    assert acc >= 0.85, f"printed zero-shot accuracy {acc:.3f} below the 85 % target"
