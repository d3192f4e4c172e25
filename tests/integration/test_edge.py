"""Edges and their hub as processes on loopback: a hub (`mp2a serve`, MP2A_ONLINE=1,
MP2A_EDGE_TOKENS) and three edges (`mp2a serve --hub --site`) whose traffic comes from three
DigitsDA styles. Tokens are scoped to one site; uploads are checked whole; a site's head
reaches its edge alone; the hub killed for a while costs no prediction and the buffers drain
afterwards; an edge killed -9 keeps its buffer; a head failing its checksum is refused (a
fake hub: a real HTTP server answering what a broken or hostile hub would)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np
import pytest
from test_serving_server import predict_ok

from benchmarks.edge import hub_and_edges
from benchmarks.procs import ServerProcess, free_port
from mp2a import versions
from mp2a.errors import ArtifactError
from mp2a.head import Head
from online.edge import EdgeConfig, EdgeSync
from online.hub import encode_samples, head_bytes
from online.state import FileState

ADMIN = "edge-test-admin-token"
TOKENS = {"north": "n" * 32, "south": "s" * 32, "east": "e" * 32}
STYLES = {"north": "printed", "south": "handwritten", "east": "textured"}


def client(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=60)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions", "sites"))
    return dst


def wait_for(what: str, check, timeout: float = 60.0):
    deadline = time.time() + timeout
    while not (got := check()):
        assert time.time() < deadline, f"never: {what}"
        time.sleep(0.2)
    return got


@contextlib.contextmanager
def fleet(
    street_run: Path, tmp: Path
) -> Iterator[tuple[ServerProcess, dict[str, ServerProcess], Path]]:
    hub_run = copy_run(street_run, tmp / "hub-run")
    runs = {site: copy_run(street_run, tmp / f"edge-{site}") for site in TOKENS}
    with hub_and_edges(
        hub_run, runs, tmp, TOKENS, ADMIN,
        hub_env={"MP2A_ADAPT_STAGES": "2", "MP2A_ADAPT_STEPS": "10"},
        edge_env={site: {"MP2A_EDGE_POLL_S": "0.5"} for site in TOKENS},
    ) as (hub, edges):  # fmt: skip
        yield hub, edges, hub_run


def test_a_hub_and_three_edges(street_run, digits_small, tmp_path):
    with fleet(street_run, tmp_path) as (hub, edges, hub_run):
        state = FileState(hub_run)
        images = {s: sorted(digits_small.glob(f"{STYLES[s]}/*/*.png")) for s in edges}
        for site, edge in edges.items():
            with client(edge) as c:
                for f in images[site]:
                    predict_ok(c, f)
                # the hub's routes are not an edge's: its document leaves them out
                assert "/traffic" not in c.get("/docs.json").json()["paths"]
        for site in edges:
            wait_for(
                f"{site}'s traffic at the hub",
                lambda site=site: state.traffic_count(site) == len(images[site]),
            )
        assert state.traffic_count("") == 0  # the hub served nothing itself

        # tokens: scoped to one site, distinct from the admin token
        dim = state.load_current().backbone.embed_dim
        now = [time.time()]
        one = encode_samples(np.ones((1, dim), np.float32) / dim**0.5, [0], [0.5], ["1"], now)
        with client(hub) as c:

            def up(token: str | None, body: dict):
                h = {"Authorization": f"Bearer {token}"} if token else {}
                return c.post("/traffic", json=body, headers=h)

            n = TOKENS["north"]
            assert up(None, {"batch_id": "x", "samples": one}).status_code == 401
            assert up("w" * 32, {"batch_id": "x", "samples": one}).status_code == 401
            assert up(ADMIN, {"batch_id": "x", "samples": one}).status_code == 401
            r = up(n, {"batch_id": "x", "samples": one, "site": "south"})
            assert r.status_code == 403 and "cannot upload as 'south'" in r.json()["error"]
            r = c.get("/sites/south/model", headers={"Authorization": f"Bearer {n}"})
            assert r.status_code == 403 and "cannot read site 'south'" in r.json()["error"]
            assert c.get("/sites/north/model").status_code == 401
            # malformed uploads: nothing stored
            before = state.traffic_count("north")
            short = encode_samples(np.ones((1, 3), np.float32), [0], [0.5], ["1"], [1.0])
            nan = encode_samples(np.full((1, dim), np.nan, np.float32), [0], [0.5], ["1"], [1.0])
            for body, status in [
                ({"batch_id": "d", "samples": short}, 422),
                ({"batch_id": "n", "samples": nan}, 422),
                ({"batch_id": "o", "samples": one * 5001}, 413),
                ({"batch_id": "m"}, 400),
            ]:
                r = up(n, body)
                assert r.status_code == status, (body["batch_id"], r.text)
                assert "error" in r.json()
            assert up(n, {"batch_id": "ok-1", "samples": one}).json()["accepted"] == 1
            r = up(n, {"batch_id": "ok-1", "samples": one})  # a replay: refused, not stored
            assert r.status_code == 409 and "stored before" in r.json()["error"]
            assert state.traffic_count("north") == before + 1
            big = c.post(
                "/traffic",
                content=b"x" * (9 * 2**20),
                headers={"Authorization": f"Bearer {n}", "Content-Type": "application/json"},
            )
            assert big.status_code == 413

            # a site's head reaches its edge alone; a rollback of it leaves the others alone
            base = state.load_current("north")
            new = Head(np.roll(base.head.weight, 1, axis=1), base.head.logit_scale)
            v = state.publish(
                new, {"by": "test"}, parent=1, prompts=None, decision=None, method="test",
                prompt_config=None, rows=None, site="north",
            )  # fmt: skip
            assert v == 2
            with client(edges["north"]) as e:
                wait_for("north swapped", lambda: e.get("/model").json()["version"] == "2", 15)
                assert predict_ok(e, images["north"][0])["model_version"] == "2"
            for site in ("south", "east"):
                with client(edges[site]) as e:
                    assert e.get("/model").json()["version"] == "1"
            etag = c.get("/sites/north/model", headers={"Authorization": f"Bearer {n}"})
            assert etag.status_code == 200 and etag.json()["version"] == 2
            again = c.get(
                "/sites/north/model",
                headers={"Authorization": f"Bearer {n}", "If-None-Match": etag.headers["etag"]},
            )
            assert again.status_code == 304
            admin = {"Authorization": f"Bearer {ADMIN}"}
            r = c.post("/rollback", json={"site": "north"}, headers=admin)
            assert r.status_code == 200 and r.json() == {"version": "1", "previous": "2"}
            with client(edges["north"]) as e:
                wait_for("north rolled back", lambda: e.get("/model").json()["version"] == "1", 15)
            assert c.get("/model").json()["version"] == "1"  # the hub's own line untouched
            assert c.post("/rollback", json={"site": "nowhere"}, headers=admin).status_code == 404

            # POST /adapt for one site: a run on that site's traffic only
            req = c.post("/adapt", json={"site": "south"}, headers=admin).json()
            assert req["site"] == "south"
            done = wait_for(
                "the south run ends",
                lambda: (
                    (s := c.get("/adapt/status", params={"site": "south"}).json())["state"]
                    in ("accepted", "rejected", "failed")
                    and s
                ),
                timeout=180,
            )
            assert done["state"] in ("accepted", "rejected"), done
            assert done["n_traffic"] == state.traffic_count("south") and done["site"] == "south"
            south = c.get("/adapt/history", params={"site": "south"}).json()["decisions"]
            assert [d["request"]["id"] for d in south] == [req["id"]]
            assert c.get("/adapt/history", params={"site": "east"}).json()["decisions"] == []
            assert c.get("/adapt/history").json()["decisions"] == []

        # the hub killed for a while: edges keep answering; their buffers drain afterwards
        sent = {s: state.traffic_count(s) for s in edges}
        hub.kill9()
        extra = 0
        for site, edge in edges.items():
            with client(edge) as e:
                for f in images[site][:20]:
                    predict_ok(e, f)
            extra = 20
        edges["east"].kill9()  # an edge killed -9 with samples in its buffer
        assert FileState(hub_run.parent / "edge-east").traffic_count("") > 0
        edges["east"].start()
        hub.start()
        for site in edges:
            wait_for(
                f"{site}'s buffer delivered after the hub came back",
                lambda site=site: state.traffic_count(site) == sent[site] + extra,
                timeout=120,
            )
        for site in edges:
            buffer = FileState(hub_run.parent / f"edge-{site}")
            wait_for(f"{site}'s buffer empty", lambda b=buffer: b.traffic_count("") == 0, 30)
        with client(edges["north"]) as e:
            metrics = e.get("/metrics").text
        for name in ("mp2a_edge_buffer_samples", "mp2a_edge_uploaded_total"):
            assert name in metrics, name


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers GET /sites/<site>/model with `FakeHub.body` and records the requests."""

    body: ClassVar[dict] = {}
    etag = '"fake"'
    seen: ClassVar[list[dict]] = []

    def do_GET(self) -> None:
        FakeHub.seen.append(dict(self.headers))
        if self.headers.get("If-None-Match") == FakeHub.etag:
            self.send_response(304)
            self.end_headers()
            return
        data = json.dumps(FakeHub.body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ETag", FakeHub.etag)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_a_head_that_fails_its_checksum_is_refused(street_run, tmp_path):
    run = copy_run(street_run, tmp_path / "edge")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = EdgeConfig(f"http://127.0.0.1:{server.server_port}", "north", "n" * 32, 0.1)
        sync = EdgeSync(run, cfg)
        base = versions.load_current(run)
        good = Head(np.roll(base.head.weight, 3, axis=1), base.head.logit_scale)
        art = type(base)(path=base.path, manifest={**base.manifest, "version": 7}, head=good)
        data = head_bytes(art)
        tampered = bytearray(data)
        tampered[-5] ^= 0xFF
        FakeHub.body = {
            "site": "north",
            "version": 7,
            "parent_version": 1,
            "head_rows": None,
            "method": "test",
            "sha256": hashlib.sha256(data).hexdigest(),
            "head": base64.b64encode(bytes(tampered)).decode(),
        }
        with pytest.raises(ArtifactError, match="fails its sha256"):
            sync.poll_once()
        assert versions.current(run) == 1 and sync.rejected_heads == 1
        assert FakeHub.seen[-1]["Authorization"] == f"Bearer {'n' * 32}"
        FakeHub.body["head"] = base64.b64encode(data).decode()
        assert sync.poll_once() is True  # the good one is installed as version 7
        served = versions.load_current(run)
        assert served.version == 7
        np.testing.assert_array_equal(served.head.weight, good.weight)
        assert sync.poll_once() is False  # 304 with the ETag: nothing to do
        assert FakeHub.seen[-1].get("If-None-Match") == FakeHub.etag
    finally:
        server.shutdown()


def test_a_damaged_upload_buffer_is_moved_aside_and_refilled(street_run, tmp_path):
    """The edge's buffer (its traffic store) damaged on disk: the uploader moves it aside,
    counts it (mp2a_state_healed_total{what="edge_buffer"}) and goes on; the server's store
    writer makes a fresh one, whose rows the uploader reads under a new buffer id."""
    from mp2a.metrics import get_metrics
    from online.store import StoreConfig, TrafficStore

    run = copy_run(street_run, tmp_path / "edge")
    buffer = run / "traffic.sqlite"
    buffer.write_bytes(b"these bytes are not a database" * 300)
    port = free_port()  # nothing listens there: a hub that is down
    sync = EdgeSync(run, EdgeConfig(f"http://127.0.0.1:{port}", "north", "n" * 32, 0.1))
    healed = get_metrics().state_healed.labels(what="edge_buffer")
    before = healed._value.get()
    assert sync.upload_once() == 0
    assert healed._value.get() == before + 1
    assert len(list(run.glob("traffic.sqlite.damaged-*"))) == 1 and not buffer.exists()
    dim = versions.load_current(run).backbone.embed_dim
    store = TrafficStore(StoreConfig(path=buffer, dim=dim))
    for e in np.random.default_rng(0).normal(size=(5, dim)).astype(np.float32):
        store.offer(e, 1, 0.5, "1")
    store.flush(30)
    with pytest.raises(OSError):  # it read the fresh buffer and tried the (down) hub
        sync.upload_once()
    assert sync._uid != "new" and store.count() == 5
    store.close()
