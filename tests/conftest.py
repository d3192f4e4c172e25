"""Shared fixtures: tiny real models and datasets built on the fly (no mocks, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MICRO_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 16,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    },
    "preprocess_cfg": {
        "size": 16,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # markers by folder
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised micro CLIP saved as a model folder (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("micro-clip")
    (d / "open_clip_config.json").write_text(json.dumps(MICRO_CONFIG))
    torch.manual_seed(0)
    m = open_clip.create_model("local-dir:" + str(d), load_weights=False)
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items()},
        str(d / "open_clip_model.safetensors"),
    )
    return d


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DigitsDA tree (all four domains)."""
    from adapt.digits import build_digits

    root = tmp_path_factory.mktemp("digits") / "digits"
    build_digits(root, seed=0, per_class=4)
    return root


@pytest.fixture(scope="session")
def street_run(tmp_path_factory: pytest.TempPathFactory, digits_small: Path) -> Path:
    """A zero-shot tiny-CLIP artifact on DigitsDA street with its ONNX export (built once)."""
    from export.run import export
    from mp2a.cli import main

    base = tmp_path_factory.getbasetemp()
    out = base / "street-run"
    args = ["adapt", "--data", str(digits_small), "--target", "street", "--method", "zeroshot"]
    assert main([*args, "--out", str(out), "--no-cache", "--quiet"]) == 0
    export(out, "onnx", cache_dir=base / "street-onnx-cache")
    return out


@pytest.fixture(scope="session")
def transductive_run(tmp_path_factory: pytest.TempPathFactory, digits_small: Path) -> Path:
    """A `--method transductive` tiny-CLIP artifact on DigitsDA street (a head of a prompt row
    and a prototype row with its own scale, bias and weight), exported to ONNX."""
    from export.run import export
    from mp2a.cli import main

    base = tmp_path_factory.getbasetemp()
    out = base / "street-transductive-run"
    args = ["adapt", "--data", str(digits_small), "--target", "street", "--method", "transductive"]
    assert main([*args, "--out", str(out), "--no-cache", "--quiet"]) == 0
    export(out, "onnx", cache_dir=base / "street-onnx-cache")
    return out


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL 15 (Debian's package) in a temp folder on a free loopback port."""
    from benchmarks.pgserver import INSTALL_HINT, PgServer, pg_bindir

    if pg_bindir() is None:
        pytest.fail(f"needs the PostgreSQL server ({INSTALL_HINT}); `make test` installs it")
    server = PgServer().start()
    yield server
    server.destroy()


@pytest.fixture
def pg_dsn(pg_server) -> str:
    """A fresh database of the session's server, for one test."""
    import uuid

    return pg_server.create_db(f"t_{uuid.uuid4().hex[:12]}")
