"""Transductive refinement: use the target's own cluster structure (numpy only).

A text head scores every target embedding alone. The embeddings also cluster: images of one
class lie close together even where the head is wrong about some of them. `refine` moves
the head's class probabilities towards that structure, after TransCLIP (Zanella, Gérin,
Ben Ayed, "Boosting Vision-Language Models with Transduction", NeurIPS 2024), implemented
from its objective. With f_i the L2-normalised embeddings, ŷ_i the head's probabilities and
z_i the refined ones:

    min  - sum_i z_i . log N(f_i; mu, Sigma)        a Gaussian mixture, one mean per class,
                                                    one shared (diagonal or isotropic) Sigma
         - gamma * sum_ij w_ij z_i . z_j            optional kNN affinity (w: cosine of the
                                                    `knn` nearest neighbours, symmetrised)
         + sum_i KL_lambda(z_i || ŷ_i)               the pull towards the head

solved by block updates, each of which lowers the objective:

    mu_k    = sum_i z_ik f_i / sum_i z_ik
    sigma^2 = (1/N) sum_i sum_k z_ik (f_i - mu_k)^2        per dimension (diag) or pooled (iso)
    z_i     ∝ ŷ_i^lambda * exp(log N(f_i; mu_k, Sigma) + gamma * sum_j w_ij z_j)

With a shared covariance, log N(f; mu_k, Sigma) = f . (mu_k / sigma^2) - mu_k.mu_k / (2 sigma^2)
+ a term that does not depend on k: one (N, D) x (D, C) product per iteration. 10,000 x 512
embeddings take tens of milliseconds (`mp2a bench adapt`).

Choices measured on DigitsDA (docs/RESULTS.md): diagonal and isotropic covariances are within
0.2 points; the kNN term does not help there (off by default); lambda = 1. One Gaussian per
class; several per class helped the `lcd` style but cost DigitsDA points, so it is not used.

A trust region: where the clusters contradict the head on more than `max_relabel` of the
samples (one Gaussian per class then does not describe the classes, e.g. a style with two
looks per class), lambda is doubled until they do not. On DigitsDA the refinement relabels at
most 17 % of the zero-shot labels (handwritten), so the default 20 % does not bind there; on
`lcd` (lit LED and dark LCD digits) it relabels 37 % of the MP²A labels at lambda = 1 and
costs 8 points, 16 % at lambda = 8 and gains 1.

`prototype_head` turns a refinement into a head row that carries it to images never seen: the
refined posterior is linear in the embedding, so one prototype row next to the prompt rows
(mp2a/head.py) reproduces it exactly; measured on a fresh DigitsDA draw, the gain of the
refinement carries over (docs/RESULTS.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mp2a.errors import DataError
from mp2a.head import Head, l2_normalize

log = logging.getLogger(__name__)

COVARIANCES = ("diag", "iso")
MIN_TOTAL_VARIANCE = 1e-8  # below: every embedding is (nearly) the same point
VARIANCE_FLOOR = 1e-3  # per-dimension variance floor, relative to the mean variance


@dataclass(frozen=True)
class RefineConfig:
    iterations: int = 10
    kl_weight: float = 1.0  # lambda: 0 = clusters only, large = the head only
    covariance: str = "diag"  # diag | iso
    knn: int = 0  # neighbours in the affinity term; 0: no affinity term
    knn_weight: float = 1.0  # gamma
    max_relabel: float = 0.2  # trust region: largest fraction of argmax labels changed
    max_doublings: int = 6  # of lambda, to get within the trust region

    def __post_init__(self) -> None:
        if self.covariance not in COVARIANCES:
            raise ValueError(f"covariance {self.covariance!r}: choose {', '.join(COVARIANCES)}")
        if self.iterations < 1 or self.knn < 0 or self.kl_weight < 0 or self.knn_weight < 0:
            raise ValueError(
                "iterations must be >= 1 and knn, kl_weight, knn_weight >= 0, got "
                f"{self.iterations}, {self.knn}, {self.kl_weight}, {self.knn_weight}"
            )
        if not 0 < self.max_relabel <= 1 or self.max_doublings < 0:
            raise ValueError(
                f"max_relabel must be in (0, 1] and max_doublings >= 0, got "
                f"{self.max_relabel}, {self.max_doublings}"
            )


@dataclass(frozen=True)
class Refinement:
    probs: np.ndarray  # (N, C) refined class probabilities
    means: np.ndarray  # (C, D) class means of the normalised embeddings
    variance: np.ndarray  # (D,) shared variance
    mass: np.ndarray  # (C,) soft number of samples per class
    kl_weight: float  # the lambda used (the trust region may have raised it)
    relabelled: float  # fraction of samples whose argmax label the refinement changed

    @property
    def empty_classes(self) -> list[int]:
        """Classes the refinement gave (almost) no sample to."""
        return [int(c) for c in np.flatnonzero(self.mass < 0.5)]


def check_inputs(features: np.ndarray, probs: np.ndarray) -> None:
    """Raise DataError saying what is wrong with a refinement's inputs."""
    if features.ndim != 2 or probs.ndim != 2 or len(features) != len(probs):
        raise DataError(
            f"refinement needs features (N, D) and probabilities (N, C) of the same N, got "
            f"{features.shape} and {probs.shape}"
        )
    n, c = probs.shape
    if n < c:
        raise DataError(
            f"{n} target samples for {c} classes: the refinement needs at least one sample per "
            "class; collect more target images or traffic"
        )
    bad = int((~np.isfinite(features)).any(1).sum())
    if bad:
        raise DataError(
            f"{bad} of {n} target embeddings hold NaN or infinite values; drop them first "
            "(a broken encoder or a damaged store)"
        )
    if not np.isfinite(probs).all():
        raise DataError("the head's probabilities hold NaN or infinite values")


def _affinity(x: np.ndarray, k: int, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Symmetrised kNN affinity as (indices (N, k), weights (N, k)) plus its transpose on use:
    w_ij = max(0, cos(f_i, f_j)) for the k nearest j of i."""
    n = len(x)
    k = min(k, n - 1)
    idx = np.empty((n, k), np.int64)
    val = np.empty((n, k), np.float32)
    for s in range(0, n, chunk):
        sim = x[s : s + chunk] @ x.T  # (b, N)
        np.fill_diagonal(sim[:, s : s + chunk], -np.inf)
        part = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # (b, k)
        idx[s : s + chunk] = part
        val[s : s + chunk] = np.maximum(np.take_along_axis(sim, part, 1), 0)
    return idx, val


def _propagate(z: np.ndarray, idx: np.ndarray, val: np.ndarray) -> np.ndarray:
    """(W z) with W = (A + A^T) / 2, A the kNN affinity: (N, C)."""
    fwd = np.einsum("nk,nkc->nc", val, z[idx])  # A z
    back = np.zeros_like(z)
    np.add.at(back, idx.ravel(), (val.ravel()[:, None] * np.repeat(z, idx.shape[1], axis=0)))
    return (fwd + back) / 2


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def refine(features: np.ndarray, probs: np.ndarray, cfg: RefineConfig | None = None) -> Refinement:
    """Refine `probs` (N, C), the head's probabilities of the target embeddings `features`
    (N, D), with the target's cluster structure. Raises DataError on unusable input."""
    cfg = cfg or RefineConfig()
    check_inputs(features, probs)
    x = l2_normalize(features.astype(np.float64))  # (N, D)
    n = len(x)
    total = float(x.var(axis=0).sum())
    if total < MIN_TOTAL_VARIANCE:
        raise DataError(
            f"the {n} target embeddings are (nearly) all the same point (total variance "
            f"{total:.2e}): there is no structure to refine with; a constant or broken stream?"
        )
    p = probs.astype(np.float64)
    knn = _affinity(x, cfg.knn) if cfg.knn and n > 1 else None
    labels = p.argmax(axis=1)
    lam = cfg.kl_weight
    for attempt in range(cfg.max_doublings + 1):
        z, means, var = _em(x, p, lam, cfg, knn)
        relabelled = float((z.argmax(axis=1) != labels).mean())
        if relabelled <= cfg.max_relabel or attempt == cfg.max_doublings or lam == 0:
            break
        log.info("refinement relabels %.0f%% at lambda %g: doubling lambda", 100 * relabelled, lam)
        lam *= 2
    mass = z.sum(axis=0)
    return Refinement(
        probs=z.astype(np.float32),
        means=means.astype(np.float32),
        variance=var.astype(np.float32),
        mass=mass.astype(np.float32),
        kl_weight=lam,
        relabelled=relabelled,
    )


def _em(
    x: np.ndarray,
    p: np.ndarray,
    lam: float,
    cfg: RefineConfig,
    knn: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The block updates from z = p: (z (N, C), means (C, D), variance (D,))."""
    n, d = x.shape
    prior = lam * np.log(np.clip(p, 1e-12, 1.0))  # (N, C)
    sq = (x**2).sum(axis=0)  # (D,)
    z = p
    for _ in range(cfg.iterations):
        mass = z.sum(axis=0)  # (C,)
        means = (z.T @ x) / np.maximum(mass, 1e-12)[:, None]  # (C, D)
        var = (sq - (means**2 * mass[:, None]).sum(axis=0)) / n  # (D,)
        if cfg.covariance == "iso":
            var = np.full(d, var.mean())
        var = np.maximum(var, VARIANCE_FLOOR * max(var.mean(), MIN_TOTAL_VARIANCE / d))
        ll = x @ (means / var).T - 0.5 * (means**2 / var).sum(axis=1)  # (N, C)
        ll[:, mass < 1e-9] = -np.inf  # a class nobody is given has no Gaussian
        if knn is not None:
            ll = ll + cfg.knn_weight * _propagate(z, *knn)
        z = _softmax(prior + ll)
    mass = z.sum(axis=0)
    means = (z.T @ x) / np.maximum(mass, 1e-12)[:, None]
    return z, means, var


# mixing weights of the prototype row tried by prototype_head
PROTOTYPE_WEIGHTS = (0.5, 0.75, 0.9)


def prototype_head(
    prompts: Head, refinement: Refinement, features: np.ndarray
) -> tuple[Head, dict]:
    """`prompts` plus one prototype row that carries `refinement` to images never seen.

    The refined posterior of an embedding f is softmax_k(lambda log ŷ_k + f . mu_k/sigma^2
    - mu_k.mu_k/(2 sigma^2)): with ŷ the prompt rows' softmax at their (shared) scale s, and
    their ensemble replaced by its mean row W̄, that is one linear row,

        weight_k = lambda * s * W̄_k + mu_k / sigma^2,   bias_k = -mu_k.mu_k / (2 sigma^2),

    at scale 1: the refined class means, whitened by the shared variance, next to the text.
    Its mixing weight against the prompt rows is the one of PROTOTYPE_WEIGHTS that
    reproduces the refined labelling of `features` best (cross-entropy; no labels). A class
    the refinement gave no sample gets the classes' average Gaussian, so it competes on its
    text evidence alone. Returns the head and what was chosen."""
    lam, scale = refinement.kl_weight, float(np.mean(prompts.scales()))
    mu = refinement.means.astype(np.float64)  # (C, D)
    var = refinement.variance.astype(np.float64)  # (D,)
    gauss = mu / var  # (C, D)
    bias = -0.5 * (mu**2 / var).sum(axis=1)  # (C,)
    empty = refinement.empty_classes
    if empty:
        full = np.setdiff1d(np.arange(len(mu)), empty)
        gauss[empty], bias[empty] = gauss[full].mean(axis=0), bias[full].mean()
    text = np.einsum("k,kcd->cd", prompts.weights(), prompts.weight).astype(np.float64)
    row = lam * scale * text + gauss  # (C, D)
    x = l2_normalize(features.astype(np.float64))
    target = np.clip(refinement.probs, 1e-12, 1.0)
    p_prompts = prompts.probs(x)  # (N, C)
    p_row = _softmax(x @ row.T + bias)
    best: tuple[float, float] | None = None
    for a in PROTOTYPE_WEIGHTS:
        p = (1 - a) * p_prompts + a * p_row
        ce = float(-(target * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=1).mean())
        if best is None or ce < best[0]:
            best = (ce, a)
    assert best is not None
    ce, a = best
    k, c = prompts.num_rows, prompts.num_classes
    head = Head(
        weight=np.concatenate([prompts.weight, row[None]]).astype(np.float32),
        logit_scale=prompts.logit_scale,
        row_scale=np.append(prompts.scales(), 1.0).astype(np.float32),
        row_bias=np.concatenate([prompts.biases(), bias[None]]).astype(np.float32),
        row_weight=np.append(prompts.weights() * (1 - a), a).astype(np.float32),
    )
    chosen = {
        "prototype_weight": a,
        "fit_cross_entropy": round(ce, 4),
        "kl_weight": lam,
        "relabelled": round(refinement.relabelled, 4),
        "empty_classes": empty,
        "prompt_rows": k,
        "classes": c,
    }
    return head, chosen
