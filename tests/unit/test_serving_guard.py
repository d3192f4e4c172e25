"""serving.guard: body limits, media type and form checks in front of a real ASGI app."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.guard import UploadGuard, UploadRule

LIMIT = 1000


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    if not request.headers.get("content-type", "").startswith("multipart/"):
        return JSONResponse({"body": len(body)})
    form = await request.form()
    sizes = {k: [len(await v.read()) for v in form.getlist(k)] for k in form}
    return JSONResponse({"sizes": sizes, "body": len(body)})


@pytest.fixture(scope="module")
def client():
    app = Starlette(
        routes=[
            Route("/one", echo, methods=["POST"]),
            Route("/many", echo, methods=["POST"]),
            Route("/other", echo, methods=["POST"]),
        ]
    )
    guarded = UploadGuard(
        app,
        rules={"/one": UploadRule("image", 1, LIMIT), "/many": UploadRule("images", 3, LIMIT)},
    )
    with TestClient(guarded) as c:
        yield c


def test_valid_upload_reaches_the_app_byte_for_byte(client):
    r = client.post("/one", files={"image": ("a.png", b"x" * 100, "image/png")})
    assert r.status_code == 200 and r.json()["sizes"] == {"image": [100]}
    r = client.post("/many", files=[("images", ("a", b"1" * 10)), ("images", ("b", b"2" * 20))])
    assert r.json()["sizes"] == {"images": [10, 20]}


def test_other_routes_pass_untouched(client):
    r = client.post("/other", content=b"z" * (10 * LIMIT), headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json()["body"] == 10 * LIMIT


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"content": b"abc", "headers": {"content-type": "image/png"}}, 415, "multipart"),
        ({"json": {"image": "x"}}, 415, "application/json"),
        ({"content": b"abc"}, 415, "multipart"),
        ({"files": {"image": ("a", b"x" * (LIMIT + 1))}}, 413, "exceeds"),
        ({"files": {"image": ("a", b"x" * (10 * LIMIT))}}, 413, "exceeds"),
        ({"files": {"picture": ("a", b"x")}}, 400, "'picture'"),
        ({"data": {"note": "hi"}, "files": {"other": ("a", b"")}}, 400, "no 'image'"),
        ({"data": {"image": "http://169.254.169.254/"}, "files": {"x": ("a", b"")}}, 400, "file"),
        ({"files": [("image", ("a", b"1")), ("image", ("b", b"2"))]}, 400, "predict_batch"),
        ({"files": {"image": ("n" * 300, b"x")}}, 400, "file name"),
        (
            {
                "content": b'--b\r\nContent-Disposition: form-data; name="image"',
                "headers": {"content-type": "multipart/form-data; boundary=b"},
            },
            400,
            "",
        ),
        (
            {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
            400,
            "malformed",
        ),
    ],
)
def test_refusals_are_json_4xx(client, kwargs, status, words):
    r = client.post("/one", **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(5):
            yield b"y" * (LIMIT // 2)

    r = client.post(
        "/one", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413


def test_too_many_files_for_the_batch_route(client):
    r = client.post("/many", files=[("images", (f"{i}", b"x")) for i in range(4)])
    assert r.status_code == 413 and "limit is 3" in r.json()["error"]
