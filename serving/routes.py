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
import os
import uuid
from typing import Any, Literal

import bentoml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from mp2a.errors import ArtifactError
from online import worker
from online.state import DEFAULT_SITE, MAX_DECISIONS, StateError

ADAPT_BODY_LIMIT = 4096  # POST /adapt's optional JSON settings


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


# POST /adapt's body as JSON Schema: what online/worker.py `request_overrides` accepts
ADAPT_BODY = {
    "type": "object",
    "title": "AdaptSettings",
    "description": "Optional settings of one run; omitted fields keep the worker's defaults.",
    "additionalProperties": False,
    "properties": {
        "method": {"type": "string", "enum": list(worker.METHODS)},
        **{
            name: {"type": "integer", "minimum": bounds[0], "maximum": bounds[1]}
            for name, bounds in worker.REQUEST_SETTINGS.items()
            if name != "method"
        },
    },
}


class AdaptRequested(BaseModel):
    status: Literal["requested"]
    id: str
    requested_at: str
    serving_version: str
    settings: dict[str, Any] | None
    message: str


class AdaptStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: Literal["idle", "running", "accepted", "rejected", "failed", "unknown"]
    pending_request: dict[str, Any] | None
    serving_version: str


class AdaptHistory(BaseModel):
    decisions: list[dict[str, Any]]


def _err(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorBody} for c in codes}


def _svc():
    """The running service, or None while it is still loading."""
    return bentoml.get_current_service()


def _not_loaded() -> JSONResponse:
    return _err(503, "the model is not loaded yet; retry shortly")


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
def model_info():
    """The version being served: backbone, classes, method, metrics, decision, ancestors."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    return JSONResponse(svc.model_info())


@app.post(
    "/rollback",
    response_model=RollbackResponse,
    responses=_errors(401, 403, 409, 500, 503),
    openapi_extra={"security": [{"bearer": []}]},
)
def rollback(request: Request):
    """Serve the served version's parent again (admin)."""
    if (refused := admin_refusal(request)) is not None:
        return refused
    svc = _svc()
    if svc is None:
        return _not_loaded()
    before = svc.predictor.version
    try:
        svc.state.rollback(DEFAULT_SITE)
    except ArtifactError as e:
        return _err(409, str(e))
    except (OSError, StateError) as e:
        return _err(500, f"cannot roll back: {e}")
    svc.watcher.check(force=True)  # this worker answers with the new version at once
    return JSONResponse({"version": svc.predictor.version, "previous": before})


@app.post(
    "/adapt",
    status_code=202,
    response_model=AdaptRequested,
    responses=_errors(400, 401, 403, 413, 500, 503),
    openapi_extra={
        "security": [{"bearer": []}],
        "requestBody": {"required": False, "content": {"application/json": {"schema": ADAPT_BODY}}},
    },
)
async def adapt(request: Request):
    """Ask the adaptation worker for a run now (admin); follow it with GET /adapt/status."""
    if (refused := admin_refusal(request)) is not None:
        return refused
    svc = _svc()
    if svc is None:
        return _not_loaded()
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > ADAPT_BODY_LIMIT:
            return _err(413, f"POST /adapt body over {ADAPT_BODY_LIMIT} bytes; send a small JSON")
    import json

    try:
        body = json.loads(raw) if raw.strip() else None
        settings = worker.request_overrides(body)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        return _err(400, f"POST /adapt body: {e}. Send no body for the default run.")
    req = {
        "id": uuid.uuid4().hex,
        "requested_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "serving_version": svc.predictor.version,
        "settings": settings or None,
    }
    try:
        svc.state.request_adapt(req, DEFAULT_SITE)
    except (OSError, StateError) as e:
        return _err(500, f"cannot store the request: {e}")
    message = (
        "re-adaptation requested; the adaptation worker picks it up (started by "
        "`MP2A_ONLINE=1 mp2a serve`, or `python -m online.worker RUN`); follow it with "
        "GET /adapt/status"
    )
    return JSONResponse({"status": "requested", **req, "message": message}, status_code=202)


@app.get("/adapt/status", response_model=AdaptStatus, responses=_errors(500, 503))
def adapt_status():
    """The last adaptation run (idle, running, accepted, rejected, failed) with its figures."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    try:
        status = svc.state.read_status(DEFAULT_SITE)
        pending = svc.state.pending_request(DEFAULT_SITE)
    except StateError as e:
        return _err(500, f"cannot read the adaptation status: {e}")
    if status is None:
        status = {"state": "idle", "detail": "no adaptation has run"}
    if status.get("state") not in ("idle", "running", "accepted", "rejected", "failed"):
        status = {**status, "state": "unknown"}
    return JSONResponse(
        {**status, "pending_request": pending, "serving_version": svc.predictor.version}
    )


@app.get("/adapt/history", response_model=AdaptHistory, responses=_errors(400, 500, 503))
def adapt_history(
    limit: int = Query(50, ge=1, le=MAX_DECISIONS, description="newest outcomes to return"),
):
    """Recorded adaptation outcomes (accepted, rejected, failed), newest first."""
    svc = _svc()
    if svc is None:
        return _not_loaded()
    try:
        return JSONResponse({"decisions": svc.state.decisions(limit, DEFAULT_SITE)})
    except StateError as e:
        return _err(500, f"cannot read the adaptation history: {e}")
