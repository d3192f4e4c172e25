"""`mp2a bench fleet --json`: three replicas and one PostgreSQL, measured.

Setup: a throwaway PostgreSQL 15 (benchmarks/pgserver.py), a zero-shot tiny-CLIP artifact on
DigitsDA (street) exported to ONNX, three `mp2a serve` replicas on loopback with
MP2A_STATE=postgresql://… .

1. Swaps under load: a separate load-generating process keeps 16 requests in flight against
   the three replicas (closed loop, round robin, one keep-alive connection per client) while
   this process publishes 10 versions and makes 2 rollbacks through the state, 1.5 s apart.
   For each, the time from the commit until every replica has answered a request with the new
   version (read off the load's own answers: version, replica, completion time), and every
   request's status.
2. Ingest: samples offered to a PostgreSQL traffic store (the replicas' store: a queue and a
   writer thread that COPYs batches) as fast as one process can, committed rows per second;
   the SQLite default the same way.
3. Prediction latency with traffic kept in PostgreSQL vs the SQLite default: one replica of
   each, side by side, the same closed-loop load (c=16), p50/p99.
4. Takeover: the replicas restarted with MP2A_ONLINE=1 (three workers, one leads); a long
   run is requested, its worker killed with SIGKILL mid-run; seconds until another worker
   holds the lead, and the decision log checked for each request exactly once.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.online import online_server
from benchmarks.pgserver import PgServer
from benchmarks.serving import BOUNDARY, multipart
from mp2a.errors import Mp2aError
from online.supervisor import REPO_ROOT

REPLICAS = 3
CONCURRENCY = 16
PUBLISHES = 10
ROLLBACKS = 2
GAP_S = 1.5


def _mp2a(*args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "mp2a", *args], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise Mp2aError(f"mp2a {' '.join(args)} failed: {r.stderr[-1500:]}")


def _prepare(work: Path, per_class: int) -> tuple[Path, Path]:
    data, run = work / "digits", work / "run"
    _mp2a("data", "digits", "--out", str(data), "--per-class", str(per_class), "--quiet")
    _mp2a(
        "adapt", "--data", str(data), "--target", "street", "--method", "zeroshot",
        "--out", str(run), "--no-cache", "--quiet",
    )  # fmt: skip
    _mp2a("export", str(run), "--format", "onnx")
    image = sorted((data / "street" / "three").glob("*.png"))[0]
    return run, image


# ------------------------------------------------------------------ load generator


def load(
    urls: list[str], body: bytes, concurrency: int, seconds: float, stop: Path | None = None
) -> list[tuple]:
    """Closed loop over `urls` (round robin per client) for `seconds` or until the file `stop`
    exists: (replica, end time, latency, status, model_version) per request."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    out: list[tuple] = []
    lock = threading.Lock()
    deadline = time.time() + seconds

    def going() -> bool:
        return time.time() < deadline and (stop is None or not stop.exists())

    def client(k: int) -> None:
        i = k
        conns: dict[int, http.client.HTTPConnection] = {}
        while going():
            r = i % len(urls)
            i += 1
            host, port = urls[r].removeprefix("http://").split(":")
            conn = conns.get(r) or http.client.HTTPConnection(host, int(port), timeout=60)
            conns[r] = conn
            t0 = time.time()
            try:
                conn.request("POST", "/predict", body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
                version = json.loads(data).get("model_version") if status == 200 else None
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conns.pop(r, None)
                status, version = 0, None
            t1 = time.time()
            with lock:
                out.append((r, t1, t1 - t0, status, version))
        for c in conns.values():
            c.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _load_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet load")
    p.add_argument("--urls", required=True)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--concurrency", type=int, default=CONCURRENCY)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stop", type=Path, help="end early once this file exists")
    a = p.parse_args(argv)
    body = multipart(a.image.read_bytes(), "image")
    rows = load(a.urls.split(","), body, a.concurrency, a.seconds, a.stop)
    a.out.write_text(json.dumps(rows))
    return 0


def _start_load(
    urls: list[str],
    image: Path,
    seconds: float,
    out: Path,
    concurrency: int = CONCURRENCY,
    stop: Path | None = None,
) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "benchmarks.fleet", "load", "--urls", ",".join(urls),
        "--image", str(image), "--seconds", str(seconds), "--out", str(out),
        "--concurrency", str(concurrency), *(["--stop", str(stop)] if stop else []),
    ]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO_ROOT)


def _latency(rows: list[tuple]) -> dict:
    ok = [r for r in rows if r[3] == 200]
    lat = np.asarray([r[2] for r in ok]) * 1000
    return {
        "requests": len(rows),
        "failed": len(rows) - len(ok),
        "requests_per_s": round(len(ok) / (max(r[1] for r in rows) - min(r[1] for r in rows)), 1)
        if rows
        else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
    }


# ------------------------------------------------------------------ phases


def _env(work: Path, i: int, dsn: str | None, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "BENTOML_DO_NOT_TRACK": "True",
        "BENTOML_HOME": str(work / f"bentoml-{i}"),
        "MP2A_STATE_CACHE": str(work / f"cache-{i}"),
        **extra,
    }
    if dsn is not None:
        env["MP2A_STATE"] = dsn
    else:
        env.pop("MP2A_STATE", None)
    return env


def swaps_under_load(work: Path, run: Path, image: Path, dsn: str) -> dict:
    from mp2a.head import Head
    from online.state import open_state

    state = open_state(run, {"MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(work / "cache-pub")})
    base = state.load_current()
    events: list[tuple[float, int, str]] = []  # (commit time, version now served, action)
    with contextlib.ExitStack() as stack:
        urls = [
            stack.enter_context(online_server(run, _env(work, i, dsn), work / f"swap-{i}.log"))
            for i in range(REPLICAS)
        ]
        seconds = GAP_S * (PUBLISHES + ROLLBACKS + 3)
        out = work / "swap-load.json"
        proc = _start_load(urls, image, seconds, out)
        time.sleep(GAP_S * 1.5)  # the load is on before the first publish
        served = 1
        plan = ["publish"] * PUBLISHES
        for k in (4, 9):  # two rollbacks among the publishes
            plan.insert(k, "rollback")
        for n, action in enumerate(plan):
            if action == "publish":
                head = Head(np.roll(base.head.weight, n + 1, axis=1), base.head.logit_scale)
                served = state.publish(
                    head, {"bench": n}, parent=served, prompts=None, decision=None,
                    method="bench", prompt_config=None, rows=None,
                )  # fmt: skip
            else:
                served = state.rollback()
            events.append((time.time(), served, action))
            time.sleep(GAP_S)
        proc.wait()
        rows = [tuple(r) for r in json.loads(out.read_text())]
    state.close()
    swap_ms = []
    for i, (t, version, _action) in enumerate(events):
        until = events[i + 1][0] if i + 1 < len(events) else float("inf")
        firsts = []
        for r in range(REPLICAS):
            seen = [
                row[1]
                for row in rows
                if row[0] == r and row[4] == str(version) and t <= row[1] < until
            ]
            firsts.append(min(seen) - t if seen else None)
        swap_ms.append(None if None in firsts else round(1000 * max(firsts), 1))
    measured = [s for s in swap_ms if s is not None]
    return {
        "replicas": REPLICAS,
        "concurrency": CONCURRENCY,
        "publishes": PUBLISHES,
        "rollbacks": ROLLBACKS,
        "load": _latency(rows),
        "all_replicas_swapped_ms": swap_ms,
        "swap_p99_ms": round(float(np.percentile(measured, 99)), 1) if measured else None,
        "swap_max_ms": max(measured) if measured else None,
    }


def ingest(run: Path, dsn: str, n: int) -> dict:
    """Samples offered as fast as possible to a PostgreSQL store and to the SQLite default."""
    from online.state import open_state
    from online.store import StoreConfig, TrafficStore

    dim = 128
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    out = {}
    env = {"MP2A_STATE": dsn, "MP2A_STORE_MAX_ROWS": str(2 * n)}
    for name in ("postgresql", "sqlite"):
        # the queue holds every sample: this measures the writer, not the drop policy
        path = Path(tempfile.mkdtemp(prefix="mp2a-ingest-")) / "traffic.sqlite"
        config = StoreConfig(path=path, dim=dim, max_rows=2 * n, queue_size=n)
        if name == "postgresql":
            from online.pg import PgTrafficStore

            state = open_state(run, env)
            store = PgTrafficStore(state, config)
            count = state.traffic_count
        else:
            store = TrafficStore(config)
            count = store.count
        t0 = time.perf_counter()
        offered = 0
        for i, e in enumerate(x):
            offered += store.offer(e, i % 10, 0.9, "1")
        store.flush(300)
        seconds = time.perf_counter() - t0
        store.close()
        rows = count()
        out[name] = {
            "samples": offered,
            "rows": rows,
            "dropped": store.dropped,
            "seconds": round(seconds, 2),
            "samples_per_s": round(rows / seconds, 1),
        }
        if name == "postgresql":
            state.close()
    return out


def p99_side_by_side(
    work: Path, run: Path, image: Path, dsn: str, seconds: float, reps: int = 2
) -> dict:
    """One replica keeping traffic in PostgreSQL, one in SQLite: the same closed-loop load,
    `reps` times each, interleaved."""
    out: dict[str, list] = {"postgresql": [], "sqlite": []}
    for rep in range(reps):
        for name in ("postgresql", "sqlite"):
            copy = work / f"p99-{name}"
            if not copy.exists():
                import shutil

                shutil.copytree(run, copy, ignore=shutil.ignore_patterns("traffic.sqlite*"))
            env = _env(work, 10 + rep, dsn if name == "postgresql" else None)
            with online_server(copy, env, work / f"p99-{name}.log") as url:
                warm = work / "warm.json"
                _start_load([url], image, 3, warm).wait()
                res = work / f"p99-{name}-{rep}.json"
                _start_load([url], image, seconds, res).wait()
                out[name].append(_latency([tuple(r) for r in json.loads(res.read_text())]))
    p99 = {k: float(np.median([r["p99_ms"] for r in v])) for k, v in out.items()}
    return {
        "runs": out,
        "p99_ms_median": p99,
        "p99_ratio_postgresql_over_sqlite": round(p99["postgresql"] / p99["sqlite"], 3),
    }


def takeover(work: Path, run: Path, dsn: str, images: list[Path]) -> dict:
    import psycopg

    from online.pg import leader_sessions
    from online.state import open_state

    token = secrets.token_hex(8)
    auth = {"Authorization": f"Bearer {token}"}
    state = open_state(run, {"MP2A_STATE": dsn, "MP2A_STATE_CACHE": str(work / "cache-t")})
    extra = {
        "MP2A_ONLINE": "1",
        "MP2A_ADMIN_TOKEN": token,
        "MP2A_ADAPT_MIN_SAMPLES": "20",
        "MP2A_ADAPT_INTERVAL_S": "1e9",
        "MP2A_ADAPT_MIN_NEW": str(10**9),
    }

    def leaders() -> list[int]:  # the backend pids of the leader's lock connection
        with psycopg.connect(dsn) as conn:
            return [pid for pid, _ in leader_sessions(conn)]

    import urllib.request

    def post(url: str, body: dict) -> dict:
        req = urllib.request.Request(
            url + "/adapt", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", **auth},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    with contextlib.ExitStack() as stack:
        urls = [
            stack.enter_context(
                online_server(run, _env(work, 20 + i, dsn, **extra), work / f"t-{i}.log")
            )
            for i in range(REPLICAS)
        ]
        deadline = time.time() + 60
        while len(leaders()) != 1:
            if time.time() > deadline:
                raise Mp2aError("no worker took the lead")
            time.sleep(0.2)
        # varied traffic to adapt on (the load above sent one image again and again)
        ctype = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        for k in range(0, len(images), 32):
            chunk = [f.read_bytes() for f in images[k : k + 32]]
            body = multipart(chunk, "images", "image/png")
            req = urllib.request.Request(urls[k % len(urls)] + "/predict_batch", data=body)
            for h, v in ctype.items():
                req.add_header(h, v)
            urllib.request.urlopen(req, timeout=60).read()
        req = post(urls[0], {"steps_per_stage": 100_000})
        deadline = time.time() + 120
        while (st := state.read_status() or {}).get("state") != "running" or (
            st.get("request") or {}
        ).get("id") != req["id"]:
            if time.time() > deadline:
                raise Mp2aError(f"the run never started: {st}")
            time.sleep(0.1)
        time.sleep(1.0)
        (old,) = leaders()  # the backend of the leader's lock connection
        os.kill(st["pid"], signal.SIGKILL)
        killed = time.monotonic()
        while not [h for h in leaders() if h != old]:  # a new session holds the lead
            if time.monotonic() - killed > 60:
                raise Mp2aError("no worker took over within 60 s")
            time.sleep(0.05)
        took = time.monotonic() - killed
        after = post(urls[1], {"stages": 1, "steps_per_stage": 5})
        deadline = time.time() + 180
        while (st := state.read_status() or {}).get("state") not in (
            "accepted", "rejected", "failed",
        ) or (st.get("request") or {}).get("id") != after["id"]:  # fmt: skip
            if time.time() > deadline:
                raise Mp2aError(f"the run after the takeover never ended: {st}")
            time.sleep(0.2)
        ids = [(d.get("request") or {}).get("id") for d in state.decisions()]
    state.close()
    return {
        "takeover_seconds": round(took, 2),
        "killed_run_recorded": ids.count(req["id"]),
        "next_run_recorded": ids.count(after["id"]),
        "next_run_state": st["state"],
        "decisions_exactly_once": ids.count(req["id"]) == 1 and ids.count(after["id"]) == 1,
    }


def run(
    quick: bool = False, work: Path | None = None, base: tuple[Path, Path] | None = None
) -> dict:
    """The bench; `base`: (a zero-shot street artifact with its ONNX export, the DigitsDA
    folder it was made from) to use instead of making them here (a test's session ones)."""
    t_all = time.time()
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mp2a-fleet-")))
        work.mkdir(parents=True, exist_ok=True)
        pg = PgServer().start()
        stack.callback(pg.destroy)
        if base is None:
            run_dir, image = _prepare(work, 4 if quick else 20)
        else:
            from benchmarks.online import _fresh_copy

            run_dir = _fresh_copy(base[0], work / "run")
            shutil.copytree(base[1], work / "digits", dirs_exist_ok=True)
            image = sorted((work / "digits" / "street" / "three").glob("*.png"))[0]
        fleet_db = pg.create_db("fleet")
        swap = swaps_under_load(work, run_dir, image, fleet_db)
        ing = ingest(run_dir, pg.create_db("ingest"), 2_000 if quick else 50_000)
        # --quick: once each (CI checks the figures are there, not the ratio: ~30 s less)
        side = p99_side_by_side(
            work, run_dir, image, pg.create_db("p99"), 4 if quick else 20, 1 if quick else 2
        )
        street = sorted((work / "digits" / "street").glob("*/*.png"))
        take = takeover(work, run_dir, fleet_db, street)
    return {
        "bench": "fleet",
        "quick": quick,
        "swaps_under_load": swap,
        "ingest": ing,
        "prediction_p99": side,
        "takeover": take,
        "targets": {
            "zero_failed_requests_during_swaps": swap["load"]["failed"] == 0,
            "swap_p99_le_1_s": swap["swap_p99_ms"] is not None and swap["swap_p99_ms"] <= 1000,
            "ingest_ge_5000_per_s": ing["postgresql"]["samples_per_s"] >= 5000,
            "p99_le_1_2x_sqlite": side["p99_ratio_postgresql_over_sqlite"] <= 1.2,
            "takeover_le_10_s": take["takeover_seconds"] <= 10,
            "decisions_exactly_once": take["decisions_exactly_once"],
        },
        "seconds": round(time.time() - t_all, 1),
        "cpu_count": os.cpu_count(),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "load":
        sys.exit(_load_main(sys.argv[2:]))
    sys.exit("usage: python -m benchmarks.fleet load --urls … --image F --seconds S --out F")
