"""The reference of `mp2a bench serving`: the same model behind a bare ASGI route.

`python -m benchmarks.bare RUN --port P [--precision fp32|int8]` serves POST /predict with
uvicorn (the server BentoML runs on) and nothing else: no framework, no middleware, no
batching, no metrics, no traffic store. The work per request is the service's: the first
part of the multipart body, `decode_image` (the same decode path, DCT scaling included),
`preprocess_image`, the same ONNX Runtime session (serving/backends.py `OrtBackend`, same
threads and settings), the artifact's head and the same top-k JSON
(`serving.predictor.answer`).

It is the fastest simple server, not a strawman: the work runs off the event loop in a thread
pool as large as the service's (MP2A_THREADS, default 64, through `anyio.to_thread` with a
capacity limiter, as the service does), one image per model call (ONNX Runtime runs
concurrent calls of one session), in as many processes as the service runs (`--workers N`:
uvicorn's workers, each session on cores/N threads as the service's are). What the service
takes beyond this is what the framework, the batching and the service's promises (input
checks, JSON errors, metrics, traffic, hot swap) cost.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import anyio
import anyio.to_thread

from mp2a.artifact import load_artifact
from mp2a.preprocess import preprocess_image
from serving.backends import OrtBackend, cpu_count
from serving.decode import DecodeLimits, InputError, decode_image
from serving.predictor import answer


def first_part(body: bytes, content_type: str) -> bytes:
    """The content of the first part of a multipart/form-data body."""
    boundary = content_type.partition("boundary=")[2].strip('"').encode()
    if not boundary:
        raise InputError(400, "no multipart boundary")
    start = body.find(b"\r\n\r\n", body.find(b"--" + boundary)) + 4
    end = body.find(b"\r\n--" + boundary, start)
    if start < 4 or end < 0:
        raise InputError(400, "malformed multipart body")
    return body[start:end]


def make_app(run: Path, precision: str = "fp32", workers: int = 1):
    art = load_artifact(run)
    backend = OrtBackend(art, threads=max(1, cpu_count() // workers), precision=precision)
    limits = DecodeLimits()
    top_k = min(5, len(art.classes))
    version = str(art.version)
    threads = int(os.environ.get("MP2A_THREADS", "64"))
    limiter: list[anyio.CapacityLimiter] = []  # made inside the running event loop

    def predict(data: bytes) -> dict:
        img = decode_image(data, limits, art.preprocessing.image_size)
        pixels = preprocess_image(img, art.preprocessing)[None]  # (1, 3, S, S)
        return answer(art.head.probs(backend.encode(pixels))[0], art.classes, top_k, version)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        status, answer = 404, {"error": "not found"}
        if scope["path"] == "/readyz":
            status, answer = 200, {}
        elif scope["path"] == "/predict" and scope["method"] == "POST":
            chunks, more = [], True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            headers = dict(scope["headers"])
            if not limiter:
                limiter.append(anyio.CapacityLimiter(threads))
            try:
                ctype = headers.get(b"content-type", b"").decode()
                data = first_part(b"".join(chunks), ctype)
                status = 200
                answer = await anyio.to_thread.run_sync(predict, data, limiter=limiter[0])
            except InputError as e:
                status, answer = e.status, {"error": e.message}
        body = json.dumps(answer).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    return app


def app_from_env():
    """uvicorn's factory for `--workers N` (each worker process imports and builds the app)."""
    return make_app(
        Path(os.environ["MP2A_BARE_RUN"]),
        os.environ["MP2A_BARE_PRECISION"],
        int(os.environ["MP2A_BARE_WORKERS"]),
    )


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m benchmarks.bare")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--workers", type=int, default=1, help="processes (as the service's)")
    a = p.parse_args(argv)
    opts = {"host": a.host, "port": a.port, "log_level": "warning", "access_log": False}
    if a.workers == 1:
        uvicorn.run(make_app(Path(a.run), a.precision), **opts)
        return 0
    os.environ.update(
        MP2A_BARE_RUN=str(Path(a.run).resolve()),
        MP2A_BARE_PRECISION=a.precision,
        MP2A_BARE_WORKERS=str(a.workers),
    )
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config("benchmarks.bare:app_from_env", factory=True, workers=a.workers, **opts)
    # uvicorn's own `workers` binds a socket of protocol 0, so asyncio never sets TCP_NODELAY
    # on its connections and every response waits out a delayed ACK (~40 ms here); the
    # socket is made as a single uvicorn makes it (protocol TCP), as BentoML's workers get it
    family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
