"""The fleet's PostgreSQL connection budget and PgBouncer, for real: light replica processes
(benchmarks/replica.py: the real state client, traffic store writer, version watcher and
worker loop, no model) under load against a real PostgreSQL 15, counted in pg_stat_activity
by the pid every mp2a session names in its application_name; a real PgBouncer in transaction
mode in front of it for the pooled connections."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest
from prereqs import require_binary

from benchmarks.fleet_scale import _pid_of
from mp2a.cli import main
from mp2a.head import Head
from online.pg import MIGRATIONS, leader_sessions
from online.state import StateError, open_state

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path: Path, street_run: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(street_run, out, ignore=shutil.ignore_patterns("traffic.sqlite*", "versions"))
    return out


@pytest.fixture(scope="module")
def bouncer(pg_server):
    require_binary("pgbouncer", "pgbouncer")
    from benchmarks.pgbouncer import PgBouncer

    b = PgBouncer(pg_server, pool_size=4).start()
    yield b
    b.destroy()


def held_sessions(dsn: str) -> dict[int, list[str]]:
    """Sessions open for over a second in the database, per mp2a process: the last query of
    each (the short-lived ones, a waiting worker's try for the lead, are not held)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name, query FROM pg_stat_activity WHERE datname = "
            "current_database() AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND backend_start < now() - interval '1 second'"
        ).fetchall()
    out: dict[int, list[str]] = {}
    for name, query in rows:
        if (pid := _pid_of(name)) is not None:
            out.setdefault(pid, []).append(query)
    return out


def leader_pid(dsn: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = [_pid_of(name) for _, name in leader_sessions(conn)]
    return found[0] if found else None


def start_replica(run: Path, env: dict, stats: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "benchmarks.replica", str(run), "--stats", str(stats), *extra]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)


def stats_of(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_for(what, check, timeout: float = 60.0, every: float = 0.1):
    deadline = time.time() + timeout
    while not (got := check()):
        assert time.time() < deadline, f"never: {what}"
        time.sleep(every)
    return got


def stop_all(procs: list[subprocess.Popen]) -> list[str]:
    logs = []
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        logs.append(err or "")
    return logs


def test_connections_per_replica_stay_in_budget_under_load(run, pg_dsn, tmp_path):
    """1, 2, 3 replicas under load: each holds 2 sessions (its pooled connection and its
    LISTEN); the one whose worker leads holds 2 more (the lock's session and the worker's
    pooled connection); waiting workers hold none. Two processes of one replica (a shared
    state cache, as MP2A_WORKERS=2 has) share one LISTEN: 3 sessions, not 4."""
    env = {**os.environ, "MP2A_STATE": pg_dsn, "MP2A_SAMPLE_RATE": "1"}
    procs: list[subprocess.Popen] = []
    try:
        for n in (1, 2, 3):
            i = n - 1
            renv = {**env, "MP2A_STATE_CACHE": str(tmp_path / f"cache-{i}")}
            procs.append(start_replica(run, renv, tmp_path / f"{i}.json", "--rate", "400"))
            pids = {p.pid for p in procs}
            names = [tmp_path / f"{k}.json" for k in range(n)]
            wait_for(f"{n} replicas ready", lambda names=names: all(map(stats_of, names)), 120)
            lead = wait_for("a leader", lambda: leader_pid(pg_dsn), 60)
            time.sleep(1.5)  # every session of the load is over a second old
            held = held_sessions(pg_dsn)
            assert set(held) == pids, (held, pids)
            for pid, queries in held.items():
                assert len(queries) == (4 if pid == lead else 2), (pid, lead, queries)
                assert sum(q.startswith("LISTEN") for q in queries) == 1, queries
            assert sum(map(len, held.values())) == 2 * n + 2
        # the writers committed while they were counted: the load was real
        assert all((stats_of(tmp_path / f"{k}.json") or {})["committed"] > 0 for k in range(3))

        # two processes of one replica (one state cache folder), no worker in either
        shared = {**env, "MP2A_STATE_CACHE": str(tmp_path / "cache-shared")}
        pair = [
            start_replica(run, shared, tmp_path / f"w{k}.json", "--no-worker", "--rate", "400")
            for k in range(2)
        ]
        procs += pair
        wait_for("both ready", lambda: all(stats_of(tmp_path / f"w{k}.json") for k in range(2)))
        time.sleep(1.5)
        held = held_sessions(pg_dsn)
        mine = [q for p in pair for q in held.get(p.pid, [])]
        assert len(mine) == 3 and sum(q.startswith("LISTEN") for q in mine) == 1, mine
        # the process that does not listen still follows a publish (it polls the token)
        state = open_state(run, {**env, "MP2A_STATE_CACHE": str(tmp_path / "pub")})
        base = state.load_current()
        v = state.publish(
            Head(np.roll(base.head.weight, 1, axis=1), base.head.logit_scale), {}, parent=1,
            prompts=None, decision=None, method="test", prompt_config=None, rows=None,
        )  # fmt: skip
        state.close()
        wait_for("every process serves the publish", lambda: all(
            (stats_of(tmp_path / f"{k}.json") or {}).get("version") == str(v)
            for k in ["0", "1", "2", "w0", "w1"]), 30)  # fmt: skip
    finally:
        logs = stop_all(procs)
    assert all(p.returncode == 0 for p in procs), logs


def test_state_through_pgbouncer_in_transaction_mode(run, pg_server, bouncer, tmp_path):
    """MP2A_STATE through a real PgBouncer (transaction mode, 4 server connections) and
    MP2A_STATE_DIRECT to PostgreSQL: replicas start and migrate together, write traffic,
    follow a publish (LISTEN on the direct connection), one worker leads (its lock on the
    direct connection); statements run far more than psycopg's 5 before it would prepare
    them; the replicas' sessions on the server stay within the pooler's pool and their
    LISTENs."""
    db = f"b_{uuid.uuid4().hex[:10]}"
    direct = pg_server.create_db(db)
    env = {
        **os.environ,
        "MP2A_STATE": bouncer.dsn_for(db),
        "MP2A_STATE_DIRECT": direct,
        "MP2A_SAMPLE_RATE": "1",
    }
    procs = [
        start_replica(run, {**env, "MP2A_STATE_CACHE": str(tmp_path / f"c{k}")},
                      tmp_path / f"{k}.json", "--rate", "200")
        for k in range(3)
    ]  # fmt: skip
    try:
        wait_for("replicas ready", lambda: all(stats_of(tmp_path / f"{k}.json") for k in range(3)))
        wait_for("a leader", lambda: leader_pid(direct), 60)
        state = open_state(run, {**env, "MP2A_STATE_CACHE": str(tmp_path / "pub")})
        base = state.load_current()
        served = 1
        for n in range(3):
            served = state.publish(
                Head(np.roll(base.head.weight, n + 1, axis=1), base.head.logit_scale), {},
                parent=served, prompts=None, decision=None, method="test",
                prompt_config=None, rows=None,
            )  # fmt: skip
            wait_for(f"every replica serves {served}", lambda v=str(served): all(
                (stats_of(tmp_path / f"{k}.json") or {}).get("version") == v
                for k in range(3)), 30)  # fmt: skip
        assert state.rollback() == served - 1
        for _ in range(20):  # the same statement many times through the pooler
            assert state.traffic_count() >= 0
        with psycopg.connect(direct, autocommit=True) as conn:
            (n_server,) = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ).fetchone()
        # the pooler's 4, three LISTENs, the leader's lock (and a waiting worker's try)
        assert n_server <= 4 + 3 + 1 + 1, n_server
        time.sleep(2)
        state.close()
    finally:
        logs = stop_all(procs)
    assert all(p.returncode == 0 for p in procs), logs
    assert not any("prepared statement" in log for log in logs), logs
    final = [stats_of(tmp_path / f"{k}.json") for k in range(3)]
    assert all(s["final"] and s["healthy"] and s["committed"] > 0 for s in final), final
    with psycopg.connect(direct, autocommit=True) as conn:
        (rows,) = conn.execute("SELECT count(*) FROM traffic").fetchone()
        (migrated,) = conn.execute("SELECT count(*) FROM mp2a_schema").fetchone()
    assert rows >= sum(s["committed"] for s in final) and migrated == len(MIGRATIONS)


def test_a_direct_dsn_answered_by_pgbouncer_is_refused_in_one_line(
    run, pg_server, bouncer, tmp_path
):
    """LISTEN through a pooler in transaction mode would never fire and a session lock there
    is nobody's: MP2A_STATE_DIRECT (or MP2A_STATE without it) answered by PgBouncer is
    refused at start, exit 2 with one line saying what to set."""
    db = f"d_{uuid.uuid4().hex[:10]}"
    direct = pg_server.create_db(db)
    pooled = bouncer.dsn_for(db)
    with pytest.raises(StateError, match=r"MP2A_STATE_DIRECT .* connection pooler"):
        open_state(run, {"MP2A_STATE": direct, "MP2A_STATE_DIRECT": pooled})
    base = {**os.environ, "MP2A_STATE_CACHE": str(tmp_path / "c")}
    base.pop("MP2A_STATE_DIRECT", None)
    cmd = [sys.executable, "-m", "online.worker", str(run)]
    r = subprocess.run(cmd, env={**base, "MP2A_STATE": pooled}, capture_output=True, text=True)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "connection pooler" in line and "set MP2A_STATE_DIRECT=" in line, line
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--port", "1"]
    env = {**base, "MP2A_STATE": pooled, "MP2A_STATE_DIRECT": pooled}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mp2a: error: MP2A_STATE_DIRECT") and "pooler" in last, r.stderr
    # the same settings with the server itself as the direct DSN start
    open_state(run, {"MP2A_STATE": pooled, "MP2A_STATE_DIRECT": direct}).close()


def test_bench_fleet_replicas_quick_prints_the_table(run, tmp_path, capsys):
    """The quick scale bench: two light replicas per way (direct, PgBouncer, PgBouncer
    without LISTEN), each figure of the table present (no timing asserts); the CLI's
    --replicas checked."""
    from benchmarks.fleet_scale import run as run_scale

    require_binary("pgbouncer", "pgbouncer")
    r = json.loads(json.dumps(run_scale(2, quick=True, work=tmp_path / "w", base=run)))
    assert r["bench"] == "fleet" and r["replicas"] == 2
    assert set(r["modes"]) == {"direct", "pgbouncer", "pgbouncer-poll"}
    for mode, m in r["modes"].items():
        assert m["connections"]["peak_total"] >= 1 and m["ingest_rows_per_s"] > 0, mode
        assert m["publish_all_swapped_ms"]["missed"] == 0, m
        assert m["takeover_seconds"] > 0 and m["restart"]["leader_after_restart"], m
        assert m["rows"]["committed_rows_lost"] == 0, m
        # the running pooler's own niceness, read back (root here: the bench's -10)
        expected = None if mode == "direct" else -10 if os.geteuid() == 0 else 0
        assert m["pooler_niceness"] == expected, mode
    assert r["modes"]["direct"]["connections"]["held_per_replica_max"] <= 4  # 2 + the lead's
    # the full server (quick: one, beside the first way only) answered through the restart
    served = r["modes"]["direct"]["full_servers"]
    assert served["servers"] == 1 and served["failed"] == 0, served
    assert (
        served["requests_while_restarting"] > 0 and served["publish_all_swapped_ms"]["missed"] == 0
    )
    assert r["modes"]["pgbouncer"]["full_servers"] is None
    assert r["targets"]["direct"]["zero_failed_predictions_on_full_servers"]
    assert main(["bench", "fleet", "--replicas", "0"]) == 2
    assert "--replicas 0: give 1 or more" in capsys.readouterr().err
