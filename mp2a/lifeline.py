"""Processes that end with the `mp2a serve` that started them, however it ends.

BentoML runs its HTTP workers in sessions of their own (circus), so a `kill -KILL` of the
`mp2a serve` process group used to leave a worker alive with parent 1, still answering and
holding the port. Two guards, both cheap:

- `die_with_parent`: Linux's parent-death signal (prctl PR_SET_PDEATHSIG): the kernel sends
  the signal the moment the parent exits, even by SIGKILL. Set in every process of the tree
  (the `bentoml serve` child, its workers, the adaptation worker), so the whole tree unwinds
  level by level.
- `watch`: a daemon thread that polls whether the `mp2a serve` process (MP2A_LIFELINE, its
  pid) still lives, for what the signal cannot cover (another OS; a parent thread that ended
  before the process). It stops this process with SIGTERM (a graceful stop, the traffic
  store flushes) and exits hard if that has not ended it after `grace_s`.

Both only act where MP2A_LIFELINE is set, i.e. under `mp2a serve`: a `bentoml serve` started
by hand from a shell is left to its user.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

ENV = "MP2A_LIFELINE"  # pid of the `mp2a serve` process whose death ends this one
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel for `sig` when this process's parent exits. False where unsupported.
    Safe in a `preexec_fn` (no allocation beyond the ctypes call, no locks)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that pid: ours is gone
        return False
    return True


def watch(pid: int, interval_s: float = 0.5, grace_s: float = 3.0) -> threading.Thread:
    """A daemon thread ending this process once `pid` is gone."""

    def run() -> None:
        while alive(pid):
            time.sleep(interval_s)
        log.warning("mp2a serve (pid %d) is gone; stopping this process with it", pid)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    t = threading.Thread(target=run, name="mp2a-lifeline", daemon=True)
    t.start()
    return t


def hold() -> bool:
    """Under `mp2a serve` (MP2A_LIFELINE set): both guards for this process. If the
    supervisor is already gone, stop at once. Returns whether the guards were set."""
    raw = os.environ.get(ENV, "").strip()
    if not raw.isdigit():
        return False
    pid = int(raw)
    if pid == os.getpid():
        return False
    die_with_parent()
    if not alive(pid):  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    watch(pid)
    return True
