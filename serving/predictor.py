"""The prediction path, independent of the HTTP framework.

decode (per request) -> preprocess (per request) -> image encoder (shared micro-batch)
-> head -> top-k, and each served image's embedding offered to the traffic store (non-blocking).
`mp2a.preprocess.preprocess_image` is the one preprocessing implementation,
so a served probability equals the offline evaluation of the same image.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mp2a.artifact import Artifact
from mp2a.head import Head
from mp2a.metrics import ServingMetrics
from mp2a.preprocess import preprocess_image
from online.estimate import ood_scores
from online.store import TrafficStore
from serving.backends import Backend
from serving.batching import MicroBatcher
from serving.decode import DecodeLimits, InputError, decode_image

log = logging.getLogger(__name__)


@dataclass
class Timing:
    """Seconds per stage of one request; `model` is the encoder call its batch rode in."""

    decode: float = 0.0
    preprocess: float = 0.0
    encode: float = 0.0  # wall time of the encode step: waiting for the batch + the model
    model: float = 0.0
    head: float = 0.0

    def server_timing(self) -> str:
        """A W3C Server-Timing header value (milliseconds)."""
        return ", ".join(f"{k};dur={1000 * v:.3f}" for k, v in vars(self).items())


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str = "image"  # how error messages refer to it, e.g. "images[3]"


def answer(
    p: np.ndarray, classes: Sequence[str], top_k: int, version: str, ood: float | None = None
) -> dict:
    """One image's JSON answer from its (C,) probabilities."""
    order = np.argsort(-p, kind="stable")[:top_k]
    # the class index too: it tells classes apart whatever their labels, and is the
    # position in GET /model's `classes`
    top = [{"label": classes[i], "score": float(p[i]), "index": int(i)} for i in order]
    return {"label": top[0]["label"], "score": top[0]["score"], "index": top[0]["index"],
            "top_k": top, "model_version": version,
            **({} if ood is None else {"ood_score": round(float(ood), 6)})}  # fmt: skip


class Predictor:
    """Thread-safe: call `predict` from many request threads at once."""

    def __init__(
        self,
        art: Artifact,
        backend: Backend,
        *,
        limits: DecodeLimits | None = None,
        top_k: int = 5,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        metrics: ServingMetrics | None = None,
        store: TrafficStore | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.backend = backend
        self.limits = limits or DecodeLimits()
        self.spec = art.preprocessing
        self.classes = art.classes
        self.top_k = min(top_k, len(self.classes))
        self.metrics = metrics
        self.store = store  # owned by the caller, which closes it
        self.art = art  # the served version; replaced whole by `swap`
        self._prompts: tuple[Artifact, Head] | None = None
        if metrics is not None:
            metrics.set_model_version(self.version, art.backbone.model)
        self.batcher = MicroBatcher(backend.encode, max_batch, max_wait_s, self._on_batch)

    @property
    def version(self) -> str:
        return str(self.art.version)

    def swap(self, art: Artifact) -> None:
        """Serve `art`'s head from now on. One reference assignment: a request in flight keeps
        the version it started with (`predict` reads `self.art` once). The encoder is unchanged,
        so `art` must have the same classes, preprocessing and backbone weights."""
        old = self.art
        if (
            art.classes != old.classes
            or art.preprocessing != old.preprocessing
            or art.backbone != old.backbone
        ):
            raise ValueError(
                f"version {art.version} at {art.path} does not fit the served encoder "
                "(other classes, preprocessing or backbone); restart the server on it instead"
            )
        self.art = art
        if self.metrics is not None:
            self.metrics.set_model_version(str(art.version), art.backbone.model)
        log.info("now serving version %s (was %s)", art.version, old.version)

    def _on_batch(self, rows: int, _seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.encoder_batch_size.observe(rows)

    def warmup(self) -> None:
        """One model call, so the first request does not pay for lazy initialisation."""
        s = self.spec.image_size
        self.batcher.submit(np.zeros((1, 3, s, s), np.float32))

    def close(self) -> None:
        self.batcher.close()

    def predict(self, uploads: Sequence[Upload]) -> tuple[list[dict], Timing]:
        """Class probabilities for each upload, as response dicts; raises InputError."""
        if not uploads:
            raise InputError(400, "no image in the request")
        t = Timing()
        art = self.art  # the version this request is answered with, whatever swaps meanwhile
        version = str(art.version)
        with self.batcher.arriving():
            t0 = time.perf_counter()
            images = []
            for up in uploads:
                try:
                    images.append(decode_image(up.data, self.limits, self.spec.image_size))
                except InputError as e:
                    raise InputError(e.status, f"{up.name}: {e.message}") from e
            t1 = time.perf_counter()
            pixels = np.stack([preprocess_image(im, self.spec) for im in images])  # (B, 3, S, S)
            t2 = time.perf_counter()
        t.decode, t.preprocess = t1 - t0, t2 - t1
        emb, t.model = self.batcher.submit(pixels)  # (B, D)
        t3 = time.perf_counter()
        probs = art.head.probs(emb)  # (B, C)
        ood = ood_scores(self._prompt_rows(art), emb)  # (B,)
        out = [
            answer(p, self.classes, self.top_k, version, o) for p, o in zip(probs, ood, strict=True)
        ]
        t.encode, t.head = t3 - t2, time.perf_counter() - t3
        self._observe(t, out)
        if self.store is not None:
            self._collect(uploads, emb, probs, version)
        return out, t

    def _collect(
        self, uploads: Sequence[Upload], emb: np.ndarray, probs: np.ndarray, version: str
    ) -> None:
        """Offer each served image to the traffic store; a full store queue drops, never waits."""
        store = self.store
        assert store is not None
        keep_images = store.keeps_images
        labels = np.argmax(probs, axis=1)  # (B,) the first maximum, as _response's stable sort
        for up, e, p, i in zip(uploads, emb, probs, labels, strict=True):
            store.offer(e, int(i), float(p[i]), version, up.data if keep_images else None)

    def _prompt_rows(self, art: Artifact) -> Head:
        """The prompt rows of `art`'s head (what `ood_score` is measured against), kept per
        version so a request does not rebuild them."""
        cached = self._prompts
        if cached is None or cached[0] is not art:
            cached = self._prompts = (art, art.prompt_head())
        return cached[1]

    def _observe(self, t: Timing, out: list[dict]) -> None:
        m = self.metrics
        if m is None:
            return
        for stage in ("decode", "preprocess", "encode", "head"):
            m.inference_latency.labels(stage=stage).observe(getattr(t, stage))
        for r in out:
            m.predictions.labels(label=r["label"]).inc()
            m.confidence.observe(r["score"])

    def model_info(self, previous_versions: list[str] | None = None) -> dict:
        """What GET /model reports; `previous_versions` from the version store when known."""
        art = self.art
        m = art.manifest
        try:
            metrics = art.metrics()
        except (OSError, ValueError) as e:  # a report problem must not hide the model
            metrics = {"error": f"metrics.json unreadable: {e}"}
        parent = m.get("parent_version")
        if previous_versions is None:
            previous_versions = [] if parent is None else [str(parent)]
        return {
            "version": str(art.version),
            "parent_version": parent,
            "backbone": art.backbone.to_dict(),
            "classes": self.classes,
            "created_at": m.get("created_at"),
            "method": m.get("method"),
            "target_domain": m.get("target_domain"),
            "preprocessing": self.spec.to_dict(),
            "metrics": metrics,
            "decision": m.get("decision"),
            "previous_versions": previous_versions,
            "runtime": self.backend.describe(),
            "artifact": str(art.path),
        }
