"""Label-free estimates of a head's accuracy on traffic, and the tests beside them (numpy only).

Online there are no labels: how good the served head is, whether a candidate is better and
whether the traffic has changed are all *estimated*. An estimate is only as good as its
measured error, so every method here is run by `mp2a bench estimate` on streams whose labels
the benchmark knows, and its error is reported there (serving/README.md, "Label-free
estimates"). The inputs are what every artifact carries: the head, its labelled source
features (source_features.safetensors: features, labels, source domain) and traffic
embeddings. An edge box and the hub run this module as it is (numpy only).

Estimators of a head's accuracy on unlabelled traffic (`METHODS`):
- `atc` — Average Thresholded Confidence (Garg et al., ICLR 2022): the threshold t on the
  negative prediction entropy that leaves a fraction of the source scores above it equal to
  the source accuracy; the estimate is the fraction of traffic scoring above t.
- `ac` — average confidence after temperature scaling on the source rows (Guo et al., 2017).
- `doc` — difference of confidences (Guillory et al., ICCV 2021): source accuracy minus the
  drop of the average (temperature-scaled) confidence from source to traffic.
- `cot` — confidence optimal transport (Lu et al., NeurIPS 2023): the error is half the
  Wasserstein-1 distance (L1 cost) between the traffic's softmax vectors and one-hot labels
  drawn from the source label distribution; with C one-hot atoms the transport is an N×C
  problem, solved here by entropic Sinkhorn iterations.
- `aol` — agreement on the line (Baek et al., NeurIPS 2022) between a head's own rows (the
  prompt rows and the prototype row disagree where they err): probit(acc_traffic) =
  probit(acc_source) + probit(agreement_traffic) − probit(agreement_source). Heads of one row
  have no second opinion: `None`.
- `*-lodo` — any of the above but `aol` corrected across shifts: each source domain in turn
  plays the unlabelled traffic, the estimator is calibrated on the other source domains, and
  its mean error on the left-out domains is subtracted (leave-one-source-domain-out). The
  spread of those errors is the estimator's systematic uncertainty, and widens the interval.
- `*-slope` — the same folds, read as a line (`ShiftLine`): on each left-out domain, how far
  the truth moved from the calibration's accuracy against how far the estimate moved. The
  estimators move too little (on the bench's artifacts the truth moved 1.2 to 2.1 times as
  far), so the estimate's move away from the source accuracy is stretched by the fitted
  slope. The interval: the folds' errors when the line is fitted on the others, at
  Student's t for that few folds.

Measured on DigitsDA and the shift styles (`mp2a bench estimate`; 7 streams × 3 traffic sizes
× 2 bases), the confidence-based estimators all pull towards the source accuracy: too low on
easy streams (printed, street: the tiny CLIP is less confident than it is right) and too high
on hard ones (handwritten, textured). The mean fold error cannot fix that (the folds err both
ways and cancel); the slope does (docs/ESTIMATES.md gives every method's error).
`DEFAULT_METHOD` is the one with the lowest mean error there.

The interval: a bootstrap over the traffic rows (the calibration fixed) for the sampling
error, added in variance to the systematic one from the folds (90 %).

Beside the estimate:
- `ood_scores`: how unlike any class of the label set an embedding is — 1 − MCM, the maximum
  concept matching score (Ming et al., NeurIPS 2022): the softmax, at temperature 1, of the
  cosine similarities to the prompt rows' class vectors; `ood_threshold` is its
  `OOD_QUANTILE` quantile on the held-out source rows.
- `shift_test`: a two-sample test between two sets of embeddings: squared maximum mean
  discrepancy with a Gaussian kernel (median-distance bandwidth) and a permutation p-value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mp2a.head import Head, l2_normalize

METHODS = ("atc", "ac", "doc", "cot", "aol")
CORRECTIONS = ("", "lodo", "slope")  # across shifts: none, the mean fold error, the fold line
DEFAULT_METHOD = "atc-slope"
Z90 = 1.645
_T90 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812)
SLOPE_RANGE = (1 / 3, 3.0)  # a sanity bound on a line fitted to a few folds
OOD_QUANTILE = 0.95
MIN_PER_CLASS = 1  # a window needs at least one sample per class for an estimate


@dataclass(frozen=True)
class Estimate:
    """An accuracy estimate and its interval; `value` None with a `reason` when there is
    none (too few samples, nothing usable)."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    method: str
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def none(n: int, method: str, reason: str) -> Estimate:
    return Estimate(None, None, None, n, method, reason)


# -- the estimators: f(source probs, source labels, traffic probs) -> accuracy ------------------
def _neg_entropy(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1.0)
    return (q * np.log(q)).sum(axis=1)


def sharpen(p: np.ndarray, t: float) -> np.ndarray:
    """Probabilities at temperature `t` (p^(1/t), renormalised): temperature scaling of a
    head whose rows are mixed, applied to its mixed log-probabilities."""
    logit = np.log(np.clip(p, 1e-12, 1.0)) / t
    logit -= logit.max(axis=1, keepdims=True)
    e = np.exp(logit)
    return e / e.sum(axis=1, keepdims=True)


_TEMPERATURES = np.exp(np.linspace(np.log(0.2), np.log(5.0), 41))


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of labels `y` (grid)."""
    rows = np.arange(len(y))
    nll = [-np.log(np.clip(sharpen(p, t)[rows, y], 1e-12, 1.0)).mean() for t in _TEMPERATURES]
    return float(_TEMPERATURES[int(np.argmin(nll))])


def _accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float((p.argmax(1) == y).mean())


def atc_threshold(ps: np.ndarray, ys: np.ndarray) -> float:
    acc = _accuracy(ps, ys)
    s = _neg_entropy(ps)
    return float(np.quantile(s, 1.0 - acc)) if acc < 1.0 else float(s.min()) - 1e-9


def atc_correct(ps: np.ndarray, ys: np.ndarray, pt: np.ndarray) -> np.ndarray:
    """ATC's per-row verdict on the traffic: 1.0 where the row scores above the threshold."""
    return (_neg_entropy(pt) > atc_threshold(ps, ys)).astype(np.float64)


def atc(ps: np.ndarray, ys: np.ndarray, pt: np.ndarray) -> float:
    return float(atc_correct(ps, ys, pt).mean())


def ac(ps: np.ndarray, ys: np.ndarray, pt: np.ndarray) -> float:
    return float(sharpen(pt, fit_temperature(ps, ys)).max(axis=1).mean())


def doc(ps: np.ndarray, ys: np.ndarray, pt: np.ndarray) -> float:
    t = fit_temperature(ps, ys)
    drop = sharpen(ps, t).max(axis=1).mean() - sharpen(pt, t).max(axis=1).mean()
    return float(_accuracy(ps, ys) - drop)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def cot_rows(pt: np.ndarray, prior: np.ndarray, eps: float = 0.02, iters: int = 300) -> np.ndarray:
    """Each traffic row's share of `cot_accuracy` (N,): the mean of the result is the
    estimate. With the classes' dual potentials fixed, a row's coupling is a softmax over the
    classes, so a bootstrap of the rows is a bootstrap of this vector."""
    n = len(pt)
    log_k = -2.0 * (1.0 - pt) / eps  # (N, C)
    log_a, log_b = np.full(n, -np.log(n)), np.log(np.clip(prior, 1e-12, 1.0))
    f, g = np.zeros(n), np.zeros(pt.shape[1])
    for _ in range(iters):
        f = log_a - _logsumexp(log_k + g[None], axis=1)
        g = log_b - _logsumexp(log_k + f[:, None], axis=0)
    plan = np.exp(log_k + f[:, None] + g[None])  # (N, C), rows sum to 1/N
    return n * (plan * pt).sum(axis=1)


def cot_accuracy(pt: np.ndarray, prior: np.ndarray) -> float:
    """1 − W1/2 between the rows of `pt` (N, C) and one-hot labels distributed as `prior`:
    with cost ||p − e_c||_1 = 2 (1 − p_c), that is the largest mean p_c over couplings that
    give each class its prior share of the rows (entropic Sinkhorn, log domain)."""
    return float(cot_rows(pt, prior).mean())


def _prior(ys: np.ndarray, c: int) -> np.ndarray:
    return np.bincount(ys, minlength=c) / max(1, len(ys))


def cot(ps: np.ndarray, ys: np.ndarray, pt: np.ndarray) -> float:
    return cot_accuracy(sharpen(pt, fit_temperature(ps, ys)), _prior(ys, pt.shape[1]))


_ESTIMATORS = {"atc": atc, "ac": ac, "doc": doc, "cot": cot}


def _probit(v: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(min(max(v, 1e-3), 1 - 1e-3))


def _cdf(v: float) -> float:
    return 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))


def row_split(head: Head, rows: list[dict] | None) -> tuple[list[int], list[int]] | None:
    """(prompt rows, prototype rows) of a head, or None when it has not both."""
    kinds = [r.get("kind") for r in rows] if rows else []
    if len(kinds) != head.num_rows:
        return None
    proto = [i for i, k in enumerate(kinds) if k == "prototype"]
    prompt = [i for i, k in enumerate(kinds) if k != "prototype"]
    return (prompt, proto) if prompt and proto else None


def aol(head: Head, rows: list[dict] | None, xs: np.ndarray, ys: np.ndarray, xt: np.ndarray):
    """Agreement on the line between the head's prompt rows and its prototype rows."""
    split = row_split(head, rows)
    if split is None:
        return None
    a, b = head.rows(split[0]), head.rows(split[1])
    agr_s = float((a.probs(xs).argmax(1) == b.probs(xs).argmax(1)).mean())
    agr_t = float((a.probs(xt).argmax(1) == b.probs(xt).argmax(1)).mean())
    acc_s = _accuracy(head.probs(xs), ys)
    return _cdf(_probit(acc_s) + _probit(agr_t) - _probit(agr_s))


# -- calibration across shifts -----------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """A head's view of the artifact's labelled source rows."""

    probs: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,)
    domains: np.ndarray  # (N,)
    features: np.ndarray  # (N, D)


def source_view(head: Head, features: np.ndarray, labels: np.ndarray, domains) -> Source:
    x = l2_normalize(np.asarray(features, np.float32))
    d = np.zeros(len(labels), np.int64) if domains is None else np.asarray(domains, np.int64)
    return Source(head.probs(x), np.asarray(labels, np.int64), d, x)


def lodo_folds(method: str, src: Source) -> np.ndarray:
    """(k, 3): per source domain left out, [accuracy of the other domains (the calibration),
    the estimate the other domains calibrate on it, its true accuracy]."""
    f = _ESTIMATORS[method]
    out = []
    for d in np.unique(src.domains):
        m = src.domains == d
        if m.all() or len(np.unique(src.labels[~m])) < 2:
            continue
        est = f(src.probs[~m], src.labels[~m], src.probs[m])
        out.append(
            (_accuracy(src.probs[~m], src.labels[~m]), est, _accuracy(src.probs[m], src.labels[m]))
        )
    return np.asarray(out, np.float64).reshape(-1, 3)


def lodo_residuals(method: str, src: Source) -> np.ndarray:
    """The estimator's error on each source domain when the others calibrate it."""
    folds = lodo_folds(method, src)
    return folds[:, 1] - folds[:, 2]


@dataclass(frozen=True)
class ShiftLine:
    """How an estimator's errors grow with the shift, fitted on the leave-one-out folds:
    true − calibration = `slope` × (estimate − calibration). A slope above 1 says the
    estimator moves too little from the source accuracy (measured: 1.2 to 2.1 on every
    artifact of the bench), so its move on the traffic is stretched by it. `errors`: each
    fold's error when the line is fitted on the other folds (the systematic uncertainty)."""

    slope: float
    errors: np.ndarray


def _slope(dx: np.ndarray, dy: np.ndarray) -> float:
    den = float(dx @ dx)
    b = float(dx @ dy) / den if den > 1e-12 else 1.0
    return min(max(b, SLOPE_RANGE[0]), SLOPE_RANGE[1])


def shift_line(folds: np.ndarray) -> ShiftLine | None:
    """The line through `lodo_folds` (None with fewer than two folds: no line to check)."""
    if len(folds) < 2:
        return None
    dx, dy = folds[:, 1] - folds[:, 0], folds[:, 2] - folds[:, 0]
    keep = np.ones(len(folds), bool)
    errors = []
    for i in range(len(folds)):
        keep[:] = True
        keep[i] = False
        errors.append(_slope(dx[keep], dy[keep]) * dx[i] - dy[i])
    return ShiftLine(_slope(dx, dy), np.asarray(errors))


def t90(df: int) -> float:
    """The two-sided 90 % quantile of Student's t with `df` degrees of freedom: a spread
    measured on a handful of folds is itself uncertain."""
    return _T90[df - 1] if 1 <= df <= len(_T90) else Z90


def estimate(
    head: Head,
    src: Source,
    traffic: np.ndarray,
    method: str = DEFAULT_METHOD,
    rows: list[dict] | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> Estimate:
    """The accuracy of `head` on `traffic` (N, D), estimated without labels, with a 90 %
    interval. `src`: the head's source view (`source_view`). Never raises on bad traffic:
    the estimate is None with a reason."""
    base, _, corr = method.partition("-")
    if base not in METHODS or corr not in CORRECTIONS or (base == "aol" and corr):
        raise ValueError(f"unknown estimator {method!r}; choose one of {', '.join(all_methods())}")
    x = np.asarray(traffic, np.float32)
    if x.ndim != 2 or x.shape[1] != head.dim:
        return none(0, method, f"traffic embeddings must be (N, {head.dim})")
    x = x[np.isfinite(x).all(axis=1)]
    n, c = len(x), head.num_classes
    if n < MIN_PER_CLASS * c:
        return none(n, method, f"{n} usable samples, fewer than the {c} classes")
    if len(src.labels) < c:
        return none(n, method, "too few labelled source rows to calibrate the estimate")
    x = l2_normalize(x)
    pt = head.probs(x)
    rng = np.random.default_rng(seed)
    if base == "aol":
        value = aol(head, rows, src.features, src.labels, x)
        if value is None:
            return none(
                n, method, "agreement on the line needs a head with prompt and prototype rows"
            )
        boots = [
            aol(head, rows, src.features, src.labels, x[rng.integers(0, n, n)])
            for _ in range(max(20, n_boot // 5))
        ]
        sampling = float(np.std(boots))
        residuals = np.zeros(0)
    else:
        f = _ESTIMATORS[base]
        if base == "atc":  # a mean of per-row verdicts: its bootstrap is cheap and exact
            verdict = atc_correct(src.probs, src.labels, pt)
            value = float(verdict.mean())
            idx = rng.integers(0, n, (n_boot, n))
            sampling = float(verdict[idx].mean(axis=1).std())
        else:
            value = f(src.probs, src.labels, pt)
            boots = [f(src.probs, src.labels, pt[rng.integers(0, n, n)]) for _ in range(20)]
            sampling = float(np.std(boots))
        residuals = lodo_residuals(base, src) if corr == "lodo" else np.zeros(0)
        if len(residuals):
            value -= float(residuals.mean())
    systematic, t_sys = float(np.sqrt((residuals**2).mean())) if len(residuals) else 0.0, Z90
    if corr == "slope":
        folds = lodo_folds(base, src)
        line = shift_line(folds)
        if line is not None:  # one source domain: nothing to fit, the estimate as it is
            calib = _accuracy(src.probs, src.labels)
            value = calib + line.slope * (value - calib)
            sampling *= line.slope
            systematic = float(np.sqrt((line.errors**2).mean()))
            t_sys = t90(len(folds) - 1)
    half = math.sqrt((Z90 * sampling) ** 2 + (t_sys * systematic) ** 2)
    value = min(max(value, 0.0), 1.0)
    return Estimate(
        round(value, 4),
        round(max(0.0, value - half), 4),
        round(min(1.0, value + half), 4),
        n,
        method,
    )


@dataclass(frozen=True)
class Gain:
    """The estimated accuracy gain of one head over another on the same traffic."""

    value: float
    low: float
    high: float
    n: int
    method: str = "cot"


def paired_gain(
    serving: Head,
    candidate: Head,
    src_serving: Source,
    src_candidate: Source,
    traffic: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> Gain:
    """COT's estimate of candidate − serving accuracy on the same `traffic` (N, D), with an
    80 % paired bootstrap interval over the traffic rows (its low end above 0: 90 % sure of a
    gain). Both heads see the same rows, so whatever the traffic does to both (the bias that
    makes absolute estimates err by points) cancels in the difference.

    One temperature for both, the serving head's on its source rows: the two heads are
    compared in one currency (each head at its own temperature, a candidate that specialises
    to its site loses calibration on the sources and is judged too cautiously: it missed 7
    of 17 real gains on the bench). What remains is the candidate's own growth in
    confidence, which COT reads as accuracy: `gain_bias_on_sources` measures it on the
    labelled source rows and the gate subtracts it (online/gate.py; docs/ESTIMATES.md).
    `src_candidate` is not used by the estimate (kept so callers pass both views alike)."""
    del src_candidate
    x = l2_normalize(np.asarray(traffic, np.float32))
    t = fit_temperature(src_serving.probs, src_serving.labels)
    prior = _prior(src_serving.labels, serving.num_classes)
    per_row = [cot_rows(sharpen(head.probs(x), t), prior) for head in (serving, candidate)]
    diff = per_row[1] - per_row[0]  # (N,)
    n = len(diff)
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, n, (n_boot, n))].mean(axis=1)
    low, high = np.quantile(boots, [0.10, 0.90])  # low > 0: 90 % sure of a gain
    return Gain(round(float(diff.mean()), 4), round(float(low), 4), round(float(high), 4), n)


def gain_bias_on_sources(serving: Head, candidate: Head, src: Source) -> tuple[float, float] | None:
    """How far `paired_gain` overstates the candidate on labelled rows: each source domain
    in turn plays the traffic (the temperature and the prior from the other domains), the
    estimated gain against the true one there. (mean, standard deviation) of those errors;
    None with fewer than two domains. A candidate trained on traffic grows more confident
    everywhere, and COT reads confidence as accuracy: on the bench's zero-shot bases this
    error was 6 to 11 points on every candidate. `src`: the serving head's source view (its
    features are those the candidate is evaluated on)."""
    domains = np.unique(src.domains)
    if len(domains) < 2:
        return None
    pc = candidate.probs(src.features)
    errors = []
    for d in domains:
        m = src.domains == d
        if len(np.unique(src.labels[~m])) < 2:
            continue
        t = fit_temperature(src.probs[~m], src.labels[~m])
        prior = _prior(src.labels[~m], serving.num_classes)
        est = (
            cot_rows(sharpen(pc[m], t), prior).mean()
            - cot_rows(sharpen(src.probs[m], t), prior).mean()
        )
        true = _accuracy(pc[m], src.labels[m]) - _accuracy(src.probs[m], src.labels[m])
        errors.append(est - true)
    if len(errors) < 2:
        return None
    return float(np.mean(errors)), float(np.std(errors))


def all_methods() -> list[str]:
    return [f"{b}-{c}" if c else b for b in METHODS for c in CORRECTIONS if not (b == "aol" and c)]


# -- out of the label set ----------------------------------------------------------------------
def ood_scores(prompts: Head, features: np.ndarray) -> np.ndarray:
    """1 − MCM of normalised `features` (B, D) under the prompt rows: higher = less like any
    class of the label set. (B,) float32 in [0, 1 − 1/C]."""
    cos = np.einsum("bd,kcd->bc", features.astype(np.float32), prompts.weight) / prompts.num_rows
    e = np.exp(cos - cos.max(axis=1, keepdims=True))
    return (1.0 - 1.0 / e.sum(axis=1)).astype(np.float32)


def ood_threshold(prompts: Head, source_features: np.ndarray, q: float = OOD_QUANTILE) -> float:
    """The score above which traffic is taken as out of the label set: the `q` quantile of
    the labelled source rows' scores."""
    return float(np.quantile(ood_scores(prompts, l2_normalize(source_features)), q))


# -- two-sample test ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ShiftTest:
    mmd2: float  # squared maximum mean discrepancy
    score: float  # mmd2 in standard deviations of its permutation null
    p_value: float
    n_reference: int
    n_window: int


def shift_test(
    reference: np.ndarray,
    window: np.ndarray,
    max_n: int = 500,
    permutations: int = 200,
    seed: int = 0,
) -> ShiftTest:
    """Are `window` embeddings drawn like `reference` ones? MMD² (unbiased, Gaussian kernel of
    median-distance bandwidth) on at most `max_n` rows of each, and its permutation p-value."""
    rng = np.random.default_rng(seed)
    a = l2_normalize(np.asarray(reference, np.float32))
    b = l2_normalize(np.asarray(window, np.float32))
    if len(a) > max_n:
        a = a[rng.choice(len(a), max_n, replace=False)]
    if len(b) > max_n:
        b = b[rng.choice(len(b), max_n, replace=False)]
    z = np.concatenate([a, b]).astype(np.float64)
    sq = np.maximum(2.0 - 2.0 * (z @ z.T), 0.0)  # squared distances of unit vectors
    bw = float(np.median(sq[np.triu_indices(len(z), 1)])) or 1.0
    k = np.exp(-sq / bw)
    np.fill_diagonal(k, 0.0)
    na, nb = len(a), len(b)
    # with weights +1/na on the reference and -1/nb on the window, w.K.w (K without its
    # diagonal) is MMD² up to the unbiased estimator's normalisation; one matrix product
    # scores every permutation at once
    w = np.concatenate([np.full(na, 1.0 / na), np.full(nb, -1.0 / nb)])
    perms = np.stack([w[rng.permutation(na + nb)] for _ in range(permutations)], axis=1)
    observed = float(w @ k @ w)
    null_a = np.einsum("ip,ip->p", perms, k @ perms)
    score = (observed - null_a.mean()) / max(float(null_a.std()), 1e-12)
    p_value = (1 + int((null_a >= observed).sum())) / (1 + permutations)
    return ShiftTest(round(observed, 6), round(float(score), 3), p_value, na, nb)
