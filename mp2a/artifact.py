"""The model artifact: a folder that describes itself.

    RUN/manifest.json              format version, backbone, classes, preprocessing, version,
                                   parent version, created_at, sha256 of every file
    RUN/head.safetensors           weight (K, C, D), logit_scale (1,), and where a row has its
                                   own figures row_scale (K,), row_bias (K, C), row_weight (K,)
                                   (mp2a/head.py); manifest `head_rows` names each row's kind
    RUN/prompts.safetensors        learned prompt context (absent for zero-shot)
    RUN/source_features.safetensors  features (N, D), labels (N,), domains (N,)
    RUN/metrics.json, RUN/report.png

Writes are atomic: everything goes to a temporary sibling folder, each file is fsynced, then
the folder is renamed into place. Loading verifies every checksum and refuses a damaged
artifact with a message that names the bad file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from mp2a.errors import ArtifactError
from mp2a.head import PROMPT, Head
from mp2a.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
PROMPTS_FILE = "prompts.safetensors"
SOURCE_FEATURES_FILE = "source_features.safetensors"
METRICS_FILE = "metrics.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Backbone:
    """What rebuilds the frozen encoders: a model reference and its weights."""

    model: str  # open_clip name, built-in name (tiny-digits) or local path
    pretrained: str | None  # tag or path of the weights, None for the built-in checkpoint
    weights_sha256: str
    embed_dim: int

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
            "embed_dim": self.embed_dim,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Backbone:
        return cls(d["model"], d.get("pretrained"), d["weights_sha256"], int(d["embed_dim"]))


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict
    head: Head

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def backbone(self) -> Backbone:
        return Backbone.from_dict(self.manifest["backbone"])

    @property
    def preprocessing(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.manifest["preprocessing"])

    def prompt_head(self) -> Head:
        """The head's prompt rows alone (manifest `head_rows`; an artifact without it has
        prompt rows only)."""
        rows = self.manifest.get("head_rows") or []
        idx = [i for i, r in enumerate(rows) if r.get("kind") == PROMPT]
        if not rows or len(rows) != self.head.num_rows or not idx:
            return self.head
        return self.head.rows(idx)

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        """Load one of the artifact's safetensors files (already checksum-verified)."""
        return load_file(str(self.path / name))

    def metrics(self) -> dict:
        return json.loads((self.path / METRICS_FILE).read_text())


@dataclass
class ArtifactContents:
    """Everything `write_artifact` needs; files are written in this order."""

    backbone: Backbone
    classes: list[str]
    preprocessing: PreprocessSpec
    head: Head
    method: str
    source_features: dict[str, np.ndarray]
    source_domains: list[str]
    target_domain: str | None
    metrics: dict
    prompts: dict[str, np.ndarray] | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)  # e.g. report.png
    prompt_config: dict | None = None  # what rebuilds the prompt learner from prompts
    head_rows: list[dict] | None = None  # per head row {"kind": prompt|prototype, ...}
    version: int = 1
    parent_version: int | None = None


def head_rows(head: Head, rows: list[dict] | None) -> list[dict]:
    """The manifest's description of each head row; without one, every row is a prompt row
    (what every head was before prototype rows)."""
    if rows is None:
        return [{"kind": PROMPT} for _ in range(head.num_rows)]
    if len(rows) != head.num_rows:
        raise ValueError(f"{len(rows)} row descriptions for a head of {head.num_rows} rows")
    return [dict(r) for r in rows]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


# export files made from the head (they go stale with a new head, the encoders do not)
HEAD_EXPORTS = ("edge_model.onnx",)


def _carry_export(old: Path, manifest: dict, new: Path) -> list[str]:
    """Copy old/export into the new artifact as far as it still matches it; returns the
    names left behind. The encoders hold for the same backbone and preprocessing; a fused
    head model and the parity reports (measured through the old head) do not, and nothing
    does for another backbone, so that `mp2a serve` exports afresh instead of serving a
    mismatched encoder."""
    src = old / "export"
    if not src.is_dir():
        return []
    names = sorted(p.name for p in src.iterdir())
    try:
        before = json.loads((old / MANIFEST).read_text())
        now = json.loads(json.dumps(manifest))  # tuples read back as lists
        same = all(before.get(k) == now[k] for k in ("backbone", "preprocessing"))
    except (OSError, ValueError):
        same = False
    if not same:
        return names
    stale = [n for n in names if n in HEAD_EXPORTS or n.startswith("parity")]
    shutil.copytree(src, new / "export", ignore=lambda _d, _n: stale)
    return stale


def write_artifact(out: Path, c: ArtifactContents) -> Path:
    """Write an artifact atomically to `out`; an existing artifact there is replaced whole."""
    out = Path(out)
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not (out / MANIFEST).is_file():
        raise ArtifactError(
            f"{out} exists and is not an mp2a artifact; choose another --out or remove it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_tensors(tmp / HEAD_FILE, c.head.tensors())
        if c.prompts is not None:
            save_tensors(tmp / PROMPTS_FILE, c.prompts)
        save_tensors(tmp / SOURCE_FEATURES_FILE, c.source_features)
        write_json(tmp / METRICS_FILE, c.metrics)
        for name, data in c.extra_files.items():
            write_bytes(tmp / name, data)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": c.version,
            "parent_version": c.parent_version,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": c.method,
            "backbone": c.backbone.to_dict(),
            "classes": list(c.classes),
            "preprocessing": c.preprocessing.to_dict(),
            "source_domains": list(c.source_domains),
            "target_domain": c.target_domain,
            "prompt": c.prompt_config,
            "head_rows": head_rows(c.head, c.head_rows),
            "files": files,
        }
        write_json(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        if out.exists():
            # Keep anything added later beside the model files (exports) across a rewrite.
            dropped = _carry_export(out, manifest, tmp)
            if dropped:
                log.warning(
                    "%s/export: removed %s (made for the previous model); run `mp2a export %s "
                    "--format onnx` again for them",
                    out,
                    ", ".join(dropped),
                    out,
                )
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_artifact(path: Path | str) -> Artifact:
    """Load and verify an artifact; raises ArtifactError naming what is wrong."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(
            f"{path} is not an mp2a artifact (no {MANIFEST}); create one with `mp2a adapt --out`"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); the artifact is damaged") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: unsupported format_version {manifest.get('format_version')!r}; "
            f"this mp2a reads version {FORMAT_VERSION}"
        )
    files = manifest.get("files", {})
    for required in (HEAD_FILE, SOURCE_FEATURES_FILE, METRICS_FILE):
        if required not in files:
            raise ArtifactError(f"{mpath} lists no {required}; the artifact is incomplete")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f} is missing; the artifact is incomplete, re-create it")
        if sha256_file(f) != digest:
            raise ArtifactError(
                f"{f} fails its sha256 check; the artifact is damaged, re-create or restore it"
            )
    try:
        t = load_file(str(path / HEAD_FILE))
        head = Head.from_tensors(t)
    except Exception as e:  # a checksummed but malformed head is a writer bug, still refuse
        raise ArtifactError(f"{path / HEAD_FILE} cannot be read as a head: {e}") from e
    if head.num_classes != len(manifest["classes"]):
        raise ArtifactError(
            f"{path}: head has {head.num_classes} classes, manifest lists "
            f"{len(manifest['classes'])}"
        )
    return Artifact(path=path, manifest=manifest, head=head)
