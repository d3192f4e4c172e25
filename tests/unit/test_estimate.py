"""Label-free estimates (online/estimate.py) on heads and embeddings whose truth is known:
each estimator follows a head's real accuracy on a clean problem, the cross-shift correction
removes a bias it measured on the sources, the paired gain finds the better head, and bad
windows give None with a reason, never a crash."""

from __future__ import annotations

import numpy as np
import pytest

from mp2a.head import Head, l2_normalize
from online import estimate

C, D = 5, 16


def _world(seed: int = 0, noise: float = 0.35):
    rng = np.random.default_rng(seed)
    w = l2_normalize(rng.normal(size=(C, D))).astype(np.float32)

    def sample(n: int, shift: float = 0.0, scale: float = noise) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % C
        x = w[y] + scale * rng.normal(size=(n, D)) + shift * w[(y + 1) % C]
        return l2_normalize(x).astype(np.float32), y

    return w, sample


def _head(w: np.ndarray, scale: float = 10.0) -> Head:
    return Head(weight=w[None], logit_scale=scale)


@pytest.fixture(scope="module")
def clean():
    w, sample = _world()
    head = _head(w)
    xs, ys = sample(600)
    ds = np.arange(600) % 3
    xt, yt = sample(800)
    return head, estimate.source_view(head, xs, ys, ds), xt, yt


@pytest.mark.parametrize(
    "method", ["atc", "atc-lodo", "atc-slope", "ac", "doc", "doc-slope", "cot", "cot-lodo"]
)
def test_each_estimator_follows_the_accuracy_on_traffic_like_the_sources(clean, method):
    head, src, xt, yt = clean
    true = float((head.probs(xt).argmax(1) == yt).mean())
    e = estimate.estimate(head, src, xt, method)
    assert e.value is not None and abs(e.value - true) < 0.06, (e, true)
    assert e.low <= e.value <= e.high and e.n == len(xt) and e.method == method


def test_the_interval_covers_the_truth_and_narrows_with_more_traffic(clean):
    head, src, xt, yt = clean
    small = estimate.estimate(head, src, xt[:100])
    big = estimate.estimate(head, src, xt)
    assert big.high - big.low < small.high - small.low
    true = float((head.probs(xt).argmax(1) == yt).mean())
    assert big.low <= true <= big.high


def test_the_cross_shift_correction_removes_a_bias_the_sources_show():
    """Sources of three domains, one of them far harder than the others; ATC calibrated on the
    easy ones over-estimates the hard one. Traffic as hard: the corrected estimate is nearer
    the truth than the plain one."""
    w, sample = _world(1)
    head = _head(w)
    parts = [sample(300, 0.0), sample(300, 0.0), sample(300, 0.9)]
    xs = np.concatenate([p[0] for p in parts])
    ys = np.concatenate([p[1] for p in parts])
    ds = np.repeat([0, 1, 2], 300)
    src = estimate.source_view(head, xs, ys, ds)
    assert estimate.lodo_residuals("atc", src).shape == (3,)
    xt, yt = sample(800, 0.9)
    true = float((head.probs(xt).argmax(1) == yt).mean())
    plain = estimate.estimate(head, src, xt, "atc").value
    corrected = estimate.estimate(head, src, xt, "atc-lodo").value
    assert abs(corrected - true) < abs(plain - true), (plain, corrected, true)


def test_the_shift_line_stretches_an_estimate_that_moves_too_little():
    """Folds where the truth moved twice as far from the calibration as the estimate: the
    line's slope is 2, and a fold predicted from the others errs by nothing."""
    calib = np.array([0.8, 0.7, 0.75])
    est = np.array([0.7, 0.75, 0.6])
    folds = np.stack([calib, est, calib + 2 * (est - calib)], axis=1)
    line = estimate.shift_line(folds)
    assert line.slope == pytest.approx(2.0) and np.allclose(line.errors, 0.0)
    assert estimate.shift_line(folds[:1]) is None  # one fold: no line to check
    # a degenerate fold set (the estimate never moved) keeps the estimate as it is
    flat = np.stack([calib, calib, calib - 0.1], axis=1)
    assert estimate.shift_line(flat).slope == 1.0
    assert estimate.t90(2) == pytest.approx(2.92) and estimate.t90(50) == estimate.Z90


def test_the_slope_correction_beats_the_mean_correction_when_shifts_grow():
    """Three source domains of growing noise, traffic noisier still: the plain ATC stays
    too near the source accuracy, the mean fold error barely moves it (the folds err both
    ways and cancel), the slope moves it most of the way."""
    w, sample = _world(0)
    head = _head(w)
    parts = [sample(400, scale=s) for s in (0.3, 0.45, 0.6)]
    xs = np.concatenate([p[0] for p in parts])
    ys = np.concatenate([p[1] for p in parts])
    src = estimate.source_view(head, xs, ys, np.repeat([0, 1, 2], 400))
    assert estimate.shift_line(estimate.lodo_folds("atc", src)).slope > 1.0
    xt, yt = sample(1000, scale=0.9)
    true = float((head.probs(xt).argmax(1) == yt).mean())
    got = {m: estimate.estimate(head, src, xt, m) for m in ("atc", "atc-lodo", "atc-slope")}
    err = {m: abs(e.value - true) for m, e in got.items()}
    assert err["atc-slope"] < 0.8 * min(err["atc"], err["atc-lodo"]), (err, true)
    assert got["atc-slope"].low <= true <= got["atc-slope"].high
    # one source domain: nothing to fit a line on, the plain estimate
    one = estimate.source_view(head, parts[0][0], parts[0][1], None)
    assert estimate.estimate(head, one, xt, "atc-slope").value == pytest.approx(
        estimate.estimate(head, one, xt, "atc").value, abs=1e-4
    )


def test_paired_gain_finds_the_better_head_and_no_gain_against_itself(clean):
    head, src, xt, yt = clean
    w = head.weight[0].copy()
    worse = Head(weight=l2_normalize(w + 0.9 * np.roll(w, 1, axis=0))[None], logit_scale=10.0)
    xs, ys, ds = src.features, src.labels, src.domains
    src_worse = estimate.source_view(worse, xs, ys, ds)
    g = estimate.paired_gain(worse, head, src_worse, src, xt)
    true = float((head.probs(xt).argmax(1) == yt).mean() - (worse.probs(xt).argmax(1) == yt).mean())
    # found, clearly; the size is conservative here (the serving head's temperature, fitted
    # on the worse head, flattens both)
    assert true > 0.05 and g.low > 0.05 and 0.1 < g.value <= true + 0.05, (g, true)
    same = estimate.paired_gain(head, head, src, src, xt)
    assert same.value == 0.0 and same.low == 0.0 == same.high


def test_cot_is_one_for_certain_balanced_rows_and_lower_when_the_balance_is_off():
    p = np.eye(C)[np.arange(100) % C]
    prior = np.full(C, 1 / C)
    assert estimate.cot_accuracy(p, prior) == pytest.approx(1.0, abs=1e-3)
    one_class = np.eye(C)[np.zeros(100, int)]  # certain, but all one class: 4/5 must be wrong
    assert estimate.cot_accuracy(one_class, prior) == pytest.approx(0.2, abs=0.02)


def test_agreement_on_the_line_needs_prompt_and_prototype_rows(clean):
    head, src, xt, _ = clean
    e = estimate.estimate(head, src, xt, "aol")
    assert e.value is None and "prompt and prototype rows" in e.reason
    two = Head(weight=np.concatenate([head.weight, head.weight]), logit_scale=10.0)
    rows = [{"kind": "prompt"}, {"kind": "prototype"}]
    src2 = estimate.source_view(two, src.features, src.labels, src.domains)
    e = estimate.estimate(two, src2, xt, "aol", rows=rows)
    # rows that always agree: the traffic's agreement is the source's, so the estimate is the
    # source accuracy
    acc_s = float((src2.probs.argmax(1) == src.labels).mean())
    assert e.value == pytest.approx(acc_s, abs=0.01)


def test_bad_windows_give_none_with_a_reason(clean):
    head, src, xt, _ = clean
    few = estimate.estimate(head, src, xt[: C - 1])
    assert few.value is None and "fewer than the 5 classes" in few.reason
    nan = np.full((50, D), np.nan, np.float32)
    e = estimate.estimate(head, src, nan)
    assert e.value is None and e.n == 0
    wrong = estimate.estimate(head, src, np.zeros((30, D + 1), np.float32))
    assert wrong.value is None and f"(N, {D})" in wrong.reason
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate.estimate(head, src, xt, "magic")


def test_ood_scores_rank_embeddings_unlike_any_class_higher(clean):
    head, src, xt, _ = clean
    rng = np.random.default_rng(5)
    # embeddings orthogonal to every class vector: no class matches
    basis = np.linalg.svd(head.weight[0])[2][C:]  # (D - C, D), orthogonal to the class rows
    other = l2_normalize(rng.normal(size=(200, D - C)) @ basis).astype(np.float32)
    s_in, s_out = estimate.ood_scores(head, xt), estimate.ood_scores(head, other)
    assert s_in.shape == (len(xt),) and np.median(s_out) > np.quantile(s_in, 0.95)
    t = estimate.ood_threshold(head, src.features)
    assert (s_out > t).mean() > 0.9 and (s_in > t).mean() < 0.1


def test_the_shift_test_tells_a_change_from_the_same_distribution():
    _, sample = _world(2)
    a, _ = sample(400)
    b, _ = sample(400)
    shifted, _ = sample(400, 0.8)
    same = estimate.shift_test(a, b)
    changed = estimate.shift_test(a, shifted)
    assert same.p_value > 0.01 and abs(same.score) < 4
    assert changed.p_value < 0.01 and changed.score > 10


def test_the_gain_bias_on_the_sources_finds_confidence_that_is_not_accuracy(clean):
    """A candidate with the serving head's rows at a higher logit scale predicts the same
    classes (no true gain) with more confidence: COT reads that as a gain, and the source
    folds measure exactly that overstatement; the serving head against itself: none."""
    head, src, xt, _ = clean
    bolder = Head(weight=head.weight, logit_scale=25.0)
    mean, sd = estimate.gain_bias_on_sources(head, bolder, src)
    g = estimate.paired_gain(head, bolder, src, src, xt)
    assert g.value > 0.02 and mean > 0.02, (g, mean)  # an imagined gain, seen on the sources
    assert abs(g.value - mean) < 0.5 * g.value and sd >= 0.0
    assert estimate.gain_bias_on_sources(head, head, src) == (0.0, 0.0)
    one = estimate.source_view(head, src.features, src.labels, None)
    assert estimate.gain_bias_on_sources(head, bolder, one) is None
