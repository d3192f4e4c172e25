"""The edge side of hub adaptation: `mp2a serve RUN --hub URL --site NAME` (no torch needed).

The edge serves locally exactly as any server does, from its own copy of the artifact. Beside
it, one process (`python -m online.edge RUN`, started and restarted by `mp2a serve`) keeps the
edge and its hub in step, and never touches a prediction:

- uploads: the server's traffic store (RUN/traffic.sqlite, a bounded buffer on disk that
  survives restarts; MP2A_STORE_MAX_ROWS caps it, the oldest samples give way and are counted
  as dropped) is read in id order and POSTed to the hub's /traffic in batches of embeddings,
  predicted labels and confidences (no image ever leaves the edge). A batch id names the rows
  it holds, so a retry after a lost answer is recognised by the hub (409) and never stored
  twice; rows leave the buffer only once the hub has them. Failures back off exponentially
  (1 s doubling to 60 s) with jitter, so a fleet of edges does not hammer a hub coming back.
- heads: GET /sites/SITE/model every MP2A_EDGE_POLL_S (2 s) with If-None-Match (a 304 costs a
  few bytes). A new head is checked against its sha256, installed as that version in
  RUN/versions (mp2a/versions.py `mirror`) and hot-swapped by the server's watcher. A head that
  fails its checksum is refused and counted; whatever happens to the hub, the edge keeps
  serving the last head it verified, across restarts too.

Metrics (in the server's Prometheus directory, so its /metrics shows them):
mp2a_edge_upload_lag_seconds (age of the oldest sample not yet delivered),
mp2a_edge_buffer_samples, mp2a_edge_uploaded_total, mp2a_edge_upload_errors_total,
mp2a_edge_head_age_seconds (since the hub last confirmed the served head),
mp2a_edge_head_rejected_total; dropped samples are mp2a_traffic_dropped_total.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import random
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors_bytes

from mp2a import versions
from mp2a.artifact import load_artifact
from mp2a.errors import ArtifactError
from mp2a.head import Head
from mp2a.heal import inode, is_damage, quarantine_sqlite
from online.hub import check_site, encode_samples
from online.store import connect

log = logging.getLogger(__name__)

MIN_BACKOFF_S, MAX_BACKOFF_S = 1.0, 60.0


@dataclass(frozen=True)
class EdgeConfig:
    hub: str  # the hub's base URL
    site: str
    token: str
    poll_s: float = 2.0
    batch: int = 500
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EdgeConfig:
        """From MP2A_HUB, MP2A_SITE, MP2A_EDGE_TOKEN, MP2A_EDGE_POLL_S, MP2A_EDGE_BATCH;
        ValueError says what is missing or wrong."""
        hub = env.get("MP2A_HUB", "").strip().rstrip("/")
        if not hub.startswith(("http://", "https://")):
            raise ValueError(f"MP2A_HUB={hub!r}: give the hub's URL, e.g. http://hub:3000")
        site = check_site(env.get("MP2A_SITE", "").strip())
        token = env.get("MP2A_EDGE_TOKEN", "").strip()
        if not token:
            raise ValueError(
                "MP2A_EDGE_TOKEN is not set: the hub's MP2A_EDGE_TOKENS gives each site a token"
            )
        try:
            poll = float(env.get("MP2A_EDGE_POLL_S", "") or 2.0)
            batch = int(env.get("MP2A_EDGE_BATCH", "") or 500)
        except ValueError:
            raise ValueError(
                "MP2A_EDGE_POLL_S must be a number, MP2A_EDGE_BATCH an integer"
            ) from None
        if not 0.05 <= poll <= 3600 or not 1 <= batch <= 5000:
            raise ValueError("MP2A_EDGE_POLL_S must be in 0.05..3600, MP2A_EDGE_BATCH in 1..5000")
        return cls(hub, site, token, poll, batch)


class Backoff:
    """Exponential back-off with jitter: 1, 2, 4 … 60 s, each drawn in [half, full]."""

    def __init__(self) -> None:
        self.failures = 0

    def ok(self) -> None:
        self.failures = 0

    def next_wait(self) -> float:
        self.failures += 1
        full = min(MAX_BACKOFF_S, MIN_BACKOFF_S * 2 ** (self.failures - 1))
        return random.uniform(full / 2, full)


def _metrics() -> Any:
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return None
    from mp2a.metrics import get_edge_metrics

    return get_edge_metrics()


class EdgeSync:
    """The uploader and the head poller of one edge (two threads)."""

    def __init__(self, run: Path, cfg: EdgeConfig, store_path: Path | None = None) -> None:
        self.run, self.cfg = Path(run), cfg
        self.store_path = store_path or self.run / "traffic.sqlite"
        base = load_artifact(self.run)
        self.dim = base.backbone.embed_dim
        self.etag: str | None = None
        self.confirmed_at = time.time()  # the served head was last confirmed by the hub
        self.uploaded = 0
        self.rejected_heads = 0
        self.metrics = _metrics()
        self._stop = threading.Event()
        self._uid = self._buffer_uid()

    # -- HTTP --------------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            self.cfg.hub + path,
            data=body,
            method=method,
            headers={"Authorization": f"Bearer {self.cfg.token}", **(headers or {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers or {}), e.read() if e.fp else b""

    # -- uploads -----------------------------------------------------------------------------
    def _buffer_uid(self) -> str:
        """A random id of this buffer file: batch ids stay unique if the file is recreated."""
        if not self.store_path.is_file():
            return "new"
        try:
            con = connect(self.store_path)
        except sqlite3.Error:  # damaged: upload_once moves it aside
            return "new"
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'edge_uid'").fetchone()
            if row is None:
                uid = os.urandom(6).hex()
                con.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('edge_uid', ?)", (uid,)
                )
                row = con.execute("SELECT value FROM meta WHERE key = 'edge_uid'").fetchone()
            return str(row[0])
        except sqlite3.Error:
            return "new"
        finally:
            con.close()

    def _oldest(self) -> tuple[list[tuple], int]:
        """The oldest batch of the buffer and its depth."""
        con = connect(self.store_path)
        try:
            rows = con.execute(
                "SELECT id, t, version, label, confidence, embedding FROM samples "
                "ORDER BY id LIMIT ?",
                (self.cfg.batch,),
            ).fetchall()
            return rows, int(con.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
        finally:
            con.close()

    def upload_once(self) -> int:
        """Send the oldest batch; the number of rows the hub now has (0: nothing to send).
        Raises OSError (network) or RuntimeError (the hub refused) to back off."""
        if not self.store_path.is_file():
            return 0
        if self._uid == "new":
            self._uid = self._buffer_uid()
        seen = inode(self.store_path)
        try:
            rows, depth = self._oldest()
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            # a damaged buffer: moved aside (mp2a/heal.py); the server's store writer makes
            # a fresh one, with a new uid so batch ids stay unique
            quarantine_sqlite(self.store_path, "edge_buffer", str(e), seen)
            self._uid = "new"
            return 0
        self._gauges(depth, rows[0][1] if rows else None)
        if not rows:
            return 0
        emb = np.frombuffer(b"".join(r[5] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
        labels, conf = [r[3] for r in rows], [r[4] for r in rows]
        samples = encode_samples(emb, labels, conf, [r[2] for r in rows], [r[1] for r in rows])
        batch_id = f"{self.cfg.site}:{self._uid}:{rows[0][0]}-{rows[-1][0]}"
        body = json.dumps({"batch_id": batch_id, "samples": samples}).encode()
        status, _, text = self._request(
            "POST", "/traffic", body, {"Content-Type": "application/json"}
        )
        if status not in (200, 409):  # 409: the hub has this batch already (a retry)
            raise RuntimeError(f"hub answered {status} to an upload: {text[:300]!r}")
        con = connect(self.store_path)
        try:
            con.execute("DELETE FROM samples WHERE id <= ?", (rows[-1][0],))
        finally:
            con.close()
        self.uploaded += len(rows)
        if self.metrics is not None:
            self.metrics.uploaded.inc(len(rows))
        return len(rows)

    def _gauges(self, depth: int, oldest_t: float | None) -> None:
        if self.metrics is not None:
            self.metrics.buffer_samples.set(depth)
            lag = 0.0 if oldest_t is None else max(0.0, time.time() - oldest_t)
            self.metrics.upload_lag.set(lag)

    def _upload_loop(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                sent = self.upload_once()
                backoff.ok()
                if sent < self.cfg.batch:  # the buffer is drained: wait for more
                    self._stop.wait(self.cfg.poll_s)
            except Exception as e:  # the hub is down or refused: keep the rows, back off
                wait = backoff.next_wait()
                log.warning("upload to %s failed (%s); retrying in %.1f s", self.cfg.hub, e, wait)
                if self.metrics is not None:
                    self.metrics.upload_errors.inc()
                self._stop.wait(wait)

    # -- heads -------------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """Ask the hub for this site's head; True if a new one was installed. Raises on a
        network failure or a refused answer; a head failing its checksum is refused."""
        headers = {"If-None-Match": self.etag} if self.etag else {}
        status, hdrs, text = self._request("GET", f"/sites/{self.cfg.site}/model", None, headers)
        if status == 304:
            self.confirmed_at = time.time()
            return False
        if status != 200:
            raise RuntimeError(f"hub answered {status} for the site's head: {text[:300]!r}")
        body = json.loads(text)
        data = base64.b64decode(body["head"])
        if hashlib.sha256(data).hexdigest() != body.get("sha256"):
            self.rejected_heads += 1
            if self.metrics is not None:
                self.metrics.head_rejected.inc()
            raise ArtifactError(
                f"the hub's head for site {self.cfg.site!r} (version {body.get('version')}) fails "
                "its sha256: refused, still serving the last verified head"
            )
        head = Head.from_tensors(load_tensors_bytes(data))
        changed = versions.mirror(
            self.run,
            int(body["version"]),
            head,
            parent=body.get("parent_version"),
            metrics={"hub": self.cfg.hub, "site": self.cfg.site, "hub_version": body["version"]},
            rows=body.get("head_rows"),
            method=f"hub:{body.get('method')}",
        )
        self.etag = hdrs.get("ETag") or hdrs.get("etag")
        self.confirmed_at = time.time()
        if changed:
            log.info("installed version %s of site %s from the hub", body["version"], self.cfg.site)
        return changed

    def _poll_loop(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self.poll_once()
                backoff.ok()
                wait = self.cfg.poll_s * random.uniform(0.9, 1.1)
            except Exception as e:  # keep serving what was verified last
                wait = min(backoff.next_wait(), max(self.cfg.poll_s, MIN_BACKOFF_S) * 8)
                log.warning("head poll of %s failed (%s); retry in %.1f s", self.cfg.hub, e, wait)
            if self.metrics is not None:
                self.metrics.head_age.set(time.time() - self.confirmed_at)
            self._stop.wait(wait)

    def start(self) -> EdgeSync:
        for target, name in ((self._upload_loop, "upload"), (self._poll_loop, "poll")):
            threading.Thread(target=target, name=f"mp2a-edge-{name}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m online.edge", description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the served artifact folder")
    p.add_argument("--store", type=Path, help="the traffic buffer (default RUN/traffic.sqlite)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = EdgeConfig.from_env(os.environ)
    except ValueError as e:
        print(f"mp2a edge: {e}", file=sys.stderr)
        return 2
    sync = EdgeSync(a.run, cfg, a.store).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sync.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
