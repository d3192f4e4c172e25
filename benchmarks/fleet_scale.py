"""`mp2a bench fleet --replicas N --json`: N light replicas on one PostgreSQL, measured.

Each replica is its own process (benchmarks/replica.py): the real state client, the real
traffic store writer fed with synthetic sampled traffic, the real version watcher and the
real adaptation worker loop (it leads or waits; no training). Three ways of reaching the
database, one after the other, each on a fresh PostgreSQL 15 (benchmarks/pgserver.py):

    direct         MP2A_STATE = PostgreSQL (max_connections 2N + 30)
    pgbouncer      MP2A_STATE = PgBouncer in transaction mode (benchmarks/pgbouncer.py,
                   at POOLER_NICE: the pooler as on a core of its own),
                   MP2A_STATE_DIRECT = PostgreSQL for LISTEN and the leader's lock
                   (max_connections N + 40)
    pgbouncer-poll the same with MP2A_STATE_LISTEN=0 (no LISTEN: version changes by polling),
                   on PostgreSQL's default max_connections 100

Per way: the peak of client sessions in pg_stat_activity (sampled every 0.25 s, the bench's
own excluded; per replica, by the pid in application_name, on direct connections), the rows
committed per second, publishes → every replica serving the new version (from each
replica's own record of when its watcher swapped), kill -9 of the leading replica → another
holds the lead, a PostgreSQL restart under load (down 3 s) → every replica's watcher healthy
and its writer committing again, and rows counted before and after: the rows in the database
never fewer than those committed before the restart, nor than every replica's count of its
committed samples at the end.

Beside the light replicas, `servers` full `mp2a serve` replicas (the tiny CLIP on ONNX
Runtime, the same state settings, traffic kept; no adaptation worker of their own: the
light replicas' workers hold the election) answer a closed-loop load (benchmarks/fleet.py
`load`, 4 clients) from before the publishes until every replica has reconnected after the
restart: failed predictions (in all and while PostgreSQL restarts), p50/p99, and publishes →
both servers answering with the new version, read off the answers. Their traffic rows are
told from the light replicas' by the replicas' constant confidence (benchmarks/replica.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.fleet import _env as server_env
from benchmarks.fleet import _latency, _start_load
from benchmarks.online import online_server
from benchmarks.pgbouncer import PgBouncer
from benchmarks.pgserver import PgServer
from benchmarks.replica import CONFIDENCE
from benchmarks.serving import bench_image
from mp2a.errors import Mp2aError
from online.supervisor import REPO_ROOT

MODES = ("direct", "pgbouncer", "pgbouncer-poll")
# PgBouncer's scheduling niceness here (benchmarks/pgbouncer.py): the bench packs the fleet onto
# this machine's cores, where a deployment gives the one single-threaded pooler a core of its
# own; at nice 0 it gets 1/N of the cores among N busy replica processes (measured, 100 light
# replicas on 2 cores: 80 of 100 clients waiting for the pool, PostgreSQL idle; publish → all
# p99 1.3 s at nice 0, 0.8 s at -10, no full servers). Needs root; otherwise 0, recorded.
POOLER_NICE = -10


class Monitor:
    """Samples pg_stat_activity of one database on a direct connection of its own."""

    def __init__(self, dsn: str, every: float = 0.25) -> None:
        self.dsn, self.every = dsn, every
        self.peak_total = 0
        self.peak_mp2a = 0
        self.peak_per_pid: dict[int, int] = {}
        self.per_pid: dict[int, list[int]] = {}  # every sample's count, per replica process
        self.totals: list[int] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def _run(self) -> None:
        import psycopg

        me = os.getpid()
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
                # held: sessions over 2 s old (a waiting worker's try for the lead lives
                # milliseconds, longer on a starved machine, and is not held)
                rows = conn.execute(
                    "SELECT application_name, count(*), count(*) FILTER (WHERE backend_start "
                    "< now() - interval '2 seconds') FROM pg_stat_activity WHERE "
                    "backend_type = 'client backend' AND datname = current_database() "
                    "AND pid <> pg_backend_pid() GROUP BY 1"
                ).fetchall()
            except Exception:
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[union-attr]
                conn = None
                self._stop.wait(self.every)
                continue
            total = mp2a = 0
            for name, n, held in rows:
                pid = _pid_of(name)
                if pid == me:
                    continue  # the bench's own sessions (publishes, counts)
                total += n
                if pid is not None:
                    mp2a += n
                    self.peak_per_pid[pid] = max(self.peak_per_pid.get(pid, 0), n)
                    self.per_pid.setdefault(pid, []).append(held)
            self.peak_total = max(self.peak_total, total)
            self.totals.append(total)
            self.peak_mp2a = max(self.peak_mp2a, mp2a)
            self.samples += 1
            self._stop.wait(self.every)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def reset(self) -> int:
        """Start counting afresh (the fleet is up); returns the peak so far (the start)."""
        peak, self.peak_total, self.peak_mp2a = self.peak_total, 0, 0
        self.peak_per_pid, self.per_pid, self.totals = {}, {}, []
        return peak


def _pid_of(name: str | None) -> int | None:
    """The pid in "mp2a pid N on HOST", else None."""
    parts = (name or "").split()
    if len(parts) >= 3 and parts[0] == "mp2a" and parts[1] == "pid" and parts[2].isdigit():
        return int(parts[2])
    return None


def _prepare(work: Path) -> Path:
    from benchmarks.fleet import _mp2a

    data, run = work / "digits", work / "run"
    _mp2a("data", "digits", "--out", str(data), "--per-class", "4", "--quiet")
    _mp2a(
        "adapt", "--data", str(data), "--target", "street", "--method", "zeroshot",
        "--out", str(run), "--no-cache", "--quiet",
    )  # fmt: skip
    _mp2a("export", str(run), "--format", "onnx")  # the full servers' encoder
    return run


def _count_servers(dsn: str) -> int:
    """Traffic rows the full servers wrote (every light replica's sample has CONFIDENCE)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        sql = "SELECT count(*) FROM traffic WHERE confidence <> %s::real"
        return int(conn.execute(sql, (CONFIDENCE,)).fetchone()[0])


def _server_swaps(rows: list[tuple], commits: list[tuple[str, float]], servers: int) -> dict:
    """Per publish: ms from the commit until every full server answered with it (or newer)."""
    per_publish, missed = [], 0
    for v, t in commits:
        lags = []
        for r in range(servers):
            seen = [row[1] for row in rows if row[0] == r and row[4] and int(row[4]) >= int(v)]
            if seen:
                lags.append(max(0.0, min(seen) - t) * 1000)
            else:
                missed += 1
        if len(lags) == servers:
            per_publish.append(max(lags))
    return {
        "per_publish": [round(x, 1) for x in per_publish],
        "p99": _pct(per_publish, 99),
        "missed": missed,
    }


def _stats(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _count(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return int(conn.execute("SELECT count(*) FROM traffic").fetchone()[0])


def _leader_pid(dsn: str) -> int | None:
    import psycopg

    from online.pg import leader_sessions

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        found = [_pid_of(name) for _, name in leader_sessions(conn)]
    return found[0] if found else None


def _wait(what: str, check, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise Mp2aError(f"fleet bench: never {what} within {timeout:.0f} s")
        time.sleep(every)


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 1) if xs else None


def run_mode(
    mode: str,
    work: Path,
    run: Path,
    replicas: int,
    quick: bool,
    rate: float,
    servers: int = 2,
    image: Path | None = None,
) -> dict:
    from mp2a.head import Head
    from online.state import open_state

    max_conn = {"direct": 2 * replicas + 30, "pgbouncer": replicas + 40}.get(mode, 100)
    pg = PgServer()
    pg.max_connections = max_conn
    pg.start()
    bouncer = None
    procs: dict[int, subprocess.Popen] = {}
    stats_dir = work / mode
    stats_dir.mkdir(parents=True, exist_ok=True)
    full = contextlib.ExitStack()  # the full servers and their load
    load_proc: subprocess.Popen | None = None
    try:
        direct = pg.create_db("fleet")
        env = {
            **os.environ,
            "MP2A_STATE": direct,
            "MP2A_STORE_MAX_ROWS": str(10**8),  # nothing capped: every committed row counted
            "MP2A_SAMPLE_RATE": "0.5",
        }
        if mode != "direct":
            bouncer = PgBouncer(
                pg, pool_size=10, max_clients=4 * replicas + 100, nice=POOLER_NICE
            ).start()
            env["MP2A_STATE"] = bouncer.dsn_for("fleet")
            env["MP2A_STATE_DIRECT"] = direct
        if mode == "pgbouncer-poll":
            env["MP2A_STATE_LISTEN"] = "0"
        pub_env = {**env, "MP2A_STATE_CACHE": str(work / f"{mode}-pub")}
        state = open_state(run, pub_env)  # migrates once before the fleet starts
        base = state.load_current()
        monitor = Monitor(direct).start()
        t_start = time.monotonic()
        for i in range(replicas):
            renv = {**env, "MP2A_STATE_CACHE": str(work / f"{mode}-cache-{i}")}
            cmd = [sys.executable, "-m", "benchmarks.replica", str(run),
                   "--stats", str(stats_dir / f"{i}.json"), "--rate", str(rate)]  # fmt: skip
            with open(stats_dir / f"{i}.log", "wb") as log:
                procs[i] = subprocess.Popen(
                    cmd, env=renv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
                )
            if i % 10 == 9:  # a start is mostly imports: let the cores keep up
                time.sleep(1.0)

        def all_stats() -> dict[int, dict]:
            return {i: s for i in procs if (s := _stats(stats_dir / f"{i}.json"))}

        def alive() -> list[int]:
            for i, p in procs.items():
                if p.poll() is not None and p.returncode not in (0, -9):
                    tail = (stats_dir / f"{i}.log").read_text(errors="replace")[-1500:]
                    raise Mp2aError(f"replica {i} exited {p.returncode}: {tail}")
            return [i for i, p in procs.items() if p.poll() is None]

        _wait("all replicas ready", lambda: len(alive()) and len(all_stats()) == replicas, 600)
        start_s = time.monotonic() - t_start
        leaders = {_wait("a leader", lambda: _leader_pid(direct), 60)}
        urls = []
        for k in range(servers if image is not None else 0):
            same = ("MP2A_STATE_DIRECT", "MP2A_STATE_LISTEN", "MP2A_SAMPLE_RATE",
                    "MP2A_STORE_MAX_ROWS")  # fmt: skip
            senv = server_env(
                stats_dir, k, env["MP2A_STATE"], MP2A_ONLINE="0",
                **{key: env[key] for key in same if key in env},
            )  # fmt: skip
            if not (run / "export" / "image_encoder.onnx").is_file():
                senv["MP2A_BACKEND"] = "torch"
            urls.append(full.enter_context(online_server(run, senv, stats_dir / f"server-{k}.log")))
        load_out, load_stop = stats_dir / "servers-load.json", stats_dir / "servers-load.stop"
        if urls:
            assert image is not None
            load_proc = _start_load(urls, image, 900, load_out, concurrency=4, stop=load_stop)
        time.sleep(2 if quick else 5)
        peak_start = monitor.reset()  # from here on: the fleet up and under load

        # ingest: committed rows per second with every replica offering
        window = 3 if quick else 10
        s0, r0, t0 = all_stats(), _count(direct), time.monotonic()
        time.sleep(window)
        s1, r1, dt = all_stats(), _count(direct), time.monotonic() - t0
        ingest = (r1 - r0) / dt
        offered_rate = sum(s1[i]["offered"] - s0[i]["offered"] for i in s1 if i in s0) / dt
        sampled_rate = sum(s1[i]["queued"] - s0[i]["queued"] for i in s1 if i in s0) / dt

        # publishes: commit → every replica's watcher swapped to it
        gap = 2.0 if quick else 3.0
        served, commits = 1, []
        for n in range(2 if quick else 6):
            head = Head(np.roll(base.head.weight, n + 1, axis=1), base.head.logit_scale)
            served = state.publish(
                head, {"bench": n}, parent=served, prompts=None, decision=None,
                method="bench", prompt_config=None, rows=None,
            )  # fmt: skip
            commits.append((str(served), time.time()))
            time.sleep(gap)
        time.sleep(2.0)
        # each replica's record of when it swapped, written after the last publish: on a
        # loaded machine a replica's figures can lag its watcher by seconds (a file written
        # every half second by its main loop), and an old record is not a missed swap
        last = commits[-1][1]
        with contextlib.suppress(Mp2aError):
            _wait(
                "every replica's figures after the last publish",
                lambda: all(st["t"] > last + 2.0 for st in all_stats().values()),
                60,
                0.25,
            )
        snap = all_stats()
        per_publish, per_replica = [], []
        missed = 0
        for v, t in commits:
            lags = []
            for s in snap.values():
                # serving v or a newer version (a watcher may skip one published meanwhile)
                times = [a for k, a in s["arrived"].items() if int(k) >= int(v)]
                got = min(times) if times else None
                if got is None:
                    missed += 1
                else:
                    lags.append(max(0.0, got - t) * 1000)
            per_replica += lags
            if lags:
                per_publish.append(max(lags))

        # kill -9 of the leading replica
        old = _leader_pid(direct)
        victim = next(i for i, p in procs.items() if p.pid == old)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        killed = time.monotonic()
        new = _wait("a new leader", lambda: (p := _leader_pid(direct)) and p != old and p, 60, 0.05)
        takeover_s = time.monotonic() - killed
        leaders |= {old, new}
        killed_committed = (snap.get(victim) or {}).get("committed", 0)

        # PostgreSQL restart under load
        survivors = [i for i in alive() if i != victim]
        before = all_stats()
        rows_before = _count(direct)
        restart_at = time.time()
        pg.restart(down_seconds=3.0)
        back = time.time()
        rows_after_restart = _count(direct)

        def reconnected() -> bool:
            now = all_stats()
            return all(
                now[i]["t"] > back + 0.5
                and now[i]["healthy"]
                and now[i]["committed"] > before[i]["committed"]
                for i in survivors
                if i in now and i in before
            )

        _wait("every replica reconnected", reconnected, 120, 0.25)
        reconnect_s = time.time() - back
        time.sleep(1.0)
        leader_after_restart = _wait("a leader after the restart", lambda: _leader_pid(direct), 60)
        leaders.add(leader_after_restart)
        served_load = None
        if load_proc is not None:
            time.sleep(2.0)  # the servers' writers commit again (their queues keep the rest)
            load_stop.touch()
            load_proc.wait(120)
            lrows = [tuple(r) for r in json.loads(load_out.read_text())]
            during = [r for r in lrows if restart_at <= r[1] <= back + reconnect_s]
            served_load = {
                "servers": len(urls),
                **_latency(lrows),
                "requests_while_restarting": len(during),
                "failed_while_restarting": sum(1 for r in during if r[3] != 200),
                "publish_all_swapped_ms": _server_swaps(lrows, commits, len(urls)),
            }
        full.close()  # SIGTERM: the servers' stores write what they queued

        # stop: each replica flushes its queue and reports what it committed
        for i in survivors:
            procs[i].send_signal(signal.SIGTERM)
        for i in survivors:
            procs[i].wait(120)
        final = all_stats()
        committed = sum(final[i]["committed"] for i in survivors) + killed_committed
        offered = sum(s["offered"] for s in final.values())
        dropped = sum(final[i]["dropped"] for i in survivors)
        rows_end = _count(direct)
        server_rows = _count_servers(direct) if urls else 0
        monitor.stop()
        state.close()
        per_pid = list(monitor.peak_per_pid.values())
        # held: what a replica keeps open (sessions over 2 s old, in 95% of its samples); the
        # peak adds the short-lived sessions of start-up and of waiting workers' tries
        held = [int(np.percentile(v, 95)) for v in monitor.per_pid.values() if len(v) >= 10]
        held_others = [
            int(np.percentile(v, 95))
            for pid, v in monitor.per_pid.items()
            if len(v) >= 10 and pid not in leaders
        ]
        return {
            "mode": mode,
            "replicas": replicas,
            "max_connections": max_conn,
            "pooler_niceness": None if bouncer is None else bouncer.niceness,
            "start_seconds": round(start_s, 1),
            "connections": {
                "peak_during_start": peak_start,
                "peak_total": monitor.peak_total,
                "held_total_p95": _pct(monitor.totals, 95),
                "peak_mp2a_sessions": monitor.peak_mp2a,
                "peak_per_replica_max": max(per_pid) if per_pid else None,
                "held_per_replica_max": max(held) if held else None,
                "held_per_non_leader_max": max(held_others) if held_others else None,
                "non_leaders_holding_over_2": sum(1 for n in held_others if n > 2),
                "per_replica": round(monitor.peak_total / replicas, 2),
                "room_left": max_conn - monitor.peak_total,
                "samples": monitor.samples,
            },
            "ingest_rows_per_s": round(ingest, 1),
            "offered_per_s": round(offered_rate, 1),
            "sampled_per_s": round(sampled_rate, 1),
            "offered_per_s_asked": round(replicas * rate, 1),
            "publish_all_swapped_ms": {
                "per_publish": [round(x, 1) for x in per_publish],
                "p99": _pct(per_publish, 99),
                "replica_p50": _pct(per_replica, 50),
                "replica_p99": _pct(per_replica, 99),
                "missed": missed,
            },
            "takeover_seconds": round(takeover_s, 2),
            "restart": {
                "reconnect_seconds": round(reconnect_s, 1),
                "rows_before": rows_before,
                "rows_after_restart": rows_after_restart,
                "committed_rows_lost_in_restart": max(0, rows_before - rows_after_restart),
                "leader_after_restart": leader_after_restart is not None,
            },
            "rows": {
                "offered": offered,
                "committed_by_replicas": committed,
                "in_database": rows_end,
                "from_full_servers": server_rows,
                "committed_rows_lost": max(0, committed - (rows_end - server_rows)),
                "dropped_by_writers": dropped,
            },
            "full_servers": served_load,
        }
    finally:
        if load_proc is not None and load_proc.poll() is None:
            load_proc.kill()
            load_proc.wait()
        full.close()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        if bouncer is not None:
            bouncer.destroy()
        pg.destroy()


def run(
    replicas: int,
    quick: bool = False,
    work: Path | None = None,
    rate: float = 20.0,
    base: Path | None = None,
    servers: int = 2,
    modes: tuple[str, ...] = MODES,
) -> dict:
    """The table; `base`: an artifact to use instead of a zero-shot one made here; `servers`
    full servers beside the light replicas (0: none; with `quick` in the first mode only);
    `modes` a subset of MODES."""
    t_all = time.time()
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mp2a-scale-")))
        work.mkdir(parents=True, exist_ok=True)
        run_dir = base if base is not None else _prepare(work)
        image = work / "three.jpg"
        image.write_bytes(bench_image(64))
        measured = {}
        for m in modes:
            # --quick: one full server, in the first way only (each start costs ~15 s here)
            n = servers if not quick else min(servers, 1) if m == modes[0] else 0
            measured[m] = run_mode(m, work, run_dir, replicas, quick, rate, n, image)
            (work / f"{m}.json").write_text(json.dumps(measured[m], indent=1))
    return {
        "bench": "fleet",
        "replicas": replicas,
        "full_servers": servers,
        "quick": quick,
        "rate_per_replica": rate,
        "modes": measured,
        "targets": targets_of(measured, replicas, servers),
        "seconds": round(time.time() - t_all, 1),
        "cpu_count": os.cpu_count(),
    }


def targets_of(measured: dict, replicas: int, servers: int) -> dict:
    """The issue's targets per mode. Per replica: directly, the sessions each replica that
    does not lead holds itself (by the pid in application_name; the total adds the leader's
    lock, the bench's publisher and waiting workers' short tries for the lead); through
    PgBouncer a pooled server session carries the name of whichever client used it last, so
    there the total counts."""
    targets = {}
    fleet = replicas + servers
    for m, r in measured.items():
        c = r["connections"]
        if m == "direct":
            per_replica = (c["held_per_non_leader_max"] or 0) <= 2
        else:
            per_replica = c["peak_total"] <= 2 * fleet + 4
        targets[m] = {
            "le_2_connections_per_replica": per_replica,
            "fits_max_connections_100_with_room": c["peak_total"] <= 90,
            "publish_all_le_2_s_p99": (r["publish_all_swapped_ms"]["p99"] or 1e9) <= 2000
            and r["publish_all_swapped_ms"]["missed"] == 0,
            "takeover_le_10_s": r["takeover_seconds"] <= 10,
            "zero_committed_rows_lost": r["rows"]["committed_rows_lost"] == 0
            and r["restart"]["committed_rows_lost_in_restart"] == 0,
        }
        if r["full_servers"] is not None:
            targets[m]["zero_failed_predictions_on_full_servers"] = r["full_servers"]["failed"] == 0
    return targets
