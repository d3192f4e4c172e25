"""The service's routes beside the BentoML prediction APIs: model info, the adaptation
endpoints and rollback, as a FastAPI app mounted in the service (serving/service.py).

FastAPI because BentoML merges a mounted FastAPI app's OpenAPI paths and schemas into the
service's own document (/docs.json): every route here is described with its request and
response models and every error status it can answer. Errors are `{"error": "<what is wrong,
how to fix>"}` like everywhere else in the service, validation errors included (400).

The routes reach the running service through `bentoml.get_current_service()`: its `state`
(online/state.py), `predictor` and `watcher`.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import json
import logging
import os
import uuid
from typing import Any, Literal

import bentoml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from mp2a.errors import ArtifactError
from online import worker
from online.hub import MAX_UPLOAD_BYTES, UploadError, parse_upload, site_head
from online.state import DEFAULT_SITE, MAX_DECISIONS, StateError
from online.store import DuplicateBatch
from serving.public import public, public_text

ADAPT_BODY_LIMIT = 4096  # POST /adapt's optional JSON settings
log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and how to fix it")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    version: str
    parent_version: int | None
    backbone: dict[str, Any]
    classes: list[str] = Field(min_length=1)
    created_at: str | None
    method: str | None
    target_domain: str | None
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]
    decision: dict[str, Any] | None
    previous_versions: list[str]
    runtime: dict[str, Any]
    artifact: str
    state: dict[str, Any]


class RollbackResponse(BaseModel):
    version: str = Field(description="the version served now")
    previous: str = Field(description="the version withdrawn")


ROLLBACK_BODY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"site": {"type": "string", "description": "a hub: the site to roll back"}},
}


# POST /adapt's body as JSON Schema: what online/worker.py `request_overrides` accepts
ADAPT_BODY = {
    "type": "object",
    "title": "AdaptSettings",
    "description": "Optional settings of one run; omitted fields keep the worker's defaults.",
    "additionalProperties": False,
    "properties": {
        "site": {"type": "string", "description": "a hub: the edge site to adapt"},
        **{
            name: {"type": "string", "enum": list(allowed)}
            if isinstance(allowed[0], str)
            else {"type": "integer", "minimum": allowed[0], "maximum": allowed[1]}
            for name, allowed in worker.REQUEST_SETTINGS.items()
        },
    },
}


class AdaptRequested(BaseModel):
    status: Literal["requested"]
    id: str
    requested_at: str
    serving_version: str
    settings: dict[str, Any] | None
    site: str
    message: str


class AdaptStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: Literal["idle", "running", "accepted", "rejected", "failed", "rolled_back", "unknown"]
    pending_request: dict[str, Any] | None
    serving_version: str


class AdaptHistory(BaseModel):
    decisions: list[dict[str, Any]]


class MonitorFigures(BaseModel):
    site: str = Field(description="the site ('' = the server's own traffic)")
    version: str = Field(description="the version the figures are about (the served one)")
    n: int = Field(description="usable samples in the window that this version answered")
    estimated_accuracy: float | None = Field(
        description="no labels: estimated; null until enough samples"
    )
    interval: list[float | None] = Field(description="[low, high]: the estimate's 90 % interval")
    shift_score: float | None = Field(
        description="sources vs traffic, MMD null standard deviations"
    )
    ood_fraction: float | None = Field(description="share of the window out of the label set")
    method: str
    reason: str | None = Field(description="why a figure is null")
    computed_at: str


def _err(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """An error answer; its message without internals (serving/public.py), a 5xx's full
    message in the log."""
    if status >= 500:
        log.warning("answered %d: %s", status, message)
    return JSONResponse({"error": public_text(message)}, status_code=status, headers=headers)


def _shown(request: Request, body: dict[str, Any]) -> dict[str, Any]:
    """`body` in full for an admin caller (tracebacks, pids, hosts, paths), else as anonymous
    callers may see it."""
    return body if admin_refusal(request) is None else public(body)


def _bearer_json(schema: dict[str, Any], required: bool) -> dict[str, Any]:
    """A route's OpenAPI extras: a bearer token, and a JSON body of `schema`."""
    return {
        "security": [{"bearer": []}],
        "requestBody": {"required": required, "content": {"application/json": {"schema": schema}}},
    }


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody} for c in codes}


def _svc():
    """The running service, or None while it is still loading."""
    return bentoml.get_current_service()


def _not_loaded() -> JSONResponse:
    return _err(503, "the model is not loaded yet; retry shortly")


def _site(svc: Any, site: str | None) -> str | JSONResponse:
    """'' (the server's own line) or a site this hub has a token for; else a 404 answer."""
    if not site:
        return DEFAULT_SITE
    tokens = svc.edge_tokens
    if tokens is None:
        return _err(
            404,
            f"site {site!r}: this server is not a hub (start it with MP2A_EDGE_TOKENS=site=token,"
            "… to adapt edge sites)",
        )
    if site not in tokens.tokens:
        return _err(404, f"unknown site {site!r}; this hub's sites: {', '.join(tokens.sites)}")
    return site


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` bytes."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            return None
    return raw


def _edge_site(request: Request, svc: Any) -> str | JSONResponse:
    """The site whose edge token the request carries; 404 off a hub, 401 without a token."""
    tokens = svc.edge_tokens
    if tokens is None:
        return _err(
            404,
            "this server is not a hub: edges upload to and poll a server started with "
            "MP2A_EDGE_TOKENS=site=token,…",
        )
    site = tokens.site_of(request.headers.get("authorization", ""))
    if site is None:
        return _err(
            401,
            "missing or unknown edge token: send 'Authorization: Bearer <the site's token>' "
            "(MP2A_EDGE_TOKEN on the edge, one of MP2A_EDGE_TOKENS on the hub)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return site


def admin_refusal(request: Request) -> JSONResponse | None:
    """None if the request carries the admin token; else the 403/401 answer (DESIGN.md §3)."""
    token = os.environ.get("MP2A_ADMIN_TOKEN", "")
    if not token:
        return _err(
            403,
            "admin endpoints are disabled: start the server with MP2A_ADMIN_TOKEN=<secret> in "
            "its environment and send 'Authorization: Bearer <secret>'",
        )
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # constant-time comparison of bytes (compare_digest refuses non-ASCII str)
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        return _err(
            401,
            "missing or wrong admin token: send 'Authorization: Bearer <token>' with the "
            "server's MP2A_ADMIN_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return None


app = FastAPI(title="mp2a", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for e in exc.errors():
        name = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
        parts.append(f"{name}: {e.get('msg')} (got {e.get('input')!r})")
    return _err(400, "; ".join(parts))


@app.get("/model", response_model=ModelInfo, responses=_errors(503))
def model_info(request: Request):
    """The version being served: backbone, classes, method, metrics, decision, ancestors
    (paths and hosts only for admin callers)."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    return JSONResponse(_shown(request, svc.model_info()))


@app.get("/monitor", response_model=MonitorFigures, responses=_errors(404, 503))
def monitor(site: str = Query("", description="a hub: the edge site")):
    """How well the served head does now, without labels: its estimated accuracy with a 90 %
    interval, the traffic's shift from the sources and its share out of the label set, over
    the site's newest stored traffic (serving/README.md, "Label-free estimates")."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    site = _site(svc, site)
    if isinstance(site, JSONResponse):
        return site
    return JSONResponse(svc.monitor.figures(site))


@app.post(
    "/rollback",
    response_model=RollbackResponse,
    responses=_errors(400, 401, 403, 404, 409, 413, 500, 503),
    openapi_extra=_bearer_json(ROLLBACK_BODY, required=False),
)
async def rollback(request: Request):
    """Serve the served version's parent again (admin); a hub: `{"site": …}` rolls one site
    back and leaves the others alone."""
    if (refused := admin_refusal(request)) is not None:
        return refused
    svc = _svc()
    if svc is None:
        return _not_loaded()
    raw = await _read_body(request, ADAPT_BODY_LIMIT)
    if raw is None:
        return _err(413, f"POST /rollback body over {ADAPT_BODY_LIMIT} bytes")
    try:
        body = json.loads(raw) if raw.strip() else {}
        if not isinstance(body, dict) or set(body) - {"site"}:
            raise ValueError('send no body, or {"site": "<site>"}')
        if not isinstance(body.get("site", ""), str):
            raise ValueError('site must be a string: {"site": "<site>"}')
    except ValueError as e:
        return _err(400, f"POST /rollback body: {e}")
    site = _site(svc, body.get("site"))
    if isinstance(site, JSONResponse):
        return site
    try:
        before = svc.predictor.version if not site else str(svc.state.load_current(site).version)
        now = svc.state.rollback(site)
    except ArtifactError as e:
        return _err(409, str(e))
    except (OSError, StateError) as e:
        return _err(500, f"cannot roll back: {e}")
    if not site:
        svc.watcher.check(force=True)  # this worker answers with the new version at once
        now = svc.predictor.version
    worker.record_rollback(svc.state, str(before), str(now), site)
    return JSONResponse({"version": str(now), "previous": before})


@app.post(
    "/adapt",
    status_code=202,
    response_model=AdaptRequested,
    responses=_errors(400, 401, 403, 404, 413, 500, 503),
    openapi_extra=_bearer_json(ADAPT_BODY, required=False),
)
async def adapt(request: Request):
    """Ask the adaptation worker for a run now (admin); follow it with GET /adapt/status."""
    if (refused := admin_refusal(request)) is not None:
        return refused
    svc = _svc()
    if svc is None:
        return _not_loaded()
    raw = await _read_body(request, ADAPT_BODY_LIMIT)
    if raw is None:
        return _err(413, f"POST /adapt body over {ADAPT_BODY_LIMIT} bytes; send a small JSON")
    try:
        body = json.loads(raw) if raw.strip() else None
        site_name = body.pop("site", None) if isinstance(body, dict) else None
        if site_name is not None and not isinstance(site_name, str):
            raise ValueError("site must be a string")
        settings = worker.request_overrides(body)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return _err(400, f"POST /adapt body: {e}. Send no body for the default run.")
    site = _site(svc, site_name)
    if isinstance(site, JSONResponse):
        return site
    try:
        serving = svc.predictor.version if not site else str(svc.state.load_current(site).version)
    except (ArtifactError, StateError) as e:
        return _err(500, f"cannot read the site's version: {e}")
    req = {
        "id": uuid.uuid4().hex,
        "requested_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "serving_version": serving,
        "settings": settings or None,
        "site": site,
    }
    try:
        svc.state.request_adapt(req, site)
    except (OSError, StateError) as e:
        return _err(500, f"cannot store the request: {e}")
    message = (
        "re-adaptation requested; the adaptation worker picks it up (started by "
        "`MP2A_ONLINE=1 mp2a serve`, or `python -m online.worker RUN`); follow it with "
        "GET /adapt/status"
    )
    return JSONResponse({"status": "requested", **req, "message": message}, status_code=202)


@app.get("/adapt/status", response_model=AdaptStatus, responses=_errors(404, 500, 503))
def adapt_status(request: Request, site: str = Query("", description="a hub: the edge site")):
    """The last adaptation run (idle, running, accepted, rejected, failed) with its figures;
    an admin caller also sees a failed run's traceback and the worker's pid and host."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    site = _site(svc, site)
    if isinstance(site, JSONResponse):
        return site
    try:
        status = svc.state.read_status(site)
        pending = svc.state.pending_request(site)
        serving = svc.predictor.version if not site else str(svc.state.load_current(site).version)
    except (StateError, ArtifactError) as e:
        return _err(500, f"cannot read the adaptation status: {e}")
    if status is None:
        status = {"state": "idle", "detail": "no adaptation has run"}
    known = ("idle", "running", "accepted", "rejected", "failed", "rolled_back")
    if status.get("state") not in known:
        status = {**status, "state": "unknown"}
    body = {**status, "pending_request": pending, "serving_version": serving}
    return JSONResponse(_shown(request, body))


@app.get("/adapt/history", response_model=AdaptHistory, responses=_errors(400, 404, 500, 503))
def adapt_history(
    request: Request,
    limit: int = Query(50, ge=1, le=MAX_DECISIONS, description="newest outcomes to return"),
    site: str = Query("", description="a hub: the edge site"),
):
    """Recorded adaptation outcomes (accepted, rejected, failed), newest first (pids and
    hosts only for admin callers)."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    site = _site(svc, site)
    if isinstance(site, JSONResponse):
        return site
    try:
        decisions = svc.state.decisions(limit, site)
    except StateError as e:
        return _err(500, f"cannot read the adaptation history: {e}")
    return JSONResponse(_shown(request, {"decisions": decisions}))


class TrafficAccepted(BaseModel):
    site: str
    batch_id: str
    accepted: int


TRAFFIC_BODY = {
    "type": "object",
    "required": ["batch_id", "samples"],
    "additionalProperties": False,
    "properties": {
        "batch_id": {"type": "string", "minLength": 1, "maxLength": 200},
        "site": {"type": "string", "description": "optional; must be the token's site"},
        "samples": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["embedding", "label", "confidence", "version", "t"],
                "properties": {
                    "embedding": {
                        "type": "string",
                        "format": "byte",
                        "description": "base64 of D little-endian float32",
                    },
                    "label": {"type": "integer", "minimum": 0},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                    "version": {"type": "string", "minLength": 1, "maxLength": 64},
                    "t": {"type": "number"},
                },
            },
        },
    },
}


@app.post(
    "/traffic",
    response_model=TrafficAccepted,
    responses=_errors(400, 401, 403, 404, 409, 413, 422, 500, 503),
    openapi_extra=_bearer_json(TRAFFIC_BODY, required=True),
)
async def traffic(request: Request):
    """A hub: store a batch of an edge site's traffic (embeddings, predicted labels,
    confidences; the edge token names the site). A batch id stored before is refused (409):
    a retry never stores twice."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    site = _edge_site(request, svc)
    if isinstance(site, JSONResponse):
        return site
    raw = await _read_body(request, MAX_UPLOAD_BYTES)
    if raw is None:
        return _err(413, f"upload over {MAX_UPLOAD_BYTES // 2**20} MiB; send smaller batches")
    try:
        body = json.loads(raw)
    except ValueError as e:
        return _err(400, f"the body is not JSON: {e}")
    if isinstance(body, dict) and body.get("site", site) != site:
        return _err(
            403, f"this token belongs to site {site!r}; it cannot upload as {body.get('site')!r}"
        )
    art = svc.predictor.art
    try:
        upload = parse_upload(body, art.backbone.embed_dim, len(art.classes))
        n = await run_in_threadpool(svc.state.ingest, upload, site)
    except UploadError as e:
        return _err(e.status, str(e))
    except DuplicateBatch:
        return _err(409, f"batch {upload.batch_id!r} of site {site!r} was stored before")
    except StateError as e:
        return _err(500, f"cannot store the upload: {e}")
    if svc.hub_metrics is not None:
        svc.hub_metrics.received.labels(site=site).inc(n)
    return JSONResponse({"site": site, "batch_id": upload.batch_id, "accepted": n})


class SiteHead(BaseModel):
    site: str
    version: int
    parent_version: int | None
    created_at: str | None
    method: str | None
    head_rows: list[dict[str, Any]] | None
    sha256: str
    head: str = Field(description="base64 of the head's safetensors bytes")


@app.get(
    "/sites/{site}/model",
    response_model=SiteHead,
    responses={**_errors(401, 403, 404, 500, 503), 304: {"description": "not modified"}},
    openapi_extra={"security": [{"bearer": []}]},
)
def site_model(site: str, request: Request):
    """A hub: the site's current head, with an ETag (If-None-Match: 304)."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    mine = _edge_site(request, svc)
    if isinstance(mine, JSONResponse):
        return mine
    if mine != site:
        return _err(403, f"this token belongs to site {mine!r}; it cannot read site {site!r}")
    try:
        art = svc.state.load_current(site)
    except (StateError, ArtifactError) as e:
        return _err(500, f"cannot read the site's head: {e}")
    body, etag = site_head(art, site)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse(body, headers={"ETag": etag})
