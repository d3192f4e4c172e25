"""PostgreSQL state for a fleet: MP2A_STATE=postgresql://user@host:port/db (online/state.py).

Every replica and worker of a deployment points at one database. It holds:

    traffic            served samples per site (embedding, time, served version, predicted
                       label, confidence); written a batch per statement by each replica's
                       store thread, capped by rows and age per site
    traffic_images     raw images, only with MP2A_STORE_IMAGES=1 (own cap)
    traffic_batches    a hub: the upload batch ids stored, per site (a retry is refused)
    versions           per site and version: head and prompt bytes (safetensors) with their
                       sha256, the manifest and metrics.json text, parent, method, decision,
                       rolled_back
    current_version    per site: the served version (no row: the base artifact, version 1)
    decisions          every adaptation outcome, per site
    adapt_requests     POST /adapt requests, taken by the worker (FOR UPDATE SKIP LOCKED)
    adapt_status       per site: the last run's status
    mp2a_meta          which base artifact this database belongs to (a database of another
                       artifact is refused: its heads do not fit this encoder)
    mp2a_schema        applied migrations

Consistency: a publish (version row, current pointer, its decision) and a rollback are one
transaction each, announced with NOTIFY mp2a_versions; every replica LISTENs and swaps on the
notification (and polls slowly in case one is missed). A publish names the version it was
trained on and is refused if the fleet serves another one by then, so two runs never publish
on top of each other. Exactly one worker runs: it holds a session advisory lock on its own
connection; when its process dies the connection closes, the lock goes with it, and the next
worker to try takes over. Migrations run at start under a transaction advisory lock, so
replicas starting together apply each exactly once.

Connections (the budget, deploy/README.md "Connections"): a process holds one pooled
connection (psycopg_pool, max 1) shared by the traffic writer, reads, status and the version
watcher's token; one process per replica (a file lock in the state cache folder elects it
among MP2A_WORKERS processes) holds a LISTEN connection, the others poll the token every half
second; an adaptation worker holds nothing until it leads (it tries the lead on a short-lived
connection every few seconds), then its session lock and a pooled connection. Everything
pooled is stateless per transaction (no server-side prepared statements, no SET, only
transaction advisory locks), so MP2A_STATE may point at PgBouncer in transaction mode;
LISTEN and the leader's session lock use MP2A_STATE_DIRECT (default: MP2A_STATE), which must
reach PostgreSQL itself: a direct DSN answered by a pooler is refused at start.
MP2A_STATE_LISTEN=0 drops the LISTEN connection (version changes by polling only).

Versions reach the predictor as ordinary artifacts: the rows are written to a local cache
folder (MP2A_STATE_CACHE, default ~/.cache/mp2a/state/<database>) with the base artifact's
source features linked in, then loaded and verified like any artifact; a row whose bytes do
not match their sha256 is refused and the previous verified version stays. With the database
unreachable at start, a replica serves the last version it verified (the cache remembers
it) and reconnects in the background.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from safetensors.numpy import save as save_tensors_bytes

from mp2a.artifact import (
    FORMAT_VERSION,
    HEAD_FILE,
    MANIFEST,
    METRICS_FILE,
    PROMPTS_FILE,
    SOURCE_FEATURES_FILE,
    Artifact,
    head_rows,
    load_artifact,
)
from mp2a.errors import ArtifactError
from mp2a.head import Head
from mp2a.metrics import ServingMetrics
from mp2a.versions import BASE_VERSION, keep_versions
from online.state import DEFAULT_SITE, MAX_DECISIONS, StateError, now
from online.store import StoreConfig, Traffic, TrafficStore, _Sample

log = logging.getLogger(__name__)

CHANNEL = "mp2a_versions"
MIGRATE_KEY = 0x6D703261_0001  # advisory lock keys (bigint)
LEADER_KEY = 0x6D703261_0002
CONNECT_TIMEOUT_S = 5
# one pooled connection per process: the traffic writer's COPY, reads, status writes and the
# watcher's token each hold it for milliseconds; more would multiply by replicas and workers
POOL_SIZE = 1
LEAD_RETRY_S = 5.0  # a worker that does not lead tries again every 2.5-5 s (jittered)
LISTEN_LOCK = ".listen.lock"  # one LISTEN per state cache folder (a replica's workers)
RETENTION_S = 10.0  # a replica's traffic store applies the caps this often (jittered)

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE mp2a_meta (key text PRIMARY KEY, value text NOT NULL);
        CREATE TABLE traffic (
            id bigserial PRIMARY KEY,
            site text NOT NULL DEFAULT '',
            t double precision NOT NULL,
            version text NOT NULL,
            label integer NOT NULL,
            confidence real NOT NULL,
            embedding bytea NOT NULL
        );
        CREATE INDEX traffic_site_id ON traffic (site, id);
        CREATE INDEX traffic_site_t ON traffic (site, t);
        CREATE TABLE traffic_images (
            sample_id bigint PRIMARY KEY REFERENCES traffic (id) ON DELETE CASCADE,
            site text NOT NULL DEFAULT '',
            data bytea NOT NULL
        );
        CREATE TABLE versions (
            site text NOT NULL,
            version integer NOT NULL,
            parent integer,
            created_at timestamptz NOT NULL DEFAULT now(),
            method text,
            head bytea NOT NULL,
            head_sha256 text NOT NULL,
            prompts bytea,
            prompts_sha256 text,
            metrics text NOT NULL,
            manifest text NOT NULL,
            rolled_back jsonb,
            PRIMARY KEY (site, version)
        );
        CREATE TABLE current_version (
            site text PRIMARY KEY,
            version integer NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE decisions (
            id bigserial PRIMARY KEY,
            site text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now(),
            entry jsonb NOT NULL
        );
        CREATE INDEX decisions_site_id ON decisions (site, id);
        CREATE TABLE adapt_requests (
            id text PRIMARY KEY,
            site text NOT NULL,
            requested_at timestamptz NOT NULL DEFAULT now(),
            body jsonb NOT NULL,
            taken_at timestamptz,
            taken_by text
        );
        CREATE INDEX adapt_requests_pending ON adapt_requests (requested_at) WHERE taken_at IS NULL;
        CREATE TABLE adapt_status (
            site text PRIMARY KEY,
            status jsonb NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
]
MIGRATIONS.append(
    (
        2,
        """
        CREATE TABLE traffic_batches (
            site text NOT NULL,
            batch_id text NOT NULL,
            n integer NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (site, batch_id)
        );
        """,
    )
)
LATEST_SCHEMA = MIGRATIONS[-1][0]


def _psycopg():
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - the [serve] extra has it
        raise StateError(
            "MP2A_STATE=postgresql://… needs psycopg: pip install 'mp2a[serve]'"
        ) from e
    return psycopg


def redact(dsn: str) -> str:
    """host:port/db of a DSN, without user or password (for messages and /model)."""
    u = urlsplit(dsn)
    return f"{u.hostname or 'localhost'}:{u.port or 5432}{u.path or '/'}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_text(obj: Any) -> str:
    """The exact bytes mp2a/artifact.py's write_json writes (sha256 of metrics.json)."""
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def _applied(conn: Any) -> set[int] | None:
    """The migrations the database has, read without a lock (None: no schema table yet)."""
    (table,) = conn.execute("SELECT to_regclass('mp2a_schema')").fetchone()
    if table is None:
        return None
    return {r[0] for r in conn.execute("SELECT version FROM mp2a_schema")}


def migrate(conn: Any) -> list[int]:
    """Apply the missing migrations under a transaction advisory lock (safe when several
    replicas start at once); returns the versions applied now. A database that has every
    migration is only read: a fleet starting together does not queue for the lock (behind
    PgBouncer each waiter would hold one of the pool's server connections)."""
    done = _applied(conn)
    if done is not None and done >= {v for v, _ in MIGRATIONS} and max(done) <= LATEST_SCHEMA:
        return []
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS mp2a_schema "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM mp2a_schema")}
        newer = [v for v in done if v > LATEST_SCHEMA]
        if newer:
            raise StateError(
                f"the database schema is at version {max(newer)}, newer than this mp2a's "
                f"{LATEST_SCHEMA}: upgrade mp2a on this replica"
            )
        for version, sql in MIGRATIONS:
            if version not in done:
                conn.execute(sql)
                conn.execute("INSERT INTO mp2a_schema (version) VALUES (%s)", (version,))
                applied_now.append(version)
    return applied_now


def retain_traffic(db: Any, site: str, max_age_s: float, max_rows: int) -> None:
    """Drop a site's traffic rows older than `max_age_s` and beyond the newest `max_rows`
    (`db`: a connection or a cursor, inside the caller's transaction)."""
    db.execute("DELETE FROM traffic WHERE site = %s AND t < %s", (site, time.time() - max_age_s))
    db.execute(
        "DELETE FROM traffic WHERE site = %s AND id <= (SELECT id FROM traffic "
        "WHERE site = %s ORDER BY id DESC LIMIT 1 OFFSET %s)",
        (site, site, max_rows),
    )


def application_name() -> str:
    """Which process a session belongs to, as pg_stat_activity shows it (the pid first:
    the server keeps 63 bytes)."""
    return f"mp2a pid {os.getpid()} on {socket.gethostname()}"[:63]


def leader_sessions(conn: Any) -> list[tuple[int, str]]:
    """(backend pid, application name) of the session holding the leader's lock in the
    connection's database (none or one), from pg_locks: a bigint advisory key shows as
    classid (high 32 bits) and objid (low 32 bits) with objsubid 1."""
    rows = conn.execute(
        "SELECT l.pid, a.application_name FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.classid = %s AND l.objid = %s AND l.objsubid = 1 "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (LEADER_KEY >> 32, LEADER_KEY & 0xFFFFFFFF),
    ).fetchall()
    return [(int(pid), str(name)) for pid, name in rows]


class PgState:
    """State in one PostgreSQL database (see the module docstring)."""

    kind = "postgresql"
    lead_retry_s = LEAD_RETRY_S  # how often a worker that does not lead tries (online/worker)

    def __init__(
        self,
        run: Path | str,
        dsn: str,
        *,
        cache_dir: Path | None = None,
        store_env: Mapping[str, str] | None = None,
        connect: bool = True,
        direct_dsn: str | None = None,
        listen: bool = True,
    ) -> None:
        self.run = Path(run)
        self.dsn = dsn
        self.where = redact(dsn)
        self.direct_dsn = direct_dsn or dsn  # LISTEN and the leader's session lock
        self.direct_named = direct_dsn is not None
        self.listen = listen
        self.base = load_artifact(self.run)
        self.identity = self._identity(self.base)
        self.store_env = dict(os.environ if store_env is None else store_env)
        default_cache = Path.home() / ".cache" / "mp2a" / "state"
        key = sha256_bytes(f"{self.where}|{self.identity}".encode())[:16]
        self.cache = Path(cache_dir) if cache_dir else default_cache / key
        self._arts: dict[tuple[str, int], Artifact] = {}
        self._lock = threading.Lock()  # guards setting up the pool
        self._ready = False  # schema migrated, base checked, direct DSN checked
        self._pool: Any = None
        self._held = threading.local()  # the pooled connection this thread holds, if any
        self._listen: Any = None
        self._listen_lock: Any = None  # the open lock file while this process LISTENs
        self._lead: Any = None
        self.lead_holder: str | None = None  # who leads, from pg_locks (a follower)
        self._lead_pid: int | None = None
        self._led = False  # a worker's state: its pool is only open while it leads
        self.offline = False  # True when started on the cached version, database down
        if connect:
            self._setup()

    @classmethod
    def from_env(
        cls, run: Path, dsn: str, environ: Mapping[str, str], connect: bool = True
    ) -> PgState:
        cache = environ.get("MP2A_STATE_CACHE", "").strip()
        direct = environ.get("MP2A_STATE_DIRECT", "").strip()
        if direct and not direct.startswith(("postgresql://", "postgres://")):
            raise StateError(
                f"MP2A_STATE_DIRECT={redact(direct)!r}: use postgresql://user@host:port/db (the "
                "PostgreSQL server itself, not a pooler), or unset it to use MP2A_STATE"
            )
        listen = environ.get("MP2A_STATE_LISTEN", "1").strip().lower()
        if listen not in ("0", "1", "", "true", "false"):
            raise StateError(
                f"MP2A_STATE_LISTEN={listen!r}: 1 (default) listens for version changes, 0 "
                "polls for them"
            )
        return cls(
            run,
            dsn,
            cache_dir=Path(cache) if cache else None,
            store_env=environ,
            connect=connect,
            direct_dsn=direct or None,
            listen=listen not in ("0", "false"),
        )

    @staticmethod
    def _identity(base: Artifact) -> str:
        """What ties a database to one base artifact: its backbone weights and head."""
        return f"{base.backbone.weights_sha256}:{base.manifest['files'][HEAD_FILE]}"

    def describe(self) -> dict:
        return {"backend": self.kind, "database": self.where, "schema": LATEST_SCHEMA}

    # -- connections -----------------------------------------------------------------------
    def _new_conn(self, autocommit: bool = True, direct: bool = False) -> Any:
        """A connection of its own: pooled-DSN ones are stateless (nothing prepared on the
        server, so a pooler in transaction mode may hand each transaction to another server
        session); `direct` ones (LISTEN, the leader's lock) are checked to reach PostgreSQL
        itself."""
        psycopg = _psycopg()
        dsn = self.direct_dsn if direct else self.dsn
        try:
            conn = psycopg.connect(
                dsn,
                autocommit=autocommit,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name=application_name(),
                prepare_threshold=None,
            )
        except psycopg.Error as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            name = "MP2A_STATE_DIRECT" if direct and self.direct_named else "MP2A_STATE"
            raise StateError(
                f"cannot reach PostgreSQL at {redact(dsn)} ({first}); check {name} and "
                "that the database is up"
            ) from e
        if direct:
            self._check_direct(conn)
        return conn

    def _check_direct(self, conn: Any) -> None:
        """Refuse a direct connection that a pooler answers: LISTEN through PgBouncer in
        transaction mode never fires and a session lock there is not held by this session.
        A pooler hands its clients a backend key of its own, so the pid the connection was
        given differs from the server backend's that runs its queries."""
        try:
            (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        except Exception as e:
            conn.close()
            raise StateError(f"lost PostgreSQL at {redact(self.direct_dsn)}: {e}") from e
        if int(pid) == conn.info.backend_pid:
            return
        conn.close()
        where = redact(self.direct_dsn)
        if self.direct_named:
            raise StateError(
                f"MP2A_STATE_DIRECT ({where}) answers through a connection pooler (e.g. "
                "PgBouncer): LISTEN and the leader's lock need a session of their own; point "
                "it at the PostgreSQL server itself"
            )
        raise StateError(
            f"MP2A_STATE ({where}) answers through a connection pooler (e.g. PgBouncer): set "
            "MP2A_STATE_DIRECT=postgresql://user@host:port/db to the PostgreSQL server itself "
            "for LISTEN and the leader's lock"
        )

    def _setup(self) -> None:
        """Migrate, check the database belongs to this artifact, check the direct DSN (each
        on a short-lived connection; the pool opens on first use)."""
        conn = self._new_conn()
        try:
            applied = migrate(conn)
            if applied:
                log.info("migrated %s to schema %s", self.where, applied)
            conn.execute(
                "INSERT INTO mp2a_meta (key, value) VALUES ('base', %s) ON CONFLICT DO NOTHING",
                (self.identity,),
            )
            (owner,) = conn.execute("SELECT value FROM mp2a_meta WHERE key = 'base'").fetchone()
        except StateError:
            conn.close()
            raise
        except Exception as e:
            conn.close()
            raise StateError(f"cannot set up the mp2a schema in {self.where}: {e}") from e
        conn.close()
        if owner != self.identity:
            raise StateError(
                f"the database {self.where} holds the state of another artifact (backbone and "
                f"head {owner[:24]}…, not {self.identity[:24]}…); give this artifact its own "
                "database"
            )
        self._new_conn(direct=True).close()
        self._ready = True

    def _open_pool(self) -> None:
        from psycopg_pool import ConnectionPool

        self._pool = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=POOL_SIZE,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "application_name": application_name(),
                "prepare_threshold": None,  # no server-side prepared statements (a pooler)
            },
            check=ConnectionPool.check_connection,  # a connection a restart broke is replaced
            open=False,
            name="mp2a",
        )
        self._pool.open(wait=False)

    def _close_pool(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.close(timeout=5)

    @contextlib.contextmanager
    def _db(self) -> Iterator[Any]:
        """The pooled connection (checked before use: a broken one is replaced). Re-entrant
        within a thread: a call made while this thread holds it gets the same connection."""
        held = getattr(self._held, "conn", None)
        if held is not None:
            yield held
            return
        psycopg = _psycopg()
        from psycopg_pool import PoolTimeout

        with self._lock:
            if not self._ready:
                self._setup()
            if self._pool is None:
                self._open_pool()
            pool = self._pool
        try:
            with pool.connection(timeout=CONNECT_TIMEOUT_S) as conn:
                self._held.conn = conn
                try:
                    yield conn
                finally:
                    self._held.conn = None
        except PoolTimeout as e:
            raise StateError(
                f"cannot reach PostgreSQL at {self.where} (no connection within "
                f"{CONNECT_TIMEOUT_S} s); check that the database is up"
            ) from e
        except psycopg.OperationalError as e:
            raise StateError(f"lost PostgreSQL at {self.where}: {e}") from e
        except psycopg.Error as e:
            raise StateError(f"PostgreSQL at {self.where}: {e}") from e

    def close(self) -> None:
        self.release_lead()
        self._close_pool()
        if self._listen is not None:
            with contextlib.suppress(Exception):
                self._listen.close()
        self._listen = None
        if self._listen_lock is not None:
            with contextlib.suppress(OSError):
                self._listen_lock.close()  # the lock goes with the file
            self._listen_lock = None

    # -- versions --------------------------------------------------------------------------
    def _site_dir(self, site: str) -> Path:
        return self.cache / (f"site-{site}" if site else "fleet")

    def _remember(self, site: str, version: int) -> None:
        """The last version this replica verified, for a start with the database down."""
        d = self._site_dir(site)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".last-{os.getpid()}"
        tmp.write_text(json.dumps({"version": version}))
        os.replace(tmp, d / "LAST")

    def _last_verified(self, site: str) -> Artifact | None:
        try:
            v = int(json.loads((self._site_dir(site) / "LAST").read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if v == BASE_VERSION:
            return self.base
        try:
            return load_artifact(self._site_dir(site) / str(v))
        except ArtifactError as e:
            log.warning("cached version %s is damaged (%s)", v, e)
            return None

    def _served(self, conn: Any, site: str) -> int:
        row = conn.execute(
            "SELECT version FROM current_version WHERE site = %s", (site,)
        ).fetchone()
        return BASE_VERSION if row is None else int(row[0])

    def _materialize(self, conn: Any, site: str, version: int) -> Artifact:
        """Version `version` of `site` as a verified artifact folder in the cache."""
        if version == BASE_VERSION:
            return self.base
        if (site, version) in self._arts:
            return self._arts[(site, version)]
        folder = self._site_dir(site) / str(version)
        if folder.is_dir():
            try:
                art = load_artifact(folder)
                self._arts[(site, version)] = art
                return art
            except ArtifactError:
                shutil.rmtree(folder, ignore_errors=True)
        row = conn.execute(
            "SELECT head, head_sha256, prompts, prompts_sha256, metrics, manifest "
            "FROM versions WHERE site = %s AND version = %s",
            (site, version),
        ).fetchone()
        if row is None:
            raise ArtifactError(f"version {version} of site {site!r} is not in {self.where}")
        head, head_sha, prompts, prompts_sha, metrics, manifest = row
        if sha256_bytes(bytes(head)) != head_sha:
            raise ArtifactError(
                f"version {version} of site {site!r}: its head bytes fail their sha256 in "
                f"{self.where}; the row is damaged, not served"
            )
        if prompts is not None and sha256_bytes(bytes(prompts)) != prompts_sha:
            raise ArtifactError(
                f"version {version} of site {site!r}: its prompt bytes fail their sha256"
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=folder.parent))
        try:
            (tmp / HEAD_FILE).write_bytes(bytes(head))
            if prompts is not None:
                (tmp / PROMPTS_FILE).write_bytes(bytes(prompts))
            (tmp / METRICS_FILE).write_text(metrics)
            src = self.run / SOURCE_FEATURES_FILE
            try:
                os.link(src, tmp / SOURCE_FEATURES_FILE)
            except OSError:
                shutil.copyfile(src, tmp / SOURCE_FEATURES_FILE)
            (tmp / MANIFEST).write_text(manifest)
            art = load_artifact(tmp)  # every checksum, the manifest's own included
            if art.version != version:
                raise ArtifactError(f"row {version} of site {site!r} says version {art.version}")
            try:
                os.rename(tmp, folder)
                art = dataclasses.replace(art, path=folder)  # the files just verified
            except OSError:  # another process of the replica wrote it first: verify that one
                art = load_artifact(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._arts[(site, version)] = art
        return art

    def load_current(self, site: str = DEFAULT_SITE) -> Artifact:
        try:
            with self._db() as conn:
                pointed = self._served(conn, site)
                try:
                    art = self._materialize(conn, site, pointed)
                except ArtifactError as e:
                    log.warning(
                        "current version %s of %r fails (%s); falling back", pointed, site, e
                    )
                    art = self._fallback(conn, site, pointed)
        except StateError:
            cached = self._last_verified(site)
            if cached is None:
                raise
            log.warning(
                "PostgreSQL at %s is unreachable: serving the last verified version %s",
                self.where,
                cached.version,
            )
            self.offline = True
            return cached
        self.offline = False
        self._remember(site, art.version)
        return art

    def _fallback(self, conn: Any, site: str, skip: int) -> Artifact:
        rows = conn.execute(
            "SELECT version FROM versions WHERE site = %s AND version <> %s "
            "AND rolled_back IS NULL ORDER BY version DESC",
            (site, skip),
        ).fetchall()
        for (v,) in rows:
            try:
                return self._materialize(conn, site, int(v))
            except ArtifactError as e:
                log.warning("version %s of %r fails (%s); skipping it", v, site, e)
        return self.base

    def change_token(self, site: str = DEFAULT_SITE) -> Any:
        with self._db() as conn:
            row = conn.execute(
                "SELECT version, updated_at FROM current_version WHERE site = %s", (site,)
            ).fetchone()
        return None if row is None else (int(row[0]), row[1].isoformat())

    def _listener(self) -> bool:
        """Whether this process is the one that LISTENs for its state cache folder (the
        processes of one replica share it): an exclusive lock on a file there, held while the
        process lives. Without a writable folder every process listens."""
        if self._listen_lock is not None:
            return True
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            f = open(self.cache / LISTEN_LOCK, "a+")  # noqa: SIM115 - held open while listening
        except OSError:
            return True
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._listen_lock = f
        return True

    def wait_for_change(self, timeout: float) -> None:
        """Block until a NOTIFY on mp2a_versions or `timeout` s (a direct connection of its
        own). A process that does not listen (MP2A_STATE_LISTEN=0, or another process of the
        replica listens) sleeps `timeout`: its watcher polls the change token after each wait."""
        psycopg = _psycopg()
        if not self.listen or not self._listener():
            time.sleep(timeout)
            return
        if self._listen is None or self._listen.closed:
            self._listen = self._new_conn(direct=True)
            self._listen.execute(f"LISTEN {CHANNEL}")
        try:
            for _ in self._listen.notifies(timeout=timeout, stop_after=1):
                pass
        except psycopg.Error as e:
            with contextlib.suppress(Exception):
                self._listen.close()
            self._listen = None
            raise StateError(f"lost the LISTEN connection to {self.where}: {e}") from e

    def publish(
        self,
        head: Head,
        metrics: dict,
        *,
        parent: int,
        prompts: dict[str, np.ndarray] | None,
        decision: dict | None,
        method: str,
        prompt_config: dict | None,
        rows: list[dict] | None,
        record: dict | None = None,
        site: str = DEFAULT_SITE,
    ) -> int:
        base = self.base
        if head.num_classes != len(base.classes) or head.dim != base.backbone.embed_dim:
            raise ArtifactError(
                f"head shape (C={head.num_classes}, D={head.dim}) does not fit {self.run}: it "
                f"has {len(base.classes)} classes and embed_dim {base.backbone.embed_dim}"
            )
        head_bytes = save_tensors_bytes(head.tensors())
        prompt_bytes = (
            None
            if prompts is None
            else save_tensors_bytes({k: np.ascontiguousarray(v) for k, v in prompts.items()})
        )
        metrics_text = _json_text(metrics)
        files = {
            HEAD_FILE: sha256_bytes(head_bytes),
            METRICS_FILE: sha256_bytes(metrics_text.encode()),
            SOURCE_FEATURES_FILE: base.manifest["files"][SOURCE_FEATURES_FILE],
        }
        if prompt_bytes is not None:
            files[PROMPTS_FILE] = sha256_bytes(prompt_bytes)
        with self._db() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO current_version (site, version) VALUES (%s, %s) "
                "ON CONFLICT (site) DO NOTHING",
                (site, BASE_VERSION),
            )
            (served,) = conn.execute(
                "SELECT version FROM current_version WHERE site = %s FOR UPDATE", (site,)
            ).fetchone()
            if int(served) != parent:
                raise StateError(
                    f"site {site!r} serves version {served}, not {parent} as when the run "
                    "started (another publish or a rollback happened): nothing published"
                )
            (top,) = conn.execute(
                "SELECT COALESCE(MAX(version), %s) FROM versions WHERE site = %s",
                (BASE_VERSION, site),
            ).fetchone()
            version = int(top) + 1
            manifest = {
                **base.manifest,
                "format_version": FORMAT_VERSION,
                "version": version,
                "parent_version": parent,
                "created_at": now(),
                "method": method,
                "decision": decision,
                "prompt": None if prompts is None else prompt_config,
                "head_rows": head_rows(head, rows),
                "site": site,
                "files": files,
            }
            conn.execute(
                "INSERT INTO versions (site, version, parent, method, head, head_sha256, "
                "prompts, prompts_sha256, metrics, manifest) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    site, version, parent, method, head_bytes, files[HEAD_FILE], prompt_bytes,
                    files.get(PROMPTS_FILE), metrics_text, _json_text(manifest),
                ),
            )  # fmt: skip
            self._point(conn, site, version)
            if record is not None:
                self._insert_decision(conn, {**record, "version": version}, site)
            self._prune(conn, site, version)
        log.info(
            "published version %s of site %r in %s (parent %s)", version, site, self.where, parent
        )
        return version

    def _point(self, conn: Any, site: str, version: int) -> None:
        conn.execute(
            "UPDATE current_version SET version = %s, updated_at = clock_timestamp() "
            "WHERE site = %s",
            (version, site),
        )
        payload = json.dumps({"site": site, "version": version})
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def _prune(self, conn: Any, site: str, served: int) -> None:
        """Keep the newest MP2A_KEEP_VERSIONS versions of the site, the served one always."""
        keep = keep_versions()
        conn.execute(
            "DELETE FROM versions WHERE site = %s AND version <> %s AND version <= "
            "(SELECT version FROM versions WHERE site = %s ORDER BY version DESC "
            "LIMIT 1 OFFSET %s)",
            (site, served, site, keep),
        )

    def rollback(self, site: str = DEFAULT_SITE) -> int:
        with self._db() as conn, conn.transaction():
            row = conn.execute(
                "SELECT version FROM current_version WHERE site = %s FOR UPDATE", (site,)
            ).fetchone()
            served = BASE_VERSION if row is None else int(row[0])
            if served == BASE_VERSION:
                raise ArtifactError(
                    f"site {site!r} serves version 1, the original artifact: nothing to roll back"
                )
            (parent,) = conn.execute(
                "SELECT parent FROM versions WHERE site = %s AND version = %s", (site, served)
            ).fetchone() or (None,)
            older = [
                int(v)
                for (v,) in conn.execute(
                    "SELECT version FROM versions WHERE site = %s AND version < %s "
                    "AND rolled_back IS NULL ORDER BY version DESC",
                    (site, served),
                )
            ]
            candidates = [int(parent)] if parent is not None else []
            candidates += [v for v in [*older, BASE_VERSION] if v not in candidates]
            for v in candidates:
                try:
                    self._materialize(conn, site, v)
                except ArtifactError as e:
                    log.warning("cannot roll back to version %s (%s)", v, e)
                    continue
                conn.execute(
                    "UPDATE versions SET rolled_back = %s WHERE site = %s AND version = %s",
                    (json.dumps({"at": now(), "to": v}), site, served),
                )
                self._point(conn, site, v)
                log.info("rolled site %r back from version %s to %s", site, served, v)
                return v
        raise ArtifactError(f"site {site!r}: no complete version to roll back to")

    def history(self, site: str = DEFAULT_SITE) -> list[dict]:
        with self._db() as conn:
            served = self._served(conn, site)
            rows = conn.execute(
                "SELECT version, parent, created_at, method, metrics, manifest, rolled_back "
                "FROM versions WHERE site = %s ORDER BY version DESC",
                (site,),
            ).fetchall()
        out = []
        for version, parent, created, method, metrics, manifest, rolled in rows:
            m = json.loads(manifest)
            out.append(
                {
                    "version": int(version),
                    "served": int(version) == served,
                    "complete": True,
                    "parent": parent,
                    "created_at": created.isoformat(timespec="seconds"),
                    "method": method,
                    "metrics": json.loads(metrics),
                    "decision": m.get("decision"),
                    "rolled_back": rolled,
                }
            )
        base = self.base
        out.append(
            {
                "version": BASE_VERSION,
                "served": served == BASE_VERSION,
                "complete": True,
                "parent": None,
                "created_at": base.manifest.get("created_at"),
                "method": base.manifest.get("method"),
                "metrics": base.metrics(),
                "decision": None,
                "rolled_back": None,
            }
        )
        return out

    def ancestors(self, art: Artifact, site: str = DEFAULT_SITE) -> list[int]:
        with self._db() as conn:
            kept = {
                int(v): (None if p is None else int(p))
                for v, p in conn.execute(
                    "SELECT version, parent FROM versions WHERE site = %s", (site,)
                )
            }
        kept[BASE_VERSION] = None
        out: list[int] = []
        parent = art.manifest.get("parent_version")
        while parent is not None and int(parent) in kept and int(parent) not in out:
            out.append(int(parent))
            parent = kept[int(parent)]
        return out

    def _insert_decision(self, conn: Any, entry: dict, site: str) -> None:
        conn.execute(
            "INSERT INTO decisions (site, entry) VALUES (%s, %s)",
            (site, json.dumps({"recorded_at": now(), **entry}, default=str)),
        )
        conn.execute(
            "DELETE FROM decisions WHERE site = %s AND id <= (SELECT id FROM decisions "
            "WHERE site = %s ORDER BY id DESC LIMIT 1 OFFSET %s)",
            (site, site, MAX_DECISIONS),
        )

    def record_decision(self, entry: dict, site: str = DEFAULT_SITE) -> None:
        with self._db() as conn, conn.transaction():
            self._insert_decision(conn, entry, site)

    def decisions(self, limit: int | None = None, site: str = DEFAULT_SITE) -> list[dict]:
        with self._db() as conn:
            rows = conn.execute(
                "SELECT entry FROM decisions WHERE site = %s ORDER BY id DESC LIMIT %s",
                (site, limit if limit is not None else MAX_DECISIONS),
            ).fetchall()
        return [r[0] for r in rows]

    # -- adaptation requests and status ----------------------------------------------------
    def request_adapt(self, req: dict, site: str = DEFAULT_SITE) -> None:
        with self._db() as conn:
            conn.execute(
                "INSERT INTO adapt_requests (id, site, body) VALUES (%s, %s, %s)",
                (req["id"], site, json.dumps(req)),
            )

    def take_request(self) -> dict | None:
        with self._db() as conn:
            row = conn.execute(
                "UPDATE adapt_requests SET taken_at = now(), taken_by = %s WHERE id = ("
                "SELECT id FROM adapt_requests WHERE taken_at IS NULL "
                "ORDER BY requested_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) "
                "RETURNING site, body",
                (f"{socket.gethostname()}:{os.getpid()}",),
            ).fetchone()
        if row is None:
            return None
        site, body = row
        return {**(body if isinstance(body, dict) else {}), "site": site}

    def pending_request(self, site: str = DEFAULT_SITE) -> dict | None:
        with self._db() as conn:
            row = conn.execute(
                "SELECT body FROM adapt_requests WHERE site = %s AND taken_at IS NULL "
                "ORDER BY requested_at, id LIMIT 1",
                (site,),
            ).fetchone()
        return None if row is None else row[0]

    def write_status(self, status: dict, site: str = DEFAULT_SITE) -> None:
        if status.get("state") == "running" and self._lead is not None:
            status = {**status, "leader_pid": self._lead_pid}
        with self._db() as conn:
            conn.execute(
                "INSERT INTO adapt_status (site, status, updated_at) VALUES (%s, %s, now()) "
                "ON CONFLICT (site) DO UPDATE SET status = EXCLUDED.status, "
                "updated_at = EXCLUDED.updated_at",
                (site, json.dumps({**status, "updated_at": now()}, default=str)),
            )

    def _raw_status(self, site: str) -> dict | None:
        with self._db() as conn:
            row = conn.execute(
                "SELECT status FROM adapt_status WHERE site = %s", (site,)
            ).fetchone()
            status = None if row is None else row[0]
            if not isinstance(status, dict) or status.get("state") != "running":
                return status
            pid = status.get("leader_pid")
            if self._lead is not None:  # the lead is one session's: a run of another is over
                alive = pid == self._lead_pid  # (its backend may still be on its way out)
            else:
                alive = (
                    isinstance(pid, int)
                    and conn.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                    ).fetchone()
                    is not None
                )
        if not alive:
            status = {
                **status,
                "stale_reason": (
                    f"the adaptation worker (pid {status.get('pid')} on {status.get('host')}) "
                    "lost its database session during the run (killed or crashed); the served "
                    "version was not changed"
                ),
            }
        return status

    def read_status(self, site: str = DEFAULT_SITE) -> dict | None:
        status = self._raw_status(site)
        if status is not None and "stale_reason" in status:
            reason = status.pop("stale_reason")
            status = {**status, "state": "failed", "reasons": [reason]}
        return status

    def stale_status(self, site: str = DEFAULT_SITE) -> dict | None:
        status = self._raw_status(site)
        return status if status is not None and "stale_reason" in status else None

    # -- traffic ---------------------------------------------------------------------------
    def open_store(self, dim: int, metrics: ServingMetrics | None = None) -> Any:
        env = self.store_env
        if env.get("MP2A_STORE", "").strip().lower() == "off":
            log.info("traffic store disabled (MP2A_STORE=off)")
            return None
        config = StoreConfig.from_env(self.run, dim, env)
        assert config is not None
        return PgTrafficStore(self, config, metrics=metrics)

    def sites(self) -> list[str]:
        """The sites that have a version line or traffic, besides the fleet's own."""
        with self._db() as conn:
            rows = conn.execute(
                "SELECT site FROM current_version WHERE site <> '' UNION "
                "SELECT DISTINCT site FROM traffic_batches"
            ).fetchall()
        return sorted(r[0] for r in rows)

    def ingest(self, upload: Any, site: str) -> int:
        """Store an edge site's upload in one transaction; DuplicateBatch if its batch id was
        stored before. The site's rows are capped like everyone's."""
        from online.store import DuplicateBatch, StoreConfig

        config = StoreConfig.from_env(self.run, upload.embeddings.shape[1], self.store_env)
        assert config is not None
        with self._db() as conn, conn.transaction():
            got = conn.execute(
                "INSERT INTO traffic_batches (site, batch_id, n) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (site, upload.batch_id, len(upload.labels)),
            ).fetchone()
            if got is None:
                raise DuplicateBatch(upload.batch_id)
            cols = "site, t, version, label, confidence, embedding"
            with conn.cursor() as cur, cur.copy(f"COPY traffic ({cols}) FROM STDIN") as copy:
                for e, lab, c, v, t in zip(
                    upload.embeddings, upload.labels, upload.confidences, upload.versions,
                    upload.times, strict=True,
                ):  # fmt: skip
                    row = (site, float(t), v, int(lab), float(c), e.astype("<f4").tobytes())
                    copy.write_row(row)
            retain_traffic(conn, site, config.max_age_s, config.max_rows)
        return len(upload.labels)

    def read_traffic(
        self, limit: int | None, site: str = DEFAULT_SITE, served_by: str | None = None
    ) -> np.ndarray:
        dim = self.base.backbone.embed_dim
        sql = "SELECT embedding FROM traffic WHERE site = %s ORDER BY id DESC LIMIT %s"
        args: list = [site, limit]
        if served_by is not None:  # the window first, then that version's rows in it
            sql = (
                "SELECT embedding FROM (SELECT id, embedding, version FROM traffic WHERE site = %s"
                " ORDER BY id DESC LIMIT %s) w WHERE version = %s ORDER BY id DESC"
            )
            args.append(str(served_by))
        with self._db() as conn:
            rows = conn.execute(sql, args).fetchall()
        blob = b"".join(bytes(r[0]) for r in reversed(rows))
        return np.frombuffer(blob, dtype="<f4").reshape(len(rows), dim).astype(np.float32)

    def traffic_max_id(self, site: str = DEFAULT_SITE) -> int:
        with self._db() as conn:
            (v,) = conn.execute(
                "SELECT COALESCE(MAX(id), 0) FROM traffic WHERE site = %s", (site,)
            ).fetchone()
        return int(v)

    def traffic_count(self, site: str = DEFAULT_SITE) -> int:
        with self._db() as conn:
            (v,) = conn.execute("SELECT COUNT(*) FROM traffic WHERE site = %s", (site,)).fetchone()
        return int(v)

    # -- the one active worker -------------------------------------------------------------
    def try_lead(self) -> bool:
        """A session advisory lock on a connection of its own: held while this process and
        its connection live; a killed leader's lock is released with its connection."""
        psycopg = _psycopg()
        if self._lead is not None:
            try:
                self._lead.execute("SELECT 1")
                return True
            except psycopg.Error:
                log.warning("lost the leader connection to %s", self.where)
                self.release_lead()
                return False
        conn = self._new_conn(direct=True)  # short-lived unless the lock is taken
        try:
            (ok,) = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_KEY,)).fetchone()
        except psycopg.Error as e:
            conn.close()
            raise StateError(f"lost PostgreSQL at {redact(self.direct_dsn)}: {e}") from e
        if not ok:
            with contextlib.suppress(psycopg.Error):
                self.lead_holder = ", ".join(name for _, name in leader_sessions(conn)) or None
            conn.close()
            return False
        self._lead_pid = conn.info.backend_pid  # a direct session: the server's pid
        self._lead = conn
        self._led = True
        return True

    def release_lead(self) -> None:
        """End the lead (its session, and with it the lock); a worker's state also closes its
        pooled connection: a worker that does not lead holds none."""
        if self._lead is not None:
            with contextlib.suppress(Exception):
                self._lead.close()  # the session ends: the advisory lock goes with it
            self._lead = None
        if self._led:
            self._close_pool()


# A batch of samples (and their images, where kept) in one statement: one round trip and its
# own transaction (autocommit). Behind PgBouncer in transaction mode a server connection is
# then held only while PostgreSQL inserts, never across the client's round trips (BEGIN,
# COPY's handshake, COMMIT), which on busy replicas made the whole fleet queue for the pool.
# The ids follow the batch's order; an image row names its sample's id.
INSERT_BATCH = """
WITH b AS MATERIALIZED (
    SELECT nextval(pg_get_serial_sequence('traffic', 'id')) AS id, u.*
    FROM (SELECT * FROM unnest(%s::float8[], %s::text[], %s::int4[], %s::float4[],
                               %s::bytea[], %s::bytea[])
          WITH ORDINALITY AS x (t, version, label, confidence, embedding, image, i)
          ORDER BY x.i) AS u
), rows AS (
    INSERT INTO traffic (id, site, t, version, label, confidence, embedding)
    SELECT id, %s, t, version, label, confidence, embedding FROM b
)
INSERT INTO traffic_images (sample_id, site, data)
SELECT id, %s, image FROM b WHERE image IS NOT NULL
"""

# The fleet's retention slot for a site: a row of mp2a_meta holding the epoch (database clock)
# before which no other pass runs; a replica that moves it forward gets a row back and does
# the pass. One statement: no lock, no transaction held open.
CLAIM_RETENTION = (
    "INSERT INTO mp2a_meta (key, value) VALUES (%s, (extract(epoch FROM now()) + %s)::text) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value "
    "WHERE mp2a_meta.value::float8 <= extract(epoch FROM now()) RETURNING 1"
)


class PgTrafficStore(TrafficStore):
    """The traffic store's queue and writer thread (online/store.py) writing to PostgreSQL:
    each batch in one statement (INSERT_BATCH) on the state's pooled connection (shared with
    reads and status: no connection of its own), per-site retention, and when the database goes
    away the batch is dropped and counted (serving never waits for it) and the next one tries
    again once the pool has a connection."""

    def __init__(
        self,
        state: PgState,
        config: StoreConfig,
        *,
        metrics: ServingMetrics | None = None,
        site: str = DEFAULT_SITE,
        start: bool = True,
    ) -> None:
        self.state, self.site = state, site
        self.committed = 0  # samples whose batch committed (a bench counts them against rows)
        self._next_retention = 0.0
        super().__init__(config, metrics=metrics, start=start)

    def _init_schema(self) -> None:
        """PgState migrated the database already."""

    def _open_writer(self) -> Any:
        return self.state  # the writer borrows the state's pooled connection per batch

    def _close_writer(self, con: Any) -> None:
        """Nothing of its own to close."""

    def _reset_writer(self, con: Any) -> Any:
        return None

    def _writer_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.state_errors.labels(op="traffic").inc()

    def _write(self, con: Any, batch: list[_Sample]) -> bool:
        psycopg = _psycopg()
        try:
            with self.state._db() as conn:  # one statement, its own transaction
                conn.execute(
                    INSERT_BATCH,
                    (
                        [s.t for s in batch],
                        [s.version for s in batch],
                        [s.label for s in batch],
                        [s.confidence for s in batch],
                        [s.embedding for s in batch],
                        [s.image for s in batch],
                        self.site,
                        self.site,
                    ),
                )
            self.committed += len(batch)
            return True
        except (psycopg.Error, StateError) as e:
            log.warning("traffic store (PostgreSQL): dropped %d samples: %s", len(batch), e)
            self._count_dropped(len(batch))
            self._writer_failed()
            return False
        finally:
            for _ in batch:
                self._queue.task_done()

    def _retain_and_publish(self, con: Any) -> bool:
        """The site's caps and its row count, tried every RETENTION_S (jittered) and done by
        one replica of the fleet at a time: the traffic table is the fleet's, so a pass does
        the whole fleet's work, and a pass per replica would grow the database's work with
        the fleet. The replica that claims the site's slot (CLAIM_RETENTION: at most one per
        RETENTION_S / 2) caps the rows and records their count; the others read that count
        (one row by its key) for their gauge."""
        psycopg = _psycopg()
        c, site = self.config, self.site
        if time.monotonic() < self._next_retention:
            return True
        self._next_retention = time.monotonic() + RETENTION_S * random.uniform(0.5, 1.0)
        try:
            with self.state._db() as conn:
                claimed = conn.execute(
                    CLAIM_RETENTION, (f"retention:{site}", RETENTION_S / 2)
                ).fetchone()
                if claimed is None:  # another replica's pass is recent: read its count
                    row = conn.execute(
                        "SELECT value FROM mp2a_meta WHERE key = %s", (f"rows:{site}",)
                    ).fetchone()
                    n = None if row is None else int(row[0])
                else:
                    with conn.transaction(), conn.cursor() as cur:
                        retain_traffic(cur, site, c.max_age_s, c.max_rows)
                        cur.execute(
                            "DELETE FROM traffic_images WHERE site = %s AND sample_id <= "
                            "(SELECT sample_id FROM traffic_images WHERE site = %s ORDER BY "
                            "sample_id DESC LIMIT 1 OFFSET %s)",
                            (site, site, c.max_images),
                        )
                        cur.execute("SELECT COUNT(*) FROM traffic WHERE site = %s", (site,))
                        (n,) = cur.fetchone()
                        cur.execute(
                            "INSERT INTO mp2a_meta (key, value) VALUES (%s, %s) ON CONFLICT "
                            "(key) DO UPDATE SET value = EXCLUDED.value",
                            (f"rows:{site}", str(n)),
                        )
        except (psycopg.Error, StateError) as e:
            log.warning("traffic store (PostgreSQL): retention pass failed: %s", e)
            self._writer_failed()
            return False
        if self.metrics is not None and n is not None:
            self.metrics.traffic_samples.set(n)
        return True

    # -- readers ---------------------------------------------------------------------------
    def count(self) -> int:
        return self.state.traffic_count(self.site)

    def image_count(self) -> int:
        with self.state._db() as conn:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM traffic_images WHERE site = %s", (self.site,)
            ).fetchone()
        return int(n)

    def read(self, limit: int | None = None, since: float | None = None, version=None) -> Traffic:
        where, args = ["site = %s"], [self.site]
        if since is not None:
            where.append("t >= %s")
            args.append(float(since))
        if version is not None:
            where.append("version = %s")
            args.append(str(version))
        sql = "SELECT t, label, confidence, embedding FROM traffic WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT %s"
        args.append(limit)
        with self.state._db() as conn:
            rows = conn.execute(sql, args).fetchall()[::-1]
        d = self.config.dim
        emb = np.frombuffer(b"".join(bytes(r[3]) for r in rows), dtype="<f4").reshape(len(rows), d)
        return Traffic(
            embeddings=emb.astype(np.float32),
            labels=np.array([r[1] for r in rows], dtype=np.int64),
            confidences=np.array([r[2] for r in rows], dtype=np.float32),
            times=np.array([r[0] for r in rows], dtype=np.float64),
        )
