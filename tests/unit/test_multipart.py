"""serving.multipart: the guard's parser against forms real clients encode, and against
every truncation and fault of a body."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from serving.multipart import FormError, parse_form


def encoded(**kwargs) -> tuple[bytes, str]:
    """The body and Content-Type httpx sends for these `files=` / `data=`."""
    req = httpx.Request("POST", "http://x/predict", **kwargs)
    return req.read(), req.headers["content-type"]


def starlette_parts(body: bytes, content_type: str) -> list[tuple]:
    """What starlette's streaming parser reads from the same body."""

    async def parse() -> list[tuple]:
        async def stream():
            yield body

        headers = Headers({"content-type": content_type})
        form = await MultiPartParser(headers, stream(), max_files=100, max_fields=100).parse()
        out = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                out.append((name, value.filename, value.content_type, await value.read()))
            else:
                out.append((name, None, None, value.encode()))
        await form.close()
        return out

    return asyncio.run(parse())


def awkward_bytes(seed: int, n: int) -> bytes:
    """Random bytes sprinkled with line breaks and boundary-like runs of dashes."""
    rng = np.random.default_rng(seed)
    data = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    for at in rng.integers(0, max(1, n - 8), 20):
        data[at : at + 6] = rng.choice([b"\r\n--\r\n", b"\r\n\r\n--", b"------", b"--\r\n\r\n"])
    return bytes(data)


@pytest.mark.parametrize("seed", range(6))
def test_the_same_parts_as_starlettes_parser(seed):
    files = [
        ("images", (f"p{i}.jpg", awkward_bytes(seed * 10 + i, 50 * 7**i), "image/jpeg"))
        for i in range(4)
    ] + [("images", ("empty.png", b"", "image/png")), ("other", ("n a\u00efve.bin", b"x"))]
    body, ctype = encoded(files=files, data={"note": "h\u00e9llo\r\n--", "k": ""})
    got = [(p.name, p.filename, p.content_type, p.data) for p in parse_form(body, ctype, 100)]
    want = starlette_parts(body, ctype)
    assert [g[:2] + g[3:] for g in got] == [w[:2] + w[3:] for w in want]
    files_got = [g for g in got if g[1] is not None]
    assert [g[2] for g in files_got] == [w[2] for w in want if w[1] is not None]
    assert [g[3] for g in files_got[:5]] == [f[1][1] for f in files[:5]]  # byte for byte


def test_headers_quoting_preamble_and_epilogue():
    body = (
        b"a preamble\r\n--b\r\n"
        b'content-disposition: form-data; name="image"; filename="a \\"q\\".jpg"\r\n\r\n'
        b"ONE\r\n--b  \r\n"  # transport padding after a boundary line
        b"Content-Disposition: form-data; name=plain; filename*=UTF-8''%C3%A9t%C3%A9.png\r\n"
        b"Content-Type: image/png\r\n\r\n"
        b"TWO\r\n--b\r\n"
        b'Content-Disposition: form-data; name="text"\r\n\r\n'
        b"\r\n--b--\r\nan epilogue"
    )
    parts = parse_form(body, 'multipart/form-data; boundary="b"', 10)
    assert [(p.name, p.filename, p.content_type, p.data) for p in parts] == [
        ("image", 'a "q".jpg', "application/octet-stream", b"ONE"),
        ("plain", "\u00e9t\u00e9.png", "image/png", b"TWO"),
        ("text", None, "text/plain", b""),
    ]
    assert parse_form(b"--b--\r\n", "multipart/form-data; boundary=b", 10) == []


def test_every_truncation_is_a_form_error_or_the_whole_form():
    body, ctype = encoded(files={"image": ("a.jpg", awkward_bytes(99, 300), "image/jpeg")})
    whole = parse_form(body, ctype, 10)
    closing = body.rindex(b"--\r\n")  # the closing boundary's trailing dashes
    for n in range(len(body)):
        try:
            parts = parse_form(body[:n], ctype, 10)
        except FormError:
            assert n < closing + 2, n
        else:
            assert n >= closing + 2 and parts == whole, n


@pytest.mark.parametrize(
    ("body", "ctype", "words"),
    [
        (b"--b\r\n\r\nx\r\n--b--", "multipart/form-data", "no boundary"),
        (b"--b\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=" + "b" * 71, "longer than"),
        (b"\x00\x01junk", "multipart/form-data; boundary=xyz", "no boundary line"),
        (b"--bX\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "line break"),
        (b"--b\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "no Content-Disposition"),
        (b"--b\r\nno colon here\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "Name:"),
        (
            b"--b\r\nContent-Disposition: attachment; name=a\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
            "form-data; name",
        ),
        (
            b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
            "form-data; name",
        ),
        (
            b"--b\r\nX-Long: " + b"y" * 9000 + b"\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
            "blank line",
        ),
    ],
)
def test_faults_name_what_is_wrong(body, ctype, words):
    with pytest.raises(FormError, match=words):
        parse_form(body, ctype, 10)


def test_parts_beyond_the_limit_are_refused():
    body, ctype = encoded(files=[("images", (f"{i}", b"x")) for i in range(5)])
    assert len(parse_form(body, ctype, 5)) == 5
    with pytest.raises(FormError, match="more than 4 parts"):
        parse_form(body, ctype, 4)
