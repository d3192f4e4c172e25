"""The BentoML prediction service: `bentoml serve serving.service:Mp2aService` (MP2A_RUN=RUN).

Configuration (environment, read when the worker starts):
    MP2A_RUN            artifact folder (default: runs/default, relative to the working dir)
    MP2A_BACKEND        ort (default; needs RUN/export/image_encoder.onnx) or torch
    MP2A_PRECISION      the ort backend's encoder: fp32 (default) or int8
                        (RUN/export/image_encoder.int8.onnx from `mp2a export --format onnx-int8`)
    MP2A_WORKERS        worker processes, each with its own model session and a share of the
                        cores: a number, or auto (default: measured, serving/workers.py)
    MP2A_THREADS        request threads per worker (default 64: every waiting request holds
                        one, and the requests waiting together form the next batch)
    MP2A_DIRECT_PREDICT 1 (default): the upload guard answers the prediction routes itself
                        once it has checked the form; 0: through BentoML's API handling
                        (the same answers, slower; kept for comparison)
    MP2A_MAX_BATCH      images per encoder call (default 32)
    MP2A_MAX_WAIT_MS    longest wait for a batch to fill (default 5)
    MP2A_MAX_UPLOAD_MB  body limit of /predict (default 16; /predict_batch: 4x)
    MP2A_MAX_BATCH_IMAGES  images per /predict_batch request (default 64)
    MP2A_TOP_K          entries in top_k (default 5)
    MP2A_STORE          traffic store file (default RUN/traffic.sqlite; `off`: no collection),
                        with MP2A_SAMPLE_RATE, MP2A_STORE_MAX_ROWS, MP2A_STORE_MAX_AGE_S,
                        MP2A_STORE_IMAGES, MP2A_STORE_MAX_IMAGES (online/store.py)
    MP2A_ADMIN_TOKEN    enables the admin endpoints (Authorization: Bearer <token>); unset:
                        they answer 403
    MP2A_KEEP_VERSIONS  version folders kept in RUN/versions (default 5; mp2a/versions.py)
    MP2A_STATE          where online state lives: unset = files beside RUN (the default);
                        postgresql://user@host:port/db = one database for a fleet
                        (online/state.py, online/pg.py)

Endpoints: POST /predict (multipart `image`), POST /predict_batch (multipart `images`, repeated),
GET /model, GET /livez, GET /readyz, GET /metrics (BentoML's, with the mp2a_* metrics),
POST /rollback (admin), POST /adapt (admin), GET /adapt/status, GET /adapt/history.

The served head follows the state's current version (online/swap.py): a publish or rollback
by any process is picked up by every worker within half a second (at once on PostgreSQL,
through NOTIFY), without failing a request. Model info and the adaptation routes are in
serving/routes.py.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path

import anyio
import anyio.to_thread
import bentoml
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse, Response

from mp2a import lifeline
from mp2a.artifact import load_artifact
from mp2a.errors import ArtifactError
from mp2a.metrics import (
    ensure_multiprocess_dir,
    get_hub_metrics,
    get_metrics,
    get_monitor_metrics,
    unseen_by_bentoml,
)
from online.hub import EdgeTokens
from online.monitor import Monitor, MonitorConfig
from online.state import DEFAULT_SITE, StateError, open_state
from online.swap import VersionWatcher
from serving import routes, workers
from serving.backends import cpu_count, load_backend
from serving.decode import DecodeLimits, InputError
from serving.docs import JsonErrors
from serving.guard import UploadGuard, UploadRule
from serving.openapi import OpenAPIDocument
from serving.predictor import Predictor, Upload

log = logging.getLogger(__name__)

DEFAULT_RUN = "runs/default"
ensure_multiprocess_dir()  # before anything imports prometheus_client (in-process use)
lifeline.hold()  # under `mp2a serve`: this process ends with it, even after a kill -9


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


MAX_UPLOAD = _env_int("MP2A_MAX_UPLOAD_MB", 16) * 2**20
# Worker processes, each with its own model session, sharing the port, the traffic store,
# the version line and the metrics directory. `auto` (default): one per core for a model that
# gains little from the cores, one for a model that uses them all (serving/workers.py).
WORKER_CHOICE = workers.resolve(
    os.environ, Path(os.environ.get("MP2A_RUN") or DEFAULT_RUN), cpu_count()
)
WORKERS = WORKER_CHOICE.count
MAX_BATCH_IMAGES = _env_int("MP2A_MAX_BATCH_IMAGES", 64)


class TopK(BaseModel):
    label: str
    score: float
    index: int = Field(description="the class's position in GET /model's classes")


class PredictResponse(BaseModel):
    label: str
    score: float
    index: int = Field(description="the top class's position in GET /model's classes")
    top_k: list[TopK]
    model_version: str
    ood_score: float = Field(
        description="higher = less like any class of the label set (1 − MCM of the prompt rows)"
    )


class BatchResponse(BaseModel):
    predictions: list[PredictResponse]
    model_version: str


def _tracing() -> dict:
    """BentoML's tracing settings for the service. Its sampler records a span for every
    request and every message sent, exported or not: a third of the event loop's time on a
    small prediction (py-spy, c = 1). With no exporter configured (BentoML's `tracing.
    exporter_type`) nobody reads them, so the prediction routes make none; with one, every
    route is traced as BentoML does. A user's own `tracing.excluded_urls` takes precedence."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        exporter = BentoMLContainer.config.tracing.exporter_type.get()
    except Exception:  # a configuration BentoML reads differently: leave it to BentoML
        return {}
    return {} if exporter else {"excluded_urls": ["/predict$", "/predict_batch$"]}


@bentoml.service(
    name="mp2a",
    workers=WORKERS,
    envs=workers.child_env(WORKER_CHOICE),
    threads=_env_int("MP2A_THREADS", 64),
    traffic={"timeout": 120},
    tracing=_tracing(),
)
class Mp2aService:
    """CLIP classifier adapted by MP²A: image in, label and top-k probabilities out."""

    def __init__(self) -> None:
        run = Path(os.environ.get("MP2A_RUN") or DEFAULT_RUN)
        if "MP2A_RUN" not in os.environ and not run.is_dir():
            raise ArtifactError(
                f"no artifact to serve: MP2A_RUN is not set and {run.resolve()} does not exist; "
                "set MP2A_RUN=RUN or start the server with `mp2a serve RUN`"
            )
        self.run = run
        base = load_artifact(run)  # the encoder belongs to the base artifact (version 1)
        try:
            self.state = open_state(run)  # MP2A_STATE: files beside RUN, or PostgreSQL
        except StateError as e:  # the database is down: its last verified version, if any
            if "cannot reach" not in str(e):
                raise
            log.warning("%s; starting on the last verified version", e)
            self.state = open_state(run, connect=False)
        art = self.state.load_current(DEFAULT_SITE)  # the served head, verified
        backend = load_backend(
            os.environ.get("MP2A_BACKEND", "ort"),
            base,
            # the cores shared among the workers' sessions, not each taking them all
            threads=max(1, cpu_count() // WORKERS),
            precision=os.environ.get("MP2A_PRECISION", "fp32"),
        )
        metrics = get_metrics()
        self.store = self.state.open_store(base.backbone.embed_dim, metrics)
        # a hub (MP2A_EDGE_TOKENS): edge sites upload here and poll their heads
        self.edge_tokens = EdgeTokens.from_env(os.environ)
        self.hub_metrics = (
            None if self.edge_tokens is None else get_hub_metrics(tuple(self.edge_tokens.sites))
        )
        # an edge (MP2A_HUB): the store is the upload buffer; what its cap evicts is lost
        if os.environ.get("MP2A_HUB") and self.store is not None:
            self.store.on_evict = metrics.traffic_dropped.inc
        self.predictor = Predictor(
            art,
            backend,
            limits=DecodeLimits(),
            top_k=_env_int("MP2A_TOP_K", 5),
            max_batch=_env_int("MP2A_MAX_BATCH", 32),
            max_wait_s=_env_int("MP2A_MAX_WAIT_MS", 5) / 1000,
            metrics=metrics,
            store=self.store,
        )
        self.predictor.warmup()
        self.watcher = VersionWatcher(self.state, self.predictor, metrics=metrics).start()
        self.monitor = Monitor(
            read=self.state.read_traffic,
            # the server's own line is what the predictor serves; a hub's sites from the state
            current=lambda site: self.predictor.art if not site else self.state.load_current(site),
            sites=lambda: [] if self.edge_tokens is None else list(self.edge_tokens.sites),
            cfg=MonitorConfig.from_env(),
            gauges=get_monitor_metrics(),
        ).start()
        # Everything loaded so far (BentoML, pydantic, ONNX Runtime, numpy: over 10^5 objects)
        # lives as long as the process. Freezing it keeps the cyclic garbage collector's full
        # passes from walking it: unfrozen, a full pass held the GIL for ~150 ms on 2 cores and
        # stalled every request in flight (p99 spikes every ~40 s with the traffic store on;
        # `mp2a bench online`).
        gc.collect()
        gc.freeze()
        log.info(
            "serving %s version %s (%s) with %s",
            run,
            self.predictor.version,
            art.backbone.model,
            backend.describe(),
        )

    def model_info(self) -> dict:
        """GET /model: the serving version and its kept ancestors."""
        art = self.predictor.art
        try:
            previous = [str(v) for v in self.state.ancestors(art, DEFAULT_SITE)]
        except Exception as e:  # the state is down: the model still answers
            log.warning("cannot list the ancestors of version %s: %s", art.version, e)
            previous = []
        info = self.predictor.model_info(previous_versions=previous)
        try:  # every kept version, rolled back ones too: what POST /rollback may return to
            info["versions"] = [
                {
                    "version": str(h["version"]),
                    **{k: h.get(k) for k in ("parent", "created_at", "served", "rolled_back")},
                }
                for h in self.state.history(DEFAULT_SITE)
            ]
        except Exception as e:  # the state is down: the model still answers
            log.warning("cannot list the kept versions: %s", e)
            info["versions"] = []
        info["state"] = {**self.state.describe(), "connected": self.watcher.healthy}
        info["runtime"]["workers"] = WORKER_CHOICE.describe()
        return info

    def __metrics__(self, content: str) -> str:
        return content + unseen_by_bentoml()

    def __is_alive__(self) -> bool:
        return self.predictor.batcher.alive  # /livez: the model thread still runs

    def __is_ready__(self) -> bool:
        return self.predictor.batcher.alive  # /readyz: __init__ ended with a warm-up call

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.monitor.close()
        self.watcher.close()
        self.predictor.close()
        if self.store is not None:
            self.store.close()  # writes what is still queued
        self.state.close()

    def _answer(self, uploads: list[Upload], batch: bool) -> Response:
        try:
            out, timing = self.predictor.predict(uploads)
        except InputError as e:
            return JSONResponse({"error": e.message}, status_code=e.status)
        # the version that answered, even if a swap happened since
        body = {"predictions": out, "model_version": out[0]["model_version"]} if batch else out[0]
        return JSONResponse(body, headers={"Server-Timing": timing.server_timing()})

    @bentoml.api(route="/predict")
    def predict(self, image: Path) -> PredictResponse:
        """Classify one image (JPEG, PNG, WebP, BMP or GIF's first frame)."""
        return self._answer([Upload(image.read_bytes())], batch=False)  # type: ignore[return-value]

    @bentoml.api(route="/predict_batch")
    def predict_batch(self, images: list[Path]) -> BatchResponse:
        """Classify several images (repeat the multipart field `images`)."""
        uploads = [Upload(p.read_bytes(), f"images[{i}]") for i, p in enumerate(images)]
        return self._answer(uploads, batch=True)  # type: ignore[return-value]


_limiter: anyio.CapacityLimiter | None = None


async def answer_upload(path: str, files: list[bytes]) -> Response:
    """The prediction routes, answered by the upload guard once it has checked the form
    (serving/guard.py): the API methods' own `_answer`, in a worker thread, so decoding,
    preprocessing and the wait for the batch never block the event loop. At most
    MP2A_THREADS requests at once, like BentoML's own thread pool."""
    global _limiter
    try:
        svc = bentoml.get_current_service()
    except Exception:  # BentoML: "service isn't instantiated yet"
        svc = None
    if svc is None:
        return JSONResponse({"error": "the model is not loaded yet; retry shortly"}, 503)
    batch = path == "/predict_batch"
    if batch:
        uploads = [Upload(data, f"images[{i}]") for i, data in enumerate(files)]
    else:
        uploads = [Upload(files[0])]
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(_env_int("MP2A_THREADS", 64))
    try:
        return await anyio.to_thread.run_sync(svc._answer, uploads, batch, limiter=_limiter)
    except Exception as e:  # a fault of the server: JSON like every other answer
        log.exception("prediction failed")
        return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, 500)


Mp2aService.add_asgi_middleware(
    UploadGuard,
    rules={
        "/predict": UploadRule("image", 1, MAX_UPLOAD),
        "/predict_batch": UploadRule("images", MAX_BATCH_IMAGES, 4 * MAX_UPLOAD),
    },
    # MP2A_DIRECT_PREDICT=0: BentoML's own API handling instead (slower; for comparison)
    handler=answer_upload if os.environ.get("MP2A_DIRECT_PREDICT", "1") != "0" else None,
)
Mp2aService.add_asgi_middleware(
    OpenAPIDocument, service=Mp2aService, max_batch_images=MAX_BATCH_IMAGES
)
Mp2aService.add_asgi_middleware(JsonErrors)  # GET /docs, / -> /docs; every error in JSON
Mp2aService.mount_asgi_app(routes.app)
