"""The quality gate: is a re-adapted head fit to replace the serving one? (numpy only)

The adaptation worker holds out a deterministic slice of the artifact's source features and of
the stored traffic (`holdout_mask`: every 5th row) and trains on the rest. `evaluate` then
compares the candidate head with the serving head on those held-out rows:

- source accuracy (labels known): the candidate may not lose more than `source_margin`
  (absolute, default 2 points) against the serving head;
- traffic (no labels), sanity checks only:
  - agreement: the fraction of held-out traffic on which both heads predict the same class
    must be at least `agreement_floor` (default 0.5): adaptation refines, it does not relabel;
  - entropy: the candidate's mean normalised prediction entropy (0..1) may not exceed
    `entropy_factor` (1.5) times the serving head's and `entropy_slack` (0.05) above it;
  - class balance: no class may take more than `max_class_share` (0.6) of the candidate's
    predictions unless the serving head's largest class share was already above that (then
    the candidate may not make it worse by more than `entropy_slack`).

The result is a plain dict (JSON-ready) with every figure, the decision and its reasons; the
worker records it in adapt_status.json and, for an accepted head, in the new version's
manifest (`decision`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mp2a.head import Head

HOLDOUT_EVERY = 5


@dataclass(frozen=True)
class GateConfig:
    source_margin: float = 0.02
    agreement_floor: float = 0.5
    entropy_factor: float = 1.5
    entropy_slack: float = 0.05
    max_class_share: float = 0.6
    min_holdout_traffic: int = 1


def holdout_mask(n: int, every: int = HOLDOUT_EVERY) -> np.ndarray:
    """Deterministic held-out rows: every `every`-th (0, every, 2*every, …)."""
    return (np.arange(n) % every) == 0


def _entropy(probs: np.ndarray) -> float:
    """Mean entropy normalised by log C (0 = certain, 1 = uniform)."""
    c = probs.shape[1]
    p = np.clip(probs, 1e-12, 1.0)
    return float((-(p * np.log(p)).sum(1)).mean() / np.log(c)) if len(p) else 0.0


def _share(pred: np.ndarray, c: int) -> tuple[float, int]:
    counts = np.bincount(pred, minlength=c)
    top = int(counts.argmax())
    return float(counts[top] / max(1, len(pred))), top


def evaluate(
    serving: Head,
    candidate: Head,
    source_features: np.ndarray,
    source_labels: np.ndarray,
    traffic: np.ndarray,
    cfg: GateConfig | None = None,
) -> dict:
    """Compare `candidate` with `serving` on held-out source rows (with labels) and held-out
    traffic embeddings; returns {"accepted", "reasons", figures…, "config"}."""
    cfg = cfg or GateConfig()
    if serving.weight.shape[1:] != candidate.weight.shape[1:]:
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

    if len(source_labels):
        acc_s = float((serving.probs(source_features).argmax(1) == source_labels).mean())
        acc_c = float((candidate.probs(source_features).argmax(1) == source_labels).mean())
    else:
        acc_s = acc_c = float("nan")
        reasons.append("no held-out source features: source accuracy cannot be checked")
    fig.update(source_accuracy_serving=acc_s, source_accuracy_candidate=acc_c)
    fig["source_accuracy_drop"] = acc_s - acc_c
    if len(source_labels) and acc_c < acc_s - cfg.source_margin:
        reasons.append(
            f"held-out source accuracy {acc_c:.3f} is more than {cfg.source_margin:.3f} below "
            f"the serving head's {acc_s:.3f}"
        )

    if len(traffic) < cfg.min_holdout_traffic:
        reasons.append(
            f"{len(traffic)} held-out traffic samples, need {cfg.min_holdout_traffic}: the "
            "traffic checks cannot run"
        )
    else:
        ps, pc = serving.probs(traffic), candidate.probs(traffic)
        pred_s, pred_c = ps.argmax(1), pc.argmax(1)
        agreement = float((pred_s == pred_c).mean())
        ent_s, ent_c = _entropy(ps), _entropy(pc)
        share_s, top_s = _share(pred_s, c)
        share_c, top_c = _share(pred_c, c)
        fig.update(
            agreement=agreement,
            entropy_serving=ent_s,
            entropy_candidate=ent_c,
            max_class_share_serving=share_s,
            max_class_share_candidate=share_c,
            max_class_serving=top_s,
            max_class_candidate=top_c,
            mean_confidence_serving=float(ps.max(1).mean()),
            mean_confidence_candidate=float(pc.max(1).mean()),
        )
        if agreement < cfg.agreement_floor:
            reasons.append(
                f"agreement with the serving head on held-out traffic {agreement:.3f} is below "
                f"the floor {cfg.agreement_floor:.3f}"
            )
        if ent_c > cfg.entropy_factor * ent_s and ent_c > ent_s + cfg.entropy_slack:
            reasons.append(
                f"mean prediction entropy rose from {ent_s:.3f} to {ent_c:.3f} (normalised), "
                f"over {cfg.entropy_factor}x"
            )
        if share_c > cfg.max_class_share:
            if share_s <= cfg.max_class_share:
                reasons.append(
                    f"class {top_c} takes {share_c:.3f} of the candidate's predictions on "
                    f"held-out traffic (limit {cfg.max_class_share:.3f}; serving head "
                    f"{share_s:.3f})"
                )
            elif share_c > share_s + cfg.entropy_slack:
                reasons.append(
                    f"class {top_c} takes {share_c:.3f} of the candidate's predictions, worse "
                    f"than the serving head's already unbalanced {share_s:.3f}"
                )
    # NaN is not JSON: report missing figures as None
    fig = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in fig.items()}
    return {"accepted": not reasons, "reasons": reasons, **fig, "config": asdict(cfg)}
