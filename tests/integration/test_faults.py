"""The fault matrix against a real `MP2A_ONLINE=1 mp2a serve` (BentoML server + adaptation
worker): random bytes over the traffic store under traffic, then a full disk during traffic
writes (RLIMIT_FSIZE set on the running processes with prlimit, then lifted), a damaged
versions/CURRENT and a damaged head of the served version. Each time every
prediction answers 200, the fault shows in /metrics and in one log line, and the loop
recovers by itself: new traffic is stored and the next adaptation run ends accepted or
rejected, not failed. (serving/README.md lists the whole matrix and the tests of each case.)"""

from __future__ import annotations

import os
import resource
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from test_online_server import AUTH, TOKEN, wait_status  # same folder (pytest's path)
from test_serving_server import fresh_run, predict_ok, process, server_env

from benchmarks.procs import descendants, free_port
from mp2a import versions
from mp2a.artifact import HEAD_FILE
from mp2a.head import Head
from online.store import peek_int


def metric(c: httpx.Client, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def stored(run: Path) -> int:
    return peek_int(run / "traffic.sqlite", "SELECT COUNT(*) FROM samples")


def wait_for(what: str, ok, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while not ok():
        assert time.time() < deadline, f"never: {what}"
        time.sleep(0.1)


def test_a_damaged_store_and_a_full_disk_under_a_running_online_server(
    street_run, digits_small, tmp_path
):
    run = fresh_run(street_run, tmp_path / "run")
    env = server_env(
        tmp_path,
        MP2A_ONLINE="1",
        MP2A_ADMIN_TOKEN=TOKEN,
        MP2A_ADAPT_MIN_SAMPLES="20",
        MP2A_ADAPT_STAGES="1",
        MP2A_ADAPT_STEPS="5",
        MP2A_STORE_CHECK_S="1",
    )
    files = sorted(digits_small.glob("street/*/*.png"))
    log = tmp_path / "serve.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mp2a", "serve", str(run), "--host", "127.0.0.1"]
    with (
        process([*cmd, "--port", str(port)], env, log, url + "/readyz") as proc,
        httpx.Client(base_url=url, timeout=60) as c,
    ):
        for f in files * 3:
            predict_ok(c, f)
        wait_for("traffic stored", lambda: stored(run) == 3 * len(files))

        # 1. random bytes over the store's file (its WAL checkpointed into it first)
        path = run / "traffic.sqlite"
        con = sqlite3.connect(path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(size // 4)
            f.write(os.urandom(size // 2))
        for f in files:
            predict_ok(c, f)  # every prediction answers while the store is damaged
        wait_for(
            "the damaged store healed",
            lambda: metric(c, "mp2a_state_healed_total", what="traffic_store") == 1.0,
        )
        aside = [p.name for p in run.glob("traffic.sqlite.damaged-*") if p.name.endswith("Z")]
        assert len(aside) == 1, aside
        assert log.read_text().count("is damaged (") == 1  # one line, across processes
        base = stored(run)
        for f in files:
            predict_ok(c, f)
        wait_for("new traffic in the fresh store", lambda: stored(run) >= base + len(files))
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        # 2. a full disk under traffic: the files of every server process may not grow
        pids = descendants(proc.pid)
        limit = 1 << 20
        for p in pids:
            resource.prlimit(p, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        con = sqlite3.connect(path)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL must grow again
        con.close()
        dropped = metric(c, "mp2a_traffic_dropped_total")
        k = 0
        while metric(c, "mp2a_traffic_dropped_total") == dropped:
            predict_ok(c, files[k % len(files)])
            k += 1
            assert k < 5000, "writes never failed under RLIMIT_FSIZE"
        for f in files:
            predict_ok(c, f)
        before = stored(run)
        for p in pids:  # space again
            resource.prlimit(p, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        for f in files:
            predict_ok(c, f)
        wait_for("storing resumed", lambda: stored(run) >= before + len(files))
        text = log.read_text()
        assert text.count("writes fail (") == 1 and text.count("writes succeed again;") == 1
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        # 3. the loop recovers: an adaptation run on the fresh store ends, not failed
        r = c.post("/adapt", headers=AUTH)
        assert r.status_code == 202, r.text
        status = wait_status(c, r.json()["id"], {"accepted", "rejected", "failed"})
        assert status["state"] in ("accepted", "rejected"), status
        assert status["n_traffic"] >= len(files)
        assert predict_ok(c, files[0])["model_version"]

        # 4. a damaged CURRENT, then a damaged head of the served version: the watcher reads
        # the change, the newest verified version is served, CURRENT repaired, each counted
        served = versions.load_current(run)
        new = Head(np.roll(served.head.weight, 1, axis=1), served.head.logit_scale)
        v = versions.publish(run, new, {"by": "test"})

        def serves(version: int) -> bool:
            return predict_ok(c, files[0])["model_version"] == str(version)

        wait_for("the publish served", lambda: serves(v))
        cur = versions.current_file(run)
        cur.write_bytes(b"\x00garbage")
        wait_for("CURRENT repaired", lambda: versions._read_pointer(run) == v)
        assert serves(v)
        wait_for("counted", lambda: metric(c, "mp2a_state_healed_total", what="versions") == 1)
        head = versions.version_path(run, v) / HEAD_FILE
        head.write_bytes(head.read_bytes()[:-8] + b"damaged!")
        cur.write_text(cur.read_text())  # a new mtime: the watcher looks again
        wait_for("the newest verified version served", lambda: serves(v - 1))
        assert versions._read_pointer(run) == v - 1
        wait_for("counted", lambda: metric(c, "mp2a_state_healed_total", what="versions") == 2)
        text = log.read_text()
        assert text.count("CURRENT is damaged") == 1 and text.count("which fails to load") == 1
    print(f"\n{k} predictions until a write failed under RLIMIT_FSIZE; all answered 200")
