"""The mp2a_* Prometheus metrics (names are a stable interface: DESIGN.md §3).

They are created lazily, on the first `get_metrics()` call inside a BentoML worker: BentoML
sets PROMETHEUS_MULTIPROC_DIR for its worker processes and its /metrics endpoint reads only
that directory, so prometheus_client must not create them before the worker is up.
`ensure_multiprocess_dir()` gives in-process use (`Service.to_asgi()`, tests) the same setup.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

STAGES = ("decode", "preprocess", "encode", "head")
ADAPTATION_OUTCOMES = ("accepted", "rejected", "failed")
STATE_OPS = ("watch", "traffic")  # what mp2a_state_errors_total counts
HEALED = ("traffic_store", "versions", "edge_buffer")  # mp2a_state_healed_total{what}
# exposition names (counters get _total, histograms _bucket/_sum/_count)
NAMES = (
    "mp2a_inference_latency_seconds",
    "mp2a_predictions_total",
    "mp2a_prediction_confidence",
    "mp2a_model_version_info",
    "mp2a_encoder_batch_size",
    "mp2a_traffic_samples",
    "mp2a_traffic_dropped_total",
    "mp2a_adaptation_runs_total",
    "mp2a_adaptation_duration_seconds",
    "mp2a_pseudo_label_selected_ratio",
    "mp2a_state_errors_total",
    "mp2a_state_healed_total",
    "mp2a_hub_samples_received_total",
    "mp2a_edge_upload_lag_seconds",
    "mp2a_edge_buffer_samples",
    "mp2a_edge_uploaded_total",
    "mp2a_edge_upload_errors_total",
    "mp2a_edge_head_age_seconds",
    "mp2a_edge_head_rejected_total",
    "mp2a_estimated_accuracy",
    "mp2a_estimated_accuracy_low",
    "mp2a_estimated_accuracy_high",
    "mp2a_shift_score",
    "mp2a_ood_fraction",
)
# 0.5 ms .. 10 s: the tiny CLIP decodes in under a millisecond, ViT-B-16 on CPU takes seconds
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ADAPTATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


@dataclass(frozen=True)
class ServingMetrics:
    inference_latency: Any  # Histogram{stage}
    predictions: Any  # Counter{label}
    confidence: Any  # Histogram
    model_version_info: Any  # Gauge{version, backbone} = 1 for the serving head
    encoder_batch_size: Any  # Histogram: rows per model call (shows batching at work)
    traffic_samples: Any  # Gauge, driven by the traffic store
    traffic_dropped: Any  # Counter: samples the traffic store lost (queue full, write failed)
    adaptation_runs: Any  # Counter{outcome=accepted|rejected|failed}, adaptation worker
    adaptation_duration: Any  # Histogram, adaptation worker
    pseudo_label_selected_ratio: Any  # Gauge, adaptation worker
    state_errors: Any  # Counter{op}: calls to the state backend that failed (database down)
    state_healed: Any  # Counter{what}: damaged state moved aside and replaced (mp2a/heal.py)

    served: list[tuple[str, str]] = field(default_factory=list)  # (version, backbone) seen

    def set_model_version(self, version: str, backbone: str) -> None:
        """Mark `version` as the one being served: its series is 1, earlier ones 0.

        Earlier series are zeroed rather than removed: in multiprocess mode a removed series
        would live on in the worker's metrics file.
        """
        for v, b in self.served:
            self.model_version_info.labels(version=v, backbone=b).set(0)
        self.model_version_info.labels(version=version, backbone=backbone).set(1)
        if (version, backbone) not in self.served:
            self.served.append((version, backbone))


def ensure_multiprocess_dir() -> None:
    """Outside `bentoml serve`, give BentoML's /metrics the directory it expects.

    BentoML's pytest plugin does the same; without it /metrics fails in-process.
    """
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="mp2a-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)


def unseen_by_bentoml() -> str:
    """Exposition text of the metrics BentoML's /metrics would miss, usually "".

    BentoML's /metrics reads only the multiprocess directory. If prometheus_client was
    imported before PROMETHEUS_MULTIPROC_DIR was set (in-process use), every metric lives in
    memory instead; then this returns the default registry's exposition to append.
    """
    from prometheus_client import REGISTRY, generate_latest, values

    if values.ValueClass is not values.MutexValue:
        return ""
    return generate_latest(REGISTRY).decode()


@functools.lru_cache(maxsize=1)
def get_metrics() -> ServingMetrics:
    """The process-wide metrics (registered once in prometheus_client's default registry)."""
    from prometheus_client import Counter, Gauge, Histogram

    multiproc = "PROMETHEUS_MULTIPROC_DIR" in os.environ
    log.debug("registering mp2a metrics (multiprocess mode: %s)", multiproc)
    m = ServingMetrics(
        inference_latency=Histogram(
            "mp2a_inference_latency_seconds",
            "Seconds per request and stage (encode includes waiting for the shared batch)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
        ),
        predictions=Counter("mp2a_predictions", "Predictions served, by top-1 label", ["label"]),
        confidence=Histogram(
            "mp2a_prediction_confidence", "Top-1 probability", buckets=CONFIDENCE_BUCKETS
        ),
        model_version_info=Gauge(
            "mp2a_model_version_info",
            "1 for the model version being served",
            ["version", "backbone"],
            multiprocess_mode="livemax",
        ),
        encoder_batch_size=Histogram(
            "mp2a_encoder_batch_size", "Images per image-encoder call", buckets=BATCH_BUCKETS
        ),
        traffic_samples=Gauge(
            "mp2a_traffic_samples",
            "Embeddings held in the traffic store",
            multiprocess_mode="livemax",
        ),
        traffic_dropped=Counter(
            "mp2a_traffic_dropped",
            "Served samples the traffic store dropped (queue full or write failed)",
        ),
        adaptation_runs=Counter(
            "mp2a_adaptation_runs", "Online re-adaptation runs, by outcome", ["outcome"]
        ),
        adaptation_duration=Histogram(
            "mp2a_adaptation_duration_seconds",
            "Seconds per online re-adaptation run",
            buckets=ADAPTATION_BUCKETS,
        ),
        pseudo_label_selected_ratio=Gauge(
            "mp2a_pseudo_label_selected_ratio",
            "Fraction of traffic selected as pseudo-labels in the last adaptation stage",
            multiprocess_mode="mostrecent",
        ),
        state_errors=Counter(
            "mp2a_state_errors",
            "Failed calls to the state backend (database unreachable), by operation",
            ["op"],
        ),
        state_healed=Counter(
            "mp2a_state_healed",
            "Damaged state moved aside and replaced by a fresh one (traffic store, versions)",
            ["what"],
        ),
    )
    # every series exists from the start, so dashboards and rate() see zeros, not gaps
    for stage in STAGES:
        m.inference_latency.labels(stage=stage)
    for outcome in ADAPTATION_OUTCOMES:
        m.adaptation_runs.labels(outcome=outcome)
    for op in STATE_OPS:
        m.state_errors.labels(op=op)
    for what in HEALED:
        m.state_healed.labels(what=what)
    return m


@dataclass(frozen=True)
class HubMetrics:
    received: Any  # Counter{site}: samples stored from edge uploads (sites: MP2A_EDGE_TOKENS)


@functools.lru_cache(maxsize=1)
def get_hub_metrics(sites: tuple[str, ...]) -> HubMetrics:
    """A hub's metrics; the site label takes only the configured sites (bounded)."""
    from prometheus_client import Counter

    m = HubMetrics(
        received=Counter(
            "mp2a_hub_samples_received", "Edge traffic samples stored by this hub", ["site"]
        )
    )
    for site in sites:
        m.received.labels(site=site)
    return m


@dataclass(frozen=True)
class EdgeMetrics:
    upload_lag: Any  # Gauge: seconds since the oldest sample not yet delivered was served
    buffer_samples: Any  # Gauge: samples waiting in the buffer
    uploaded: Any  # Counter: samples the hub has
    upload_errors: Any  # Counter: failed upload attempts
    head_age: Any  # Gauge: seconds since the hub last confirmed the served head
    head_rejected: Any  # Counter: heads refused (checksum)


@functools.lru_cache(maxsize=1)
def get_edge_metrics() -> EdgeMetrics:
    from prometheus_client import Counter, Gauge

    return EdgeMetrics(
        upload_lag=Gauge(
            "mp2a_edge_upload_lag_seconds",
            "Age of the oldest sample not yet delivered to the hub",
            multiprocess_mode="mostrecent",
        ),
        buffer_samples=Gauge(
            "mp2a_edge_buffer_samples",
            "Samples waiting in the edge's buffer",
            multiprocess_mode="mostrecent",
        ),
        uploaded=Counter("mp2a_edge_uploaded", "Samples delivered to the hub"),
        upload_errors=Counter("mp2a_edge_upload_errors", "Failed uploads to the hub"),
        head_age=Gauge(
            "mp2a_edge_head_age_seconds",
            "Seconds since the hub last confirmed the served head",
            multiprocess_mode="mostrecent",
        ),
        head_rejected=Counter(
            "mp2a_edge_head_rejected", "Heads from the hub refused (failed their sha256)"
        ),
    )


MONITOR_GAUGES = (
    ("accuracy", "mp2a_estimated_accuracy", "Served head's estimated accuracy on recent traffic"),
    ("low", "mp2a_estimated_accuracy_low", "Low end of the estimate's 90 % interval"),
    ("high", "mp2a_estimated_accuracy_high", "High end of the estimate's 90 % interval"),
    ("shift", "mp2a_shift_score", "Shift score: sources vs recent traffic"),
    ("ood", "mp2a_ood_fraction", "Fraction of recent traffic out of the label set"),
)  # fmt: skip
OWN_SITE_LABEL = "default"  # the server's own traffic (a hub's edge sites by their names)


@dataclass(frozen=True)
class MonitorMetrics:
    gauges: dict[str, Any]  # key of MONITOR_GAUGES -> Gauge{site}

    def set_monitor(self, fig: dict) -> None:
        """Set the gauges from online.monitor figures; a figure that is None is NaN (no
        value yet), not a stale number."""
        site = fig.get("site") or OWN_SITE_LABEL
        low, high = (fig.get("interval") or [None, None])[:2]
        values = {
            "accuracy": fig.get("estimated_accuracy"),
            "low": low,
            "high": high,
            "shift": fig.get("shift_score"),
            "ood": fig.get("ood_fraction"),
        }
        for key, v in values.items():
            self.gauges[key].labels(site=site).set(float("nan") if v is None else float(v))


@functools.lru_cache(maxsize=1)
def get_monitor_metrics() -> MonitorMetrics:
    from prometheus_client import Gauge

    return MonitorMetrics(
        {
            key: Gauge(name, doc, ["site"], multiprocess_mode="mostrecent")
            for key, name, doc in MONITOR_GAUGES
        }
    )
