"""An ASGI middleware that checks uploads before BentoML parses them.

BentoML's multipart handling has no body limit, answers 500 to a few malformed forms (a file
field sent as text makes it try to download that text as a URL; an over-long file name
fails its temp-file creation), and treats any non-multipart body as JSON. This guard buffers
the body of the prediction routes up to a limit (413 beyond it), requires
multipart/form-data (415), parses the form once (serving/multipart.py) to check that the
expected field holds file uploads (400/413 otherwise). Every refusal is JSON {"error": "..."}.

With a `handler`, a checked upload is answered here: the handler gets the route and the
files' bytes and returns the response (the service's prediction path). BentoML's own
handling of the request (a second multipart parse, a temp file per upload, pydantic models
in and out) is then skipped, while everything outside this middleware (BentoML's request
metrics, tracing, access log, timeout and concurrency limit) still applies. Without one the
body is replayed to BentoML unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.multipart import FormError, Part, parse_form

log = logging.getLogger(__name__)

MAX_FILENAME = 200  # bytes; BentoML turns the upload's file name into a temp-file suffix
MAX_FIELDS = 64  # parts of a form beside the route's files
DRAIN_FACTOR = 4  # read (and drop) an oversize body up to this many limits before answering


@dataclass(frozen=True)
class UploadRule:
    """What one prediction route accepts."""

    field: str  # the multipart field holding the image(s)
    max_files: int  # 1 for /predict
    max_bytes: int  # whole request body


class BodyTooLarge(Exception):
    pass


# (route, the files' bytes in the order sent) -> the response
Handler = Callable[[str, list[bytes]], Awaitable[Response]]


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class UploadGuard:
    """ASGI middleware; `rules` maps a POST path to what it accepts."""

    def __init__(
        self, app: ASGIApp, rules: dict[str, UploadRule], handler: Handler | None = None
    ) -> None:
        self.app = app
        self.rules = rules
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        rule = self.rules.get(scope.get("path", "")) if scope["type"] == "http" else None
        if rule is None or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        body, refusal = await self._read(rule, headers, receive)
        files: list[bytes] = []
        if refusal is None:
            refusal, files = self._check_form(rule, headers, body)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if self.handler is not None:
            response = await self.handler(scope["path"], files)
            await response(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(
        self, rule: UploadRule, headers: Headers, receive: Receive
    ) -> tuple[bytes, JSONResponse | None]:
        media = headers.get("content-type", "").split(";")[0].strip().lower()

        def too_large() -> JSONResponse:
            return _error(
                413,
                f"the request body exceeds {rule.max_bytes // 2**20} MiB; send smaller or "
                "fewer images",
            )

        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > DRAIN_FACTOR * rule.max_bytes:
            return b"", too_large()  # answer at once; the server closes the connection
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= rule.max_bytes:
                chunks.append(chunk)
            elif size > DRAIN_FACTOR * rule.max_bytes:
                return b"", too_large()
            more = message.get("more_body", False)
        if size > rule.max_bytes:
            return b"", too_large()  # drained, so the client reads this answer cleanly
        if media != "multipart/form-data":
            got = media or "no content type"
            return b"", _error(
                415,
                f"expected multipart/form-data with the image in field {rule.field!r}, got "
                f"{got}; e.g. curl -F {rule.field}=@photo.jpg",
            )
        return b"".join(chunks), None

    def _check_form(
        self, rule: UploadRule, headers: Headers, body: bytes
    ) -> tuple[JSONResponse | None, list[bytes]]:
        """(None, the files' bytes) for a good form, else (the refusal, [])."""
        try:
            form = parse_form(body, headers.get("content-type", ""), rule.max_files + MAX_FIELDS)
        except FormError as e:
            return _error(400, f"malformed multipart/form-data body: {e.message}"), []
        refusal = self._check_values(rule, form)
        if refusal is not None:
            return refusal, []
        return None, [p.data for p in form if p.name == rule.field]

    @staticmethod
    def _check_values(rule: UploadRule, form: list[Part]) -> JSONResponse | None:
        """The refusal of a parsed form, in the order a client would fix it; None if good."""
        values = [p for p in form if p.name == rule.field]
        if not values:
            fields = ", ".join(dict.fromkeys(repr(p.name) for p in form)) or "none"
            return _error(
                400,
                f"no {rule.field!r} field in the form (fields sent: {fields}); "
                f"e.g. curl -F {rule.field}=@photo.jpg",
            )
        if len(values) > rule.max_files == 1:
            return _error(
                400,
                f"{len(values)} files in field {rule.field!r}; this endpoint takes one "
                "image, POST several to /predict_batch as repeated field 'images'",
            )
        if len(values) > rule.max_files:
            return _error(
                413, f"{len(values)} images in one request; the limit is {rule.max_files}"
            )
        for v in values:
            if v.filename is None:
                return _error(
                    400,
                    f"field {rule.field!r} must be a file upload (with a filename), not "
                    f"text; e.g. curl -F {rule.field}=@photo.jpg",
                )
            if len(v.filename.encode()) > MAX_FILENAME:
                return _error(400, f"the upload's file name exceeds {MAX_FILENAME} bytes")
        return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the buffered body once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
