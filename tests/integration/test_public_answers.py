"""Anonymous callers see no internals: a real `mp2a serve` process, every anonymous route of
its OpenAPI document and the error answers, with a failed run (traceback, pid, host, paths in
its reasons) in the status and the history, an old artifact whose metrics carry an absolute
data path, and an unreadable status file (a 500). No answer may carry an absolute path, a
traceback, the pid or the host name; an admin caller (bearer token) sees the details."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import traceback

import httpx
from test_serving_server import serve_client  # same folder (pytest puts it on the path)

from mp2a.artifact import sha256_file
from online import worker
from online.state import open_state

TOKEN = "public-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOTS = sorted(n for n in os.listdir("/") if re.fullmatch(r"[\w.+-]+", n))
ABSOLUTE = re.compile(rf"(?<![\w.~])/(?:{'|'.join(map(re.escape, ROOTS))})(?:/|\b)")
HOST = re.compile(rf"(?<![\w.-]){re.escape(socket.gethostname())}(?![\w-])")


def internals(text: str, pids: set[int]) -> list[str]:
    """What in an answer's text is internal to the server's machine."""
    found = [m.group(0) for m in ABSOLUTE.finditer(text)]
    found += ["Traceback"] * ("Traceback" in text) + HOST.findall(text)
    found += [f"pid {p}" for p in pids if re.search(rf"(?<!\d){p}(?!\d)", text)]
    if re.search(r'"(pid|host|traceback)"\s*:', text):
        found.append("a pid/host/traceback field")
    return found


def failed_status(run) -> dict:
    """A failed run as the worker writes it: reasons with a path, a traceback, pid, host."""
    try:
        open(run / "missing" / "features.safetensors", "rb")  # noqa: SIM115
    except OSError as e:
        reason, tb = f"{type(e).__name__}: {e}", traceback.format_exc()
    return {
        "state": "failed",
        "started_at": worker.now(),
        "finished_at": worker.now(),
        "request": None,
        "pid": 999_983,
        "host": socket.gethostname(),
        "site": "",
        "reasons": [reason],
        "traceback": tb,
        "seconds": 0.5,
    }


def test_anonymous_answers_carry_no_internals(street_run, digits_small, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(street_run, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["data"] == digits_small.name  # the artifact records the folder's name
    assert json.loads((run / "local.json").read_text())["data"] == str(digits_small)
    # an artifact from before: its metrics carry the absolute data path
    (run / "metrics.json").write_text(json.dumps({**metrics, "data": str(digits_small)}))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"]["metrics.json"] = sha256_file(run / "metrics.json")
    (run / "manifest.json").write_text(json.dumps(manifest))
    state = open_state(run, {})
    status = failed_status(run)
    assert str(run) in status["reasons"][0] and "Traceback" in status["traceback"]
    state.record_decision(worker.decision_entry(status))
    state.write_status(status)
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
        "MP2A_ADMIN_TOKEN": TOKEN,
    }
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    log = tmp_path / "serve.log"
    image = next(digits_small.glob("street/*/*.png")).read_bytes()
    with serve_client(cmd, env, log) as c:
        pids = {999_983, os.getpid()}
        pids |= {int(p) for p in re.findall(r"\bpid[ =:]+(\d+)", log.read_text())}
        doc = c.get("/docs.json").json()
        anonymous = [
            p
            for p, ops in doc["paths"].items()
            if "get" in ops and "{" not in p and not ops["get"].get("security")
        ]
        assert {"/model", "/adapt/status", "/adapt/history", "/metrics"} <= set(anonymous)
        answers: dict[str, httpx.Response] = {p: c.get(p) for p in anonymous}
        answers |= {
            "/adapt/history?limit=5": c.get("/adapt/history", params={"limit": 5}),
            "/adapt/history?limit=0": c.get("/adapt/history", params={"limit": 0}),
            "/adapt/status?site=x": c.get("/adapt/status", params={"site": "x"}),
            "POST /adapt": c.post("/adapt"),
            "POST /rollback": c.post("/rollback", json={"site": 3}),
            "POST /traffic": c.post("/traffic", json={}),
            "/sites/a/model": c.get("/sites/a/model"),
            "/nowhere": c.get("/nowhere"),
            "POST /predict (not an image)": c.post("/predict", files={"image": ("x", b"no")}),
            "POST /predict (truncated)": c.post(
                "/predict", files={"image": ("x.png", image[:40], "image/png")}
            ),
            "POST /predict_batch (none)": c.post("/predict_batch", files={"x": ("x", b"")}),
            "POST /predict": c.post("/predict", files={"image": ("x.png", image, "image/png")}),
        }
        assert answers["/adapt/status"].json()["state"] == "failed"
        assert answers["/adapt/history"].json()["decisions"][0]["state"] == "failed"
        assert answers["/adapt/status"].json()["reasons"] == [
            "FileNotFoundError: [Errno 2] No such file or directory: 'features.safetensors'"
        ]
        assert answers["POST /predict"].status_code == 200
        assert answers["/model"].json()["metrics"]["data"] == digits_small.name

        # admin callers see the details; anonymous ones the same status without them
        full = c.get("/adapt/status", headers=AUTH).json()
        assert full["pid"] == 999_983 and full["host"] == socket.gethostname()
        assert full["traceback"] == status["traceback"] and full["reasons"] == status["reasons"]
        assert c.get("/adapt/history", headers=AUTH).json()["decisions"][0]["pid"] == 999_983
        assert c.get("/model", headers=AUTH).json()["artifact"] == str(run)

        # an unreadable status file: its detail names no path
        (run / "versions" / "adapt_status.json").write_text("{not json")
        answers["/adapt/status (unreadable)"] = c.get("/adapt/status")
        assert answers["/adapt/status (unreadable)"].json()["state"] == "unknown"

        leaks = {}
        for what, r in answers.items():
            assert r.status_code < 500, (what, r.text)
            if found := internals(r.text, pids):
                leaks[what] = found
        assert not leaks, leaks
