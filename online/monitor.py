"""How well the served head does now, per site, without labels (numpy only).

Over a rolling window of the site's newest stored traffic embeddings (they are stored
anyway, so this costs one read and a few matrix products), the samples in it that the served
version answered itself: a head just adapted on the traffic before it would otherwise be
judged on its own training rows, where it is confident by construction (the estimate ran
8-15 points above the truth there; `mp2a bench estimate`'s drift run):
- the served head's estimated accuracy and its 90 % interval (online/estimate.py, its
  `DEFAULT_METHOD`), on the traffic that looks like the label set;
- `shift_score`: how far the traffic is from the artifact's labelled sources, in standard
  deviations of a permutation null of the MMD two-sample statistic (online/estimate.py);
- `ood_fraction`: the share of the window whose `ood_score` is above the threshold
  calibrated on the sources (out of the label set, by that score).

`drift`: the newest `drift_window` samples tested against the older rest of the window
(the same two-sample test). A site whose traffic changed domain shows a large score there at
once, and a stationary stream only by chance; the worker starts a run when it exceeds
`drift_score` (with a cooldown, online/worker.py), or when the newest slice's estimated
accuracy is `drift_drop` below the older rest's with a score of at least a third of it.
Measured (`mp2a bench estimate`): printed traffic, then lcd: score 4 after 50 lcd samples in
the newest 200, 13 after 100; 20 stationary windows of printed: at most 1.7.

Figures are None, with a `reason`, when the window is too small (fewer samples than
`min_samples` or than classes), empty, or all out of the label set: never a crash and never
a run started on them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from mp2a.artifact import SOURCE_FEATURES_FILE, Artifact
from mp2a.head import l2_normalize
from online import estimate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonitorConfig:
    window: int = 2000  # newest stored samples per site
    min_samples: int = 50  # fewer: no figures
    interval_s: float = 30.0  # seconds between computations in the server
    drift_window: int = 200  # the newest slice tested against the older rest
    drift_score: float = 8.0  # MMD null standard deviations that count as a change
    drift_drop: float = 0.10  # or: the newest slice's estimate this far below the rest's

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MonitorConfig:
        env = os.environ if environ is None else environ
        kw: dict = {}
        for name, field, kind in (
            ("MP2A_MONITOR_WINDOW", "window", int),
            ("MP2A_MONITOR_MIN_SAMPLES", "min_samples", int),
            ("MP2A_MONITOR_INTERVAL_S", "interval_s", float),
            ("MP2A_DRIFT_WINDOW", "drift_window", int),
            ("MP2A_DRIFT_SCORE", "drift_score", float),
        ):
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                v = kind(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if v <= 0:
                raise ValueError(f"{name}={raw!r} must be > 0")
            kw[field] = v
        return cls(**kw)


@dataclass(frozen=True)
class Calibrated:
    """What one served version needs to monitor traffic: computed once per version."""

    version: int
    art: Artifact
    source: estimate.Source
    ood_threshold: float


def calibrate(art: Artifact) -> Calibrated:
    sf = art.tensors(SOURCE_FEATURES_FILE)
    x = l2_normalize(sf["features"].astype(np.float32))
    source = estimate.source_view(art.head, x, sf["labels"], sf.get("domains"))
    return Calibrated(art.version, art, source, estimate.ood_threshold(art.prompt_head(), x))


def _nulls(site: str, version: int, n: int, reason: str) -> dict:
    return {
        "site": site,
        "version": str(version),
        "n": n,
        "estimated_accuracy": None,
        "interval": [None, None],
        "shift_score": None,
        "ood_fraction": None,
        "method": estimate.DEFAULT_METHOD,
        "reason": reason,
        "computed_at": _now(),
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def newest_copies(x: np.ndarray) -> np.ndarray:
    """Ascending indices of the newest copy of each distinct row of `x` (newest last)."""
    _, first = np.unique(x[::-1], axis=0, return_index=True)
    return np.sort(len(x) - 1 - first)


def usable(traffic: np.ndarray, dim: int) -> np.ndarray:
    """The finite rows of `traffic`, each image once (newest last): a health probe or a stuck
    camera repeating one image would otherwise fill the window, pull the estimate towards
    its one verdict and look like drift."""
    x = np.asarray(traffic, np.float32).reshape(-1, dim) if len(traffic) else np.zeros((0, dim))
    x = x[np.isfinite(x).all(axis=1)].astype(np.float32)
    return l2_normalize(x[newest_copies(x)] if len(x) else x)


def compute(cal: Calibrated, traffic: np.ndarray, cfg: MonitorConfig, site: str = "") -> dict:
    """The monitor's figures for `traffic` (newest last) under the served version `cal`."""
    art = cal.art
    x = usable(traffic, art.head.dim)
    n, c = len(x), art.head.num_classes
    need = max(cfg.min_samples, c)
    if n < need:
        return _nulls(
            site,
            cal.version,
            n,
            f"{n} usable samples served by version {cal.version} in the window, need {need}",
        )
    ood = estimate.ood_scores(art.prompt_head(), x) > cal.ood_threshold
    ood_fraction = float(ood.mean())
    inset = x[~ood]
    out = _nulls(site, cal.version, n, "")
    out["ood_fraction"] = round(ood_fraction, 4)
    shift = estimate.shift_test(cal.source.features, x)
    out["shift_score"] = shift.score
    if len(inset) < need:
        out["reason"] = (
            f"{len(inset)} of {n} samples look like the label set (ood_fraction "
            f"{ood_fraction:.2f}), need {need} for an estimate"
        )
        return out
    est = estimate.estimate(art.head, cal.source, inset)
    if est.value is None:
        out["reason"] = est.reason
        return out
    out.update(estimated_accuracy=est.value, interval=[est.low, est.high], reason=None)
    return out


def drift(cal: Calibrated, traffic: np.ndarray, cfg: MonitorConfig) -> dict:
    """Has the traffic changed? The newest `drift_window` samples against the older rest of
    `traffic` (newest last): {"drifted", "score", "p_value", "drop", "reason"}."""
    x = usable(traffic, cal.art.head.dim)
    k = cfg.drift_window
    if len(x) < 2 * k:
        return {"drifted": False, "reason": f"{len(x)} samples, need {2 * k}"}
    old, new = x[:-k], x[-k:]
    t = estimate.shift_test(old, new, max_n=max(k, 500))
    e_old = estimate.estimate(cal.art.head, cal.source, old, n_boot=50)
    e_new = estimate.estimate(cal.art.head, cal.source, new, n_boot=50)
    drop = (
        None if e_old.value is None or e_new.value is None else round(e_old.value - e_new.value, 4)
    )
    reasons = []
    if t.score >= cfg.drift_score:
        reasons.append(
            f"the newest {k} samples differ from the {len(old)} before them (MMD score "
            f"{t.score:.1f} >= {cfg.drift_score:g})"
        )
    # a drop alone, on two small slices, can be chance: it counts with some sign of change
    if drop is not None and drop >= cfg.drift_drop and t.score >= cfg.drift_score / 3:
        reasons.append(
            f"the estimated accuracy of the newest {k} samples is {drop:.3f} below the rest's"
        )
    return {
        "drifted": bool(reasons),
        "score": t.score,
        "p_value": t.p_value,
        "drop": drop,
        "reason": "; ".join(reasons) or None,
    }


class Monitor:
    """The server's monitor thread: every `interval_s`, each site's window → figures, kept
    for GET /monitor and set as the mp2a_estimated_accuracy… gauges."""

    def __init__(
        self,
        read: Callable[[int, str, str], np.ndarray],  # (window, site, served_by version)
        current: Callable[[str], Artifact],
        sites: Callable[[], list[str]],
        cfg: MonitorConfig | None = None,
        gauges: object | None = None,
    ) -> None:
        self.cfg = cfg or MonitorConfig()
        self._read, self._current, self._sites = read, current, sites
        self._gauges = gauges
        self._cal: dict[str, Calibrated] = {}
        self._last: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _calibrated(self, site: str) -> Calibrated:
        art = self._current(site)
        cal = self._cal.get(site)
        if cal is None or cal.version != art.version or cal.art.path != art.path:
            cal = self._cal[site] = calibrate(art)
        return cal

    def refresh(self, site: str = "") -> dict:
        """Compute `site`'s figures now (also what the thread does)."""
        try:
            cal = self._calibrated(site)
            served = self._read(self.cfg.window, site, str(cal.version))
            fig = compute(cal, served, self.cfg, site)
        except Exception as e:  # no store yet, the state is down: the figures say so
            log.warning("monitor of site %r: cannot compute its figures: %s", site, e)
            cal = self._cal.get(site)
            fig = _nulls(
                site,
                cal.version if cal is not None else 0,
                0,
                "no traffic window to read yet (nothing stored, or the state is unreachable)",
            )
        with self._lock:
            self._last[site] = fig
        if self._gauges is not None:
            self._gauges.set_monitor(fig)  # type: ignore[attr-defined]
        return fig

    def figures(self, site: str = "") -> dict:
        with self._lock:
            fig = self._last.get(site)
        return fig if fig is not None else self.refresh(site)

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._loop, name="mp2a-monitor", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.interval_s if self._last else 1.0):
            for site in ["", *self._sites()]:
                if self._stop.is_set():
                    return
                self.refresh(site)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
