"""The BentoML prediction service: `bentoml serve serving.service:Mp2aService` (MP2A_RUN=RUN).

Configuration (environment, read when the worker starts):
    MP2A_RUN            artifact folder (default: runs/default, relative to the working dir)
    MP2A_BACKEND        ort (default; needs RUN/export/image_encoder.onnx) or torch
    MP2A_PRECISION      the ort backend's encoder: fp32 (default) or int8
                        (RUN/export/image_encoder.int8.onnx from `mp2a export --format onnx-int8`)
    MP2A_THREADS        request threads per worker (default 64: every waiting request holds
                        one, and the requests waiting together form the next batch)
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

Endpoints: POST /predict (multipart `image`), POST /predict_batch (multipart `images`, repeated),
GET /model, GET /livez, GET /readyz, GET /metrics (BentoML's, with the mp2a_* metrics),
POST /rollback (admin), POST /adapt (admin), GET /adapt/status, GET /adapt/history.

The served head follows RUN/versions/CURRENT (online/swap.py): a publish or rollback by any
process is picked up by every worker within half a second, without failing a request.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hmac
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path

import bentoml
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mp2a import versions
from mp2a.artifact import load_artifact
from mp2a.errors import ArtifactError
from mp2a.metrics import ensure_multiprocess_dir, get_metrics, unseen_by_bentoml
from online import worker
from online.store import open_store
from online.swap import VersionWatcher
from serving.backends import load_backend
from serving.decode import DecodeLimits, InputError
from serving.guard import UploadGuard, UploadRule
from serving.predictor import Predictor, Upload

log = logging.getLogger(__name__)

DEFAULT_RUN = "runs/default"
ensure_multiprocess_dir()  # before anything imports prometheus_client (in-process use)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


MAX_UPLOAD = _env_int("MP2A_MAX_UPLOAD_MB", 16) * 2**20
MAX_BATCH_IMAGES = _env_int("MP2A_MAX_BATCH_IMAGES", 64)


class TopK(BaseModel):
    label: str
    score: float


class PredictResponse(BaseModel):
    label: str
    score: float
    top_k: list[TopK]
    model_version: str


class BatchResponse(BaseModel):
    predictions: list[PredictResponse]
    model_version: str


ADAPT_STATUS = worker.ADAPT_STATUS  # written by the adaptation worker
ADAPT_REQUEST = worker.ADAPT_REQUEST  # written by POST /adapt, taken by the worker
ADAPT_BODY_LIMIT = 4096  # POST /adapt's optional JSON settings


def _not_loaded() -> Response:
    return JSONResponse({"error": "the model is not loaded yet; retry shortly"}, status_code=503)


def _model_route(_: Request) -> Response:
    svc = bentoml.get_current_service()
    if svc is None:
        return _not_loaded()
    return JSONResponse(svc.model_info())


def _admin_refusal(request: Request) -> Response | None:
    """None if the request carries the admin token; else the 403/401 answer (DESIGN.md §3)."""
    token = os.environ.get("MP2A_ADMIN_TOKEN", "")
    if not token:
        return JSONResponse(
            {
                "error": "admin endpoints are disabled: start the server with "
                "MP2A_ADMIN_TOKEN=<secret> in its environment and send "
                "'Authorization: Bearer <secret>'"
            },
            status_code=403,
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # constant-time comparison of bytes (compare_digest refuses non-ASCII str)
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return JSONResponse(
            {
                "error": "missing or wrong admin token: send 'Authorization: Bearer <token>' "
                "with the server's MP2A_ADMIN_TOKEN"
            },
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


def _rollback_route(request: Request) -> Response:
    if (refused := _admin_refusal(request)) is not None:
        return refused
    svc = bentoml.get_current_service()
    if svc is None:
        return _not_loaded()
    before = svc.predictor.version
    try:
        versions.rollback(svc.run)
    except ArtifactError as e:
        return JSONResponse({"error": str(e)}, status_code=409)
    except OSError as e:
        return JSONResponse(
            {"error": f"cannot write {versions.versions_dir(svc.run)}: {e}"}, status_code=500
        )
    svc.watcher.check(force=True)  # this worker answers with the new version at once
    return JSONResponse({"version": svc.predictor.version, "previous": before})


def _atomic_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def _adapt_route(request: Request) -> Response:
    if (refused := _admin_refusal(request)) is not None:
        return refused
    svc = bentoml.get_current_service()
    if svc is None:
        return _not_loaded()
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > ADAPT_BODY_LIMIT:
            return JSONResponse(
                {"error": f"POST /adapt body over {ADAPT_BODY_LIMIT} bytes; send a small JSON"},
                status_code=413,
            )
    try:
        body = json.loads(raw) if raw.strip() else None
        settings = worker.request_overrides(body)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return JSONResponse(
            {"error": f"POST /adapt body: {e}. Send no body for the default run."},
            status_code=400,
        )
    req = {
        "id": uuid.uuid4().hex,
        "requested_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "serving_version": svc.predictor.version,
        "settings": settings or None,
    }
    path = versions.versions_dir(svc.run) / ADAPT_REQUEST
    try:
        _atomic_json(path, req)
    except OSError as e:
        return JSONResponse({"error": f"cannot write {path}: {e}"}, status_code=500)
    message = (
        f"re-adaptation requested ({path}); the adaptation worker picks it up (started by "
        "`MP2A_ONLINE=1 mp2a serve`, or `python -m online.worker RUN`); follow it with "
        "GET /adapt/status"
    )
    return JSONResponse({"status": "requested", **req, "message": message}, status_code=202)


def _adapt_status_route(_: Request) -> Response:
    svc = bentoml.get_current_service()
    if svc is None:
        return _not_loaded()
    d = versions.versions_dir(svc.run)
    try:
        status = json.loads((d / ADAPT_STATUS).read_text())
    except FileNotFoundError:
        status = {"state": "idle", "detail": "no adaptation has run"}
    except (OSError, ValueError) as e:
        status = {"state": "unknown", "detail": f"{d / ADAPT_STATUS} is unreadable: {e}"}
    if not isinstance(status, dict):
        status = {"state": "unknown", "detail": f"{d / ADAPT_STATUS} is not a JSON object"}
    if (stale := worker.stale_reason(status)) is not None:  # the worker was killed mid-run
        status = {**status, "state": "failed", "reasons": [stale]}
    try:
        status["pending_request"] = json.loads((d / ADAPT_REQUEST).read_text())
    except (OSError, ValueError):
        status["pending_request"] = None
    status["serving_version"] = svc.predictor.version
    return JSONResponse(status)


def _adapt_history_route(request: Request) -> Response:
    """GET /adapt/history[?limit=N]: recorded adaptation outcomes, newest first."""
    svc = bentoml.get_current_service()
    if svc is None:
        return _not_loaded()
    raw = request.query_params.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= versions.MAX_DECISIONS:
        return JSONResponse(
            {"error": f"limit must be an integer in 1..{versions.MAX_DECISIONS}, got {raw!r}"},
            status_code=400,
        )
    return JSONResponse({"decisions": versions.decisions(svc.run, int(raw))})


@bentoml.service(
    name="mp2a",
    workers=1,  # one model copy; ONNX Runtime's intra-op threads use every core
    threads=_env_int("MP2A_THREADS", 64),
    traffic={"timeout": 120},
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
        art = versions.load_current(run)  # the head: the version CURRENT names, verified
        backend = load_backend(
            os.environ.get("MP2A_BACKEND", "ort"),
            base,
            precision=os.environ.get("MP2A_PRECISION", "fp32"),
        )
        metrics = get_metrics()
        self.store = open_store(run, base.backbone.embed_dim, metrics)
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
        self.watcher = VersionWatcher(run, self.predictor).start()
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
        previous = [str(v) for v in versions.ancestors(self.run, art)]
        return self.predictor.model_info(previous_versions=previous)

    def __metrics__(self, content: str) -> str:
        return content + unseen_by_bentoml()

    def __is_alive__(self) -> bool:
        return self.predictor.batcher.alive  # /livez: the model thread still runs

    def __is_ready__(self) -> bool:
        return self.predictor.batcher.alive  # /readyz: __init__ ended with a warm-up call

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.watcher.close()
        self.predictor.close()
        if self.store is not None:
            self.store.close()  # writes what is still queued

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


Mp2aService.add_asgi_middleware(
    UploadGuard,
    rules={
        "/predict": UploadRule("image", 1, MAX_UPLOAD),
        "/predict_batch": UploadRule("images", MAX_BATCH_IMAGES, 4 * MAX_UPLOAD),
    },
)
Mp2aService.mount_asgi_app(
    Starlette(
        routes=[
            Route("/model", _model_route, methods=["GET"]),
            Route("/rollback", _rollback_route, methods=["POST"]),
            Route("/adapt", _adapt_route, methods=["POST"]),
            Route("/adapt/status", _adapt_status_route, methods=["GET"]),
            Route("/adapt/history", _adapt_history_route, methods=["GET"]),
        ]
    )
)
