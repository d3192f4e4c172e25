"""The state interface (online/state.py): one contract, run against both backends — files
beside the artifact and a real PostgreSQL 15 (Debian's package, started by the test) — plus
what only the database has: migrations under concurrency, NOTIFY, a damaged row, a database
of another artifact, a restart under load, and the advisory-lock leader with a real kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from mp2a.errors import ArtifactError
from mp2a.head import Head
from online.pg import leader_sessions
from online.state import FileState, StateError, open_state


def permuted(art, shift: int) -> Head:
    return Head(np.roll(art.head.weight, shift, axis=1), art.head.logit_scale)


@pytest.fixture
def run(tmp_path: Path, street_run: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(street_run, out, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    return out


@pytest.fixture(params=["files", "postgresql"])
def state(request, run: Path, tmp_path: Path):
    if request.param == "files":
        s = FileState(run, tmp_path / "traffic.sqlite")
    else:
        dsn = request.getfixturevalue("pg_dsn")
        s = open_state(run, {"MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(tmp_path / "cache")})
    yield s
    s.close()


def publish(state, head: Head, parent: int, note: str, **kw) -> int:
    return state.publish(
        head,
        {"note": note},
        parent=parent,
        prompts=None,
        decision={"accepted": True, "note": note},
        method="test",
        prompt_config=None,
        rows=None,
        **kw,
    )


def test_versions_publish_rollback_history_and_decisions(state, run):
    """The same contract on both backends: a publish is served, names its parent, carries its
    decision; a stale parent is refused; rollback returns to the parent; history and the
    decision log read back."""
    base = state.load_current()
    assert base.version == 1 and state.kind in ("files", "postgresql")
    with pytest.raises(ArtifactError, match="nothing to roll back"):
        state.rollback()
    token = state.change_token()
    v2 = publish(state, permuted(base, 1), 1, "two", record={"state": "accepted"})
    assert v2 == 2 and state.change_token() != token
    art = state.load_current()
    assert art.version == 2 and art.manifest["parent_version"] == 1
    np.testing.assert_array_equal(art.head.weight, permuted(base, 1).weight)
    assert art.metrics() == {"note": "two"} and art.manifest["decision"]["note"] == "two"
    assert state.ancestors(art) == [1]
    with pytest.raises((StateError, ArtifactError), match="not 1 as when the run started"):
        publish(state, permuted(base, 2), 1, "stale")  # trained on 1, but 2 is served
    assert publish(state, permuted(base, 3), 2, "three") == 3
    assert state.ancestors(state.load_current()) == [2, 1]
    assert state.rollback() == 2 and state.load_current().version == 2
    hist = {h["version"]: h for h in state.history()}
    assert set(hist) == {1, 2, 3} and hist[2]["served"] and hist[3]["rolled_back"]["to"] == 2
    (logged,) = state.decisions()
    assert logged["state"] == "accepted" and logged["version"] == 2  # recorded with its publish
    state.record_decision({"state": "rejected", "reasons": ["no gain"]})
    assert [d["state"] for d in state.decisions()] == ["rejected", "accepted"]
    assert [d["state"] for d in state.decisions(limit=1)] == ["rejected"]


def test_adapt_requests_and_status(state):
    assert state.take_request() is None and state.pending_request() is None
    state.request_adapt({"id": "r1", "settings": {"stages": 1}})
    assert state.pending_request()["id"] == "r1"
    taken = state.take_request()
    assert taken["id"] == "r1" and taken["site"] == "" and taken["settings"] == {"stages": 1}
    assert state.take_request() is None and state.pending_request() is None
    assert state.read_status() is None
    state.write_status({"state": "rejected", "reasons": ["x"]})
    got = state.read_status()
    assert got["state"] == "rejected" and got["reasons"] == ["x"] and "updated_at" in got


def test_traffic_offer_read_and_caps(state, run):
    base = state.load_current()
    dim = base.backbone.embed_dim
    import os

    os.environ["MP2A_STORE_MAX_ROWS"] = "50"
    try:
        if state.kind == "postgresql":
            state.store_env["MP2A_STORE_MAX_ROWS"] = "50"
        store = state.open_store(dim)
    finally:
        del os.environ["MP2A_STORE_MAX_ROWS"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, dim)).astype(np.float32)
    for i, e in enumerate(x):
        assert store.offer(e, i % 10, 0.5, "1")
    store.flush(30)
    deadline = time.time() + 60
    while state.traffic_count() > 50 and time.time() < deadline:  # retention runs each second
        time.sleep(0.2)
    store.close()
    got = state.read_traffic(None)
    assert state.traffic_count() == 50 == len(got)
    np.testing.assert_array_equal(got, x[-50:])  # the newest, oldest first
    assert state.traffic_max_id() >= 80
    np.testing.assert_array_equal(state.read_traffic(10), x[-10:])


def test_one_retention_pass_per_window_for_the_whole_fleet(run, pg_dsn, tmp_path):
    """The traffic table is the fleet's: the replica that claims the site's retention slot caps
    the rows and records their count; another replica passing within the window leaves the
    rows alone and reads that count; once the window is over, the next pass caps again."""
    import psycopg

    from online.pg import PgTrafficStore
    from online.store import StoreConfig

    states = [
        open_state(run, {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / f"c{i}")})
        for i in range(2)
    ]
    dim = states[0].load_current().backbone.embed_dim
    config = StoreConfig(path=tmp_path / "unused", dim=dim, max_rows=10)
    a, b = (PgTrafficStore(s, config, start=False) for s in states)
    writer = states[0].open_store(dim)
    x = np.random.default_rng(4).normal(size=(60, dim)).astype(np.float32)

    def write(rows) -> None:
        for e in rows:
            assert writer.offer(e, 0, 0.5, "1")
        writer.flush(30)

    def slot(conn) -> tuple:
        return conn.execute(
            "SELECT key, value FROM mp2a_meta WHERE key LIKE 'r%%' ORDER BY key"
        ).fetchall()

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        write(x[:30])
        deadline = time.time() + 30
        while len(slot(conn)) < 2 and time.time() < deadline:  # the writer's own first pass
            time.sleep(0.05)
        writer._next_retention = float("inf")  # from here on only a and b pass
        conn.execute("DELETE FROM mp2a_meta WHERE key LIKE 'r%%'")
        write(x[30:45])
        assert states[0].traffic_count() == 45
        assert a._retain_and_publish(None)
        assert states[0].traffic_count() == 10 and dict(slot(conn))["rows:"] == "10"
        write(x[45:])
        b._next_retention = 0.0
        assert b._retain_and_publish(None)  # within a's window: reads its count
        assert states[0].traffic_count() == 25 and dict(slot(conn))["rows:"] == "10"
        conn.execute("UPDATE mp2a_meta SET value = '0' WHERE key = 'retention:'")  # it ended
        b._next_retention = 0.0
        assert b._retain_and_publish(None)
        assert states[0].traffic_count() == 10 and dict(slot(conn))["rows:"] == "10"
        np.testing.assert_array_equal(states[0].read_traffic(None), x[-10:])
    writer.close()
    for s in states:
        s.close()


def test_a_batch_with_some_images_keeps_its_order_and_each_image_names_its_sample(
    run, pg_dsn, tmp_path
):
    """The PostgreSQL writer inserts a batch in one statement: rows in the order offered, and
    with MP2A_STORE_IMAGES=1 each kept image under the id of the sample it was served with."""
    import psycopg

    env = {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / "c"),
           "MP2A_STORE_IMAGES": "1"}  # fmt: skip
    state = open_state(run, env)
    dim = state.load_current().backbone.embed_dim
    store = state.open_store(dim)
    x = np.random.default_rng(3).normal(size=(30, dim)).astype(np.float32)
    images = {i: f"image {i}".encode() for i in range(30) if i % 3 != 1}
    for i, e in enumerate(x):
        assert store.offer(e, i % 10, 0.25 + i / 100, "1", image=images.get(i))
    store.flush(30)
    store.close()
    np.testing.assert_array_equal(state.read_traffic(None), x)
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT t.label, t.confidence, i.data FROM traffic t LEFT JOIN traffic_images i "
            "ON i.sample_id = t.id ORDER BY t.id"
        ).fetchall()
    assert [r[0] for r in rows] == [i % 10 for i in range(30)]
    assert [round(r[1], 2) for r in rows] == [round(0.25 + i / 100, 2) for i in range(30)]
    assert [None if r[2] is None else bytes(r[2]) for r in rows] == [
        images.get(i) for i in range(30)
    ]
    state.close()


def test_one_leader_at_a_time_and_takeover(state, run, tmp_path):
    other = (
        FileState(run, tmp_path / "traffic.sqlite")
        if state.kind == "files"
        else open_state(run, {"MP2A_STATE": state.dsn, "MP2A_STATE_CACHE": str(tmp_path / "c2")})
    )
    try:
        assert state.try_lead() and state.try_lead()  # re-entrant for the holder
        assert not other.try_lead()
        assert f"pid {os.getpid()} on " in other.lead_holder  # a follower knows who leads
        state.release_lead()
        assert other.try_lead() and not state.try_lead()
    finally:
        other.close()


def test_the_leader_reads_a_run_it_does_not_own_as_over(state, run, tmp_path):
    """The killed leader's process (files) or session (PostgreSQL) can outlive its lock for a
    moment. Whoever takes the lead in that moment still sees its run as over and records it."""
    from online import worker

    sleeper = subprocess.Popen(["sleep", "60"])  # alive: the run's process, not yet reaped
    other = None
    try:
        status = {"state": "running", "pid": sleeper.pid, "host": socket.gethostname()}
        if state.kind != "files":  # a live session that is not the leader's
            import psycopg

            other = psycopg.connect(state.dsn)
            (backend,) = other.execute("SELECT pg_backend_pid()").fetchone()
            status["leader_pid"] = backend
        state.write_status(status)
        assert state.read_status()["state"] == "running"  # to a reader that does not lead
        assert state.try_lead()
        assert state.read_status()["state"] == "failed"
        recovered = worker.recover(state)
        assert recovered["state"] == "failed" and f"pid {sleeper.pid}" in recovered["reasons"][0]
        assert state.decisions()[0]["pid"] == sleeper.pid
        state.write_status({"state": "running", "pid": os.getpid(), "host": socket.gethostname()})
        assert state.read_status()["state"] == "running"  # the leader's own run
        assert worker.recover(state) is None
    finally:
        sleeper.kill()
        sleeper.wait()
        if other is not None:
            other.close()
        state.release_lead()


# ------------------------------------------------------------------- PostgreSQL only


@pytest.fixture
def pg_state(run, pg_dsn, tmp_path):
    s = open_state(run, {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / "cache")})
    yield s
    s.close()


def test_a_migrated_database_starts_a_replica_without_the_migration_lock(
    run, pg_server, pg_dsn, tmp_path
):
    """A fleet starting together must not queue on the migration lock (behind PgBouncer each
    waiter holds a server connection): with every migration applied a replica starts while
    another session holds that lock; on a database still to migrate it waits for the lock."""
    import psycopg

    from online.pg import MIGRATE_KEY, MIGRATIONS

    open_state(run, {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / "a")}).close()
    fresh = pg_server.create_db(f"t_{uuid.uuid4().hex[:12]}")

    def start(dsn: str, cache: str, out: list) -> None:
        try:
            s = open_state(run, {"MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(tmp_path / cache)})
            s.load_current()
            s.close()
            out.append("started")
        except BaseException as e:
            out.append(e)

    for dsn, cache, migrated in ((pg_dsn, "b", True), (fresh, "c", False)):
        with psycopg.connect(dsn, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_KEY,))
            got: list = []
            t = threading.Thread(target=start, args=(dsn, cache, got), daemon=True)
            t.start()
            t.join(30 if migrated else 3)
            if migrated:
                assert got == ["started"]
                continue
            assert got == [] and t.is_alive()  # waits for the lock
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_KEY,))
            t.join(30)
            assert got == ["started"]
            applied = holder.execute("SELECT version FROM mp2a_schema ORDER BY version")
            assert [r[0] for r in applied] == [v for v, _ in MIGRATIONS]


def test_replicas_starting_together_migrate_once(run, pg_dsn, tmp_path):
    import psycopg

    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            env = {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / f"c{i}")}
            open_state(run, env).close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with psycopg.connect(pg_dsn) as conn:
        from online.pg import MIGRATIONS

        applied = conn.execute("SELECT version FROM mp2a_schema ORDER BY version").fetchall()
        assert applied == [(v,) for v, _ in MIGRATIONS]


def test_unreachable_database_and_another_artifacts_database_are_one_line_errors(
    run, pg_dsn, tmp_path, street_run, transductive_run
):
    with pytest.raises(StateError, match=r"cannot reach PostgreSQL at 127\.0\.0\.1:1/nope"):
        open_state(run, {"MP2A_STATE": "postgresql://u@127.0.0.1:1/nope"})
    with pytest.raises(StateError, match="use postgresql://"):
        open_state(run, {"MP2A_STATE": "mysql://x"})
    open_state(run, {"MP2A_STATE": pg_dsn}).close()
    other = tmp_path / "other"
    shutil.copytree(transductive_run, other, ignore=shutil.ignore_patterns("versions"))
    with pytest.raises(StateError, match="holds the state of another artifact"):
        open_state(other, {"MP2A_STATE": pg_dsn})


def test_notify_wakes_a_waiting_replica_within_a_second(run, pg_dsn, tmp_path, pg_state):
    replica = open_state(run, {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / "r")})
    try:
        replica.wait_for_change(0.01)  # LISTEN is set up
        woke: list[float] = []

        def wait() -> None:
            replica.wait_for_change(30)
            woke.append(time.monotonic())

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.3)
        sent = time.monotonic()
        publish(pg_state, permuted(pg_state.load_current(), 1), 1, "two")
        t.join(10)
        assert woke and woke[0] - sent < 1.0
        assert replica.load_current().version == 2
    finally:
        replica.close()


def test_a_head_row_whose_sha256_does_not_match_is_not_served(run, pg_dsn, pg_state, tmp_path):
    import psycopg

    base = pg_state.load_current()
    publish(pg_state, permuted(base, 1), 1, "two")
    publish(pg_state, permuted(base, 2), 2, "three")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE versions SET head = overlay(head placing '\\x00' from 200 for 1) "
            "WHERE version = 3"
        )
    fresh = open_state(run, {"MP2A_STATE": pg_dsn, "MP2A_STATE_CACHE": str(tmp_path / "f")})
    try:
        assert fresh.load_current().version == 2  # 3 fails its sha256: the newest good one
    finally:
        fresh.close()


def test_a_replica_started_with_the_database_down_serves_its_last_verified_version(
    run, pg_server, tmp_path
):
    dsn = pg_server.create_db(f"down_{uuid.uuid4().hex[:8]}")
    env = {"MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(tmp_path / "cache")}
    s = open_state(run, env)
    publish(s, permuted(s.load_current(), 4), 1, "two")
    assert s.load_current().version == 2
    s.close()
    pg_server.stop("immediate")
    try:
        with pytest.raises(StateError, match="cannot reach PostgreSQL"):
            open_state(run, env)  # a fresh connection fails: mp2a serve decides (launch.py)
        offline = open_state(run, env, connect=False)
        art = offline.load_current()
        assert art.version == 2 and offline.offline
        np.testing.assert_array_equal(art.head.weight, permuted(art, 0).weight)
    finally:
        pg_server.start()


def test_a_database_restart_under_traffic_loses_no_committed_row(run, pg_server, tmp_path):
    """The store keeps taking samples while the database restarts (those it cannot write are
    dropped and counted, never blocking), reconnects by itself, and every row committed before
    the restart is still there."""
    dsn = pg_server.create_db(f"restart_{uuid.uuid4().hex[:8]}")
    s = open_state(run, {"MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(tmp_path / "cache")})
    dim = s.load_current().backbone.embed_dim
    store = s.open_store(dim)
    x = np.random.default_rng(1).normal(size=(400, dim)).astype(np.float32)
    for e in x[:200]:
        store.offer(e, 0, 0.5, "1")
    store.flush(30)
    before = s.traffic_count()
    assert before == 200
    pg_server.restart(down_seconds=1.0)
    t0 = time.monotonic()
    for e in x[200:]:
        store.offer(e, 0, 0.5, "1")
        time.sleep(0.01)
    assert time.monotonic() - t0 < 30  # offer never waited for the database
    store.flush(60)
    deadline = time.time() + 30
    while True:
        try:
            n = s.traffic_count()
            break
        except StateError:
            assert time.time() < deadline
            time.sleep(0.5)
    store.close()
    assert n + store.dropped == 400 and n >= before
    assert s.read_traffic(None)[:200].tolist() == x[:200].tolist()
    s.close()


def test_kill_9_of_the_leading_worker_hands_the_lead_over(run, pg_dsn, tmp_path, pg_state):
    """A real `python -m online.worker` leads; kill -9 ends its session and its advisory lock;
    another state takes the lead within seconds, and a status it left running reads failed."""
    cmd = [sys.executable, "-m", "online.worker", str(run), "--state", pg_dsn, "--poll", "0.2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import psycopg

    try:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            deadline = time.time() + 180  # the worker's start (imports) on a busy machine
            mine = f"mp2a pid {proc.pid} on "
            while not (lead := [p for p, name in leader_sessions(conn) if name.startswith(mine)]):
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.2)
            assert not pg_state.try_lead()
            pg_state.write_status({"state": "running", "pid": proc.pid, "host": "h"})
            conn.execute(  # as the leader writes it
                "UPDATE adapt_status SET status = jsonb_set(status, '{leader_pid}', %s::jsonb)",
                (json.dumps(lead[0]),),
            )
        assert pg_state.read_status()["state"] == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        while not pg_state.try_lead():
            assert time.monotonic() - t0 < 10, "no takeover within 10 s"
            time.sleep(0.2)
        status = pg_state.read_status()
        assert status["state"] == "failed" and "lost its database session" in status["reasons"][0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_worker_reads_past_a_burst_of_one_repeated_image(state, run):
    """A health probe or a stuck camera sending one image fills the newest rows: the worker's
    read reaches back until it holds `limit` distinct images, and only as far as it must."""
    from online.worker import READ_REACH, read_distinct

    dim = state.load_current().backbone.embed_dim
    store = state.open_store(dim)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, dim)).astype(np.float32)
    probe = rng.normal(size=dim).astype(np.float32)
    for i, e in enumerate(x):
        assert store.offer(e, i % 10, 0.5, "1")
    for _ in range(150):  # far more repeats than the window holds
        assert store.offer(probe, 0, 0.5, "1")
    store.flush(30)
    store.close()
    got = read_distinct(state, 30, "")
    assert len(np.unique(got, axis=0)) == 30  # the probe image and the newest 29 of the stream
    assert got[0].tolist() == x[-29].tolist() and len(got) == 29 + 150
    assert read_distinct(state, None, "").shape == (190, dim)
    # a store that holds fewer distinct images than asked for: all of it, not an endless read
    assert len(read_distinct(state, 100, "")) == 190
    # the reach is bounded: one distinct image in a window of 1 reads only the newest row
    assert len(read_distinct(state, 1, "")) == 1 and READ_REACH >= 4


def test_the_window_of_one_version_is_the_newest_rows_that_version_served(state, run):
    """What the monitor reads: the newest `limit` rows first, then those the given version
    answered (a head is judged on the traffic it served, not on the rows it trained on)."""
    dim = state.load_current().backbone.embed_dim
    store = state.open_store(dim)
    x = np.random.default_rng(2).normal(size=(60, dim)).astype(np.float32)
    served = ["1"] * 30 + ["2"] * 20 + ["1"] * 10  # a swap to 2, then a rollback to 1
    for e, v in zip(x, served, strict=True):
        assert store.offer(e, 0, 0.5, v)
    store.flush(30)
    store.close()
    np.testing.assert_array_equal(state.read_traffic(None, served_by="2"), x[30:50])
    np.testing.assert_array_equal(state.read_traffic(25, served_by="2"), x[35:50])
    np.testing.assert_array_equal(state.read_traffic(25, served_by="1"), x[50:])
    np.testing.assert_array_equal(state.read_traffic(25), x[35:])  # unchanged without it
    assert state.read_traffic(100, served_by="7").shape == (0, dim)
