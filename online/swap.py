"""Hot swap: every serving worker follows the state's current version.

A small thread per worker waits for a change (`State.wait_for_change`: a LISTEN/NOTIFY wake-up
on PostgreSQL, a sleep of `interval` on files) and compares the state's change token (the
stat of RUN/versions/CURRENT; the current version row) with the last one it saw. On a change
it loads the version the state serves — checksum-verified, off the request path — and hands
it to the predictor's `swap` (serving/predictor.py), a single reference assignment: requests
in flight finish with the head they started with, later ones get the new head, none waits or
fails. A version that fails to load is logged and the served head stays.

When the state cannot be reached (a database restart, a network cut) the watcher keeps the
served head, counts the failure (`mp2a_state_errors_total{op="watch"}`), marks itself
unhealthy for /model and retries with a back-off of `interval` doubling to 10 s. Serving never
depends on it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from mp2a.artifact import Artifact
from mp2a.errors import ArtifactError
from mp2a.metrics import ServingMetrics
from online.state import DEFAULT_SITE, State

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5
MAX_BACKOFF_S = 10.0


class Swappable(Protocol):
    """What the watcher drives: serving/predictor.py's Predictor."""

    @property
    def version(self) -> str: ...

    def swap(self, art: Artifact) -> None: ...


class VersionWatcher:
    """Keeps `predictor` on the version the state serves for `site`."""

    def __init__(
        self,
        state: State,
        predictor: Swappable,
        interval: float = DEFAULT_INTERVAL_S,
        site: str = DEFAULT_SITE,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.state = state
        self.predictor = predictor
        self.interval = interval
        self.site = site
        self.metrics = metrics
        self.healthy = True  # False while the state cannot be reached
        self.swapped_at: float | None = None  # time.time() of the last swap
        self._seen: Any = self._token()
        self._lock = threading.Lock()  # one check at a time (thread and `check` callers)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mp2a-version-watch", daemon=True)

    def _token(self) -> Any:
        try:
            return self.state.change_token(self.site)
        except Exception:  # looked at again by the loop
            return None

    def start(self) -> VersionWatcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        backoff = self.interval
        while not self._stop.is_set():
            try:
                self.state.wait_for_change(self.interval if self.healthy else backoff)
                if self._stop.is_set():
                    break
                self.check()
                if not self.healthy:
                    log.info("state reachable again; serving version %s", self.version)
                self.healthy, backoff = True, self.interval
            except Exception as e:  # the watcher must outlive any surprise; serving goes on
                if self.healthy:
                    log.warning("state unreachable (%s); still serving version %s", e, self.version)
                self.healthy = False
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                if self.metrics is not None:
                    self.metrics.state_errors.labels(op="watch").inc()
                self._stop.wait(backoff)

    @property
    def version(self) -> str:
        return self.predictor.version

    def check(self, force: bool = False) -> bool:
        """Swap if the state's change token moved since the last look (or always with
        `force`); True if the served version changed. Raises when the state is unreachable."""
        with self._lock:
            token = self.state.change_token(self.site)
            if token == self._seen and not force:
                return False
            try:
                art = self.state.load_current(self.site)
            except ArtifactError as e:
                log.error("no servable version (%s); still serving %s", e, self.version)
                self._seen = token
                return False
            self._seen = token
            if str(art.version) == self.predictor.version:
                return False
            try:
                self.predictor.swap(art)
            except ValueError as e:
                log.error("%s; still serving version %s", e, self.version)
                return False
            self.swapped_at = time.time()
            return True
