"""The quality gate: is a re-adapted head better than the serving one? (numpy only)

There are no labels online, so the gate *estimates* the target accuracy of both heads on
held-out traffic, two ways, and accepts a candidate only when the estimate rises by a margin
and nothing looks broken. The worker holds out a deterministic slice of the artifact's source
features and of the stored traffic (`holdout_mask`: every 5th row) and trains on the rest.

Estimates of target accuracy (held-out traffic, no labels):
- ATC (Garg et al., ICLR 2022, "Leveraging Unlabeled Data to Predict Out-of-Distribution
  Performance"): per head, the threshold t on the negative prediction entropy such that the
  fraction of held-out *source* rows scoring above t equals the head's source accuracy; the
  estimate is the fraction of traffic scoring above t.
- Agreement with the refined labelling: the two heads' votes on the held-out traffic (one
  each, so the more confident head does not outweigh the other), refined with the traffic's
  cluster structure (adapt/transductive.py), taken as pseudo ground truth; the estimate is
  each head's agreement with it. Refining the serving head's labels alone scored a candidate
  that was 12 points better on `lcd` as worse (it moved away from the serving head's errors);
  averaging probabilities let a confident, wrong candidate write the reference.
The decision uses their mean (`estimate_*`); `min_gain` is the margin.

Checks that reject whatever the estimates say:
- held-out source accuracy (labels are known there; a collapse of the prompts shows here
  first): the candidate's prompt rows may lose at most `source_margin` (5 points) against
  the serving head's prompt rows, and the whole head at most `head_source_margin` (10
  points: its prototype row is fitted to the traffic, not to the sources). Measured on
  genuine shifts (`mp2a bench online`, scratch runs over DigitsDA and the shift styles) the
  prompt rows lost 0.7 to 3.2 points and whole heads 1.5 to 5; on harmful streams the prompt
  rows lost 5.4 (letters) to 13 (noise);
- class structure of the stream: the share of the traffic's variance that the serving
  head's labelling explains (between-class over within-class variance, Fisher's ratio),
  relative to the same ratio on the held-out source rows, at least `min_structure`. Images
  of the label set in a new style are organised by their classes (DigitsDA streams: 0.94 to
  1.5, `lcd` 0.73, `dotmatrix` 0.93); images from another label set or noise are not
  (letters 0.30, noise 0.49), and the stream is then no target to adapt to;
- ATC alone may not fall by more than `atc_tolerance`, or two held-out samples' worth
  (2 / n) where the held-out traffic is small: a one-sample difference is no evidence. ATC
  is calibrated on the sources, where a prototype row is out of its domain, so it is a
  sanity bound here, not the decision;
- agreement with the serving head on held-out traffic at least `agreement_floor`;
- entropy: the candidate's mean normalised entropy not over `entropy_factor` times the
  serving head's and `entropy_slack` above it;
- class balance: no class above `max_class_share` of the candidate's predictions;
- the stream itself: if one class takes more than `max_class_share` of the *serving* head's
  predictions, the stream is dominated by one class (a flood, a stuck camera): adapting to it
  would teach the head that one class, so the gate refuses whatever the candidate;
- too little held-out traffic (`min_holdout_traffic`).

The result is a plain dict (JSON-ready) with every figure, the decision and its reasons; the
worker records it in adapt_status.json, decisions.jsonl and, for an accepted head, in the new
version's manifest (`decision`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mp2a.head import Head, l2_normalize
from online import estimate

HOLDOUT_EVERY = 5


@dataclass(frozen=True)
class GateConfig:
    min_gain: float = 0.01  # the estimated paired gain must reach this, and its interval > 0
    source_margin: float = 0.05  # the prompt rows' held-out source accuracy (collapse)
    min_structure: float = 0.65
    agreement_floor: float = 0.0  # off: no measured harmful case needed it (kept settable)
    max_class_share: float = 0.6  # of the candidate's predictions
    max_stream_excess: float = 0.35  # of the serving head's predictions, beyond balance
    min_holdout_traffic: int = 20


def holdout_mask(n: int, every: int = HOLDOUT_EVERY) -> np.ndarray:
    """Deterministic held-out rows: every `every`-th (0, every, 2*every, …)."""
    return (np.arange(n) % every) == 0


def _neg_entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, 1e-12, 1.0)
    return (p * np.log(p)).sum(axis=1)


def _entropy(probs: np.ndarray) -> float:
    """Mean entropy normalised by log C (0 = certain, 1 = uniform)."""
    return float(-_neg_entropy(probs).mean() / np.log(probs.shape[1])) if len(probs) else 0.0


def _share(pred: np.ndarray, c: int) -> tuple[float, int]:
    counts = np.bincount(pred, minlength=c)
    top = int(counts.argmax())
    return float(counts[top] / max(1, len(pred))), top


def fisher_ratio(features: np.ndarray, probs: np.ndarray) -> float:
    """Between-class over within-class variance of normalised `features` under the soft
    labelling `probs` (N, C)."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    mass = probs.sum(axis=0)  # (C,)
    means = (probs.T @ x) / np.maximum(mass, 1e-12)[:, None]  # (C, D)
    centre = x.mean(axis=0)
    between = float((mass[:, None] * (means - centre) ** 2).sum()) / len(x)
    within = float((x**2).sum() - (mass[:, None] * means**2).sum()) / len(x)
    return between / max(within, 1e-12)


def evaluate(
    serving: Head,
    candidate: Head,
    source_features: np.ndarray,
    source_labels: np.ndarray,
    traffic: np.ndarray,
    cfg: GateConfig | None = None,
    serving_prompts: Head | None = None,
    candidate_prompts: Head | None = None,
    source_domains: np.ndarray | None = None,
) -> dict:
    """Compare `candidate` with `serving` on held-out source rows (with labels) and held-out
    traffic embeddings; returns {"accepted", "reasons", figures…, "config"}.
    `serving_prompts` / `candidate_prompts`: the heads' prompt rows alone (default: the whole
    heads); `source_domains`: the source rows' domains (the absolute estimates' calibration
    across shifts)."""
    cfg = cfg or GateConfig()
    if serving.num_classes != candidate.num_classes or serving.dim != candidate.dim:
        return {
            "accepted": False,
            "reasons": [
                f"candidate head shape {candidate.weight.shape} does not fit the serving "
                f"head's {serving.weight.shape}"
            ],
            "config": asdict(cfg),
        }
    c = serving.num_classes
    reasons: list[str] = []
    fig: dict = {"n_source_holdout": len(source_labels), "n_traffic_holdout": len(traffic)}
    have_source = len(source_labels) >= c
    if have_source:
        view_s = estimate.source_view(serving, source_features, source_labels, source_domains)
        view_c = estimate.source_view(candidate, source_features, source_labels, source_domains)
        src_s = view_s.probs
        acc_s = float((view_s.probs.argmax(1) == view_s.labels).mean())
        acc_c = float((view_c.probs.argmax(1) == view_c.labels).mean())
        sp = serving_prompts or serving
        cp = candidate_prompts or candidate
        x_src = view_s.features
        pacc_s = float((sp.probs(x_src).argmax(1) == view_s.labels).mean())
        pacc_c = float((cp.probs(x_src).argmax(1) == view_s.labels).mean())
        fig.update(
            source_accuracy_serving=acc_s,
            source_accuracy_candidate=acc_c,
            source_accuracy_drop=acc_s - acc_c,
            source_accuracy_prompts_serving=pacc_s,
            source_accuracy_prompts_candidate=pacc_c,
        )
        if pacc_c < pacc_s - cfg.source_margin:
            reasons.append(
                f"the candidate's prompt rows reach {pacc_c:.3f} on held-out source rows, more "
                f"than {cfg.source_margin:.3f} below the serving prompts' {pacc_s:.3f}: "
                "training on this traffic damaged what the prompts know of the label set"
            )
    else:
        reasons.append(
            f"{len(source_labels)} held-out source rows, fewer than the {c} classes: the "
            "estimates cannot be calibrated and collapse cannot be checked"
        )

    if len(traffic) < max(1, cfg.min_holdout_traffic, c):
        reasons.append(
            f"{len(traffic)} held-out traffic samples, need {max(cfg.min_holdout_traffic, c)}: "
            "the traffic checks cannot run; serve more traffic first"
        )
        return _result(reasons, fig, cfg)
    if not have_source:
        return _result(reasons, fig, cfg)

    x = l2_normalize(np.asarray(traffic, np.float32))
    ps, pc = serving.probs(x), candidate.probs(x)
    pred_s, pred_c = ps.argmax(1), pc.argmax(1)
    agreement = float((pred_s == pred_c).mean())
    share_s, top_s = _share(pred_s, c)
    share_c, top_c = _share(pred_c, c)
    fig.update(
        agreement=agreement,
        entropy_serving=_entropy(ps),
        entropy_candidate=_entropy(pc),
        max_class_share_serving=share_s,
        max_class_share_candidate=share_c,
        max_class_serving=top_s,
        max_class_candidate=top_c,
        mean_confidence_serving=float(ps.max(1).mean()),
        mean_confidence_candidate=float(pc.max(1).mean()),
    )
    structure = fisher_ratio(x, ps) / max(fisher_ratio(x_src, src_s), 1e-12)
    fig["class_structure"] = structure
    if structure < cfg.min_structure:
        reasons.append(
            f"the serving head's classes explain little of this traffic (class structure "
            f"{structure:.2f} of the source's, limit {cfg.min_structure:.2f}): it does not look "
            "like images of this label set (another label set, noise, a broken camera?); "
            "nothing to adapt to"
        )
    # the decision: the estimated paired gain on the same held-out rows, with its interval
    gain = estimate.paired_gain(serving, candidate, view_s, view_c, x)
    est_s = estimate.estimate(serving, view_s, x)
    est_c = estimate.estimate(candidate, view_c, x)
    atc_s, atc_c = (
        estimate.atc(src_s, view_s.labels, ps),
        estimate.atc(view_c.probs, view_c.labels, pc),
    )
    fig.update(
        estimated_gain=gain.value,
        estimated_gain_interval=[gain.low, gain.high],
        gain_method=gain.method,
        estimate_serving=est_s.value,
        estimate_candidate=est_c.value,
        estimate_serving_interval=[est_s.low, est_s.high],
        estimate_candidate_interval=[est_c.low, est_c.high],
        estimate_method=est_s.method,
        atc_serving=atc_s,
        atc_candidate=atc_c,
    )
    stream_limit = 1 / c + cfg.max_stream_excess * (1 - 1 / c)
    fig["stream_share_limit"] = stream_limit
    if share_s > stream_limit:
        reasons.append(
            f"the stream is dominated by one class: {share_s:.3f} of the held-out traffic is "
            f"class {top_s} for the serving head (limit {stream_limit:.3f}); adapting to it "
            "would teach the head that class; collect a more varied stream"
        )
    if gain.value < cfg.min_gain or gain.low <= 0:
        reasons.append(
            f"the estimated accuracy gain {gain.value:+.3f} (90 % interval {gain.low:+.3f} to "
            f"{gain.high:+.3f}, {gain.method} on {gain.n} held-out samples) is not clearly "
            f"above zero (needs at least {cfg.min_gain:.3f} and an interval above 0)"
        )
    if agreement < cfg.agreement_floor:
        reasons.append(
            f"agreement with the serving head on held-out traffic {agreement:.3f} is below "
            f"the floor {cfg.agreement_floor:.3f}"
        )
    if share_c > cfg.max_class_share:
        reasons.append(
            f"class {top_c} takes {share_c:.3f} of the candidate's predictions on held-out "
            f"traffic (limit {cfg.max_class_share:.3f}; serving head {share_s:.3f})"
        )
    return _result(reasons, fig, cfg)


def _result(reasons: list[str], fig: dict, cfg: GateConfig) -> dict:
    # NaN is not JSON: report missing figures as None
    fig = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in fig.items()}
    return {"accepted": not reasons, "reasons": reasons, **fig, "config": asdict(cfg)}
