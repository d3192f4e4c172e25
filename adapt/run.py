"""`mp2a adapt`: encode the domains once, fit a head with the chosen method, write the artifact."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapt.data import UNLABELED, DomainData, check_domains, open_dataset, read_domain
from adapt.features import cached_features
from adapt.models import DEFAULT_MODEL, LoadedModel, load_model
from adapt.text import class_text_features
from mp2a.artifact import ArtifactContents, write_artifact
from mp2a.errors import DataError
from mp2a.head import Head

log = logging.getLogger(__name__)

METHODS = ("zeroshot",)
DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class AdaptRequest:
    data: Path
    target: str
    out: Path
    method: str = "zeroshot"
    sources: tuple[str, ...] | None = None  # None: every other domain
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    seed: int = 0
    template: str | None = None  # None: the dataset's meta.json, else DEFAULT_TEMPLATE
    cache_dir: Path | None = None
    progress: bool = True


@dataclass(frozen=True)
class Encoded:
    """A domain's cached features, with undecodable files already dropped."""

    name: str
    features: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,)
    skipped: int

    @property
    def labeled(self) -> bool:
        return len(self.labels) > 0 and bool((self.labels != UNLABELED).all())


def encode_domain(
    lm: LoadedModel, d: DomainData, cache_dir: Path | None, progress: bool
) -> Encoded:
    feats, valid = cached_features(lm, d.files, cache_dir, progress=progress)
    skipped = int((~valid).sum())
    if skipped:
        log.warning("domain %s: skipped %d undecodable image(s)", d.name, skipped)
    if not valid.any():
        raise DataError(f"no image in domain {d.name!r} could be decoded")
    return Encoded(d.name, feats[valid], d.labels[valid], skipped)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def adapt(req: AdaptRequest) -> dict:
    """Run one adaptation and write the artifact to `req.out`; returns metrics.json's dict."""
    t0 = time.time()
    if req.method not in METHODS:
        raise DataError(f"unknown method {req.method!r}. Available: {', '.join(METHODS)}")
    ds = open_dataset(req.data)
    check_domains(ds, [req.target])
    sources = (
        list(req.sources) if req.sources is not None else [d for d in ds.domains if d != req.target]
    )
    check_domains(ds, sources)
    if not sources:
        raise DataError(
            f"no source domain: {ds.root} has only {req.target!r}; add labeled source domains "
            "(every artifact keeps source features for online re-adaptation)"
        )
    if req.target in sources:
        raise DataError(f"target {req.target!r} cannot also be a source; drop it from --sources")
    template = req.template or ds.prompt_template or DEFAULT_TEMPLATE

    lm = load_model(req.model, req.pretrained)
    target = encode_domain(lm, read_domain(ds, req.target), req.cache_dir, req.progress)
    srcs = [encode_domain(lm, read_domain(ds, s), req.cache_dir, req.progress) for s in sources]
    for s in srcs:
        if not s.labeled:
            raise DataError(f"source domain {s.name!r} has unlabeled images; sources need labels")

    text = class_text_features(lm, ds.classes, template).numpy()  # (C, D)
    head = Head(weight=text[None], logit_scale=float(lm.model.logit_scale.exp()))
    per_stage: list[dict] = []

    target_acc = accuracy(head.probs(target.features), target.labels) if target.labeled else None
    metrics = {
        "method": req.method,
        "target": req.target,
        "sources": sources,
        "target_accuracy": target_acc,
        "source_accuracy": {s.name: accuracy(head.probs(s.features), s.labels) for s in srcs},
        "per_stage": per_stage,
        "n_target": len(target.labels),
        "skipped_images": target.skipped + sum(s.skipped for s in srcs),
        "model": lm.backbone.model,
        "template": template,
        "seed": req.seed,
        "seconds": round(time.time() - t0, 2),
    }
    dim = lm.backbone.embed_dim
    write_artifact(
        req.out,
        ArtifactContents(
            backbone=lm.backbone,
            classes=ds.classes,
            preprocessing=lm.preprocess,
            head=head,
            method=req.method,
            source_features={
                "features": np.concatenate([s.features for s in srcs]).reshape(-1, dim),
                "labels": np.concatenate([s.labels for s in srcs]).astype(np.int64),
                "domains": np.concatenate(
                    [np.full(len(s.labels), i, np.int64) for i, s in enumerate(srcs)]
                ),
            },
            source_domains=sources,
            target_domain=req.target,
            metrics=metrics,
        ),
    )
    return metrics
