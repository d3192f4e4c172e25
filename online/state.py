"""Where the online loop keeps its state: one interface (`State`), two backends.

- `FileState`, the embedded default (MP2A_STATE unset): everything beside the artifact, one box,
  no database. Versions in RUN/versions (mp2a/versions.py: atomic folders and a CURRENT
  pointer), the traffic store RUN/traffic.sqlite (online/store.py), the worker's status and
  POST /adapt's request as JSON files in RUN/versions, the decision log
  RUN/versions/decisions.jsonl, and a file lock that lets one worker run at a time.
- `PgState` (MP2A_STATE=postgresql://user@host:port/db, online/pg.py): one PostgreSQL for
  every replica and worker of a fleet: traffic, the version registry (head and prompt bytes
  with their sha256), the current-version pointer, decisions, adapt requests and status; a
  publish or a rollback is one transaction announced with NOTIFY; an advisory lock elects the
  one active worker.

Both hand out versions as verified `Artifact`s (a PostgreSQL version is written to a local
cache folder and loaded like any artifact, checksums included), so the predictor, the gate and
the worker do not know which backend they run on. Every call takes a `site`: "" is the
server's own version line; a hub keeps one line per edge site (the edge issue).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mp2a import versions
from mp2a.artifact import Artifact, load_artifact
from mp2a.errors import Mp2aError
from mp2a.head import Head
from mp2a.metrics import ServingMetrics

log = logging.getLogger(__name__)

DEFAULT_SITE = ""
ADAPT_STATUS = "adapt_status.json"
ADAPT_REQUEST = "adapt_request.json"
TAKEN_PREFIX = ".taken-"
WORKER_LOCK = ".worker.lock"
MAX_DECISIONS = versions.MAX_DECISIONS


class StateError(Mp2aError):
    """The state backend cannot be reached or used; the message says what to fix."""


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class State(Protocol):
    """What the server, the watcher and the worker need from where state lives."""

    kind: str  # "files" | "postgresql"
    run: Path  # the base artifact (version 1 of every site)

    def describe(self) -> dict: ...

    # -- versions --------------------------------------------------------------------------
    def load_current(self, site: str = DEFAULT_SITE) -> Artifact: ...

    def change_token(self, site: str = DEFAULT_SITE) -> Any:
        """Cheap: changes whenever a publish or rollback may have changed what is served."""
        ...

    def wait_for_change(self, timeout: float) -> None:
        """Sleep up to `timeout` s; return early when a change is announced."""
        ...

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
        """Version N+1 of `site`, served from now on, `record` logged as its decision, all
        or nothing. Refuses (StateError) when `parent` is no longer the served version."""
        ...

    def rollback(self, site: str = DEFAULT_SITE) -> int: ...

    def history(self, site: str = DEFAULT_SITE) -> list[dict]: ...

    def ancestors(self, art: Artifact, site: str = DEFAULT_SITE) -> list[int]: ...

    def record_decision(self, entry: dict, site: str = DEFAULT_SITE) -> None: ...

    def decisions(self, limit: int | None = None, site: str = DEFAULT_SITE) -> list[dict]: ...

    # -- adaptation requests and status ----------------------------------------------------
    def request_adapt(self, req: dict, site: str = DEFAULT_SITE) -> None: ...

    def take_request(self) -> dict | None:
        """The oldest pending request of any site (with its "site"), taken by this caller."""
        ...

    def pending_request(self, site: str = DEFAULT_SITE) -> dict | None: ...

    def write_status(self, status: dict, site: str = DEFAULT_SITE) -> None: ...

    def read_status(self, site: str = DEFAULT_SITE) -> dict | None:
        """The last status, with a "running" one of a dead worker reported as failed."""
        ...

    def stale_status(self, site: str = DEFAULT_SITE) -> dict | None:
        """The status if it says running but its worker is gone, else None."""
        ...

    # -- traffic ---------------------------------------------------------------------------
    def open_store(self, dim: int, metrics: ServingMetrics | None = None) -> Any: ...

    def read_traffic(
        self, limit: int | None, site: str = DEFAULT_SITE, served_by: str | None = None
    ) -> np.ndarray:
        """The embeddings of `site`'s newest `limit` samples (all if None), oldest first;
        with `served_by`, only those of them that version answered."""
        ...

    def traffic_max_id(self, site: str = DEFAULT_SITE) -> int: ...

    def traffic_count(self, site: str = DEFAULT_SITE) -> int: ...

    def ingest(self, upload: Any, site: str) -> int:
        """Store an edge site's upload atomically; DuplicateBatch for a batch id seen before."""
        ...

    def sites(self) -> list[str]:
        """The sites with a version line or traffic, besides the server's own."""
        ...

    # -- the one active worker -------------------------------------------------------------
    def try_lead(self) -> bool: ...

    def release_lead(self) -> None: ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------ files


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:  # Linux: field 3 of /proc/PID/stat is the state; Z = zombie, X = dead
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def stale_reason(status: dict, leading: bool = False) -> str | None:
    """Why a "running" status is a dead run's leftover, or None: its worker process, on this
    host, no longer exists; or this process holds the lead and the run is not its own (the
    lead is exclusive; the killed holder may not be reaped yet). A status written on another
    host is otherwise never judged from here."""
    if status.get("state") != "running":
        return None
    pid, here = status.get("pid"), status.get("host") == socket.gethostname()
    dead = here and isinstance(pid, int) and pid > 0 and not pid_alive(pid)
    if not dead and not (leading and not (here and pid == os.getpid())):
        return None
    return (
        f"the adaptation worker (pid {pid}) ended during the run (killed or crashed); the "
        "served version was not changed"
    )


def atomic_json(path: Path, obj: dict) -> None:
    """Replace `path` with `obj` as JSON (temp file + fsync + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileState:
    """The embedded default: RUN/versions, RUN/traffic.sqlite and JSON files."""

    kind = "files"

    def __init__(
        self, run: Path | str, store: Path | str | None = None, store_off: bool = False
    ) -> None:
        self.run = Path(run)
        self.store_named = store is not None
        self.store_path = Path(store) if store else self.run / "traffic.sqlite"
        self.store_off = store_off
        self._lead: Any = None
        self.lead_holder: str | None = None  # who leads, as its lock file says (a follower)

    @classmethod
    def from_env(cls, run: Path, environ: Mapping[str, str] | None = None) -> FileState:
        env = os.environ if environ is None else environ
        raw = env.get("MP2A_STORE", "").strip()
        off = raw.lower() == "off"
        return cls(run, None if off or not raw else Path(raw), store_off=off)

    def describe(self) -> dict:
        return {"backend": self.kind, "versions": str(versions.versions_dir(self.run))}

    @staticmethod
    def _check_site(site: str) -> None:
        if site != DEFAULT_SITE:
            from online.hub import check_site

            try:
                check_site(site)
            except ValueError as e:
                raise StateError(str(e)) from None

    def _dir(self, site: str) -> Path:
        self._check_site(site)
        return versions.versions_dir(self.run, site)

    def sites(self) -> list[str]:
        """The sites that have a version line (a hub's), besides the server's own."""
        root = self.run / versions.SITES_DIR
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    # -- versions --------------------------------------------------------------------------
    def load_current(self, site: str = DEFAULT_SITE) -> Artifact:
        self._check_site(site)
        return versions.load_current(self.run, site)

    def change_token(self, site: str = DEFAULT_SITE) -> Any:
        """(inode, mtime, size) of CURRENT: publish and rollback replace the file."""
        try:
            st = os.stat(versions.current_file(self.run, site))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def wait_for_change(self, timeout: float) -> None:
        import time

        time.sleep(timeout)

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
        self._check_site(site)
        version = versions.publish(
            self.run,
            head,
            metrics,
            parent=parent,
            prompts=prompts,
            decision=decision,
            method=method,
            prompt_config=prompt_config,
            rows=rows,
            expect_current=parent,
            site=site,
        )
        if record is not None:
            self.record_decision({**record, "version": version}, site)
        return version

    def rollback(self, site: str = DEFAULT_SITE) -> int:
        self._check_site(site)
        return versions.rollback(self.run, site)

    def history(self, site: str = DEFAULT_SITE) -> list[dict]:
        self._check_site(site)
        return versions.history(self.run, site=site)

    def ancestors(self, art: Artifact, site: str = DEFAULT_SITE) -> list[int]:
        self._check_site(site)
        return versions.ancestors(self.run, art, site)

    def record_decision(self, entry: dict, site: str = DEFAULT_SITE) -> None:
        self._check_site(site)
        versions.record_decision(self.run, entry, site)

    def decisions(self, limit: int | None = None, site: str = DEFAULT_SITE) -> list[dict]:
        self._check_site(site)
        return versions.decisions(self.run, limit, site)

    # -- adaptation requests and status ----------------------------------------------------
    def request_adapt(self, req: dict, site: str = DEFAULT_SITE) -> None:
        atomic_json(self._dir(site) / ADAPT_REQUEST, req)

    def take_request(self) -> dict | None:
        """Consume a site's adapt_request.json if one is present (the server's own line
        first; an atomic rename: one taker wins); its content with its "site", {} for an
        unreadable one, None when there was none."""
        for site in [DEFAULT_SITE, *self.sites()]:
            src = self._dir(site) / ADAPT_REQUEST
            taken = src.with_name(f"{TAKEN_PREFIX}{os.getpid()}-{ADAPT_REQUEST}")
            try:
                os.rename(src, taken)
            except FileNotFoundError:
                continue
            try:
                req = json.loads(taken.read_text())
                req = req if isinstance(req, dict) else {}
            except (OSError, ValueError):
                req = {}
            finally:
                taken.unlink(missing_ok=True)
            return {**req, "site": site}
        return None

    def pending_request(self, site: str = DEFAULT_SITE) -> dict | None:
        try:
            req = json.loads((self._dir(site) / ADAPT_REQUEST).read_text())
        except (OSError, ValueError):
            return None
        return req if isinstance(req, dict) else None

    def write_status(self, status: dict, site: str = DEFAULT_SITE) -> None:
        atomic_json(self._dir(site) / ADAPT_STATUS, {**status, "updated_at": now()})

    def _raw_status(self, site: str) -> dict | None:
        path = self._dir(site) / ADAPT_STATUS
        try:
            status = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return {"state": "unknown", "detail": f"{path} is unreadable: {e}"}
        if not isinstance(status, dict):
            return {"state": "unknown", "detail": f"{path} is not a JSON object"}
        return status

    def read_status(self, site: str = DEFAULT_SITE) -> dict | None:
        status = self._raw_status(site)
        if status is not None and (reason := stale_reason(status, self._lead is not None)):
            status = {**status, "state": "failed", "reasons": [reason]}
        return status

    def stale_status(self, site: str = DEFAULT_SITE) -> dict | None:
        status = self._raw_status(site)
        if status is None or (reason := stale_reason(status, self._lead is not None)) is None:
            return None
        return {**status, "stale_reason": reason}

    # -- traffic ---------------------------------------------------------------------------
    def open_store(self, dim: int, metrics: ServingMetrics | None = None) -> Any:
        """The serving process's SQLite store (online/store.py `open_store`) at this state's
        path; None when collection is off (or the default path is not writable)."""
        from online.store import open_store

        env = dict(os.environ)
        env.pop("MP2A_STORE", None)
        if self.store_off:
            env["MP2A_STORE"] = "off"
        elif self.store_named:
            env["MP2A_STORE"] = str(self.store_path)
        return open_store(self.run, dim, metrics, env)

    def _store(self, dim: int | None = None):
        from online.store import StoreConfig, TrafficStore

        if self.store_off:
            raise StateError("MP2A_STORE=off: no traffic is kept, there is nothing to adapt on")
        if not self.store_path.is_file():
            raise StateError(f"no traffic store at {self.store_path}")
        if dim is None:
            dim = load_artifact(self.run).backbone.embed_dim
        return TrafficStore(StoreConfig(path=self.store_path, dim=dim), start=False)

    def read_traffic(
        self, limit: int | None, site: str = DEFAULT_SITE, served_by: str | None = None
    ) -> np.ndarray:
        self._check_site(site)
        return self._store().read(limit=limit, site=site, served_by=served_by).embeddings

    def _peek(self, sql: str, site: str) -> int:
        from online.store import connect

        if not self.store_path.is_file():
            return 0
        try:
            con = connect(self.store_path)
            try:
                return int(con.execute(sql, (site,)).fetchone()[0])
            finally:
                con.close()
        except Exception as e:  # a store still being created: nothing there yet
            log.debug("cannot read %s: %s", self.store_path, e)
            return 0

    def traffic_max_id(self, site: str = DEFAULT_SITE) -> int:
        return self._peek("SELECT COALESCE(MAX(id), 0) FROM samples WHERE site = ?", site)

    def traffic_count(self, site: str = DEFAULT_SITE) -> int:
        return self._peek("SELECT COUNT(*) FROM samples WHERE site = ?", site)

    def ingest(self, upload: Any, site: str) -> int:
        """Store an edge site's upload (online/hub.py `Upload`); DuplicateBatch if its batch
        id was stored before."""
        from online.store import StoreConfig, TrafficStore

        self._check_site(site)
        if self.store_off:
            raise StateError("MP2A_STORE=off: this hub keeps no traffic")
        config = StoreConfig.from_env(self.run, upload.embeddings.shape[1])
        assert config is not None
        store = TrafficStore(
            StoreConfig(**{**config.__dict__, "path": self.store_path}), start=False
        )
        return store.ingest(
            site, upload.batch_id, upload.embeddings, upload.labels, upload.confidences,
            upload.versions, upload.times,
        )  # fmt: skip

    # -- the one active worker -------------------------------------------------------------
    def try_lead(self) -> bool:
        """An exclusive, non-blocking flock on RUN/versions/.worker.lock, held until
        `release_lead` or the process ends (the kernel drops it on kill -9)."""
        if self._lead is not None:
            return True
        d = versions.versions_dir(self.run)
        d.mkdir(parents=True, exist_ok=True)
        f = open(d / WORKER_LOCK, "a+")  # noqa: SIM115 - held open while leading
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            self.lead_holder = f.read(200).strip() or None
            f.close()
            return False
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")  # for followers' logs
        f.flush()
        self._lead = f
        return True

    def release_lead(self) -> None:
        if self._lead is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lead.fileno(), fcntl.LOCK_UN)
            self._lead.close()
            self._lead = None

    def close(self) -> None:
        self.release_lead()


def open_state(
    run: Path | str, environ: Mapping[str, str] | None = None, *, connect: bool = True
) -> State:
    """The state backend MP2A_STATE names: unset = files beside RUN (the embedded default),
    postgresql://user@host:port/db = PgState. A DSN that does not parse or a database that
    cannot be reached raises StateError with one line that says what to fix."""
    env = os.environ if environ is None else environ
    dsn = env.get("MP2A_STATE", "").strip()
    run = Path(run)
    if not dsn or dsn.lower() == "files":
        return FileState.from_env(run, env)
    if not dsn.startswith(("postgresql://", "postgres://")):
        raise StateError(
            f"MP2A_STATE={dsn!r}: use postgresql://user@host:port/db, or unset it for files "
            "beside the artifact"
        )
    from online.pg import PgState

    return PgState.from_env(run, dsn, env, connect=connect)
