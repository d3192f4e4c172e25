"""ImageFolder datasets: `root/<domain>/<class>/<image>`, one folder per domain.

Class names come from the class folders (`_` becomes a space) and are shared by all domains.
A domain folder holding images directly (no class folders) is an unlabeled target. Images
that fail to decode are reported and skipped by the feature extractor, never crash a run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mp2a.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
UNLABELED = -1


@dataclass(frozen=True)
class DomainData:
    name: str
    files: list[Path]
    labels: np.ndarray  # (N,) int64 class index, UNLABELED where unknown

    @property
    def labeled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels != UNLABELED).all())


@dataclass(frozen=True)
class Dataset:
    root: Path
    domains: list[str]
    class_folders: list[str]
    prompt_template: str | None  # from meta.json when the dataset suggests one

    @property
    def classes(self) -> list[str]:
        return [c.replace("_", " ") for c in self.class_folders]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def open_dataset(root: Path | str) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; create one with `mp2a data digits`")
    domains = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not domains:
        raise DataError(f"{root} has no domain folders; expected {root}/<domain>/<class>/<image>")
    class_folders = sorted({c.name for d in domains for c in (root / d).iterdir() if c.is_dir()})
    if not class_folders:
        raise DataError(f"{root} has no class folders; expected {root}/<domain>/<class>/<image>")
    template = None
    meta = root / "meta.json"
    if meta.is_file():  # a dataset may name its prompt template and its class order
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta} is not valid JSON: {e}") from e
        template = info.get("prompt_template")
        if sorted(info.get("classes", [])) == class_folders:
            class_folders = list(info["classes"])
    return Dataset(root, domains, class_folders, template)


def check_domains(ds: Dataset, names: list[str]) -> None:
    for n in names:
        if n not in ds.domains:
            raise DataError(
                f"unknown domain {n!r} in {ds.root}. Available: {', '.join(ds.domains)}"
            )


def read_domain(ds: Dataset, name: str) -> DomainData:
    check_domains(ds, [name])
    folder = ds.root / name
    files: list[Path] = _images_in(folder)
    labels = [UNLABELED] * len(files)
    for idx, c in enumerate(ds.class_folders):
        if (folder / c).is_dir():
            imgs = _images_in(folder / c)
            files += imgs
            labels += [idx] * len(imgs)
    if not files:
        raise DataError(
            f"domain {name!r} in {ds.root} holds no images ({', '.join(IMAGE_SUFFIXES)})"
        )
    return DomainData(name, files, np.asarray(labels, np.int64))
