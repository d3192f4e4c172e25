"""A fleet as it runs in production: a real PostgreSQL 15 and three real `mp2a serve`
replicas on loopback ports, each with MP2A_ONLINE=1 (so three adaptation workers), sharing one
state. One replica's POST /adapt gives one run for the fleet; a publish and a rollback reach
every replica; /adapt/status and /adapt/history read the same everywhere; kill -9 of the
leading worker mid-run leaves a failed run recorded once and another worker takes over."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time

import httpx
import numpy as np
import psycopg
import pytest
from test_serving_server import predict_ok, serve_client  # same folder (pytest's path)

from mp2a.head import Head
from online.pg import leader_sessions
from online.state import open_state

TOKEN = "fleet-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPLICAS = 3


def leaders(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [pid for pid, _ in leader_sessions(conn)]


def wait_for(what, check, timeout: float = 60.0, every: float = 0.1):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.time() < deadline, f"never: {what}"
        time.sleep(every)


def statuses(clients: list[httpx.Client]) -> list[dict]:
    """Each replica's status as an admin reads it (with the worker's pid)."""
    return [c.get("/adapt/status", headers=AUTH).json() for c in clients]


ENDED = ("accepted", "rejected", "failed")


def run_status(c: httpx.Client, request_id: str, states: tuple[str, ...]) -> dict | None:
    """The status of request `request_id` as `c` reports it, once it is in `states`."""
    s = c.get("/adapt/status", headers=AUTH).json()  # admin: with the worker's pid
    mine = (s.get("request") or {}).get("id") == request_id
    return s if mine and s["state"] in states else None


def test_three_replicas_one_state(street_run, digits_small, pg_dsn, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(street_run, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    files = sorted(digits_small.glob("street/*/*.png"))
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    with contextlib.ExitStack() as stack:
        clients = []
        for i in range(REPLICAS):
            env = {
                **os.environ,
                "BENTOML_DO_NOT_TRACK": "True",
                "BENTOML_HOME": str(tmp_path / f"bentoml-{i}"),
                "MP2A_STATE": pg_dsn,
                "MP2A_STATE_CACHE": str(tmp_path / f"cache-{i}"),  # as on another machine
                "MP2A_ONLINE": "1",
                "MP2A_ADMIN_TOKEN": TOKEN,
                "MP2A_ADAPT_MIN_SAMPLES": "20",
                "MP2A_ADAPT_STAGES": "2",
                "MP2A_ADAPT_STEPS": "10",
            }
            clients.append(stack.enter_context(serve_client(cmd, env, tmp_path / f"r{i}.log")))
        assert {c.get("/model").json()["state"]["backend"] for c in clients} == {"postgresql"}

        # traffic through every replica lands in the one traffic table
        for k, f in enumerate(files * 2):
            predict_ok(clients[k % REPLICAS], f)
        state = open_state(run, {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / "t")})
        wait_for("traffic stored", lambda: state.traffic_count() == 2 * len(files))
        wait_for("one leading worker", lambda: len(leaders(pg_dsn)) == 1)

        # a publish by anyone reaches every replica; a rollback through one replica too
        base = state.load_current()
        new = Head(np.roll(base.head.weight, 1, axis=1), base.head.logit_scale)
        v = state.publish(
            new, {"by": "test"}, parent=1, prompts=None, decision=None, method="test",
            prompt_config=None, rows=None,
        )  # fmt: skip
        wait_for(
            "all replicas serve the publish",
            lambda: all(c.get("/model").json()["version"] == str(v) for c in clients),
            timeout=60,
        )
        assert all(predict_ok(c, files[0])["model_version"] == str(v) for c in clients)
        r = clients[1].post("/rollback", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"version": "1", "previous": str(v)}
        wait_for(
            "all replicas rolled back",
            lambda: all(c.get("/model").json()["version"] == "1" for c in clients),
            timeout=60,
        )

        # POST /adapt on one replica: one run for the fleet, the same status everywhere
        req = clients[2].post("/adapt", headers=AUTH).json()
        done = wait_for("the run ends", lambda: run_status(clients[0], req["id"], ENDED), 180)
        assert done["state"] in ("accepted", "rejected"), done
        same = statuses(clients)
        assert len({(s["state"], s["request"]["id"], s.get("pid")) for s in same}) == 1
        histories = [c.get("/adapt/history").json()["decisions"] for c in clients]
        assert histories[0] == histories[1] == histories[2]
        runs = [d for d in histories[0] if d["state"] != "rolled_back"]  # the rollback is too
        assert [d["request"]["id"] for d in runs] == [req["id"]]  # exactly once
        first_pid = done["pid"]

        # kill -9 of the leading worker in the middle of a run
        long = clients[0].post("/adapt", headers=AUTH, json={"steps_per_stage": 100000}).json()
        running = wait_for(
            "the long run is running",
            lambda: run_status(clients[0], long["id"], ("running",)),
            timeout=120,
        )
        time.sleep(1.0)  # inside the training steps
        os.kill(running["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        failed = wait_for(
            "every replica reads the killed run failed",
            lambda: all(s["state"] == "failed" for s in statuses(clients)),
            timeout=30,
        )
        assert failed
        wait_for("another worker leads", lambda: len(leaders(pg_dsn)) == 1, timeout=30)
        took_over = time.monotonic() - killed_at
        print(f"\ntakeover after kill -9: {took_over:.1f} s")
        after = clients[1].post("/adapt", headers=AUTH).json()
        end = wait_for(
            "a new run by the new leader ends",
            lambda: run_status(clients[0], after["id"], ENDED),
            timeout=180,
        )
        assert end["state"] in ("accepted", "rejected"), end
        assert end["pid"] != running["pid"]
        decisions = clients[2].get("/adapt/history").json()["decisions"]
        decisions = [d for d in decisions if d["state"] != "rolled_back"]  # runs only
        ids = [d["request"]["id"] for d in decisions]
        assert sorted(ids) == sorted([req["id"], long["id"], after["id"]])  # each once
        killed = [d for d in decisions if d["request"]["id"] == long["id"]]
        assert killed[0]["state"] == "failed" and "lost its database session" in str(killed[0])
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute("SELECT version FROM versions ORDER BY version").fetchall()
        published = [r[0] for r in rows]
        assert published == list(range(2, 2 + len(published)))  # none twice, none missing
        assert first_pid  # the first run's worker is recorded
        state.close()


@pytest.mark.parametrize("dsn", ["postgresql://nobody@127.0.0.1:1/none", "mysql://x"])
def test_serve_with_a_bad_or_unreachable_state_is_one_line(street_run, tmp_path, dsn):
    import subprocess

    env = {**os.environ, "MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(tmp_path / "c")}
    cmd = [sys.executable, "-m", "mp2a", "serve", str(street_run), "--port", "1"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mp2a: error: ") and ("cannot reach" in last or "postgresql://" in last)


def test_serve_with_the_database_down_starts_on_the_last_verified_version(
    street_run, digits_small, pg_server, tmp_path
):
    """A replica that verified version 2 before keeps serving it when it restarts while the
    database is down, and follows the fleet again once the database is back."""
    import uuid

    run = tmp_path / "run"
    shutil.copytree(street_run, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    dsn = pg_server.create_db(f"down_{uuid.uuid4().hex[:8]}")
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "MP2A_STATE": dsn,
        "MP2A_STATE_CACHE": str(tmp_path / "cache"),
    }
    state = open_state(run, env)
    base = state.load_current()
    two = Head(np.roll(base.head.weight, 2, axis=1), base.head.logit_scale)
    state.publish(
        two, {}, parent=1, prompts=None, decision=None, method="test", prompt_config=None, rows=None
    )
    state.load_current()  # this machine verified version 2 (the cache remembers it)
    state.close()
    pg_server.stop("immediate")
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    files = sorted(digits_small.glob("street/*/*.png"))
    try:
        with serve_client(cmd, env, tmp_path / "serve.log") as c:
            info = c.get("/model").json()
            assert info["version"] == "2" and info["state"]["connected"] in (True, False)
            assert predict_ok(c, files[0])["model_version"] == "2"
            pg_server.start()
            wait_for(
                "reconnected", lambda: c.get("/model").json()["state"]["connected"], timeout=60
            )
    finally:
        with contextlib.suppress(Exception):
            pg_server.start()


def test_a_database_restart_fails_no_prediction_and_the_replica_recovers(
    street_run, digits_small, pg_server, tmp_path
):
    """Predictions keep flowing while PostgreSQL restarts under them: every one answers 200
    from the verified head; the replica reconnects by itself and traffic is stored again."""
    import threading
    import uuid

    run = tmp_path / "run"
    shutil.copytree(street_run, run, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    dsn = pg_server.create_db(f"restart_{uuid.uuid4().hex[:8]}")
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "MP2A_STATE": dsn,
        "MP2A_STATE_CACHE": str(tmp_path / "cache"),
    }
    files = sorted(digits_small.glob("street/*/*.png"))
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    statuses: list[int] = []
    stop = threading.Event()
    with serve_client(cmd, env, tmp_path / "serve.log") as c:

        def client() -> None:
            with httpx.Client(base_url=str(c.base_url), timeout=60) as own:
                k = 0
                while not stop.is_set():
                    f = files[k % len(files)]
                    k += 1
                    r = own.post("/predict", files={"image": (f.name, f.read_bytes())})
                    statuses.append(r.status_code)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(2)
        pg_server.restart(down_seconds=3.0)
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join()
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        state = open_state(run, {"MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(tmp_path / "t")})
        before = state.traffic_count()
        for f in files[:10]:
            predict_ok(c, f)
        wait_for("traffic stored after the restart", lambda: state.traffic_count() >= before + 10)
        wait_for("reconnected", lambda: c.get("/model").json()["state"]["connected"], timeout=60)
        metrics = c.get("/metrics").text
        assert "mp2a_state_errors_total" in metrics
        state.close()
    print(f"\n{len(statuses)} predictions across the restart, all 200")
