"""Progressive alignment: train on the most confident target pseudo-labels first.

Stage t = 1..T: recompute pseudo-labels with the current ensemble (stage 1: the initial head),
keep per class the top r_t fraction by confidence (class-balanced), then train the prompts
with CE on source labels + CE on the selected target pseudo-labels (2C-way softmax over the
pair's source and target prompts) + an optional L1 agreement loss between the per-source
target predictions. r_t grows from r_0 to 1 by `ratio_at`.

`mp2a-t` (beyond the paper) runs the same stages, then refines the final ensemble's
probabilities with the target's cluster structure (adapt/transductive.py `refine`); the
refinement becomes a prototype row of the head (`FitResult.refinement`). With `stage_refine`
the refinement also gives every stage's pseudo-labels (only where it agrees with the
ensemble, ranked by the ensemble's probability of them). That is the more literal reading,
and it measured worse: refined labels are wrong in whole clusters, the prompts learn those
errors and the next refinement starts from them (DigitsDA handwritten 61.5 vs 62.5 %, `lcd`
53 vs 65 %, docs/RESULTS.md). `mp2a` stays the published method.

The baselines run through the same loop: `oneshot` is one stage with every target sample above
a fixed confidence threshold, `source-only` trains on source labels alone.

Target labels never enter this module: evaluation happens in a callback owned by the caller.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from adapt.prompts import SOURCE, TARGET, MultiPromptLearner
from adapt.transductive import RefineConfig, Refinement, refine

log = logging.getLogger(__name__)

MODES = ("mp2a", "mp2a-t", "oneshot", "source-only")
PROGRESSIVE = ("mp2a", "mp2a-t")  # the modes that run the stage schedule


@dataclass(frozen=True)
class FitConfig:
    """Defaults suit DigitsDA and Office-Home-scale data alike (see README)."""

    stages: int = 5
    r0: float = 0.2
    schedule: str = "linear"  # linear | cosine | exp
    steps_per_stage: int = 100
    batch_size: int = 32  # per source domain, and for the target
    lr: float = 2e-3
    agreement_weight: float = 1.0
    oneshot_threshold: float = 0.5
    seed: int = 0
    threads: int | None = None  # None: 1 for small prompt batches, else torch's default
    transductive: RefineConfig = field(default_factory=RefineConfig)  # mode mp2a-t
    stage_refine: bool = False  # mp2a-t: refined pseudo-labels at every stage (see module doc)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_threads(learner: MultiPromptLearner, cfg: FitConfig) -> int:
    """Small text batches run faster on one thread (no sync, no spinning on a busy host)."""
    if cfg.threads is not None:
        return cfg.threads
    width = learner.sos.shape[-1]
    work = learner.num_sources * 2 * learner.num_classes * int(learner.pool_at.max()) * width
    return 1 if work < 2_000_000 else torch.get_num_threads()


def ratio_at(stage: int, stages: int, r0: float, kind: str = "linear") -> float:
    """Fraction of each class's pseudo-labels used at `stage` (1-based); ends at 1."""
    if not 1 <= stage <= stages:
        raise ValueError(f"stage {stage} outside 1..{stages}")
    if not 0 < r0 <= 1:
        raise ValueError(f"r0 must be in (0, 1], got {r0}")
    u = 1.0 if stages == 1 else (stage - 1) / (stages - 1)
    if kind == "linear":
        return r0 + (1 - r0) * u
    if kind == "cosine":  # slow start, slow finish
        return r0 + (1 - r0) * (1 - math.cos(math.pi * u)) / 2
    if kind == "exp":  # geometric growth: doubles-ish early stages stay small
        return r0 ** (1 - u)
    raise ValueError(f"unknown schedule {kind!r}; choose linear, cosine or exp")


def select_class_balanced(
    probs: np.ndarray, ratio: float, confidence: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per pseudo-class (argmax of `probs`), the top `ratio` fraction by confidence (default:
    the winning probability): (indices, pseudo-labels)."""
    pseudo = probs.argmax(1)
    conf = probs.max(1) if confidence is None else confidence
    keep = []
    for c in np.unique(pseudo):
        members = np.flatnonzero(pseudo == c)
        k = math.ceil(ratio * len(members))
        order = np.argsort(-conf[members], kind="stable")
        keep.append(members[order[:k]])
    idx = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    return idx, pseudo[idx]


def select_threshold(probs: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(probs.max(1) >= threshold)
    return idx, probs.argmax(1)[idx]


@dataclass
class FitResult:
    head_weight: np.ndarray  # (S, C, D): the prompts that classify the target
    per_stage: list[dict]
    refinement: Refinement | None = None  # mp2a-t: the refinement of the final ensemble


Evaluate = Callable[[np.ndarray, np.ndarray, np.ndarray], dict]


def ensemble_probs(tf: torch.Tensor, x: torch.Tensor, scale: float, which: int) -> torch.Tensor:
    """Mean over sources of the C-way softmax over prompts `which`: (N, C)."""
    logits = scale * torch.einsum("nd,scd->snc", x, tf[:, which])  # (S, N, C)
    return logits.softmax(-1).mean(0)


def train_step(
    learner: MultiPromptLearner,
    opt: torch.optim.Optimizer,
    sources: list[tuple[torch.Tensor, torch.Tensor]],
    target: tuple[torch.Tensor, torch.Tensor] | None,
    logit_scale: float,
    agreement_weight: float,
) -> float:
    """One optimisation step on image features: sources [(x (B, D), y (B,))], target pseudo."""
    c = learner.num_classes
    tf = learner.text_features()  # (S, 2, C, D)
    loss = torch.zeros(())
    for s, (x, y) in enumerate(sources):
        allp = tf[s].reshape(2 * c, -1)  # (2C, D): source prompts, then target prompts
        loss = loss + F.cross_entropy(logit_scale * x @ allp.T, y)
        if target is not None:  # target pseudo-labels point at the target prompts
            loss = loss + F.cross_entropy(logit_scale * target[0] @ allp.T, c + target[1])
    if target is not None and agreement_weight > 0 and len(sources) > 1:
        p = (logit_scale * torch.einsum("bd,scd->sbc", target[0], tf[:, TARGET])).softmax(-1)
        pairs = [(i, j) for i in range(len(p)) for j in range(i + 1, len(p))]
        agree = sum((p[i] - p[j]).abs().sum(-1).mean() for i, j in pairs) / len(pairs)
        loss = loss + agreement_weight * agree
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def make_optimizer(learner: MultiPromptLearner, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([learner.domain_ctx, learner.class_ctx], lr=lr, weight_decay=0)


def fit(
    learner: MultiPromptLearner,
    sources: list[tuple[np.ndarray, np.ndarray]],
    target: np.ndarray,
    init_probs: np.ndarray,
    logit_scale: float,
    cfg: FitConfig,
    mode: str = "mp2a",
    evaluate: Evaluate | None = None,
    progress: bool = True,
    on_stage: Callable[[int, int], None] | None = None,
) -> FitResult:
    """Train `learner` on cached features. sources: [(features (N_s, D), labels (N_s,))].

    init_probs (N_t, C): the starting pseudo-label distribution (e.g. zero-shot). `evaluate`
    gets (selected indices, their pseudo-labels, ensemble probs) after each stage and returns
    figures to log; it is the only place target labels may live. `on_stage(stage, stages)`
    is called as each stage starts (a server shows it as the run's progress).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose {', '.join(MODES)}")
    if len(sources) != learner.num_sources:
        raise ValueError(f"{len(sources)} source sets for a learner of {learner.num_sources}")
    with torch_threads(training_threads(learner, cfg)):
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        xs = [torch.from_numpy(f).float() for f, _ in sources]
        ys = [torch.from_numpy(y).long() for _, y in sources]
        xt = torch.from_numpy(target).float()
        opt = make_optimizer(learner, cfg.lr)

        if mode in PROGRESSIVE:
            plan = [(t, cfg.steps_per_stage) for t in range(1, cfg.stages + 1)]
        else:  # the baselines get the same number of steps in one go
            plan = [(1, cfg.steps_per_stage * cfg.stages)]
        probs = init_probs
        per_stage = []
        for stage, steps in plan:
            if on_stage is not None:
                on_stage(stage, len(plan))
            t0 = time.time()
            conf = None
            if mode == "mp2a-t" and cfg.stage_refine:
                # refined labels, ranked by the ensemble's own probability of them: the
                # refinement's posteriors are near 1 almost everywhere and rank poorly
                refined = refine(target, probs, cfg.transductive).probs
                agree = refined.argmax(1) == probs.argmax(1)
                conf = np.where(agree, probs[np.arange(len(probs)), refined.argmax(1)], -1.0)
                probs = refined
            if mode in PROGRESSIVE:
                ratio = ratio_at(stage, cfg.stages, cfg.r0, cfg.schedule)
                idx, pseudo = select_class_balanced(probs, ratio, conf)
                if conf is not None:  # never train on what the two disagree about
                    idx, pseudo = idx[conf[idx] >= 0], pseudo[conf[idx] >= 0]
            elif mode == "oneshot":
                idx, pseudo = select_threshold(probs, cfg.oneshot_threshold)
            else:
                idx, pseudo = np.zeros(0, np.int64), np.zeros(0, np.int64)
            sel_x, sel_y = xt[idx], torch.from_numpy(pseudo).long()
            losses = []
            bar = tqdm(range(steps), disable=not progress, leave=False, desc=f"stage {stage}")
            for _ in bar:
                batches = []
                for s in range(learner.num_sources):
                    b = rng.integers(len(ys[s]), size=cfg.batch_size)
                    batches.append((xs[s][b], ys[s][b]))
                tb = rng.integers(len(idx), size=cfg.batch_size) if len(idx) else None
                tgt = (sel_x[tb], sel_y[tb]) if tb is not None else None
                losses.append(
                    train_step(learner, opt, batches, tgt, logit_scale, cfg.agreement_weight)
                )
            with torch.no_grad():
                which = SOURCE if mode == "source-only" else TARGET
                probs = ensemble_probs(learner.text_features(), xt, logit_scale, which).numpy()
            row = {
                "stage": stage,
                "selected": len(idx),
                "ratio": round(len(idx) / max(1, len(xt)), 4),
                "loss": round(float(np.mean(losses)), 4),
                "seconds": round(time.time() - t0, 2),
            }
            if evaluate is not None:
                row.update(evaluate(idx, pseudo, probs))
            log.info("stage %s", row)
            per_stage.append(row)
        with torch.no_grad():
            tf = learner.text_features()
        which = SOURCE if mode == "source-only" else TARGET
        final = refine(target, probs, cfg.transductive) if mode == "mp2a-t" else None
        return FitResult(
            head_weight=tf[:, which].numpy().astype(np.float32),
            per_stage=per_stage,
            refinement=final,
        )
