"""ImageFolder datasets: `root/<domain>/<class>/<image>`, one folder per domain.

Class names come from the class folders (`_` becomes a space) and are shared by all domains.
A domain folder holding images directly (no class folders) is an unlabeled target. Images
that fail to decode are reported and skipped by the feature extractor, never crash a run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from mp2a.errors import DataError

log = logging.getLogger(__name__)

# the formats the server accepts as uploads (serving/decode.py), so that a model never learns
# from pictures its server refuses. TIFF is left out on both sides: its many codecs are a
# decoder risk on an anonymous upload route, and cameras and browsers do not send it.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
REFUSED_SUFFIXES = frozenset({".tif", ".tiff"})
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
        return [label_of(c) for c in self.class_folders]


def _images_in(folder: Path) -> list[Path]:
    files = sorted(folder.iterdir())
    refused = sum(p.suffix.lower() in REFUSED_SUFFIXES for p in files)
    if refused:
        log.warning(
            "%s: skipped %d TIFF image(s): the server does not accept TIFF uploads, so the "
            "model does not learn from it either; convert them to PNG to use them",
            folder,
            refused,
        )
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def open_dataset(root: Path | str) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; point --data at a folder of your images laid "
            "out DIR/<domain>/<class>/<image> (README: Your own data), or build the benchmark "
            "with `mp2a data digits --out DIR`"
        )
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
    check_unique_labels(root, class_folders)
    return Dataset(root, domains, class_folders, template)


def label_of(folder: str) -> str:
    """A class folder's label: `_` becomes a space (`desk_chair` -> "desk chair")."""
    return folder.replace("_", " ")


def check_unique_labels(root: Path, class_folders: list[str]) -> None:
    """Two folders that give one label (`desk_chair` and `desk chair`) would merge two
    classes in every answer and metric: refuse, naming both."""
    seen: dict[str, str] = {}
    for c in class_folders:
        other = seen.setdefault(label_of(c), c)
        if other != c:
            raise DataError(
                f"class folders {other!r} and {c!r} in {root} both give the label "
                f"{label_of(c)!r} (`_` reads as a space); rename or merge one of them"
            )


class LabeledDomain(Protocol):
    name: str
    labels: np.ndarray

    @property
    def labeled(self) -> bool: ...


def warn_missing_classes(ds: Dataset, domains: Sequence[LabeledDomain], target: str) -> list[str]:
    """One warning per labeled domain that lacks some classes, and one for the classes only
    the target has (no source teaches them). Returns the warnings (also logged)."""
    out: list[str] = []
    classes = ds.classes
    present: dict[str, set[int]] = {}
    for d in domains:
        if not d.labeled:
            continue
        present[d.name] = set(np.unique(d.labels).tolist())
        missing = [classes[i] for i in range(len(classes)) if i not in present[d.name]]
        if missing:
            out.append(
                f"domain {d.name!r} has no images of {len(missing)} class(es): "
                + ", ".join(repr(m) for m in missing)
            )
    sources = [n for n in present if n != target]
    if target in present and sources:
        taught = set().union(*(present[n] for n in sources))
        only = [classes[i] for i in sorted(present[target] - taught)]
        if only:
            out.append(
                "class(es) only the target has (no source domain teaches them): "
                + ", ".join(repr(m) for m in only)
            )
    for w in out:
        log.warning("%s", w)
    return out


def check_domains(ds: Dataset, names: list[str]) -> None:
    for n in names:
        if n not in ds.domains:
            raise DataError(
                f"unknown domain {n!r} in {ds.root}. Available: {', '.join(ds.domains)}"
            )


def split_file(ds: Dataset, name: str, split: str) -> Path:
    """DomainNet-style split list: root/<domain>_<split>.txt with `relative/path label` lines."""
    return ds.root / f"{name}_{split}.txt"


def has_splits(ds: Dataset, name: str) -> bool:
    return split_file(ds, name, "train").is_file() and split_file(ds, name, "test").is_file()


def _read_split(ds: Dataset, name: str, split: str) -> tuple[list[Path], list[int]]:
    """Files of a split list; the label comes from the class folder in the path."""
    index = {c: i for i, c in enumerate(ds.class_folders)}
    files, labels = [], []
    path = split_file(ds, name, split)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rel = Path(line.split()[0])
        if len(rel.parts) < 3 or rel.parts[-2] not in index:
            raise DataError(f"{path}:{n}: expected '<domain>/<class>/<file> <label>', got {line!r}")
        files.append(ds.root / rel)
        labels.append(index[rel.parts[-2]])
    return files, labels


def read_domain(ds: Dataset, name: str, split: str | None = None) -> DomainData:
    """All images of a domain, or those of a split list (`split` = train/test) when given."""
    check_domains(ds, [name])
    folder = ds.root / name
    if split is not None:
        if not split_file(ds, name, split).is_file():
            raise DataError(f"no split list {split_file(ds, name, split)}")
        files, labels = _read_split(ds, name, split)
    else:
        files = _images_in(folder)
        labels = [UNLABELED] * len(files)
        for idx, c in enumerate(ds.class_folders):
            if (folder / c).is_dir():
                imgs = _images_in(folder / c)
                files += imgs
                labels += [idx] * len(imgs)
    if not files:
        raise DataError(
            f"domain {name!r} in {ds.root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return DomainData(name, files, np.asarray(labels, np.int64))
