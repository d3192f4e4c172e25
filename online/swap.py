"""Hot swap: every serving worker follows RUN/versions/CURRENT (mp2a/versions.py).

A small thread per worker looks at CURRENT every `interval` seconds (one `stat`: publish and
rollback replace the file, so its inode and mtime change). On a change it loads the version
CURRENT names — checksum-verified, off the request path — and hands it to the predictor's
`swap` (serving/predictor.py), a single reference assignment: requests in flight finish with
the head they started with, later ones get the new head, none waits or fails. A version that
fails to load is logged and the served head stays.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from mp2a import versions
from mp2a.artifact import Artifact
from mp2a.errors import ArtifactError

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5


class Swappable(Protocol):
    """What the watcher drives: serving/predictor.py's Predictor."""

    @property
    def version(self) -> str: ...

    def swap(self, art: Artifact) -> None: ...


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class VersionWatcher:
    """Keeps `predictor` on the version RUN/versions/CURRENT names."""

    def __init__(
        self, run: Path, predictor: Swappable, interval: float = DEFAULT_INTERVAL_S
    ) -> None:
        self.run = Path(run)
        self.predictor = predictor
        self.interval = interval
        self._seen = _stamp(versions.current_file(self.run))
        self._lock = threading.Lock()  # one check at a time (thread and `check_now` callers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mp2a-version-watch", daemon=True)

    def start(self) -> VersionWatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watcher must outlive any surprise; serving goes on
                log.exception("version check failed; still serving version %s", self.version)

    @property
    def version(self) -> str:
        return self.predictor.version

    def check(self, force: bool = False) -> bool:
        """Swap if CURRENT changed since the last look (or always with `force`); True if the
        served version changed."""
        with self._lock:
            stamp = _stamp(versions.current_file(self.run))
            if stamp == self._seen and not force:
                return False
            self._seen = stamp
            try:
                art = versions.load_current(self.run)
            except ArtifactError as e:
                log.error(
                    "no servable version in %s (%s); still serving %s", self.run, e, self.version
                )
                return False
            if str(art.version) == self.predictor.version:
                return False
            try:
                self.predictor.swap(art)
            except ValueError as e:
                log.error("%s; still serving version %s", e, self.version)
                return False
            return True
