"""The online loop as a user runs it: `MP2A_ONLINE=1 mp2a serve RUN` (BentoML server + the
adaptation worker under its supervisor), real HTTP traffic into the real SQLite store,
POST /adapt → the worker re-adapts → gate → the server hot-swaps; then kill -9 of the worker
in the middle of a run: the status says failed, the supervisor starts a new worker, the
failure is counted in /metrics, and the served version stays complete and verified."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serving_server import (  # same folder (pytest puts it on the path)
    predict_ok,
    serve_client,
    wait_http,
)

from benchmarks.procs import alive_processes, descendants, free_port
from mp2a import versions
from online.store import peek_int

TOKEN = "online-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def runs_counter(c: httpx.Client) -> dict[str, float]:
    text = c.get("/metrics").text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "mp2a_adaptation_runs":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[s.labels["outcome"]] = s.value
    return out


def wait_status(c: httpx.Client, request_id: str, states: set[str], timeout=180.0) -> dict:
    """The status of request `request_id` once it is in one of `states` (as an admin reads
    it: with the worker's pid and host)."""
    deadline = time.time() + timeout
    while True:
        status = c.get("/adapt/status", headers=AUTH).json()
        mine = (status.get("request") or {}).get("id") == request_id
        if mine and status["state"] in states:
            return status
        assert time.time() < deadline, f"status never reached {states}: {status}"
        time.sleep(0.1)


def test_online_server_adapts_on_request_swaps_and_survives_a_killed_worker(
    street_run, digits_small, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(street_run, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),  # its own metrics directory
        "MP2A_ONLINE": "1",
        "MP2A_ADMIN_TOKEN": TOKEN,
        "MP2A_ADAPT_MIN_SAMPLES": "20",
        "MP2A_ADAPT_STAGES": "2",
        "MP2A_ADAPT_STEPS": "15",
    }
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    files = sorted(digits_small.glob("street/*/*.png"))
    log = tmp_path / "serve.log"
    with serve_client(cmd, env, log) as c:
        predict = functools.partial(predict_ok, c)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(predict, files * 2))
        assert {a["model_version"] for a in answers} == {"1"}
        deadline = time.time() + 30
        while peek_int(run / "traffic.sqlite", "SELECT COUNT(*) FROM samples") < len(answers):
            assert time.time() < deadline, "traffic never reached the store"
            time.sleep(0.2)
        assert c.get("/adapt/status").json()["state"] == "idle"
        zero = {"accepted": 0.0, "rejected": 0.0, "failed": 0.0}
        assert runs_counter(c) == zero

        # 1. POST /adapt: the worker (started by `mp2a serve`) runs, the gate decides
        assert c.post("/adapt").status_code == 401
        r = c.post("/adapt", headers=AUTH)
        assert r.status_code == 202, r.text
        status = wait_status(c, r.json()["id"], {"accepted", "rejected", "failed"})
        assert status["state"] in ("accepted", "rejected"), status
        assert status["n_traffic"] == len(answers)
        assert status["gate"]["reasons"] == status["reasons"]
        print("\nonline status:", json.dumps({k: status[k] for k in ("state", "reasons", "gate")}))
        if status["state"] == "accepted":
            new = str(status["version"])
            deadline = time.time() + 60
            while predict(files[0])["model_version"] != new:
                assert time.time() < deadline, "the server never swapped to the accepted version"
                time.sleep(0.1)
            assert c.get("/model").json()["version"] == new
            assert versions.history(run)[0]["decision"]["accepted"] is True
        else:
            assert predict(files[0])["model_version"] == "1" and versions.current(run) == 1
        served = versions.current(run)
        assert runs_counter(c) == {**zero, status["state"]: 1.0}

        # 2. kill -9 of the worker in the middle of a long run
        r = c.post("/adapt", headers=AUTH, json={"steps_per_stage": 100_000})
        assert r.status_code == 202, r.text
        running = wait_status(c, r.json()["id"], {"running"}, timeout=60)
        assert running["request"]["settings"] == {"steps_per_stage": 100_000}
        os.kill(running["pid"], signal.SIGKILL)
        # noticed as soon as the process is gone (before the supervisor's restart)
        status = wait_status(c, r.json()["id"], {"failed"}, timeout=10)
        assert f"pid {running['pid']}" in status["reasons"][0]
        deadline = time.time() + 60  # the supervisor restarts it; the new one counts the loss
        while runs_counter(c).get("failed") != 1.0:
            assert time.time() < deadline, f"failed run never counted: {runs_counter(c)}"
            time.sleep(0.2)
        stored = json.loads((run / "versions" / "adapt_status.json").read_text())
        assert stored["state"] == "failed" and stored["pid"] == running["pid"]
        assert versions.current(run) == served
        versions.load_current(run)  # complete, every checksum verified
        assert predict(files[0])["model_version"] == str(served)

        # 3. the restarted worker takes the next request
        r = c.post("/adapt", headers=AUTH, json={"stages": 1, "steps_per_stage": 5})
        assert r.status_code == 202, r.text
        status = wait_status(c, r.json()["id"], {"accepted", "rejected", "failed"})
        assert status["state"] in ("accepted", "rejected"), status
        assert status["pid"] != running["pid"] and len(status["per_stage"]) == 1
        history = c.get("/adapt/history", headers=AUTH).json()["decisions"]  # with pids
        assert [d["state"] for d in history][1] == "failed" and len(history) == 3
        assert all("pid" not in d for d in c.get("/adapt/history").json()["decisions"])
        assert history[0]["request"]["id"] == r.json()["id"] and history[1]["pid"] == running["pid"]
        assert c.get("/adapt/history?limit=0").status_code == 400
    assert "adaptation worker exited (-9); restarting" in log.read_text()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))


def test_sigterm_stops_the_server_and_the_worker_with_it(street_run, tmp_path):
    """docker stop / systemd send SIGTERM to `mp2a serve`: BentoML's processes and the
    adaptation worker must go with it, not linger as orphans holding the port and CPU."""
    run = tmp_path / "run"
    shutil.copytree(street_run, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
        "MP2A_ONLINE": "1",
    }
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    log = tmp_path / "serve.log"
    family: set[int] = set()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", proc, log)
            deadline = time.time() + 30
            family = descendants(proc.pid)
            while len(family) < 4:  # launcher, bentoml serve, its worker, adaptation worker
                assert time.time() < deadline, family
                time.sleep(0.2)
                family = descendants(proc.pid)
            proc.terminate()
            assert proc.wait(timeout=30) != 0
            deadline = time.time() + 60
            while left := family & set(alive_processes()):
                assert time.time() < deadline, f"left running: {left}"
                time.sleep(0.2)
        finally:
            for pid in family | descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
