"""Transductive refinement and the prototype row (adapt/transductive.py, numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from adapt.transductive import RefineConfig, prototype_head, refine
from mp2a.errors import DataError
from mp2a.head import Head, l2_normalize

C, D = 4, 24


def clusters(n_per: int, seed: int, spread: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    """C well-separated clusters on the sphere; (features (N, D), labels)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(C, D) * 3
    y = np.repeat(np.arange(C), n_per)
    x = centres[y] + rng.normal(0, spread, (len(y), D))
    return l2_normalize(x).astype(np.float32), y


def systematic_head(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A head that is right on most samples but calls a third of class 2 "class 1"."""
    p = np.full((len(y), C), 0.1 / (C - 1), np.float32)
    p[np.arange(len(y)), y] = 0.9
    wrong = (y == 2) & (np.arange(len(y)) % 3 == 0)
    p[wrong] = 0.1 / (C - 1)
    p[wrong, 1] = 0.9
    return p


def test_refinement_fixes_what_the_clusters_contradict():
    x, y = clusters(60, 0)
    p = systematic_head(x, y)
    assert (p.argmax(1) == y).mean() < 0.95
    r = refine(x, p)
    assert r.probs.shape == p.shape and np.allclose(r.probs.sum(1), 1, atol=1e-5)
    assert (r.probs.argmax(1) == y).mean() == 1.0
    assert r.kl_weight == 1.0 and 0 < r.relabelled < 0.2  # inside the trust region
    assert r.means.shape == (C, D) and r.variance.shape == (D,) and r.empty_classes == []
    # the isotropic covariance and the kNN term reach the same labelling here
    for cfg in (RefineConfig(covariance="iso"), RefineConfig(knn=3)):
        assert (refine(x, p, cfg).probs.argmax(1) == y).mean() == 1.0


def test_the_trust_region_raises_lambda_when_clusters_contradict_the_head_too_much():
    """A head whose labels are random on half the samples: the clusters would relabel
    about a third of them. Beyond max_relabel, lambda doubles until the head's labels mostly
    stand."""
    x, y = clusters(50, 1)
    rng = np.random.default_rng(1)
    noisy = np.where(np.arange(len(y)) % 2 == 0, rng.integers(0, C, len(y)), y)
    p = np.full((len(y), C), 0.1 / (C - 1), np.float32)
    p[np.arange(len(y)), noisy] = 0.9
    free = refine(x, p, RefineConfig(max_relabel=1.0))
    bounded = refine(x, p, RefineConfig(max_relabel=0.2))
    assert free.kl_weight == 1.0 and free.relabelled > 0.3
    assert (free.probs.argmax(1) == y).mean() == 1.0  # here the clusters are right
    assert bounded.kl_weight > 1.0 and bounded.relabelled <= 0.2


def test_bad_inputs_say_what_is_wrong():
    x, y = clusters(10, 2)
    p = systematic_head(x, y)
    with pytest.raises(DataError, match="at least one sample per class"):
        refine(x[:3], p[:3])
    bad = x.copy()
    bad[5, 3] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(DataError, match="2 of 40 target embeddings hold NaN or infinite"):
        refine(bad, p)
    same = np.repeat(x[:1], 40, axis=0)
    with pytest.raises(DataError, match="all the same point"):
        refine(same, p)
    with pytest.raises(DataError, match="same N"):
        refine(x, p[:-1])
    with pytest.raises(ValueError, match="covariance"):
        RefineConfig(covariance="full")


def test_a_class_nobody_is_given_gets_no_gaussian_and_stays_predictable():
    """Traffic without class 3: the refinement gives it nothing, and the head can still say
    class 3 where its text evidence is strongest."""
    x, y = clusters(40, 3)
    x, y = x[y != 3], y[y != 3]
    p = systematic_head(x, y)
    p[:, 3] = 0
    p /= p.sum(1, keepdims=True)
    r = refine(x, p)
    assert r.empty_classes == [3] and r.probs[:, 3].max() < 1e-6
    prompts = Head(l2_normalize(np.eye(C, D, dtype=np.float32))[None], 10.0)
    head, fit = prototype_head(prompts, r, x)
    assert fit["empty_classes"] == [3] and np.isfinite(head.weight).all()
    probe = l2_normalize(np.eye(C, D, dtype=np.float32)[3:4])
    assert head.probs(probe).argmax() == 3
    assert (head.probs(x).argmax(1) == y).mean() == 1.0


def test_the_prototype_row_reproduces_the_refinement_on_images_never_seen():
    x, _ = clusters(60, 4)
    fresh_x, fresh_y = clusters(60, 5)
    prompts = Head(l2_normalize(np.eye(C, D, dtype=np.float32) + 0.3)[None], 10.0)
    p = prompts.probs(x)
    r = refine(x, p)
    head, fit = prototype_head(prompts, r, x)
    assert head.num_rows == 2 and fit["prototype_weight"] in (0.5, 0.75, 0.9)
    assert np.isclose(head.weights().sum(), 1.0) and head.scales()[-1] == 1.0
    agree = (head.probs(x).argmax(1) == r.probs.argmax(1)).mean()
    assert agree >= 0.99
    assert (head.probs(fresh_x).argmax(1) == fresh_y).mean() >= (
        prompts.probs(fresh_x).argmax(1) == fresh_y
    ).mean()
    # a head of rows round-trips through its tensors
    again = Head.from_tensors(head.tensors())
    np.testing.assert_allclose(again.probs(x), head.probs(x), atol=1e-6)


def test_ten_thousand_by_512_is_fast_enough_to_run_online():
    """The figure itself is in `mp2a bench adapt`; here: it completes and stays finite."""
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(10_000, 512))).astype(np.float32)
    w = l2_normalize(rng.normal(size=(10, 512))).astype(np.float32)
    r = refine(x, Head(w[None], 50.0).probs(x))
    assert np.isfinite(r.probs).all() and r.probs.shape == (10_000, 10)
