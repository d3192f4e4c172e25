"""The service's OpenAPI document (GET /docs.json), made accurate.

BentoML generates the document from the APIs' type hints and merges the paths of the mounted
FastAPI app (serving/routes.py), which are described fully there. Its prediction routes are
short of what they really do: the uploads are checked before BentoML sees them
(serving/guard.py) and answer 400, 413, 415, 422 and 503 with `{"error": …}`, an upload must
not be empty and a batch holds 1 to MP2A_MAX_BATCH_IMAGES images. `document` adds that, and
the bearer scheme of the admin routes; `OpenAPIDocument` serves it in place of BentoML's.
The routes only a hub answers (edge uploads and site heads) are listed only by a hub: on
any other server they do not exist (404).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mp2a import __version__

log = logging.getLogger(__name__)

DOC_PATH = "/docs.json"
HUB_ONLY = ("/traffic", "/sites/{site}/model")
ERROR = {"$ref": "#/components/schemas/ErrorBody"}
DESCRIPTION = (
    "CLIP image classifier adapted by MP²A: POST an image to /predict for its label and top-k "
    "probabilities. Admin routes take 'Authorization: Bearer <MP2A_ADMIN_TOKEN>'. Every error "
    'answer is JSON {"error": "<what is wrong, how to fix it>"}.'
)
PREDICT_ERRORS = {
    400: "a malformed form, a missing or empty field, an image that does not decode",
    413: "the body, the image's pixels or the number of images is over the limit",
    415: "not multipart/form-data, or not an image (JPEG, PNG, WebP, BMP, GIF)",
    422: "an image that declares an empty size",
    500: "a fault of the server (never caused by the input)",
    503: "the model is not loaded yet",
}


def document(spec: dict[str, Any], max_batch_images: int, hub: bool) -> dict[str, Any]:
    """`spec` (BentoML's, as a dict) with the prediction routes described as they behave;
    without the hub's routes unless `hub`."""
    spec = json.loads(json.dumps(spec))  # a plain copy; response codes become strings
    # BentoML's info says version "None" and advertises BentoML with pictures from the web
    spec["info"] = {"title": "mp2a", "version": __version__, "description": DESCRIPTION}
    paths = spec["paths"]
    if not hub:
        for path in HUB_ONLY:
            paths.pop(path, None)
    for path, field, many in (("/predict", "image", False), ("/predict_batch", "images", True)):
        op = paths[path]["post"]
        schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        prop = schema["properties"][field]
        if many:
            prop.update(minItems=1, maxItems=max_batch_images)
            prop["items"]["minLength"] = 1
        else:
            prop["minLength"] = 1
        op["requestBody"]["required"] = True
        op["responses"] = {
            "200": op["responses"]["200"],
            **{
                str(code): {"description": what, "content": {"application/json": {"schema": ERROR}}}
                for code, what in PREDICT_ERRORS.items()
            },
        }
    paths["/readyz"]["get"]["responses"]["503"] = {"description": "not ready (yet)"}
    paths["/livez"]["get"]["responses"]["503"] = {"description": "the model thread died"}
    spec.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "the server's MP2A_ADMIN_TOKEN",
    }
    return spec


class OpenAPIDocument:
    """ASGI middleware answering GET /docs.json with `document(service spec)`."""

    def __init__(self, app: ASGIApp, service: Any, max_batch_images: int) -> None:
        self.app, self.service, self.max_batch_images = app, service, max_batch_images

    @functools.cached_property
    def body(self) -> dict[str, Any] | None:
        try:
            hub = bool(os.environ.get("MP2A_EDGE_TOKENS", "").strip())
            return document(self.service.openapi_spec.asdict(), self.max_batch_images, hub)
        except Exception:  # BentoML's own document is still better than none
            log.exception("cannot amend the OpenAPI document; serving BentoML's")
            return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") == DOC_PATH and scope["method"] == "GET":
            body = self.body
            if body is not None:
                await JSONResponse(body)(scope, receive, send)
                return
        await self.app(scope, receive, send)
