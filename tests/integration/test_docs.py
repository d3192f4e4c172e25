"""The API docs page of our own (GET /docs; / redirects there) and JSON error answers, on the
real service in-process."""

from __future__ import annotations

import re

import pytest
from test_serving_http import make_client  # same folder (pytest's path)

import mp2a


@pytest.fixture
def client(street_run):
    with make_client(street_run) as c:
        yield c


def test_docs_page_is_ours_and_loads_nothing_from_elsewhere(client):
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/docs"
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert 'fetch("/docs.json")' in html
    # no script, style, font or picture from another host (BentoML's page had Google's)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "googletagmanager" not in html
    info = client.get("/docs.json").json()["info"]
    assert info["version"] == mp2a.__version__
    assert "http" not in info["description"]


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        ("GET", "/predict", 405, "GET is not allowed on /predict; use POST"),
        ("GET", "/predict_batch", 405, "use POST"),
        ("PUT", "/model", 405, "PUT is not allowed on /model; use GET"),
        ("GET", "/no/such/route", 404, "no route /no/such/route; the routes are listed at /docs"),
    ],
)
def test_every_error_answer_is_json(client, method, path, status, says):
    r = client.request(method, path)
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"error": says} or says in r.json()["error"]


def test_our_own_errors_pass_unchanged(client):
    r = client.post("/predict", files={"image": ("x.png", b"not an image", "image/png")})
    assert r.status_code in (400, 415) and set(r.json()) == {"error"}
