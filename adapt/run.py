"""`mp2a adapt`: encode the domains once, fit a head with the chosen method, write the artifact.

Methods share one code path: `zeroshot` (hand prompt), `transductive` (the zero-shot head
refined with the target's cluster structure, adapt/transductive.py, plus a prototype row),
`source-only`, `oneshot`, `mp2a` (progressive multi-prompt alignment as published,
adapt/progressive.py) and `mp2a-t` (MP²A on refined pseudo-labels, with a prototype row).
Target labels, when the target has them, are used only inside `_evaluator` for reporting.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapt.data import (
    UNLABELED,
    Dataset,
    DomainData,
    check_domains,
    has_splits,
    open_dataset,
    warn_missing_classes,
)
from adapt.data import read_domain as _read_domain
from adapt.features import Extractor, cached_features, extractor
from adapt.models import DEFAULT_MODEL, LoadedModel, load_model
from adapt.progressive import Evaluate, FitConfig, fit
from adapt.prompts import MultiPromptLearner
from adapt.text import class_text_features
from adapt.transductive import prototype_head, refine
from mp2a.artifact import ArtifactContents, write_artifact, write_json
from mp2a.errors import DataError
from mp2a.head import PROMPT, PROTOTYPE, Head

log = logging.getLogger(__name__)

METHODS = ("zeroshot", "transductive", "source-only", "oneshot", "mp2a", "mp2a-t")
PROMPT_METHODS = ("source-only", "oneshot", "mp2a", "mp2a-t")  # the ones that learn prompts
DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class AdaptRequest:
    data: Path
    target: str
    out: Path
    method: str = "mp2a"
    sources: tuple[str, ...] | None = None  # None: every other domain
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    seed: int = 0
    template: str | None = None  # None: the dataset's meta.json, else DEFAULT_TEMPLATE
    fit: FitConfig = dataclasses.field(default_factory=FitConfig)
    cache_dir: Path | None = None
    progress: bool = True
    force: bool = False  # replace a run folder holding online state (traffic, versions)


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
    lm: LoadedModel,
    d: DomainData,
    cache_dir: Path | None,
    progress: bool,
    engine: Extractor | None = None,
) -> Encoded:
    feats, valid = cached_features(lm, d.files, cache_dir, progress=progress, engine=engine)
    skipped = int((~valid).sum())
    if skipped:
        log.warning("domain %s: skipped %d undecodable image(s)", d.name, skipped)
    if not valid.any():
        raise DataError(f"no image in domain {d.name!r} could be decoded")
    return Encoded(d.name, feats[valid], d.labels[valid], skipped)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean())


def _evaluator(target: Encoded) -> Evaluate | None:
    """Per-stage figures that need target labels: evaluation only, never training."""
    if not target.labeled:
        return None

    def evaluate(idx: np.ndarray, pseudo: np.ndarray, probs: np.ndarray) -> dict:
        precision = float((pseudo == target.labels[idx]).mean()) if len(idx) else None
        return {"pseudo_label_precision": precision, "accuracy": accuracy(probs, target.labels)}

    return evaluate


def _report_png(per_stage: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    stages = [r["stage"] for r in per_stage]
    ax.plot(stages, [r["ratio"] for r in per_stage], "o-", label="coverage (selected / target)")
    if per_stage and "accuracy" in per_stage[0]:
        prec = [r["pseudo_label_precision"] for r in per_stage]
        ax.plot(
            stages, [np.nan if p is None else p for p in prec], "s-", label="pseudo-label precision"
        )
        ax.plot(
            stages, [r["accuracy"] for r in per_stage], "^-", label="target accuracy after stage"
        )
    ax.set_xlabel("stage")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(stages)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def online_state_in(out: Path) -> list[str]:
    """What a served run folder holds beside the artifact that a rewrite would delete: the
    collected traffic (traffic.sqlite and its journal files) and the published versions."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.startswith("traffic.sqlite")) + (
        ["versions/"] if (out / "versions").is_dir() else []
    )


def check_out(out: Path, force: bool) -> None:
    """Refuse to overwrite a run's online state unless `force`; with it, say what goes."""
    held = online_state_in(out)
    if not held:
        return
    if not force:
        raise DataError(
            f"{out} holds online state ({', '.join(held)}: the traffic it collected, the "
            "versions it published) that a new artifact there would delete; choose another "
            "--out, or pass --force to remove it"
        )
    log.warning("--force: replacing %s removes %s", out, ", ".join(held))


def check_template(template: str, where: str) -> None:
    if "{}" not in template:
        raise DataError(
            f"{where} {template!r} has no {{}} for the class name; write e.g. 'a photo of a {{}}.'"
        )
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as e:
        raise DataError(
            f"{where} {template!r} is not a template with one {{}} ({e}); "
            "write e.g. 'a photo of a {}.' (double other braces: {{ }})"
        ) from None


def _read(ds: Dataset, name: str, split: str) -> DomainData:
    return _read_domain(ds, name, split if has_splits(ds, name) else None)


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
    if req.target in sources:
        raise DataError(f"target {req.target!r} cannot also be a source; drop it from --sources")
    if not sources:
        raise DataError(
            f"no source domain: {ds.root} has only {req.target!r}; add labeled source domains "
            "(every artifact keeps source features for online re-adaptation)"
        )
    check_out(Path(req.out), req.force)
    if req.template:
        check_template(req.template, "--template")
    elif ds.prompt_template:
        check_template(ds.prompt_template, f"{ds.root / 'meta.json'} prompt_template")
    template = req.template or ds.prompt_template or DEFAULT_TEMPLATE

    lm = load_model(req.model, req.pretrained)
    engine = extractor(lm)  # ONNX Runtime where this encoder was exported, else torch
    enc = lambda d: encode_domain(lm, d, req.cache_dir, req.progress, engine)  # noqa: E731
    target = enc(_read(ds, req.target, "train"))
    # DomainNet-style lists: adapt on the target's train split, report on its test split.
    test = enc(_read_domain(ds, req.target, "test")) if has_splits(ds, req.target) else target
    srcs = [enc(_read(ds, s, "train")) for s in sources]
    if engine.images:
        f = engine.figures()
        log.info("encoded %d images with %s (%s img/s)", f["images_encoded"], f["engine"],
                 f["images_per_s"])  # fmt: skip
    for s in srcs:
        if not s.labeled:
            raise DataError(f"source domain {s.name!r} has unlabeled images; sources need labels")

    warnings = warn_missing_classes(ds, [target, *srcs], req.target)
    scale = float(lm.model.logit_scale.exp())
    zs = Head(weight=class_text_features(lm, ds.classes, template).numpy()[None], logit_scale=scale)
    per_stage: list[dict] = []
    prompts = prompt_config = None
    head = zs
    rows = [{"kind": PROMPT, "template": template}]
    head_fit: dict | None = None
    if req.method == "transductive":
        refined = refine(target.features, zs.probs(target.features), req.fit.transductive)
        head, head_fit = prototype_head(zs, refined, target.features)
        rows.append({"kind": PROTOTYPE, "target": req.target})
    if req.method in PROMPT_METHODS:
        torch.manual_seed(req.seed)
        learner = MultiPromptLearner(lm, ds.classes, len(srcs), template, seed=req.seed)
        cfg = dataclasses.replace(req.fit, seed=req.seed)
        result = fit(
            learner,
            [(s.features, s.labels) for s in srcs],
            target.features,
            init_probs=zs.probs(target.features),
            logit_scale=scale,
            cfg=cfg,
            mode=req.method,
            evaluate=_evaluator(target),
            progress=req.progress,
        )
        head = Head(weight=result.head_weight, logit_scale=scale)
        rows = [{"kind": PROMPT, "source": s.name} for s in srcs]
        if result.refinement is not None:  # mp2a-t
            head, head_fit = prototype_head(head, result.refinement, target.features)
            rows.append({"kind": PROTOTYPE, "target": req.target})
        per_stage = result.per_stage
        prompts = learner.arrays()
        prompt_config = learner.config(cfg)

    if head_fit is not None:  # the classes by name, as every other figure a user reads
        head_fit["empty_classes"] = [ds.classes[i] for i in head_fit["empty_classes"]]
    target_acc = accuracy(head.probs(test.features), test.labels) if test.labeled else None
    metrics = {
        "method": req.method,
        "target": req.target,
        "data": Path(req.data).resolve().name,  # the folder's name: no machine path
        "sources": sources,
        "target_accuracy": target_acc,
        "zeroshot_accuracy": accuracy(zs.probs(test.features), test.labels)
        if test.labeled
        else None,
        "source_accuracy": {s.name: accuracy(head.probs(s.features), s.labels) for s in srcs},
        "per_stage": per_stage,
        "head": head_fit,
        "n_target": len(target.labels),
        "n_test": len(test.labels),
        "skipped_images": target.skipped + sum(s.skipped for s in srcs),
        "feature_extraction": engine.figures(),  # images the cache did not hold
        "warnings": warnings,
        "model": lm.backbone.model,
        "template": template,
        "seed": req.seed,
        "seconds": round(time.time() - t0, 2),
    }
    extra = {}
    if per_stage:
        extra["report.png"] = _report_png(per_stage, f"{req.method} → {req.target}")
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
            prompts=prompts,
            prompt_config=prompt_config,
            head_rows=rows,
            extra_files=extra,
        ),
    )
    write_json(req.out / LOCAL_FILE, {"data": str(Path(req.data).resolve())})
    return metrics


# Beside the artifact, not part of it (not in the manifest, never served, not copied into
# versions): this machine's path of the data the run was adapted on, so `mp2a export RUN`
# finds its parity images without --data. The artifact itself records the folder's name.
LOCAL_FILE = "local.json"


def data_location(run: Path) -> Path | None:
    """Where `run`'s data lived on this machine when it was adapted, if known."""
    try:
        recorded = json.loads((Path(run) / LOCAL_FILE).read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(recorded) if isinstance(recorded, str) and recorded else None
