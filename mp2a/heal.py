"""Damaged state heals itself (DESIGN.md §8): a file that fails its check is moved aside under
a timestamped name, a fresh one takes its place, and the loss is counted
(`mp2a_state_healed_total{what}`) and said in one log line.

Moving aside instead of deleting keeps the damaged bytes for whoever wants to look (or salvage
rows with `sqlite3 .recover`); the timestamp keeps several incidents apart. Predictions never
wait on any of this: the traffic store heals in its writer thread, the versions when the watcher
reads them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DAMAGED_INFIX = ".damaged-"
# what SQLite says of a file that is not (or no longer) a database; never "locked", "full",
# "I/O error": those are conditions that pass, and the file is fine
DAMAGE_MARKERS = ("malformed", "not a database", "file is encrypted", "database corrupt")


def is_damage(e: BaseException) -> bool:
    """True for an SQLite error that means the file itself is damaged."""
    return isinstance(e, sqlite3.DatabaseError) and any(m in str(e).lower() for m in DAMAGE_MARKERS)


def count_healed(what: str) -> None:
    """One more `mp2a_state_healed_total{what}` (a process without prometheus_client counts
    nothing: the log line still says it)."""
    try:
        from mp2a.metrics import get_metrics

        get_metrics().state_healed.labels(what=what).inc()
    except Exception as e:  # a metric must never stop the healing
        log.debug("cannot count the healed %s: %s", what, e)


def stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Exclusive across processes: one of several finders of the same damage heals it."""
    with open(path.with_name(path.name + ".heal-lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def sqlite_problem(path: Path) -> str | None:
    """None if `path` passes `PRAGMA quick_check` (or does not exist), else what is wrong."""
    if not Path(path).is_file():
        return None
    try:
        con = sqlite3.connect(path, timeout=30)
        try:
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        return str(e) if is_damage(e) else None  # locked/busy: not a verdict
    answer = "; ".join(str(r[0]) for r in rows[:3])
    return None if answer == "ok" else answer


def quarantine_sqlite(path: Path, what: str, reason: str, seen_inode: int | None = None) -> bool:
    """Move a damaged SQLite file and its -wal/-shm/-journal aside (`NAME.damaged-STAMP`);
    count it and log one line. `seen_inode`: the file the caller found damaged; if another
    process has already replaced it (a different inode now), nothing is moved. Returns True
    when this call moved it."""
    path = Path(path)
    with _lock(path):
        now = inode(path)
        if now is None or (seen_inode is not None and now != seen_inode):
            return False  # healed by someone else meanwhile
        if seen_inode is None and (problem := sqlite_problem(path)) is None:
            return False  # checked again under the lock: fine after all
        reason = reason if seen_inode is not None else (problem or reason)
        aside = path.with_name(path.name + DAMAGED_INFIX + stamp())
        for suffix in ("-wal", "-shm", "-journal", ""):
            src = path.with_name(path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                os.replace(src, aside.with_name(aside.name + suffix))
    count_healed(what)
    log.error(
        "%s %s is damaged (%s): moved aside as %s; a fresh one takes its place, the rows it "
        "held are not used any more",
        what.replace("_", " "),
        path,
        reason,
        aside.name,
    )
    return True
