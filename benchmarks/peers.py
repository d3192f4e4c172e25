"""Peers of `mp2a bench serving --peers`: LitServe and a plain BentoML service over the same
ONNX encoder and head (benchmarks/peers/*.py, each written as its framework's docs recommend,
batching included), in their own virtual environment so they are never dependencies of mp2a.

The environment is made on first use (MP2A_PEERS_VENV, default ~/.cache/mp2a/peers-venv):
`python -m venv` + `pip install litserve bentoml onnxruntime pillow numpy python-multipart`.
PyTriton is left out: its wheel ships Triton's server binary for a CUDA-enabled build, and
the CPU-only path needs more than a pip install on this kind of machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmarks.procs import free_port, stop_group

log = logging.getLogger(__name__)

PEERS = ("litserve", "bentoml-plain")
PACKAGES = ("litserve", "bentoml", "onnxruntime", "pillow", "numpy", "python-multipart")
APPS = Path(__file__).resolve().parent / "peers"


def venv_dir() -> Path:
    env = os.environ.get("MP2A_PEERS_VENV")
    return Path(env) if env else Path.home() / ".cache" / "mp2a" / "peers-venv"


def ensure_venv() -> Path:
    """The peers' interpreter, installing the environment the first time."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    ok = venv / ".mp2a-installed"
    if not ok.is_file():
        log.info("installing the peers' environment in %s", venv)
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PACKAGES],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        ok.write_text("\n".join(PACKAGES) + "\n")
    return python


def versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "('litserve', 'bentoml', 'onnxruntime', 'pillow', 'numpy')}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def write_model(run: Path, out: Path, precision: str = "fp32") -> Path:
    """The peers' view of an artifact: encoder path, head rows (C, D), logit scale, classes,
    preprocessing (the first prompt row set of the head, as the bench's heads have one)."""
    from mp2a.artifact import load_artifact
    from serving.backends import encoder_path

    art = load_artifact(run)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "head.npy", np.ascontiguousarray(art.head.weight[0], np.float32))  # (C, D)
    spec = art.preprocessing
    cfg = {
        "onnx": str(encoder_path(art, precision)),
        "head": str(out / "head.npy"),
        "logit_scale": float(art.head.logit_scale),
        "classes": list(art.classes),
        "image_size": spec.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
    path = out / "model.json"
    path.write_text(json.dumps(cfg))
    return path


@contextlib.contextmanager
def running_peer(peer: str, model_json: Path, log_file: Path) -> Iterator[str]:
    """One peer server on a free loopback port; yields its base URL (POST /predict)."""
    from benchmarks.serving import wait_ready

    python = ensure_venv()
    port = free_port()
    if peer == "litserve":
        cmd = [str(python), str(APPS / "litserve_app.py"), str(port)]
        ready = "/health"
    elif peer == "bentoml-plain":
        bentoml = str(python.parent / "bentoml")
        cmd = [bentoml, "serve", "bentoml_app:Classifier", "--port", str(port),
               "--host", "127.0.0.1"]  # fmt: skip
        ready = "/readyz"
    else:
        raise ValueError(f"unknown peer {peer!r}; choose one of {', '.join(PEERS)}")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "MP2A_PEER_MODEL": str(model_json),
        "PYTHONPATH": str(APPS),
        "BENTOML_HOME": str(log_file.parent / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(
            cmd, cwd=APPS, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, path=ready)
            yield url
        finally:
            stop_group(proc, group_first=True)
