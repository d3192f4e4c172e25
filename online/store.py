"""The traffic store: embeddings of served images, kept for online re-adaptation (DESIGN.md §1).

One SQLite file in WAL mode. Per sample the sampling rate keeps: time, model version,
predicted label index, top-1 confidence and the embedding (float32, D from the artifact); raw
image bytes only when explicitly enabled, in their own table with their own cap.

Writes never slow or fail a prediction: `offer()` does a coin flip and a `put_nowait` on a
bounded queue, nothing else. One writer thread per process drains the queue and inserts what it
finds in one transaction; once a second (and at close) it enforces the retention caps (oldest
first) and publishes the row count. When the queue is full the sample is dropped and counted
(`mp2a_traffic_dropped_total`).

Several processes (BentoML workers, the adaptation worker reading) may open the same file:
WAL lets readers run beside the one writer, `busy_timeout` makes writers of different
processes wait for each other instead of failing, and each thread has its own connection.

Configuration (environment, read by `StoreConfig.from_env`):
    MP2A_STORE              file (default RUN/traffic.sqlite); `off` disables collection
    MP2A_SAMPLE_RATE        fraction of served images kept (default 1.0)
    MP2A_STORE_MAX_ROWS     newest rows kept (default 100000)
    MP2A_STORE_MAX_AGE_S    rows older than this are deleted (default 604800, 7 days)
    MP2A_STORE_IMAGES       1 keeps the raw image bytes too (default 0: embeddings only)
    MP2A_STORE_MAX_IMAGES   newest images kept when MP2A_STORE_IMAGES=1 (default 1000)
    MP2A_STORE_CHECK_S      seconds between the writer's `PRAGMA quick_check` (default 300)

A damaged file heals itself (mp2a/heal.py): the store is checked when a process opens it
(`PRAGMA quick_check`), every MP2A_STORE_CHECK_S by the writer, and on every error SQLite gives
for a damaged file ("malformed", "not a database"). The file and its -wal/-shm are then moved
aside (`traffic.sqlite.damaged-STAMP`), a fresh store takes their place, the loss is counted in
`mp2a_state_healed_total{what="traffic_store"}` and said in one log line; the batch being
written goes to the fresh store. A writer whose file was replaced by another process (its
inode changed) reconnects before its next write, so no process keeps writing into a file that
was moved aside. A deleted -wal is noticed the same way: the writer checkpoints what its open
WAL holds into the database, then reconnects.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mp2a.heal import count_healed, inode, is_damage, quarantine_sqlite, sqlite_problem
from mp2a.metrics import ServingMetrics

log = logging.getLogger(__name__)

DEFAULT_NAME = "traffic.sqlite"
BUSY_TIMEOUT_MS = 30_000  # another process's write transaction is milliseconds; wait, not fail
# The caps and the row count, at most and at least this often (and once more at close): a
# pass walks the rows (O(rows) for the count and the cut), so one per written batch took a
# third of a core at 150 req/s; the row cap may be exceeded by one interval's traffic.
RETENTION_INTERVAL_S = 1.0
RECONNECT_S = 2.0  # a writer that lost its backend tries again after this long
CHECK_S = 300.0  # quick_check reads every page: 0.33 s for 20k 512-d rows (83 MB) here
_checked: set[tuple[str, int | None]] = set()  # (file, inode) this process checked at open

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: retention deletes the lowest
    t REAL NOT NULL,                       -- unix seconds when served
    version TEXT NOT NULL,                 -- model version that served it
    label INTEGER NOT NULL,                -- predicted class index (artifact order)
    confidence REAL NOT NULL,              -- top-1 probability
    embedding BLOB NOT NULL,               -- (D,) float32, little-endian
    site TEXT NOT NULL DEFAULT ''          -- '' = this server's traffic; a hub: the edge site
);
CREATE INDEX IF NOT EXISTS samples_t ON samples (t);
CREATE TABLE IF NOT EXISTS images (
    sample_id INTEGER PRIMARY KEY REFERENCES samples (id) ON DELETE CASCADE,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (       -- a hub: uploads already stored (idempotent ids)
    site TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    n INTEGER NOT NULL,
    t REAL NOT NULL,
    PRIMARY KEY (site, batch_id)
);
"""
SITE_INDEX = "CREATE INDEX IF NOT EXISTS samples_site ON samples (site, id)"


class DuplicateBatch(Exception):
    """An upload whose batch id was stored before (the edge retried): nothing stored."""


class StoreError(Exception):
    """The store cannot be opened as configured; the message says how to fix it."""


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    dim: int  # embedding width of the serving model
    sample_rate: float = 1.0
    max_rows: int = 100_000
    max_age_s: float = 7 * 24 * 3600.0
    store_images: bool = False
    max_images: int = 1000
    queue_size: int = 10_000  # samples waiting for the writer; beyond it they are dropped
    batch_size: int = 512  # samples per insert transaction
    check_s: float = CHECK_S  # seconds between the writer's integrity checks
    seed: int | None = None  # of the sampling coin; None: from the OS

    def __post_init__(self) -> None:
        checks = [
            (self.dim >= 1, f"dim must be >= 1, got {self.dim}"),
            (
                0.0 <= self.sample_rate <= 1.0,
                f"sample_rate must be in [0, 1], not {self.sample_rate}",
            ),
            (self.max_rows >= 1, f"max_rows must be >= 1, got {self.max_rows}"),
            (self.max_age_s > 0, f"max_age_s must be > 0, got {self.max_age_s}"),
            (self.max_images >= 0, f"max_images must be >= 0, got {self.max_images}"),
            (self.queue_size >= 1, f"queue_size must be >= 1, got {self.queue_size}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @classmethod
    def from_env(
        cls, run: Path, dim: int, environ: Mapping[str, str] | None = None
    ) -> StoreConfig | None:
        """The configuration the MP2A_STORE* variables describe; None when MP2A_STORE=off."""
        env = os.environ if environ is None else environ
        raw_path = env.get("MP2A_STORE", "").strip()
        if raw_path.lower() == "off":
            return None

        def num(name: str, default: float, kind: type = float) -> float:
            raw = env.get(name, "").strip()
            try:
                return kind(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a {kind.__name__}") from None

        images = env.get("MP2A_STORE_IMAGES", "0").strip().lower()
        if images not in ("0", "1", "true", "false", ""):
            raise ValueError(f"MP2A_STORE_IMAGES={images!r}: use 1 to keep images, 0 not to")
        try:
            return cls(
                path=Path(raw_path) if raw_path else run / DEFAULT_NAME,
                dim=dim,
                sample_rate=num("MP2A_SAMPLE_RATE", 1.0),
                max_rows=int(num("MP2A_STORE_MAX_ROWS", 100_000, int)),
                max_age_s=num("MP2A_STORE_MAX_AGE_S", 7 * 24 * 3600.0),
                store_images=images in ("1", "true"),
                max_images=int(num("MP2A_STORE_MAX_IMAGES", 1000, int)),
                check_s=num("MP2A_STORE_CHECK_S", CHECK_S),
            )
        except ValueError as e:
            raise ValueError(f"traffic store configuration (MP2A_STORE*): {e}") from e


class Traffic(NamedTuple):
    """Stored samples, oldest first."""

    embeddings: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64, predicted class index
    confidences: np.ndarray  # (N,) float32, top-1 probability
    times: np.ndarray  # (N,) float64, unix seconds


@dataclass
class _Sample:
    t: float
    version: str
    label: int
    confidence: float
    embedding: bytes
    image: bytes | None


INSERT_SAMPLE = (
    "INSERT INTO samples (t, version, label, confidence, embedding) VALUES (?, ?, ?, ?, ?)"
)


def _insert(con: sqlite3.Connection, batch: list[_Sample]) -> None:
    rows = [(s.t, s.version, s.label, s.confidence, s.embedding) for s in batch]
    if all(s.image is None for s in batch):  # the usual case: one statement
        con.executemany(INSERT_SAMPLE, rows)
        return
    for s, row in zip(batch, rows, strict=True):
        cur = con.execute(INSERT_SAMPLE, row)
        if s.image is not None:
            con.execute(
                "INSERT INTO images (sample_id, data) VALUES (?, ?)", (cur.lastrowid, s.image)
            )


def connect(path: Path) -> sqlite3.Connection:
    """A connection for one thread: WAL, a busy timeout, cascading deletes."""
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    con.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoints, fast
    return con


def read_int(path: Path, sql: str) -> int:
    """One integer query on a store file (its own short-lived connection)."""
    con = connect(path)
    try:
        return int(con.execute(sql).fetchone()[0])
    finally:
        con.close()


def peek_int(path: Path, sql: str) -> int:
    """`read_int`, or 0 while the store does not exist yet or cannot be read (pollers)."""
    if not Path(path).is_file():
        return 0
    try:
        return read_int(path, sql)
    except sqlite3.Error as e:
        log.debug("cannot read %s: %s", path, e)
        return 0


class TrafficStore:
    """Thread-safe `offer()` from request threads; one writer thread per instance."""

    def __init__(
        self,
        config: StoreConfig,
        *,
        metrics: ServingMetrics | None = None,
        start: bool = True,
    ) -> None:
        self.config = config
        self.path = Path(config.path)
        self.metrics = metrics
        self.on_evict: Any = None  # called with the rows a cap removed (an edge counts them)
        self.dropped = 0  # samples lost to a full queue or a failed write
        self._failing_since: float | None = None  # writes have failed since (monotonic s)
        self._failed_n = 0
        self._drop_lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._queue: queue.Queue[_Sample] = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._init_schema()
        if start:
            self.start()

    def _init_schema(self) -> None:
        """Create the schema; a damaged file found here (quick_check once per process and
        file, or an error that says so) is moved aside and a fresh store created."""
        key = (str(self.path), inode(self.path))
        if key[1] is not None and key not in _checked:
            if (problem := sqlite_problem(self.path)) is not None:
                quarantine_sqlite(self.path, "traffic_store", problem, seen_inode=key[1])
            _checked.add((str(self.path), inode(self.path)))
        try:
            self._create_schema()
        except StoreError as e:
            if not is_damage(e.__cause__ or e):
                raise
            quarantine_sqlite(self.path, "traffic_store", str(e.__cause__), key[1])
            self._create_schema()

    def _create_schema(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = connect(self.path)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(
                f"cannot open the traffic store {self.path}: {e}; set MP2A_STORE to a writable "
                "file or MP2A_STORE=off"
            ) from e
        try:
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            con.executescript(SCHEMA)
            cols = {r[1] for r in con.execute("PRAGMA table_info(samples)")}
            if "site" not in cols:  # a store written before sites existed
                con.execute("ALTER TABLE samples ADD COLUMN site TEXT NOT NULL DEFAULT ''")
            con.execute(SITE_INDEX)
            con.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('dim', ?)", (str(self.config.dim),)
            )
            dim = int(con.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()[0])
        except sqlite3.Error as e:
            raise StoreError(f"cannot set up the traffic store {self.path}: {e}") from e
        finally:
            con.close()
        if dim != self.config.dim:
            raise StoreError(
                f"the traffic store {self.path} holds {dim}-d embeddings but this model makes "
                f"{self.config.dim}-d ones; point MP2A_STORE at another file or remove it"
            )

    # -- producers (request threads) ------------------------------------------------------

    @property
    def keeps_images(self) -> bool:
        return self.config.store_images and self.config.max_images > 0

    def offer(
        self,
        embedding: np.ndarray,
        label: int,
        confidence: float,
        version: str,
        image: bytes | None = None,
    ) -> bool:
        """Queue one served sample if the sampling rate keeps it; never blocks.

        Returns True if it was queued, False if sampled out or dropped (queue full, or an
        embedding or confidence that is not finite: it would fail the whole insert batch).
        """
        rate = self.config.sample_rate
        if rate < 1.0 and self._rng.random() >= rate:
            return False
        if not (np.isfinite(embedding).all() and np.isfinite(confidence)):
            self._count_dropped(1)
            return False
        sample = _Sample(
            t=time.time(),
            version=version,
            label=int(label),
            confidence=float(confidence),
            embedding=np.ascontiguousarray(embedding, dtype="<f4").tobytes(),
            image=image if self.keeps_images else None,
        )
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            self._count_dropped(1)
            return False
        return True

    def _count_dropped(self, n: int) -> None:
        with self._drop_lock:
            self.dropped += n
        if self.metrics is not None:
            self.metrics.traffic_dropped.inc(n)

    # -- the writer thread -----------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (the constructor does, unless start=False)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="mp2a-store-writer", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _open_writer(self) -> Any:
        """The writer thread's connection (a subclass may raise; the batch is then dropped)."""
        return connect(self.path)

    def _close_writer(self, con: Any) -> None:
        con.close()

    def _run(self) -> None:
        con = None
        last_retention = 0.0
        written = False  # rows written since the last retention pass
        retry_at = 0.0  # a backend that cannot be reached is retried, not hammered
        try:
            while not (self._stop.is_set() and self._queue.empty()):
                batch = self._take_batch()
                now = time.monotonic()
                if con is None and now >= retry_at:
                    try:
                        con = self._open_writer()
                    except Exception as e:  # any backend error: drop the batch, go on
                        log.warning("traffic store: cannot connect (%s); retrying", e)
                        retry_at = now + RECONNECT_S
                        self._writer_failed()
                if con is not None:
                    con = self._check_writer(con)
                if batch and con is None:
                    self._count_dropped(len(batch))
                    for _ in batch:
                        self._queue.task_done()
                elif batch and not self._write(con, batch):
                    con = self._reset_writer(con)
                if (fresh := self.__dict__.pop("_healed_con", None)) is not None:
                    con = fresh  # the batch healed the file and went to a fresh store
                written = written or bool(batch)
                if con is not None and now - last_retention >= RETENTION_INTERVAL_S:
                    if not self._retain_and_publish(con):
                        con = self._reset_writer(con)
                    last_retention, written = now, False
            if con is not None and written:  # the caps hold in what a stopped store leaves
                self._retain_and_publish(con)
        finally:
            if con is not None:
                self._close_writer(con)

    def _reset_writer(self, con: Any) -> Any:
        """None after a failed write (a subclass whose connection can break drops it)."""
        return con

    def _check_writer(self, con: Any) -> Any:
        """The writer's SQLite connection, checked before each write: reopened when its file
        was replaced (healed by another process) or its -wal deleted, healed when damaged
        (the periodic quick_check). Other backends' connections are returned as they are."""
        if not isinstance(con, sqlite3.Connection):
            return con
        if not hasattr(self, "_writer_inode"):  # its first write opens the -wal
            self._writer_inode, self._next_check = inode(self.path), 0.0
            return con
        now_inode = inode(self.path)
        wal = self.path.with_name(self.path.name + "-wal")
        if now_inode is not None and now_inode == self._writer_inode and wal.exists():
            if time.monotonic() < self._next_check:
                return con
            self._next_check = time.monotonic() + self.config.check_s
            # on a connection of its own: the writer's page cache may hold good copies of
            # pages that are damaged on disk (it would answer ok; every new reader fails)
            if (problem := sqlite_problem(self.path)) is None:
                return con
            quarantine_sqlite(self.path, "traffic_store", problem, self._writer_inode)
        elif now_inode == self._writer_inode and now_inode is not None:
            # the -wal was deleted under us: what it held is still in our open descriptor;
            # move it into the database file before reconnecting
            try:
                con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning(
                    "traffic store %s: checkpoint of a deleted WAL failed: %s", self.path, e
                )
            log.error("traffic store %s: its -wal file was deleted; reconnecting", self.path)
            count_healed("traffic_store")
        return self._reopen_writer(con)

    def _reopen_writer(self, con: Any) -> Any:
        """A fresh writer connection on the (possibly new) file, schema included."""
        with contextlib.suppress(sqlite3.Error):
            con.close()
        try:
            self._init_schema()
            con = self._open_writer()
        except Exception as e:
            log.warning("traffic store %s: cannot reopen (%s); retrying", self.path, e)
            self._writer_inode = None
            return None
        self._writer_inode = inode(self.path)
        self._next_check = time.monotonic() + self.config.check_s
        with contextlib.suppress(sqlite3.Error):
            con.execute("SELECT COUNT(*) FROM meta").fetchone()  # opens (creates) the -wal
        return con

    def _writer_failed(self) -> None:
        """A hook for subclasses to count a backend failure."""

    def _take_batch(self) -> list[_Sample]:
        try:
            batch = [self._queue.get(timeout=0.2)]
        except queue.Empty:
            return []
        while len(batch) < self.config.batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, con: sqlite3.Connection, batch: list[_Sample]) -> bool:
        """Insert `batch` in one transaction; False when it was dropped."""
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                _insert(con, batch)
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:  # disk full, locked past the timeout: lose them, go on
            if is_damage(e) and self._heal_and_rewrite(con, batch, e):
                return True
            self._count_dropped(len(batch))
            if self._failing_since is None:  # one line per episode (a full disk), not per batch
                self._failing_since, self._failed_n = time.monotonic(), 0
                log.warning(
                    "traffic store %s: writes fail (%s); samples are dropped until they succeed "
                    "again (mp2a_traffic_dropped_total)",
                    self.path,
                    e,
                )
            self._failed_n += len(batch)
            return True  # the connection itself is fine
        finally:
            for _ in batch:
                self._queue.task_done()
        if self._failing_since is not None:
            log.warning(
                "traffic store %s: writes succeed again; %d samples dropped in %.0f s",
                self.path,
                self._failed_n,
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        return True

    def _heal_and_rewrite(
        self, con: sqlite3.Connection, batch: list[_Sample], e: Exception
    ) -> bool:
        """The file is damaged: move it aside, then write `batch` into a fresh store on the
        writer's new connection (kept in `_healed_con` for `_run`); True when written."""
        quarantine_sqlite(self.path, "traffic_store", str(e), getattr(self, "_writer_inode", None))
        fresh = self._reopen_writer(con)
        if fresh is None:
            return False
        self._healed_con = fresh
        try:
            fresh.execute("BEGIN IMMEDIATE")
            _insert(fresh, batch)
            fresh.execute("COMMIT")
        except sqlite3.Error as e2:
            if fresh.in_transaction:
                fresh.execute("ROLLBACK")
            log.warning("traffic store %s: the fresh store refused a write too: %s", self.path, e2)
            return False
        return True

    def _retain_and_publish(self, con: sqlite3.Connection) -> bool:
        c = self.config
        try:
            con.execute("BEGIN IMMEDIATE")
            # this server's own rows (a hub caps each site's rows when it stores them); ids
            # grow with insertion, so the row max_rows places below the newest is the cut
            before = con.total_changes
            self._retain_site(con, "")
            evicted = con.total_changes - before
            con.execute(
                "DELETE FROM images WHERE sample_id <= "
                "(SELECT sample_id FROM images ORDER BY sample_id DESC LIMIT 1 OFFSET ?)",
                (c.max_images,),
            )
            con.execute("COMMIT")
            n = con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            if evicted and self.on_evict is not None:
                self.on_evict(evicted)
        except sqlite3.Error as e:
            if con.in_transaction:
                con.execute("ROLLBACK")
            if is_damage(e):  # the next write reconnects to a fresh store
                quarantine_sqlite(self.path, "traffic_store", str(e), inode(self.path))
                return True
            log.warning("traffic store %s: retention pass failed: %s", self.path, e)
            return True
        if self.metrics is not None:
            self.metrics.traffic_samples.set(n)
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        q = self._queue
        with q.all_tasks_done:
            return q.all_tasks_done.wait_for(lambda: q.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop the writer thread."""
        self.start()  # a store created with start=False still writes its queue on close
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("traffic store %s: writer still busy after %.0f s", self.path, timeout)

    # -- readers (the adaptation worker, tests) ---------------------------------------------

    def _query(self, sql: str, args: Any = ()) -> list[tuple]:
        """The rows of one read on its own connection. A damaged file is healed (moved
        aside, a fresh store created) and read again: the fresh store's rows, so a reader
        (the adaptation worker) never fails for ever on one damaged file."""
        seen = inode(self.path)
        try:
            con = connect(self.path)
            try:
                return con.execute(sql, args).fetchall()
            finally:
                con.close()
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            quarantine_sqlite(self.path, "traffic_store", str(e), seen)
        self._init_schema()
        con = connect(self.path)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def count(self, site: str | None = None) -> int:
        """Rows in the store (all processes' writes), of one site if given."""
        if site is None:
            return int(self._query("SELECT COUNT(*) FROM samples")[0][0])
        return int(self._query("SELECT COUNT(*) FROM samples WHERE site = ?", (site,))[0][0])

    def ingest(
        self,
        site: str,
        batch_id: str,
        embeddings: np.ndarray,
        labels: np.ndarray,
        confidences: np.ndarray,
        versions: list[str],
        times: np.ndarray,
    ) -> int:
        """Store an edge site's upload in one transaction (a hub); DuplicateBatch when the
        batch id was stored before. Then the site's rows are capped like the server's own."""
        rows = [
            (float(t), str(v), int(lab), float(c), np.ascontiguousarray(e, "<f4").tobytes(), site)
            for e, lab, c, v, t in zip(
                embeddings, labels, confidences, versions, times, strict=True
            )
        ]
        try:
            return self._ingest(site, batch_id, rows)
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            quarantine_sqlite(self.path, "traffic_store", str(e), inode(self.path))
        self._init_schema()
        return self._ingest(site, batch_id, rows)

    def _ingest(self, site: str, batch_id: str, rows: list[tuple]) -> int:
        con = connect(self.path)
        try:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute(
                    "INSERT INTO batches (site, batch_id, n, t) VALUES (?, ?, ?, ?)",
                    (site, batch_id, len(rows), time.time()),
                )
            except sqlite3.IntegrityError:
                con.execute("ROLLBACK")
                raise DuplicateBatch(batch_id) from None
            con.executemany(
                "INSERT INTO samples (t, version, label, confidence, embedding, site) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._retain_site(con, site)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return len(rows)

    def _retain_site(self, con: sqlite3.Connection, site: str) -> None:
        c = self.config
        cutoff = time.time() - c.max_age_s
        con.execute("DELETE FROM samples WHERE site = ? AND t < ?", (site, cutoff))
        con.execute(
            "DELETE FROM samples WHERE site = ? AND id <= (SELECT id FROM samples WHERE site = ? "
            "ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (site, site, c.max_rows),
        )

    def image_count(self) -> int:
        return read_int(self.path, "SELECT COUNT(*) FROM images")

    def versions(self) -> dict[str, int]:
        """Rows per model version."""
        rows = self._query("SELECT version, COUNT(*) FROM samples GROUP BY version")
        return {str(v): int(n) for v, n in rows}

    def read(
        self,
        limit: int | None = None,
        since: float | None = None,
        version: str | None = None,
        site: str | None = None,
        served_by: str | None = None,
    ) -> Traffic:
        """The newest `limit` samples (all if None) served at or after `since` (unix seconds),
        optionally only those served by `version`; oldest first. `served_by`: of those newest
        `limit`, only the ones that version served (a window, then a filter)."""
        where, args = [], []
        if site is not None:
            where.append("site = ?")
            args.append(site)
        if since is not None:
            where.append("t >= ?")
            args.append(float(since))
        if version is not None:
            where.append("version = ?")
            args.append(str(version))
        sql = "SELECT id, t, label, confidence, embedding, version FROM samples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        if served_by is not None:  # the window first, then that version's rows in it
            sql = f"SELECT * FROM ({sql}) WHERE version = ? ORDER BY id DESC"
            args.append(str(served_by))
        rows = [r[1:5] for r in self._query(sql, args)[::-1]]  # (t, label, confidence, emb)
        d = self.config.dim
        emb = np.frombuffer(b"".join(r[3] for r in rows), dtype="<f4").reshape(len(rows), d)
        return Traffic(
            embeddings=emb.astype(np.float32),  # (N, D), a writable copy
            labels=np.array([r[1] for r in rows], dtype=np.int64),
            confidences=np.array([r[2] for r in rows], dtype=np.float32),
            times=np.array([r[0] for r in rows], dtype=np.float64),
        )


def open_store(
    run: Path,
    dim: int,
    metrics: ServingMetrics | None = None,
    environ: Mapping[str, str] | None = None,
) -> TrafficStore | None:
    """The serving process's store as the environment configures it, or None.

    A store the user named (MP2A_STORE) that cannot be opened is an error; the default one in
    the artifact folder (which may be read-only, e.g. baked into an image) only logs a warning,
    so serving goes on without collecting.
    """
    env = os.environ if environ is None else environ
    config = StoreConfig.from_env(run, dim, env)
    if config is None:
        log.info("traffic store disabled (MP2A_STORE=off)")
        return None
    try:
        store = TrafficStore(config, metrics=metrics)
    except StoreError as e:
        if env.get("MP2A_STORE", "").strip():
            raise
        log.warning("%s; serving without collecting traffic", e)
        return None
    log.info(
        "traffic store %s (sample rate %g, max %d rows, max age %g s, images %s)",
        config.path,
        config.sample_rate,
        config.max_rows,
        config.max_age_s,
        "on" if store.keeps_images else "off",
    )
    return store
